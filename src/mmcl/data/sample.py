"""The one record type every reader produces and every trainer, method and evaluator consumes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

IMAGE_PLACEHOLDER = "<image>"


@dataclass(frozen=True)
class Sample:
    """One visual question with its answer.

    ``prompt`` is the user's text of the final turn with ``<image>`` placeholders where images go
    (LLaVA convention; if the text holds none, the images are put before the text). ``history``
    holds earlier (user, assistant) turns of a multi-turn conversation; during training every
    assistant turn is a target, during evaluation only ``answer`` is generated and scored.
    ``metadata`` carries whatever else the source record held (question type, scene facts).
    """

    id: str
    task: str
    images: tuple[Path, ...]
    prompt: str
    answer: str
    history: tuple[tuple[str, str], ...] = ()
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def reference(self) -> str | list[str]:
        """What a prediction is scored against: ``metadata["answers"]`` when the record lists several
        accepted answers (VQA's ten human answers), else ``answer``."""
        answers = self.metadata.get("answers")
        if isinstance(answers, list) and answers and all(isinstance(a, str) for a in answers):
            return answers
        return self.answer

    def turns(self) -> list[tuple[str, str]]:
        """All (user, assistant) turns, the final one last."""
        return [*self.history, (self.prompt, self.answer)]
