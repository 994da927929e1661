"""Writing synthetic examples to disk: LLaVA JSON + PNG per split, in a cached folder built aside and
renamed into place with ``manifest.json`` written last."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from mmcl.data.sample import IMAGE_PLACEHOLDER
from mmcl.errors import ConfigError, DataError
from mmcl.synthetic.draw import SynthExample, TaskSpec


def write_split(folder: Path, task: str, split: str, examples: Iterable[SynthExample]) -> None:
    """``<folder>/<split>.json`` in LLaVA train or test format and one PNG per example under ``images/``
    (an example without an image is a text-only record: no ``image`` key, no placeholder)."""
    folder.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    for index, example in enumerate(examples, start=1):
        sample_id = f"{task}-{split}-{index:05d}"
        record: dict[str, Any] = {}
        text = example.question
        if example.image is not None:
            (folder / "images").mkdir(exist_ok=True)
            record["image"] = f"images/{sample_id}.png"
            example.image.save(folder / record["image"], format="PNG", compress_level=1)
            text = f"{IMAGE_PLACEHOLDER}\n{text}"
        if split == "train":
            conversation = [{"from": "human", "value": text}, {"from": "gpt", "value": example.answer}]
            record = {"id": sample_id, **record, "conversations": conversation}
        else:
            record = {"question_id": sample_id, **record, "text": text, "answer": example.answer}
        records.append({**record, "qtype": example.qtype, "facts": example.facts})
    lines = ",\n".join(json.dumps(record, ensure_ascii=False) for record in records)  # one record a line
    (folder / f"{split}.json").write_text(f"[\n{lines}\n]\n" if records else "[]\n", encoding="utf-8")


def _read_manifest(root: Path) -> dict[str, Any] | None:
    try:
        manifest = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def write_cached(root: Path, params: dict[str, Any], fill: Callable[[Path], None]) -> Path:
    """Generate into a temp folder beside ``root`` (manifest last) and rename it into place, unless
    ``root`` already holds a manifest with identical ``params``. A different synthetic folder is replaced;
    a non-empty folder that is not one is never touched."""
    root = Path(root).expanduser()
    existing = _read_manifest(root)
    if existing == params:
        return root
    ours = existing is not None and str(existing.get("generator", "")).startswith("synth-")
    if root.exists() and not ours and (not root.is_dir() or any(root.iterdir())):
        raise DataError(f"{root}: exists and holds no synthetic-data manifest.json; refusing to overwrite it")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".tmp", dir=root.parent))
    try:
        fill(tmp)
        (tmp / "manifest.json").write_text(json.dumps(params, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        if _read_manifest(root) == params:  # another process (a sweep's run) finished it meanwhile: keep theirs,
            shutil.rmtree(tmp, ignore_errors=True)  # which it may be reading already
            return root
        old = None
        if root.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".old", dir=root.parent))
            os.replace(root, old / "data")
        try:
            os.rename(tmp, root)
        except OSError:  # another process finished the same folder first
            if _read_manifest(root) != params:
                raise
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def check_sizes(image_size: int, **counts: int) -> None:
    """Refuse (``ConfigError``) an image size below 24 pixels or a negative or non-integer count."""
    if not isinstance(image_size, int) or image_size < 24:
        raise ConfigError(f"synthetic data: image_size must be an integer >= 24, got {image_size!r}")
    for name, value in counts.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"synthetic data: {name} must be a non-negative integer, got {value!r}")


def write_task_stream(
    root: Path, generator: str, version: int, specs: Sequence[TaskSpec],
    examples: Callable[[str, int, int, str, int], Iterable[SynthExample]],
    seed: int, train_per_task: int, test_per_task: int, image_size: int,
) -> Path:
    """A generated stream under ``root``: for every task ``<task>/train.json`` and ``test.json`` from
    ``examples(task, n, seed, split, image_size)``, with the manifest that keys the cache. Cached."""
    check_sizes(image_size, seed=seed, train_per_task=train_per_task, test_per_task=test_per_task)
    params = {
        "generator": generator, "version": version, "seed": seed, "train_per_task": train_per_task,
        "test_per_task": test_per_task, "image_size": image_size, "tasks": [spec.name for spec in specs],
    }  # fmt: skip

    def fill(folder: Path) -> None:
        for spec in specs:
            for split, n in (("train", train_per_task), ("test", test_per_task)):
                write_split(folder / spec.name, spec.name, split, examples(spec.name, n, seed, split, image_size))

    return write_cached(Path(root), params, fill)


__all__ = ["check_sizes", "write_cached", "write_split", "write_task_stream"]
