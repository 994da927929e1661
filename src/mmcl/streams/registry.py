"""Built-in streams. Importing this module registers them."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

from mmcl.streams.stream import StreamSpec, Task, register_stream
from mmcl.errors import ConfigError

# ``seed`` is the data seed, kept apart from the training seed so that seeds of a comparison share one dataset.
SYNTH_DOMAIN_DEFAULTS: dict[str, Any] = {"train_per_task": 300, "test_per_task": 200, "image_size": 48, "seed": 0}


SYNTH_UNIMODAL_DEFAULTS: dict[str, Any] = {"train_per_task": 64, "test_per_task": 100, "image_size": 48, "seed": 0}


# shifted_test 1: MLLM-CL's non-IID test sets; 0: test sets drawn from the training profiles (the gap's baseline).
SYNTH_ABILITY_DEFAULTS: dict[str, Any] = {"train_per_task": 300, "test_per_task": 200, "image_size": 96, "seed": 0,
                                          "shifted_test": 1}
FLAGS = ("shifted_test",)  # options that take 0 or 1


def _synthetic(name: str, defaults: dict[str, Any], options: dict[str, Any], cache: Path, version: int,
               write: Callable[..., Path], specs: Sequence[Any]) -> list[Task]:
    """A generated stream's tasks: options checked against ``defaults``, files written once per setting."""
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ConfigError(f"stream.options: unknown key {unknown[0]!r} for {name} (known: {', '.join(defaults)})")
    settings = {**defaults, **options}
    for key, value in settings.items():
        if key in FLAGS:
            if value not in (0, 1) or isinstance(value, bool):
                raise ConfigError(f"stream.options.{key}: expected 0 or 1, got {value!r}")
        elif not isinstance(value, int) or isinstance(value, bool) or value < (0 if key == "seed" else 1):
            raise ConfigError(f"stream.options.{key}: expected a positive integer, got {value!r}")
    folder = cache / name / (  # keyed by the generator's version too: a new generator never reuses old files
        f"{version}-seed{settings['seed']}-n{settings['train_per_task']}-{settings['test_per_task']}-px{settings['image_size']}"
        + ("-iid-test" if settings.get("shifted_test") == 0 else "")
    )
    root = write(folder, **settings)
    return [
        Task(
            name=spec.name,
            description=spec.description,
            train_file=root / spec.name / "train.json",
            test_file=root / spec.name / "test.json",
            image_root=None,
            scorer=spec.scorer,
            max_new_tokens=spec.max_new_tokens,
        )
        for spec in specs
    ]


def _synth_domain(options: dict[str, Any], cache: Path) -> list[Task]:
    from mmcl.streams.synth import GENERATOR_VERSION, SYNTH_DOMAIN_TASKS, write_synth_domain

    return _synthetic("synth-domain", SYNTH_DOMAIN_DEFAULTS, options, cache, GENERATOR_VERSION, write_synth_domain,
                      SYNTH_DOMAIN_TASKS)


def _synth_unimodal(options: dict[str, Any], cache: Path) -> list[Task]:
    from mmcl.synthetic.unimodal import GENERATOR_VERSION, UNIMODAL_TASKS, write_synth_unimodal

    return _synthetic("synth-unimodal", SYNTH_UNIMODAL_DEFAULTS, options, cache, GENERATOR_VERSION,
                      write_synth_unimodal, UNIMODAL_TASKS)


def _synth_ability(options: dict[str, Any], cache: Path) -> list[Task]:
    from mmcl.synthetic.ability import ABILITY_TASKS, GENERATOR_VERSION, write_synth_ability

    return _synthetic("synth-ability", SYNTH_ABILITY_DEFAULTS, options, cache, GENERATOR_VERSION, write_synth_ability,
                      ABILITY_TASKS)


register_stream(
    StreamSpec(
        name="synth-domain",
        description="Five procedurally drawn domains (aerial map, scan, road, diagram, chart) in MLLM-CL's domain order",
        build=_synth_domain,
        defaults=SYNTH_DOMAIN_DEFAULTS,
    )
)
register_stream(
    StreamSpec(
        name="synth-unimodal",
        description="A language-only task (text-arith, no image) and a vision-only one (image-shapes), for "
                    "CLiMB's unimodal low-shot transfer (evaluation.low_shot.extra_tasks)",
        build=_synth_unimodal,
        defaults=SYNTH_UNIMODAL_DEFAULTS,
    )
)
register_stream(
    StreamSpec(
        name="synth-ability",
        description="Four drawn abilities (OCR, math & logic, visual perception, GUI agent) in MLLM-CL's ability "
                    "order, each tested on renderings, ranges, layouts or labels unseen in training",
        build=_synth_ability,
        defaults=SYNTH_ABILITY_DEFAULTS,
        backbone="tiny-reader",  # 96-pixel images with text: the 48-pixel tiny-llava cannot read them
    )
)

# Readers for published benchmark layouts (each module registers its streams on import).
from mmcl.streams import climb, coin, mllm_cl  # noqa: E402,F401
