"""Built-in streams. Importing this module registers them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmcl.streams.stream import StreamSpec, Task, register_stream
from mmcl.errors import ConfigError

# ``seed`` is the data seed, kept apart from the training seed so that seeds of a comparison share one dataset.
SYNTH_DOMAIN_DEFAULTS: dict[str, Any] = {"train_per_task": 300, "test_per_task": 200, "image_size": 48, "seed": 0}


def _synth_domain(options: dict[str, Any], cache: Path) -> list[Task]:
    from mmcl.streams.synth import GENERATOR_VERSION, SYNTH_DOMAIN_TASKS, write_synth_domain

    unknown = sorted(set(options) - set(SYNTH_DOMAIN_DEFAULTS))
    if unknown:
        raise ConfigError(f"stream.options: unknown key {unknown[0]!r} for synth-domain (known: {', '.join(SYNTH_DOMAIN_DEFAULTS)})")
    settings = {**SYNTH_DOMAIN_DEFAULTS, **options}
    for key, value in settings.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < (0 if key == "seed" else 1):
            raise ConfigError(f"stream.options.{key}: expected a positive integer, got {value!r}")
    folder = cache / "synth-domain" / (  # keyed by the generator's version too: a new generator never reuses old files
        f"{GENERATOR_VERSION}-seed{settings['seed']}-n{settings['train_per_task']}-{settings['test_per_task']}-px{settings['image_size']}"
    )
    root = write_synth_domain(folder, **settings)
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
        for spec in SYNTH_DOMAIN_TASKS
    ]


register_stream(
    StreamSpec(
        name="synth-domain",
        description="Five procedurally drawn domains (aerial map, scan, road, diagram, chart) in MLLM-CL's domain order",
        build=_synth_domain,
        defaults=SYNTH_DOMAIN_DEFAULTS,
    )
)

# Readers for published benchmark layouts (each module registers its streams on import).
from mmcl.streams import climb, coin, mllm_cl  # noqa: E402,F401
