"""The evaluation-protocol interface: one protocol = what is evaluated after each stage, the files it
writes (through :class:`~mmcl.layout.RunLayout`), its part of ``results.json`` and its report section.

The runner walks the rows (row 0 = the base model, row k = after stage k) and, for every enabled
protocol in ``order``, calls :meth:`EvaluationProtocol.evaluate`. ``mmcl report`` and ``compare`` call
:meth:`EvaluationProtocol.collect` to rebuild the protocol's results from its files alone, and
:meth:`EvaluationProtocol.planned_files` to tell a finished run from an unfinished one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, Sequence

from mmcl.layout import RunLayout
from mmcl.registry import Registry

if TYPE_CHECKING:
    from mmcl.data.sample import Sample
    from mmcl.streams.stream import Task

Matrix = list[list[float | None]]


@dataclass(frozen=True)
class Row:
    """One evaluated row: the model after stage ``index`` (0 = the base model), of ``n_tasks`` tasks, having
    learned the first ``seen`` of them; ``name`` is its folder name (``2_med``)."""

    index: int
    name: str
    seen: int
    n_tasks: int


@dataclass(frozen=True)
class RunView:
    """What :meth:`EvaluationProtocol.collect` knows of a run dir: its layout, the task names, the rows (all
    of them, evaluated or not), which rows the method skipped, and the accuracy matrix collected so far."""

    layout: RunLayout
    tasks: list[str]
    rows: list[Row]
    matrix: Matrix = field(default_factory=list)


class RunContext(Protocol):
    """What a protocol may use of the live run (the runner provides it)."""

    layout: RunLayout
    tasks: list["Task"]

    def log(self, message: str) -> None: ...
    def test_samples(self, task: "Task") -> list["Sample"]: ...
    def answers(self, row_index: int, task: "Task", samples: Sequence["Sample"], max_new_tokens: int) -> list[str]: ...
    def evaluate_file(self, row_index: int, task: "Task", samples: list["Sample"], out_file: Path) -> None: ...
    def exists_everywhere(self, path: Path) -> bool: ...
    def is_main(self) -> bool: ...


class EvaluationProtocol(ABC):
    """Base class. A subclass sets the class attributes, takes its settings (an instance of
    ``config_class``, from its config section) in ``__init__`` and implements the four methods."""

    name: ClassVar[str]  # registry key; also its key in results.json's ``protocols`` and in run.json's plan
    folder: ClassVar[str]  # its folder in the run dir
    title: ClassVar[str]  # report section heading
    order: ClassVar[int] = 100  # evaluation order within a row (the matrix first: others read its files)
    config_class: ClassVar[type | None] = None  # its config section (None: none of its own)
    template: ClassVar[str | None] = None  # Jinja2 template of its report section (mmcl/report/templates/)
    part_class: ClassVar[type | None] = None  # the dataclass of its results part (None: plain JSON data)

    def __init__(self, settings: Any = None):
        self.settings = settings

    def enabled(self) -> bool:
        """Whether this run evaluates the protocol at all."""
        return True

    def plan_entry(self) -> Any:
        """What run.json's ``evaluation.planned`` records for this protocol (enough for :meth:`planned_files`)."""
        return self.enabled()

    @abstractmethod
    def planned_files(self, layout: RunLayout, row: Row, tasks: Sequence[str], planned: Any) -> list[Path]:
        """Files a finished run holds for ``row``; ``planned`` = this protocol's stored plan entry."""

    @abstractmethod
    def evaluate(self, run: RunContext, row: Row) -> None:
        """Evaluate after ``row``, writing each file once (skip files that exist)."""

    @abstractmethod
    def collect(self, view: RunView) -> Any | None:
        """This protocol's part of the results, from its files alone (None when it has none)."""

    def metrics(self, part: Any) -> dict[str, float]:
        """Headline numbers of ``part`` that join the run's metrics (e.g. ``general_drop``)."""
        return {}

    def metric_intervals(self, part: Any) -> dict[str, list[float]]:
        """95% intervals ``[low, high]`` of the headline numbers of :meth:`metrics` that have one (see
        :mod:`mmcl.evaluation.uncertainty`), joining results.json's ``metric_intervals``."""
        return {}

    def load_part(self, data: Any) -> Any:
        """``part`` read back from results.json (the inverse of ``dataclasses.asdict``)."""
        return self.part_class(**data) if self.part_class is not None else data


PROTOCOLS: Registry[type[EvaluationProtocol]] = Registry("evaluation protocol")


def register_protocol(cls: type[EvaluationProtocol]) -> type[EvaluationProtocol]:
    """Class decorator: make the protocol known by ``cls.name`` (a taken name is refused)."""
    return PROTOCOLS.register(cls.name, cls)
