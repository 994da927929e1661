"""The over-long sample check, done before any work starts: every training conversation is rendered and
tokenized with its images by the backbone's processor through the same :class:`Backbone` methods that
:meth:`Backbone.encode_for_training` uses (chat messages, chat template, processor), without the model, and
its length is compared with ``backbone.max_length`` as training does. ``mmcl data check`` and ``mmcl run``
both call it."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from mmcl.errors import DataError, MmclError

_PROCESSORS: dict[tuple[str, str], Any] = {}  # (source, options) -> processor: loaded once per process


def _processor(source: str, options: dict[str, Any]):
    import json

    from mmcl.backbones.processors import load_processor

    key = (source, json.dumps(options, sort_keys=True, default=str))
    if key not in _PROCESSORS:
        _PROCESSORS[key] = load_processor(source, options)
    return _PROCESSORS[key]


class LengthChecker:
    """Counts the tokens of a training sample exactly as training does (chat template, images expanded)."""

    def __init__(self, backbone_name: str, max_length: int, processor_options: dict[str, Any] | None = None):
        from mmcl.backbones.backbone import Backbone
        from mmcl.backbones.registry import PRESETS, resolve_source

        source, _ = resolve_source(backbone_name)
        options = {**(PRESETS[backbone_name].processor_options if backbone_name in PRESETS else {}), **(processor_options or {})}
        try:
            processor = _processor(source, options)
        except (OSError, ValueError, KeyError) as exc:
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise MmclError(f"backbone {backbone_name}: cannot load its processor from {source!r} ({first_line})") from None
        if processor.tokenizer.pad_token is None:
            processor.tokenizer.pad_token = processor.tokenizer.eos_token
        self.name = backbone_name
        self.max_length = max_length
        # encode_for_training raises above max_length; here it counts, and the comparison names the record
        self._backbone = Backbone(name=backbone_name, model=None, processor=processor, lora_targets="", max_length=sys.maxsize)

    @property
    def label(self) -> str:
        return f"the {self.name} processor, max_length {self.max_length}"

    def tokens(self, sample) -> int:
        """The length :meth:`Backbone.encode_for_training` compares with max_length: the whole conversation
        rendered with its answers and tokenized with its images (the per-turn prefix renderings it also makes
        only place the labels)."""
        from mmcl.backbones.backbone import build_messages
        from mmcl.data.images import sample_images

        backbone = self._backbone
        text = backbone._render(build_messages(sample, include_final_answer=True), generation_prompt=False)
        return int(backbone._tokenize(text, sample_images(sample))["input_ids"].shape[1])

    def problems(self, task, max_problems: int | None = None) -> list[str]:
        """Training records of ``task`` longer than ``max_length`` tokens, each naming file and record.
        Records that do not parse or whose images do not load are :meth:`Task.problems`' business."""
        from mmcl.data.readers import load_records, parse_train_record

        found: list[str] = []
        path = Path(task.train_file)
        root = task.image_root if task.image_root is not None else path.parent
        try:
            records = load_records(path)
        except DataError:
            return found
        for index, record in enumerate(records):
            where = f"{path}: record {index}"
            try:
                count = self.tokens(parse_train_record(record, task.name, root, where))
            except DataError:
                continue
            if count > self.max_length:
                found.append(f"{where}: {count} tokens exceed backbone.max_length {self.max_length} ({self.label})")
                if max_problems is not None and len(found) >= max_problems:
                    break
        return found


def length_checker(backbone) -> LengthChecker:
    """The checker of an experiment's ``backbone`` settings (:class:`mmcl.config.BackboneConfig`)."""
    return LengthChecker(backbone.name, backbone.max_length, backbone.processor_options)


def check_lengths(tasks, backbone) -> None:
    """Refuse over-long training samples before any work starts: the first, and how many more there are."""
    checker = length_checker(backbone)
    problems = [problem for task in tasks for problem in checker.problems(task)]
    if problems:
        more = f" (and {len(problems) - 1} more; see `mmcl data check`)" if len(problems) > 1 else ""
        raise DataError(problems[0] + more)
