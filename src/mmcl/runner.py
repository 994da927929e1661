"""The continual loop: one stage per task, each saved atomically; evaluations saved per (stage, task);
re-running the same command skips what is done and continues where it stopped. Under ``torchrun``
every process walks the same loop; process 0 alone writes (see :mod:`mmcl.distributed`)."""

from __future__ import annotations

import json
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import yaml
from safetensors.torch import load_file

from mmcl.backbones.backbone import GREEDY_DECODING
from mmcl.backbones.registry import resolve_backbone
from mmcl.data.lengths import check_lengths
from mmcl.streams.stream import Task, build_stream
from mmcl.config import ExperimentConfig, from_dict
from mmcl import errors
from mmcl.errors import ConfigError, DataError, MmclError, RunDirError
from mmcl import distributed
from mmcl.log import info as log_info
from mmcl.evaluation.chance import task_chance
from mmcl.evaluation.evaluator import generate_answers, read_predictions, write_predictions
from mmcl.evaluation.general import general_task
from mmcl.evaluation.superficial import make_probes, probe_tokens, write_judged
from mmcl.fingerprint import FINGERPRINT_FILE, Change, changes, data_fingerprints
from mmcl.lock import LOCK_FILE, RunLock
from mmcl.methods import METHODS, Method
from mmcl.results import (
    BASE_LABEL,
    METHOD_SUMMARY,
    collect_results,
    evaluation_plan,
    general_file,
    judged_file,
    low_shot_file,
    planned_row,
    stage_name,
)
from mmcl.utils import atomic_write_text, save_tensors

Log = Callable[[str], None]
def claim_run_dir(config: ExperimentConfig, overwrite: bool) -> Path:
    """Create the run dir, or reuse it only if it was made by the same config."""
    run_dir = config.run_dir
    config_file = run_dir / "config.yaml"
    if config_file.exists():
        stored = yaml.safe_load(config_file.read_text(encoding="utf-8")) or {}
        same = stored.get("fingerprint") == config.fingerprint()
        if not same and not overwrite:
            raise RunDirError(
                f"{run_dir}: holds a run of a different config; pick another --out or pass --overwrite to replace it"
            )
        if not same:  # everything but the lock this run holds
            for child in run_dir.iterdir():
                if child.name != LOCK_FILE:
                    shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = {"fingerprint": config.fingerprint(), **config.to_dict()}
    atomic_write_text(config_file, yaml.safe_dump(resolved, sort_keys=False))
    return run_dir


def check_tasks(tasks: list[Task], test_only: list[Task] = ()) -> None:
    """Refuse to start on bad data: the first problem, with file and record, and how many more there are."""
    problems = [problem for task in tasks for problem in task.problems()]
    problems += [problem for task in test_only for problem in task.problems(splits=("test",))]
    if problems:
        more = f" (and {len(problems) - 1} more; see `mmcl data check`)" if len(problems) > 1 else ""
        raise DataError(problems[0] + more)


def create_method(config: ExperimentConfig) -> Method:
    method_class = METHODS.lookup(config.method.name, "method.name")
    options = from_dict(method_class.config_class, config.method.options, "method.options")
    return method_class(options, config.lora, config.seed)


def low_shot_samples(task: Task, k: int, seed: int) -> list:
    """``k`` training samples of ``task`` drawn once per seed (the same for every stage)."""
    samples = list(task.train_samples)
    random.Random(f"low-shot/{seed}/{task.name}").shuffle(samples)
    return samples[:k]


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


def write_plan(
    run_dir: Path,
    config: ExperimentConfig,
    method: Method,
    tasks: list[Task],
    stages: list,
    chance: dict[str, float | None],
    general: bool = False,
) -> None:
    evaluation = config.evaluation
    plan = {
        "name": config.name,
        "method": config.method.name,
        "stream": config.stream.name,
        "backbone": config.backbone.name,
        "seed": config.seed,
        "joint": method.trains_jointly,
        "tasks": [
            {"name": t.name, "description": t.description, "scorer": t.scorer, "max_new_tokens": t.max_new_tokens,
             "chance": chance[t.name]}
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
            "planned": {**evaluation_plan(config.to_dict(), general),
                        "skipped_rows": [i for i in range(len(stages) + 1) if not method.evaluates_stage(i, len(stages))]},
        },
    }
    atomic_write_text(run_dir / "run.json", json.dumps(plan, indent=1))


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
        self.log = log if distributed.is_main() else (lambda message: None)
        resolve_backbone(config.backbone.name)  # an unknown name fails here, in seconds, before the run dir exists
        self.tasks = build_stream(config.stream, base_dir)
        self.general = general_task(config.evaluation, config.backbone, config.stream, base_dir)
        check_tasks(self.tasks, test_only=[self.general] if self.general else [])
        check_lengths(self.tasks, config.backbone)  # as `mmcl data check` does; training would refuse them mid-stage
        self.method = create_method(config)
        self.method.log_dir = config.run_dir / "tensorboard" if distributed.is_main() else None
        self.stages = plan_stages(self.method, self.tasks)
        self.run_dir = config.run_dir
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
        self.loaded_stage = 0  # the stage whose weights the model holds (0 = the backbone as loaded)
        self.backbone = None

    # -- the run dir -------------------------------------------------------------------------
    def claim(self, overwrite: bool, recompute_changed: bool) -> None:
        """Process 0: lock the run dir, check its config and data, write the plan; on refusal leave it as it was."""
        self.created_run_dir = not self.run_dir.exists()
        try:
            self.lock = RunLock(self.run_dir).acquire()
            if self.lock.taken_over:
                self.log(f"took over a stale lock on {self.run_dir} ({self.lock.taken_over})")
            claim_run_dir(self.config, overwrite)
            self.reconcile_data(recompute_changed)
            chance = {task.name: task_chance(self.test_samples(task), task.scorer, task.chance) for task in self.tasks}
            write_plan(self.run_dir, self.config, self.method, self.tasks, self.stages, chance, self.general is not None)
        except BaseException:
            self.abandon()
            raise

    def reconcile_data(self, recompute_changed: bool) -> None:
        """Compare the data with the fingerprints the run dir recorded (``data.json``); refuse on a change,
        or with ``recompute_changed`` delete exactly the stages and evaluations that depend on it. A run dir
        from before fingerprints were recorded gets the current data's fingerprints (trusted on first use)."""
        current = data_fingerprints(self.tasks, self.general)
        stored_file = self.run_dir / FINGERPRINT_FILE
        try:
            stored = json.loads(stored_file.read_text(encoding="utf-8")) if stored_file.is_file() else None
            if stored is not None and not isinstance(stored, dict):
                raise ValueError(f"expected an object, found {type(stored).__name__}")
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise RunDirError(
                f"{stored_file}: unreadable data fingerprints ({exc}); delete it to trust the current data, "
                "or use another --out"
            ) from None
        if stored is None and (self.run_dir / "run.json").exists():
            self.log(f"{self.run_dir}: made before data fingerprints were recorded; recording the current data's "
                     f"(results computed earlier are taken to come from it)")
        found = changes(stored, current) if stored is not None else []
        if found and not recompute_changed:
            more = f" (and {len(found) - 1} more file(s))" if len(found) > 1 else ""
            raise RunDirError(
                f"{self.run_dir}: data changed since its results were computed: {found[0].describe()}{more}; "
                "pass --recompute-changed to redo what depends on it, or use another --out"
            )
        if found:
            stale = self.stale_outputs(found)
            for change in found:
                self.log(f"data changed: {change.describe()}")
            self.log(f"recomputing what depends on it: {sum(1 for p in stale if p.parent.name == 'stages')} stage(s), "
                     f"{sum(1 for p in stale if p.parent.name != 'stages')} evaluation file(s)/folder(s)")
            self.prune_method_summary(found)
            for path in stale:
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
            (self.run_dir / "results.json").unlink(missing_ok=True)
        atomic_write_text(stored_file, json.dumps(current, indent=1))

    def stale_outputs(self, found: list[Change]) -> list[Path]:
        """Existing stage dirs and evaluation files that depend on the changed files: a changed train file of
        a task invalidates the stage training it, every later stage and their rows (and low-shot files of
        the task, whose shots it holds); a changed test file, every evaluation of that task in every row;
        a changed general set, every general file."""
        train = {change.task for change in found if change.split == "train"}
        test = {change.task for change in found if change.split == "test"}
        general = any(change.task is None for change in found)
        first = next(
            (index for index, (_, stage_tasks) in enumerate(self.stages, start=1) if train & {t.name for t in stage_tasks}),
            len(self.stages) + 1,
        )
        stale: list[Path] = []
        for index in range(first, len(self.stages) + 1):
            final = self.stage_dir(index)
            stale += [final, final.with_name(f".tmp_{final.name}")]
        labels = [BASE_LABEL, *(label for label, _ in self.stages)]
        for row_index, label in enumerate(labels):
            row = stage_name(row_index, label)
            if row_index >= first:
                stale += [self.run_dir / "predictions" / row, general_file(self.run_dir, row)]
                stale += [judged_file(self.run_dir, row, "x").parent, low_shot_file(self.run_dir, row, "x").parent]
                continue
            for task in self.tasks:
                if task.name in test:
                    stale += [self.prediction_file(row, task), judged_file(self.run_dir, row, task.name)]
                if task.name in test or task.name in train:
                    stale.append(low_shot_file(self.run_dir, row, task.name))
            if general:
                stale.append(general_file(self.run_dir, row))
        return [path for path in stale if path.exists()]

    def prune_method_summary(self, found: list[Change]) -> None:
        """Drop the method's evaluation facts of the evaluations that are redone, so a resumed method does
        not add new counts to stale ones. Summaries laid out as ``stages -> row label -> tasks -> task``
        (MR-LoRA's routing) lose exactly those entries; any other layout is kept as it is."""
        file = self.run_dir / METHOD_SUMMARY
        if not file.is_file():
            return
        try:
            stored = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            return  # unreadable: the next evaluation rewrites it
        summary = stored.get("summary") if isinstance(stored, dict) else None
        rows = summary.get("stages") if isinstance(summary, dict) else None
        if not isinstance(rows, dict):
            return
        stale = {path.relative_to(self.run_dir).parts for path in self.stale_outputs(found)}
        for row, entry in list(rows.items()):
            if ("predictions", row) in stale or any(parts[0] == "stages" and parts[1] == row for parts in stale):
                del rows[row]
            elif isinstance(entry, dict) and isinstance(entry.get("tasks"), dict):
                for task in list(entry["tasks"]):
                    if ("predictions", row, f"{task}.jsonl") in stale:
                        del entry["tasks"][task]
        atomic_write_text(file, json.dumps(stored, indent=1))

    def holds_results(self) -> bool:
        """Whether the run dir holds a finished stage or evaluation file."""
        stages = self.run_dir / "stages"
        if stages.is_dir() and any(not p.name.startswith(".") for p in stages.iterdir()):
            return True
        return any(
            (self.run_dir / folder).is_dir() and any((self.run_dir / folder).rglob("*.jsonl"))
            for folder in ("predictions", "general", "superficial", "low_shot")
        )

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

    # -- paths -----------------------------------------------------------------------------
    def stage_dir(self, index: int) -> Path:
        return self.run_dir / "stages" / stage_name(index, self.stages[index - 1][0])

    def prediction_file(self, row_label: str, task: Task) -> Path:
        return self.run_dir / "predictions" / row_label / f"{task.name}.jsonl"

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
            self.method.setup(self.backbone, self.tasks)

    def ensure_stage_loaded(self, index: int) -> None:
        self.ensure_backbone()
        if self.loaded_stage == index:
            return
        stage_dir = self.stage_dir(index)
        self.method.load_state_json(json.loads((stage_dir / "state.json").read_text(encoding="utf-8")))
        weights = stage_dir / "state.safetensors"
        self.method.load_state_tensors(load_file(str(weights)) if weights.exists() else {})
        summary_file = self.run_dir / METHOD_SUMMARY
        if summary_file.exists():
            self.method.load_evaluation_summary(json.loads(summary_file.read_text(encoding="utf-8"))["summary"])
        self.loaded_stage = index

    def train_stage(self, index: int) -> None:
        label, stage_tasks = self.stages[index - 1]
        final_dir = self.stage_dir(index)
        work_dir = final_dir.with_name(f".tmp_{final_dir.name}")
        if distributed.is_main():
            shutil.rmtree(work_dir, ignore_errors=True)
        distributed.barrier()
        work_dir.mkdir(parents=True, exist_ok=True)
        if index > 1:
            self.ensure_stage_loaded(index - 1)
        self.ensure_backbone()
        started = time.perf_counter()
        samples = []
        for task in stage_tasks:
            position = self.tasks.index(task)
            self.method.before_task(position, task)
            samples.extend(self.method.train_data(position, task, task.train_samples))
        self.log(f"stage {index}/{len(self.stages)} [{label}]: training on {len(samples)} samples")
        metrics = self.method.train(samples, self.config.training, work_dir / "trainer", seed=self.config.seed + index)
        for task in stage_tasks:
            self.method.after_task(self.tasks.index(task), task)
        seconds = time.perf_counter() - started
        self.loaded_stage = index
        if distributed.is_main():
            self.save_stage(work_dir, final_dir, label, len(samples), seconds, metrics)
        distributed.barrier()
        self.log(f"stage {index} [{label}] done in {seconds:.1f}s, loss {metrics.get('train_loss', float('nan')):.3f}")

    def save_stage(self, work_dir: Path, final_dir: Path, label: str, n_samples: int, seconds: float, metrics: dict) -> None:
        shutil.rmtree(work_dir / "trainer", ignore_errors=True)
        save_tensors(self.method.state_tensors(), work_dir / "state.safetensors")
        atomic_write_text(work_dir / "state.json", json.dumps(self.method.state_json()))
        info = {
            "label": label,
            "train_samples": n_samples,
            "seconds": round(seconds, 3),
            "trainable_parameters": self.method.trainable_parameters(),
            "train_metrics": metrics,
        }
        atomic_write_text(work_dir / "stage.json", json.dumps(info, indent=1))
        work_dir.replace(final_dir)

    def evaluate_row(self, row_index: int, row_label: str, tasks: list[Task]) -> None:
        """Row ``row_index`` of the matrix for ``tasks``, then the general set and, if on, the probes of
        the tasks seen so far; each file is written once and skipped when it exists."""
        evaluation = self.config.evaluation
        plan = planned_row(
            row_index, len(self.tasks), self.method.trains_jointly, evaluation.forward_transfer,
            self.general is not None, evaluation.superficial, evaluation.low_shot,
        )  # fmt: skip
        for task in tasks:
            self.evaluate_file(row_index, task, self.test_samples(task), self.prediction_file(row_label, task))
        if plan["general"]:
            file = general_file(self.run_dir, row_label)
            self.evaluate_file(row_index, self.general, self.test_samples(self.general), file)
        for position in plan["superficial"]:
            self.evaluate_probes(row_index, row_label, self.tasks[position])
        for position in plan["low_shot"]:
            self.evaluate_low_shot(row_index, row_label, self.tasks[position])

    def test_samples(self, task: Task) -> list:
        evaluation = self.config.evaluation
        return limited(task.test_samples, evaluation.limit, evaluation.limit_selection, evaluation.limit_seed, task.name)

    def seen_tasks(self, row_index: int) -> int:
        """How many tasks of the stream the model has been trained on after stage ``row_index``."""
        return len(self.tasks) if self.method.trains_jointly else row_index

    def generator(self, row_index: int, task: Task):
        if row_index == 0:
            return self.backbone.generate
        return lambda batch, tokens: self.method.generate(batch, task, tokens)

    def answers(self, row_index: int, task: Task, samples: list, max_new_tokens: int) -> list[str]:
        """Answers of the model after stage ``row_index`` (sharded over processes, gathered on all)."""
        self.ensure_stage_loaded(row_index)
        part = generate_answers(
            self.generator(row_index, task), distributed.shard(samples), max_new_tokens, self.config.evaluation.batch_size
        )
        return distributed.gather_shards(part, len(samples))

    def evaluate_file(self, row_index: int, task: Task, samples: list, out_file: Path) -> None:
        if distributed.agree(out_file.exists()):
            return
        started = time.perf_counter()
        answers = self.answers(row_index, task, samples, self.config.evaluation.max_new_tokens or task.max_new_tokens)
        if distributed.is_main():
            score = write_predictions(out_file, samples, answers, task.scorer, time.perf_counter() - started)
            self.log(f"  eval [{out_file.parent.name}] {task.name}: {score:.1f}")
            if row_index > 0:
                self.save_method_summary()

    def evaluate_probes(self, row_index: int, row_label: str, task: Task) -> None:
        """The seen task's questions asked in another answer style; format and content judged apart."""
        out_file = judged_file(self.run_dir, row_label, task.name)
        if distributed.agree(out_file.exists()):
            return
        samples = self.test_samples(task)
        probes = make_probes(samples, task.name)
        answers = self.answers(row_index, task, probes, probe_tokens(probes))
        if distributed.is_main():
            originals = read_predictions(self.prediction_file(row_label, task))
            write_judged(out_file, samples, probes, originals, answers)
            self.log(f"  probe [{row_label}] {task.name}: judged {len(probes)} answers in another format")

    def evaluate_low_shot(self, row_index: int, row_label: str, task: Task) -> None:
        """CLiMB's low-shot transfer: fine-tune the model after stage ``row_index`` on ``low_shot``
        training samples of the unseen ``task`` (plain SFT of whatever the method trains), evaluate
        it on the task, then restore the stage's state; the same samples for every stage."""
        out_file = low_shot_file(self.run_dir, row_label, task.name)
        if distributed.agree(out_file.exists()):
            return
        from mmcl.training.sft import train_on_samples

        self.ensure_stage_loaded(row_index)
        tensors = {name: tensor.detach().clone() for name, tensor in self.method.state_tensors().items()}
        state = json.loads(json.dumps(self.method.state_json()))
        shots = low_shot_samples(task, self.config.evaluation.low_shot, self.config.seed)
        with tempfile.TemporaryDirectory(prefix="mmcl-low-shot-") as work:
            train_on_samples(self.backbone, shots, self.config.training, Path(work), seed=self.config.seed)
        samples = self.test_samples(task)
        started = time.perf_counter()
        answers = self.answers(row_index, task, samples, self.config.evaluation.max_new_tokens or task.max_new_tokens)
        self.method.load_state_json(state)
        self.method.load_state_tensors(tensors)
        if distributed.is_main():
            score = write_predictions(out_file, samples, answers, task.scorer, time.perf_counter() - started)
            self.log(f"  low-shot [{row_label}] {task.name} after {len(shots)} samples: {score:.1f}")

    def save_method_summary(self) -> None:
        summary = self.method.evaluation_summary()
        if summary is not None:
            stored = {"summary": summary, "sections": self.method.report_sections()}
            atomic_write_text(self.run_dir / METHOD_SUMMARY, json.dumps(stored, indent=1))

    def run(self) -> dict[str, Any]:
        """Train and evaluate what is missing, then write ``results.json``; the run-dir lock is released at
        the end, also on errors and Ctrl-C, and a run dir this invocation created is removed again when it
        fails before anything was computed in it."""
        try:
            return self._run()
        except BaseException:
            self.abandon()
            raise
        finally:
            self.release()

    def _run(self) -> dict[str, Any]:
        started = time.perf_counter()
        if self.config.evaluation.evaluate_base:
            self.evaluate_row(0, stage_name(0, BASE_LABEL), self.tasks)
        for index in range(1, len(self.stages) + 1):
            if not distributed.agree(self.stage_dir(index).exists()):
                self.train_stage(index)
            else:
                self.log(f"stage {index}/{len(self.stages)} [{self.stages[index - 1][0]}]: done earlier, skipped")
            if not self.method.evaluates_stage(index, len(self.stages)):
                self.log(f"stage {index}: not evaluated ({self.config.method.name} defines no model at this stage)")
                continue
            seen = len(self.tasks) if self.config.evaluation.forward_transfer else self.seen_tasks(index)
            self.evaluate_row(index, stage_name(index, self.stages[index - 1][0]), self.tasks[:seen])
        distributed.barrier()
        if not distributed.is_main():
            return {}
        results = collect_results(self.run_dir)
        results["last_session_seconds"] = round(time.perf_counter() - started, 3)
        atomic_write_text(self.run_dir / "results.json", json.dumps(results, indent=1))
        return results
