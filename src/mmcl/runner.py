"""The continual loop: one stage per task, each saved atomically; evaluations saved per (stage, task);
re-running the same command skips what is done and continues where it stopped. Under ``torchrun``
every process walks the same loop; process 0 alone writes (see :mod:`mmcl.distributed`)."""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from safetensors.torch import load_file

from mmcl.backbones.backbone import GREEDY_DECODING
from mmcl.backbones.registry import resolve_backbone
from mmcl.data.lengths import check_lengths
from mmcl.determinism import check_pinned
from mmcl.environment import environment_record
from mmcl.streams.stream import Task, build_stream
from mmcl.config import ExperimentConfig, from_dict
from mmcl import errors
from mmcl.errors import ConfigError, DataError, MmclError, RunDirError
from mmcl import distributed
from mmcl.log import info as log_info
from mmcl.evaluation.chance import task_chance
from mmcl.evaluation.evaluator import generate_answers, write_predictions
from mmcl.evaluation.general import general_task
from mmcl.evaluation.input_cache import InputCache
from mmcl.evaluation.protocols import PROTOCOLS, EvaluationProtocol, Row
from mmcl.evaluation.protocols.general import GeneralAbility
from mmcl.evaluation.protocols.low_shot import LowShotTransfer
from mmcl.evaluation.protocols.matrix import AccuracyMatrix
from mmcl.evaluation.protocols.superficial import SuperficialProbes
from mmcl.layout import RunLayout, row_name
from mmcl.lock import RunLock
from mmcl.methods import METHODS, Method
from mmcl.run_dir import claim_run_dir, reconcile_data
from mmcl.results import Results, collect_results, record_session, run_rows, write_results
from mmcl.utils import atomic_write_text, save_tensors

Log = Callable[[str], None]
def check_tasks(tasks: list[Task], test_only: list[Task] = ()) -> None:
    """Refuse to start on bad data: the first problem, with file and record, and how many more there are."""
    problems = [problem for task in tasks for problem in task.problems()]
    problems += [problem for task in test_only for problem in task.problems(splits=("test",))]
    if problems:
        more = f" (and {len(problems) - 1} more; see `mmcl data check`)" if len(problems) > 1 else ""
        raise DataError(problems[0] + more)


def low_shot_extra_tasks(config: ExperimentConfig, tasks: list[Task], base_dir: Path) -> list[Task]:
    """The tasks of ``evaluation.low_shot.extra_tasks`` (none when unset); their names must not be the stream's."""
    extra = config.evaluation.low_shot.extra_tasks
    if extra is None:
        return []
    built = build_stream(extra, base_dir)
    clash = sorted({task.name for task in built} & {task.name for task in tasks})
    if clash:
        raise ConfigError(f"evaluation.low_shot.extra_tasks: task {clash[0]!r} is also a task of the stream; "
                          "rename one (low-shot files are named by task)")
    return built


def create_method(config: ExperimentConfig) -> Method:
    method_class = METHODS.lookup(config.method.name, "method.name")
    options = from_dict(method_class.config_class, config.method.options, "method.options")
    return method_class(options, config.lora, config.seed)


def plan_stages(method: Method, tasks: list[Task]) -> list[tuple[str, list[Task]]]:
    """(label, tasks trained in that stage) for every stage."""
    if method.trains_jointly:
        return [("joint", tasks)]
    return [(task.name, [task]) for task in tasks]


def limited(samples: list, limit: int | None, selection: str, seed: int, task_name: str) -> list:
    """At most ``limit`` of ``samples``: the first ones, or (``random``) a subset drawn with a generator
    seeded by ``seed`` and the task name alone, the same for every stage and run seed, kept in file order."""
    if not limit or limit >= len(samples):
        return list(samples)
    if selection == "first":
        return list(samples[:limit])
    chosen = sorted(random.Random(f"limit/{seed}/{task_name}").sample(range(len(samples)), limit))
    return [samples[index] for index in chosen]


def build_protocols(config: ExperimentConfig, general: Task | None,
                    low_shot_extra: Sequence[Task] = ()) -> list[EvaluationProtocol]:
    """The evaluation protocols of this run, enabled or not, in evaluation order: the built-ins from their
    config sections, then each plugin protocol named in ``evaluation.protocols`` (its section checked
    against its config class). ``low_shot_extra``: the built tasks of ``evaluation.low_shot.extra_tasks``."""
    evaluation = config.evaluation
    protocols: list[EvaluationProtocol] = [
        AccuracyMatrix(evaluation.forward_transfer),
        GeneralAbility(evaluation.general, general),
        SuperficialProbes(evaluation.superficial),
        LowShotTransfer(evaluation.low_shot, low_shot_extra),
    ]
    builtin = {type(protocol) for protocol in protocols}
    for name, section in evaluation.protocols.items():
        protocol_class = PROTOCOLS.lookup(name, f"evaluation.protocols.{name}")
        if protocol_class in builtin:
            raise ConfigError(f"evaluation.protocols.{name}: a built-in protocol; set evaluation.{name} instead")
        settings = from_dict(protocol_class.config_class, section, f"evaluation.protocols.{name}") \
            if protocol_class.config_class else None
        protocols.append(protocol_class(settings))
    return sorted(protocols, key=lambda protocol: protocol.order)


def write_plan(
    layout: RunLayout,
    config: ExperimentConfig,
    method: Method,
    tasks: list[Task],
    stages: list,
    test_counts: dict[str, int],
    chance: dict[str, float | None],
    protocols: list[EvaluationProtocol],
) -> None:
    evaluation = config.evaluation
    planned: dict[str, Any] = {"evaluate_base": evaluation.evaluate_base}
    for protocol in protocols:
        planned.update(protocol.plan_entry())
    plan = {
        "name": config.name,
        "method": config.method.name,
        "stream": config.stream.name,
        "backbone": config.backbone.name,
        "seed": config.seed,
        "joint": method.trains_jointly,
        "reference": method.reference,
        "tasks": [
            {"name": t.name, "description": t.description, "scorer": t.scorer, "max_new_tokens": t.max_new_tokens,
             "chance": chance[t.name], "train_samples": len(t.train_samples), "test_samples": test_counts[t.name]}
            for t in tasks
        ],  # fmt: skip
        "stages": [label for label, _ in stages],
        "evaluation": {
            "limit": evaluation.limit,
            "limit_selection": evaluation.limit_selection if evaluation.limit else None,
            "limit_seed": evaluation.limit_seed if evaluation.limit and evaluation.limit_selection == "random" else None,
            "max_new_tokens": evaluation.max_new_tokens,
            "batch_size": evaluation.batch_size,
            "decoding": dict(GREEDY_DECODING),  # plus each task's max_new_tokens (tasks above) unless overridden
            # which evaluations a finished run holds; rows the method defines no model for are skipped
            "planned": {**planned,
                        "skipped_rows": [i for i in range(len(stages) + 1) if not method.evaluates_stage(i, len(stages))]},
        },
    }
    atomic_write_text(layout.plan_file, json.dumps(plan, indent=1))


class ContinualRun:
    """Drives one experiment in its run directory."""

    def __init__(
        self,
        config: ExperimentConfig,
        base_dir: Path,
        overwrite: bool = False,
        log: Log = log_info,
        recompute_changed: bool = False,
    ):
        self.config = config
        self.base_dir = base_dir
        if config.deterministic:
            check_pinned(config.deterministic_isa)
        self.log = log if distributed.is_main() else (lambda message: None)
        resolve_backbone(config.backbone.name)  # an unknown name fails here, in seconds, before the run dir exists
        self.tasks = build_stream(config.stream, base_dir)
        self.general = general_task(config.evaluation, config.backbone, config.stream, base_dir)
        self.low_shot_extra = low_shot_extra_tasks(config, self.tasks, base_dir)
        check_tasks(self.tasks + self.low_shot_extra, test_only=[self.general] if self.general else [])
        # as `mmcl data check` does; training would refuse them mid-stage
        check_lengths(self.tasks + self.low_shot_extra, config.backbone)
        self.method = create_method(config)
        self.method.log_dir = RunLayout(config.run_dir).tensorboard_dir if distributed.is_main() else None
        self.stages = plan_stages(self.method, self.tasks)
        self.protocols = build_protocols(config, self.general, self.low_shot_extra)
        self.run_dir = config.run_dir
        self.layout = RunLayout(self.run_dir)
        self.rows = run_rows([task.name for task in self.tasks], [label for label, _ in self.stages],
                             self.method.trains_jointly)
        self.lock: RunLock | None = None
        self.created_run_dir = False  # made by this invocation: removed again if it fails before computing anything
        refusal = None
        if distributed.is_main():
            try:
                self.claim(overwrite, recompute_changed)
            except MmclError as exc:  # told to every process, so all of them stop with the same error
                refusal = [type(exc).__name__, str(exc)]
        refusal = distributed.agree(refusal)
        if refusal is not None:
            error_class = getattr(errors, refusal[0], RunDirError)
            raise error_class(refusal[1])
        self.session_recorded = False
        self.loaded_stage = 0  # the stage whose weights the model holds (0 = the backbone as loaded)
        self.backbone = None
        cache_mb = config.evaluation.input_cache_mb
        self.input_cache = InputCache(cache_mb * 2**20) if cache_mb else None  # processed test batches
        self.length_orders: dict[tuple[str, ...], list[int]] = {}  # sample ids -> generation order

    # -- the run dir -------------------------------------------------------------------------
    def claim(self, overwrite: bool, recompute_changed: bool) -> None:
        """Process 0: lock the run dir, check its config and data, write the plan; on refusal leave it as it was."""
        self.created_run_dir = not self.run_dir.exists()
        try:
            self.lock = RunLock(self.run_dir).acquire()
            if self.lock.taken_over:
                self.log(f"took over a stale lock on {self.run_dir} ({self.lock.taken_over})")
            claim_run_dir(self.config, overwrite, self.base_dir)
            reconcile_data(self.layout, self.tasks + self.low_shot_extra, self.general, self.stages, self.rows,
                           self.protocols,
                           recompute_changed, self.log)
            tests = {task.name: self.test_samples(task) for task in self.tasks}
            chance = {task.name: task_chance(tests[task.name], task.scorer, task.chance) for task in self.tasks}
            counts = {name: len(samples) for name, samples in tests.items()}
            write_plan(self.layout, self.config, self.method, self.tasks, self.stages, counts, chance, self.protocols)
        except BaseException:
            self.abandon()
            raise

    def holds_results(self) -> bool:
        """Whether the run dir holds a finished stage or evaluation file."""
        stages = self.layout.stages_dir
        if stages.is_dir() and any(not p.name.startswith(".") for p in stages.iterdir()):
            return True
        folders = [self.layout.protocol_dir(protocol.folder) for protocol in self.protocols]
        return any(folder.is_dir() and any(folder.rglob("*.jsonl")) for folder in folders)

    def abandon(self) -> None:
        """After a failure: remove the run dir if this invocation created it and nothing was computed in it;
        release the lock."""
        if not distributed.is_main():
            return
        if self.created_run_dir and self.run_dir.exists() and not self.holds_results():
            shutil.rmtree(self.run_dir, ignore_errors=True)
        self.release()

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def stage_dir(self, index: int) -> Path:
        return self.layout.stage_dir(index, self.stages[index - 1][0])

    # -- model state -------------------------------------------------------------------------
    def ensure_backbone(self) -> None:
        if self.backbone is None:
            from mmcl.backbones.registry import load_backbone

            settings = self.config.backbone
            self.log(f"loading backbone {settings.name}")
            self.backbone = load_backbone(
                settings.name,
                settings.dtype,
                settings.device,
                settings.max_length,
                load_in_4bit=settings.load_in_4bit,
                processor_options=settings.processor_options,
            )
            self.method.setup(self.backbone)

    def learned_tasks(self, index: int) -> list[Task]:
        """The tasks trained by stage ``index`` (the stage's own included): all the method may see then."""
        return [task for _, stage_tasks in self.stages[:index] for task in stage_tasks]

    def ensure_stage_loaded(self, index: int) -> None:
        self.method.see_tasks(self.learned_tasks(index), len(self.tasks))
        self.ensure_backbone()
        if self.loaded_stage == index:
            return
        weights, state = self.layout.stage_state_files(index, self.stages[index - 1][0])
        self.method.load_state_json(json.loads(state.read_text(encoding="utf-8")))
        self.method.restore_tensors(load_file(str(weights)) if weights.exists() else {})
        summary_file = self.layout.method_summary_file
        if summary_file.exists():
            self.method.load_evaluation_summary(json.loads(summary_file.read_text(encoding="utf-8"))["summary"])
        self.loaded_stage = index

    def train_stage(self, index: int) -> None:
        label, stage_tasks = self.stages[index - 1]
        work_dir = self.layout.stage_work_dir(index, label)
        if distributed.is_main():
            shutil.rmtree(work_dir, ignore_errors=True)
        distributed.barrier()
        work_dir.mkdir(parents=True, exist_ok=True)
        if index > 1:
            self.ensure_stage_loaded(index - 1)
        self.method.see_tasks(self.learned_tasks(index), len(self.tasks))
        self.ensure_backbone()
        started = time.perf_counter()
        samples = []
        for task in stage_tasks:
            position = self.tasks.index(task)
            self.method.before_task(position, task)
            samples.extend(self.method.train_data(position, task, task.train_samples))
        self.log(f"stage {index}/{len(self.stages)} [{label}]: training on {len(samples)} samples")
        self.method.stage_name = row_name(index, label)  # names the stage's training curves (TensorBoard)
        scratch = self.layout.stage_scratch_dir(index, label)
        metrics = self.method.train(samples, self.config.training, scratch, seed=self.config.seed + index)
        for task in stage_tasks:
            self.method.after_task(self.tasks.index(task), task)
        seconds = time.perf_counter() - started
        self.loaded_stage = index
        if distributed.is_main():
            self.save_stage(index, label, len(samples), seconds, metrics)
        distributed.barrier()
        self.log(f"stage {index} [{label}] done in {seconds:.1f}s, loss {metrics.get('train_loss', float('nan')):.3f}")

    def save_stage(self, index: int, label: str, n_samples: int, seconds: float, metrics: dict) -> None:
        shutil.rmtree(self.layout.stage_scratch_dir(index, label), ignore_errors=True)
        tensors_file, state_file = self.layout.stage_state_files(index, label, work=True)
        save_tensors(self.method.saved_tensors(), tensors_file)
        atomic_write_text(state_file, json.dumps(self.method.state_json()))
        info = {
            "label": label,
            "train_samples": n_samples,
            "seconds": round(seconds, 3),
            "trainable_parameters": self.method.trainable_parameters(),
            "train_metrics": metrics,
            "environment": environment_record(self.config.deterministic),
        }
        if torch.cuda.is_available():  # the process's peak so far (with --stop-after-stage: this stage's)
            info["peak_cuda_memory_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        atomic_write_text(self.layout.stage_info_file(index, label, work=True), json.dumps(info, indent=1))
        self.layout.stage_work_dir(index, label).replace(self.layout.stage_dir(index, label))

    def evaluate_row(self, row: Row) -> None:
        """Every enabled protocol after row ``row`` (the matrix first); each file is written once and
        skipped when it exists."""
        for protocol in self.protocols:
            if protocol.enabled():
                protocol.evaluate(self, row)

    # -- what protocols use of the run (mmcl.evaluation.protocols.RunContext) -------------------
    @staticmethod
    def is_main() -> bool:
        return distributed.is_main()

    @staticmethod
    def exists_everywhere(path: Path) -> bool:
        """Whether ``path`` exists, as process 0 sees it (all processes skip or evaluate together)."""
        return distributed.agree(path.exists())

    def test_samples(self, task: Task) -> list:
        evaluation = self.config.evaluation
        return limited(task.test_samples, evaluation.limit, evaluation.limit_selection, evaluation.limit_seed, task.name)

    def generator(self, row_index: int, task: Task):
        if row_index == 0:
            return self.backbone.generate
        return lambda batch, tokens: self.method.generate(batch, task, tokens)

    def answers(self, row_index: int, task: Task, samples: list, max_new_tokens: int) -> list[str]:
        """Answers of the model after stage ``row_index`` (sharded over processes, gathered on all), in the
        order of ``samples``; generated in order of prompt length with ``evaluation.sort_by_length``, and
        from processed batches kept in the run's input cache when the same batch was processed before."""
        self.ensure_stage_loaded(row_index)
        order = self.generation_order(samples)
        ordered = [samples[i] for i in order]
        self.backbone.input_cache = self.input_cache
        try:
            part = generate_answers(
                self.generator(row_index, task), distributed.shard(ordered), max_new_tokens,
                self.config.evaluation.batch_size,
            )
        finally:
            self.backbone.input_cache = None
        answers: list[str] = [""] * len(samples)
        for position, answer in zip(order, distributed.gather_shards(part, len(samples)), strict=True):
            answers[position] = answer
        if distributed.active():
            self.method.sync_evaluation()
        return answers

    def generation_order(self, samples: list) -> list[int]:
        """Positions of ``samples`` in the order they are generated: as given, or by (image count, prompt
        tokens) with ``evaluation.sort_by_length`` (a stable sort: ties keep file order)."""
        if not self.config.evaluation.sort_by_length:
            return list(range(len(samples)))
        key = tuple(sample.id for sample in samples)
        if key not in self.length_orders:
            lengths = [self.backbone.prompt_length(sample) for sample in samples]
            self.length_orders[key] = sorted(range(len(samples)), key=lengths.__getitem__)
        return self.length_orders[key]

    def evaluate_file(self, row_index: int, task: Task, samples: list, out_file: Path) -> None:
        if self.exists_everywhere(out_file):
            return
        started = time.perf_counter()
        answers = self.answers(row_index, task, samples, self.config.evaluation.max_new_tokens or task.max_new_tokens)
        if distributed.is_main():
            score = write_predictions(out_file, samples, answers, task.scorer, time.perf_counter() - started)
            self.log(f"  eval [{out_file.parent.name}] {task.name}: {score:.1f}")
            if row_index > 0:
                self.save_method_summary()

    def save_method_summary(self) -> None:
        summary = self.method.evaluation_summary()
        if summary is not None:
            stored = {"summary": summary, "sections": self.method.report_sections()}
            atomic_write_text(self.layout.method_summary_file, json.dumps(stored, indent=1))

    def run(self, stop_after: int | None = None) -> Results | None:
        """Train and evaluate what is missing (up to stage ``stop_after`` when given), then write
        ``results.json`` (process 0; others return None).
        The session's wall-clock time joins ``sessions.json`` (also when it fails or is interrupted); the
        run-dir lock is released at the end, also on errors and Ctrl-C, and a run dir this invocation
        created is removed again when it fails before anything was computed in it."""
        started = time.perf_counter()
        try:
            return self._run(started, stop_after)
        except BaseException:
            self.record_session(started)
            self.abandon()
            raise
        finally:
            self.release()

    def record_session(self, started: float) -> None:
        """Add this session's wall-clock time to the run dir (once; only where something was computed)."""
        if self.session_recorded or not distributed.is_main():
            return
        self.session_recorded = True
        if self.run_dir.is_dir() and self.holds_results():
            try:
                record_session(self.layout, time.perf_counter() - started)
            except OSError:  # the disk that just failed the run: the time is the one thing lost
                pass

    def _run(self, started: float, stop_after: int | None = None) -> Results | None:
        if self.config.evaluation.evaluate_base:
            self.evaluate_row(self.rows[0])
        last = len(self.stages) if stop_after is None else min(stop_after, len(self.stages))
        for index in range(1, last + 1):
            if not distributed.agree(self.stage_dir(index).exists()):
                self.train_stage(index)
            else:
                self.log(f"stage {index}/{len(self.stages)} [{self.stages[index - 1][0]}]: done earlier, skipped")
            if not self.method.evaluates_stage(index, len(self.stages)):
                self.log(f"stage {index}: not evaluated ({self.config.method.name} defines no model at this stage)")
                continue
            self.evaluate_row(self.rows[index])
        distributed.barrier()
        if not distributed.is_main():
            return None
        self.record_session(started)
        results = collect_results(self.run_dir)
        write_results(self.layout, results)
        return results
