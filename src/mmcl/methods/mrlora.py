"""``mrlora``: MR-LoRA, expert LoRAs with an MLLM-based router (Zhao et al., 2025, "MLLM-CL: Continual
Learning for Multimodal Large Language Models", arXiv:2506.05453).

Training, per task t (1-based):

* an **expert** LoRA, trained fresh from the base model on task t alone (exactly as ``experts``, whose
  adapter handling is inherited: same initialisation and training as the experts of ``experts``);
* a small **routing set**: ``router_samples_per_task`` samples of task t's training set, drawn with a
  seed-determined generator and kept (as ids) in the method state;
* from t = 2 on, the **router** LoRA (adapter ``router``, on the base model, experts switched off) is
  trained further on the routing set of all tasks seen so far. Its prompt asks for the letter only,
  lists the experts as option letters, each with a short description taken from its task's
  description (see ``router_description``), and ends with the user's question (images kept), so the
  letter is read right after the question; the target is the letter of the sample's own expert.
  Training runs in rounds until the router routes its own routing set correctly (at most
  ``router_max_rounds``; misrouted prompts are repeated in the next round): tasks that share their
  images and differ only in the question are otherwise left confused (see ``MrLoraConfig``).

``router_protocol: paper`` follows the MLLM-CL repo instead: one router training after the last task
on the routing sets of every task, and a *generated* router answer (illegal -> random expert); the rows
of the stages before the last are then not evaluated (placeholders, flagged in the routing report).

Two-stage inference (no task identity is used; "per-stage" protocol): (1) one forward pass of base +
router over the router prompts of the whole batch; at the last prompt position the logits of the letter tokens of
the existing experts are compared (constrained choice, no text parsing); (2) the batch is split by
chosen expert and each group is answered by one batched ``generate`` call with its expert active.
The cost is about one extra prompt forward pass per batch, not one generation per expert; the
instruction and expert list, which every router prompt of a batch starts with, are run once per batch
and shared through the key/value cache, so long expert descriptions cost next to nothing at test
time. With a single expert there is nothing to route; with none (an evaluation before the first task
is learned) the base model answers. Test samples of tasks not learned yet (forward-transfer
evaluations) are routed to one of the existing experts, as a deployed MR-LoRA model would do.

Routing statistics are recorded for every evaluated sample (its true task is ``sample.task``, used
for statistics only): per stage and task, how many samples went to each expert (the confusion
matrix), the router accuracy on seen tasks, and, if ``oracle_scores`` is on, the task score with
oracle routing (each sample answered by its own task's expert; an extra generation is only needed
for the misrouted samples) next to the score with the router. See :meth:`MrLora.routing_report`.

PEFT set-up: the experts ``expert_<task>`` and the router are named adapters of one ``PeftModel``;
``set_adapter`` picks the single active (and trainable) one.

The router's options, prompt and routing pass are in :mod:`mmcl.methods.mrlora_router`, the routing
statistics and the report's tables in :mod:`mmcl.methods.mrlora_stats`.
"""

from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from mmcl import distributed
from mmcl.config import TrainingConfig
from mmcl.data.sample import Sample
from mmcl.errors import ConfigError, MmclError
from mmcl.layout import BASE_LABEL, row_name
from mmcl.methods.base import register_method
from mmcl.methods.experts import TaskExperts, adapter_name
from mmcl.methods.lora_utils import (
    adapter_parameter_count,
    adapter_part,
    adapter_tensors,
    ensure_adapter,
    load_adapter_tensors,
    named_adapters_tensors,
)
from mmcl.methods.mrlora_router import (
    BASE_ROUTE,
    LETTERS,
    NOT_EVALUATED,
    ROUTER,
    ROUTER_INIT_SEED_OFFSET,
    ROUTER_ROUND_SEED_STEP,
    ROUTER_TRAIN_SEED_OFFSET,
    MrLoraConfig,
    choose_experts,
    describe,
    first_answer_logits,
    generate_grouped,
    letter_token_ids,
    pick_routing_ids,
    route_by_generation,
    router_prompt,
    routing_set_pairs,
)
from mmcl.methods.mrlora_stats import (
    add_entries,
    entry_delta,
    new_entry,
    count_batch,
    merge_counters,
    protocol_note,
    routing_set_fit,
    routing_sections,
    summarize_stage,
)
from mmcl.streams.stream import Task


@register_method
class MrLora(TaskExperts[MrLoraConfig]):
    name = "mrlora"
    state_growth = "per-task"
    reference = False  # routes by a learned router, not by the true task: a continual learner
    description = "MR-LoRA: a fresh LoRA expert per task and a LoRA router (an MLLM prompt) that picks the expert"

    def init_state(self) -> None:
        super().init_state()
        self.routing_set: dict[str, list[str]] = {}  # task name -> training-sample ids, in task order
        self.router_experts = 0  # number of experts (letters) the router was last trained on; 0 = none
        self.routing: dict[str, dict[str, Any]] = {}  # stage key -> raw routing counters
        # (stage key, task) -> its counters before this process's evaluations since the last sync_evaluation
        self._before_sync: dict[tuple[str, str], dict[str, Any]] = {}
        self.router_training: list[dict[str, Any]] = []  # one record per router training (size, loss, seconds)
        self.last_routes: list[str] = []  # the route (expert task name or "base") of each sample of the last batch
        self.last_fallbacks: list[bool] = []  # per sample of the last batch: an illegal router answer sent it to a random expert
        self._letter_ids: list[int] | None = None
        self._prefix_sharing: bool | None = None  # None until checked on this backbone (see route)
        self._shared_prefix = 0  # the shared prefix length of the last next_token_logits call (0 = not shared)

    # -- set-up and training ---------------------------------------------------------------------
    def setup(self, backbone) -> None:
        super().setup(backbone)
        self._letter_ids = None
        self._prefix_sharing = None

    def see_tasks(self, tasks: Sequence[Task], n_tasks: int) -> None:
        if n_tasks > len(LETTERS):
            raise ConfigError(f"method mrlora: at most {len(LETTERS)} tasks can be routed, the stream has {n_tasks}")
        super().see_tasks(tasks, n_tasks)

    @property
    def expert_tasks(self) -> list[Task]:
        """The tasks with a trained expert, in letter order (A = first task)."""
        by_adapter = {adapter_name(task): task for task in self.tasks}
        return [by_adapter[name] for name in self.trained]

    def descriptions(self) -> list[str]:
        return [describe(task, self.config.router_description) for task in self.expert_tasks]

    def _ensure_router(self) -> None:
        ensure_adapter(self.backbone, ROUTER, self.config.router_lora(self.lora), self.seed + ROUTER_INIT_SEED_OFFSET)

    def pick_routing_ids(self, task: Task) -> list[str]:
        """``router_samples_per_task`` training-sample ids of ``task`` (all if fewer), fixed by the seed."""
        return pick_routing_ids(task, self.seed, self.config.router_samples_per_task)

    def routing_set_samples(self) -> list[tuple[Sample, int]]:
        """The routing set of every task with an expert: (training sample, index of its own expert)."""
        return routing_set_pairs(self.expert_tasks, self.routing_set)

    def router_training_samples(self) -> list[Sample]:
        """The routing set of every task with an expert, as router prompts with their expert's letter."""
        descriptions = self.descriptions()
        return [router_prompt(sample, descriptions, answer=LETTERS[e]) for sample, e in self.routing_set_samples()]

    def routing_set_check(self) -> tuple[dict[str, float], list[int]]:
        """How the router routes its own routing set (the constrained letter choice used at test time):
        per expert task the percentage of its samples sent to its own expert, and the positions (in
        :meth:`routing_set_samples` order) of the misrouted samples."""
        pairs = self.routing_set_samples()
        step = max(1, 4 * self.config.router_batch_size)
        choices = torch.cat([self.route([s for s, _ in pairs[i : i + step]]) for i in range(0, len(pairs), step)]).tolist()
        return routing_set_fit([e for _, e in pairs], choices, [task.name for task in self.expert_tasks])

    def train_router(self, task_index: int) -> dict[str, float]:
        """Train the router (base + router LoRA only) on the routing set of all tasks so far, continuing
        from its last state. "per-stage" protocol: in rounds of ``router_epochs``; after each round the
        router routes its own routing set and another round follows while some task's samples are not all
        sent to their own expert (at most ``router_max_rounds`` rounds). "paper" protocol: one round."""
        from mmcl.training.sft import train_on_samples

        self._ensure_router()
        model = self.backbone.model
        settings = TrainingConfig(
            epochs=self.config.router_epochs,
            batch_size=self.config.router_batch_size,
            learning_rate=self.config.router_learning_rate,
            progress_bar=False,
            logging_steps=10**6,
        )
        samples = self.router_training_samples()
        rounds = self.config.router_max_rounds if self.config.router_protocol == "per-stage" else 1
        started = time.perf_counter()
        losses, fits = [], []
        extra: list[Sample] = []  # misrouted routing-set prompts, repeated in the following rounds
        best = None  # (misrouted count, round, router tensors) of the best round so far
        for round_index in range(rounds):
            model.set_adapter(ROUTER)  # the router is the only active adapter, and the only trainable one
            seed = self.seed + ROUTER_TRAIN_SEED_OFFSET + task_index + ROUTER_ROUND_SEED_STEP * round_index
            log_dir = self.sft_log_dir("mrlora_router")
            with tempfile.TemporaryDirectory(prefix="mmcl-router-") as work:
                metrics = train_on_samples(
                    self.backbone, samples + extra, settings, Path(work), seed=seed,
                    log_dir=log_dir / f"round{round_index + 1}" if log_dir is not None else None,
                )  # fmt: skip
            losses.append(metrics.get("train_loss"))
            self.router_experts = len(self.trained)
            if rounds == 1:
                break
            accuracy, wrong = self.routing_set_check()
            fits.append(accuracy)
            if best is None or len(wrong) < best[0]:
                best = (len(wrong), round_index, {k: v.detach().clone() for k, v in adapter_tensors(self.backbone, ROUTER).items()})
            if not wrong:
                break
            extra += [samples[i] for i in wrong]
        if best is not None and best[1] != len(losses) - 1:
            # a later round (its schedule restarts at the full learning rate) can undo more than it fixes:
            # keep the round that misrouted the fewest routing-set samples
            load_adapter_tensors(self.backbone, best[2], ROUTER)
        self.router_training.append(
            {
                "experts": self.router_experts,
                "samples": len(samples),
                "rounds": len(losses),
                "train_loss": losses[-1],
                "round_losses": losses,
                "routing_set_accuracy": fits,  # per round (per-stage protocol): task -> % routed to its own expert
                "kept_round": best[1] + 1 if best is not None else len(losses),  # the round whose router is kept
                "seconds": round(time.perf_counter() - started, 3),
            }
        )
        return metrics

    def after_task(self, task_index: int, task: Task) -> None:
        super().after_task(task_index, task)
        self.routing_set[task.name] = self.pick_routing_ids(task)
        last = task_index == self.n_tasks - 1
        if len(self.trained) >= 2 and (self.config.router_protocol == "per-stage" or last):
            self.train_router(task_index)
        self.backbone.model.set_adapter(adapter_name(task))

    def evaluates_stage(self, index: int, n_stages: int) -> bool:
        """Whether the model after stage ``index`` (0 = the base model) is an MR-LoRA model that can be
        evaluated. Under the "paper" protocol the router exists only after the last task, so the stages
        1 .. T-1 are not: the runner skips those rows (their cells stay empty). Called outside the runner
        on such a stage, :meth:`generate` gives empty placeholder answers and the routing report marks the
        stage ``"evaluated": false``."""
        return self.config.router_protocol == "per-stage" or index == 0 or index >= n_stages

    def trainable_parameters(self) -> int:
        """Parameters trained in the last stage: the newest expert, plus the router from task 2 on."""
        model = self.backbone.model
        names = [self.trained[-1]] if self.trained else [model.active_adapter]
        if self.router_experts >= 2:
            names.append(ROUTER)
        return adapter_parameter_count(model, names)

    # -- inference -------------------------------------------------------------------------------
    @torch.inference_mode()
    def route(self, samples: Sequence[Sample]) -> torch.Tensor:
        """Expert index (0 = first task's expert) chosen by the router for each sample."""
        count = len(self.trained)
        if count <= 1 or self.router_experts < 2:
            if count > 1:
                raise MmclError(f"mrlora: {count} experts but no trained router (state incomplete?)")
            return torch.zeros(len(samples), dtype=torch.long)
        descriptions = self.descriptions()
        model = self.backbone.model
        if self.config.router_protocol == "paper":
            prompts = [router_prompt(sample, descriptions) for sample in samples]
            choices, self.last_fallbacks = route_by_generation(
                self.backbone, prompts, samples, self.seed, count, self.config.router_max_new_tokens
            )
            return choices
        if self._letter_ids is None or len(self._letter_ids) < count:
            self._letter_ids = letter_token_ids(self.backbone, max(count, self.n_tasks))
        model.set_adapter(ROUTER, inference_mode=True)
        was_training = model.training
        model.eval()
        prompts = [router_prompt(sample, descriptions) for sample in samples]
        if self._prefix_sharing is None and len(prompts) > 1:
            # check once that the shared-prefix pass reproduces the plain one on this backbone (models
            # with their own position scheme, e.g. Qwen2-VL's M-RoPE, may not); if not, never use it
            shared = self.next_token_logits(prompts)
            really_shared = self._shared_prefix >= 2  # decide only on a batch where the shared pass really ran
            plain = self.next_token_logits(prompts, share_prefix=False)
            if really_shared:
                self._prefix_sharing = bool(torch.allclose(shared, plain, rtol=1e-3, atol=1e-3 * float(plain.abs().max())))
            logits = plain
        else:
            logits = self.next_token_logits(prompts, share_prefix=bool(self._prefix_sharing))
        if was_training:
            model.train()
        letter_ids = torch.tensor(self._letter_ids[:count], device=logits.device)
        self.last_fallbacks = [False] * len(samples)
        return choose_experts(logits.float().index_select(1, letter_ids)).cpu()

    def next_token_logits(self, prompts: Sequence[Sample], share_prefix: bool = True) -> torch.Tensor:
        """Logits (batch, vocab) of the first answer token of each prompt, with the active adapter(s); with
        ``share_prefix`` the prompts' common prefix is run once (see :func:`first_answer_logits`)."""
        logits, self._shared_prefix = first_answer_logits(self.backbone, prompts, share_prefix)
        return logits

    def _run_expert(self, expert: int, samples: list[Sample], max_new_tokens: int) -> list[str]:
        self.backbone.model.set_adapter(self.trained[expert], inference_mode=True)
        return self.backbone.generate(samples, max_new_tokens)

    def generate(self, samples: Sequence[Sample], task: Task, max_new_tokens: int) -> list[str]:
        # routing never looks at the task identity; the statistics score the answers with its scorer
        samples = list(samples)
        model = self.backbone.model
        self.last_fallbacks = [False] * len(samples)
        if not self.trained:
            with model.disable_adapter():
                answers = self.backbone.generate(samples, max_new_tokens)
            self.last_routes = [BASE_ROUTE] * len(samples)
        elif not self.evaluates_stage(len(self.trained), self.n_tasks):
            answers = [""] * len(samples)  # placeholders: the protocol defines no model at this stage
            self.last_routes = [NOT_EVALUATED] * len(samples)
        else:
            choices = self.route(samples)
            answers = generate_grouped(samples, choices, lambda e, group: self._run_expert(e, group, max_new_tokens))
            self.last_routes = [self.expert_tasks[int(c)].name for c in choices]
        self._record(samples, answers, max_new_tokens, task)
        return answers

    # -- routing statistics ----------------------------------------------------------------------
    def stage_key(self) -> str:
        """The label of the current stage as the runner names it (``<k>_<task>``; ``0_base`` before any)."""
        if not self.trained:
            return row_name(0, BASE_LABEL)
        return row_name(len(self.trained), self.expert_tasks[-1].name)

    def _record(self, samples: list[Sample], answers: list[str], max_new_tokens: int, evaluated_task: Task) -> None:
        from mmcl.evaluation.general import GENERAL_TASK

        scorers = {task.name: task.scorer for task in self.tasks}  # the stream's tasks are scored, the general set is not
        if evaluated_task.name != GENERAL_TASK:
            scorers.setdefault(evaluated_task.name, evaluated_task.scorer)  # a later task under forward transfer
        experts = [task.name for task in self.expert_tasks]
        evaluated = self.evaluates_stage(len(self.trained), self.n_tasks)
        stage = self.routing.setdefault(self.stage_key(), {"experts": experts, "evaluated": evaluated, "tasks": {}})
        if distributed.active():  # the counts of this shard are combined with the others' in sync_evaluation
            for name in {sample.task for sample in samples}:
                before = copy.deepcopy(stage["tasks"].get(name, new_entry()))
                self._before_sync.setdefault((self.stage_key(), name), before)
        oracle_answers = None
        if evaluated and self.config.oracle_scores and experts:
            oracle_answers = dict(enumerate(answers))  # each sample answered by its own task's expert
            wrong = [i for i, s in enumerate(samples) if s.task in experts and self.last_routes[i] != s.task]
            if wrong:
                own = [experts.index(samples[i].task) for i in wrong]
                fixed = generate_grouped(
                    [samples[i] for i in wrong], own, lambda e, group: self._run_expert(e, group, max_new_tokens)
                )
                oracle_answers.update(zip(wrong, fixed))
        count_batch(
            stage, samples, answers, self.last_routes, self.last_fallbacks, scorers, experts, evaluated, oracle_answers
        )

    def sync_evaluation(self) -> None:
        """Under torchrun each process routes and counts its own shard: add every process's new counts, so the
        statistics cover all test samples (the counters before the evaluation are the same everywhere)."""
        mine = [(stage, task, {k: self.routing[stage][k] for k in ("experts", "evaluated")},
                 copy.deepcopy(base), entry_delta(self.routing[stage]["tasks"][task], base))
                for (stage, task), base in self._before_sync.items()]
        combined: dict[tuple[str, str], dict[str, Any]] = {}
        for part in distributed.gather_objects(mine):
            for stage, task, meta, base, delta in part:
                self.routing.setdefault(stage, {**meta, "tasks": {}})
                add_entries(combined.setdefault((stage, task), base), delta)
        for (stage, task), total in combined.items():
            self.routing[stage]["tasks"][task] = total
        self._before_sync = {}

    def routing_report(self) -> dict[str, Any]:
        """Per stage (keyed like the run's stage dirs, e.g. ``3_ad``): the experts in letter order, the
        router accuracy over the seen tasks' test samples, and per evaluated task the sample count, the
        routes taken (``routed``: expert task -> count), the router accuracy (None for tasks without an
        expert yet), the task score with the router (``score``) and with oracle routing
        (``oracle_score``; None when off or for unseen tasks), plus the confusion matrix (rows = true
        tasks in evaluation order, columns = experts in letter order). Scores are percentages.
        ``router_training`` lists each router training (experts, routing-set size, loss, seconds)."""
        return {
            "protocol": self.config.router_protocol,
            "protocol_note": protocol_note(self.config),
            "stages": {key: summarize_stage(raw) for key, raw in self.routing.items()},
            "router_training": list(self.router_training),
        }

    def load_routing_report(self, report: dict[str, Any]) -> None:
        """Take back the counters of a report written earlier (a resumed run's evaluations of a stage
        add to them). Tasks already counted in this process are kept as they are."""
        merge_counters(self.routing, report)
        if len(report.get("router_training", [])) > len(self.router_training):
            self.router_training = list(report["router_training"])

    # hooks for the runner: a method-specific summary of the evaluations, stored next to the predictions
    def evaluation_summary(self) -> dict[str, Any]:
        """The routing report, to be stored by the runner after each evaluation."""
        return self.routing_report()

    def load_evaluation_summary(self, summary: dict[str, Any]) -> None:
        """Restore what :meth:`evaluation_summary` returned (when a run is resumed)."""
        self.load_routing_report(summary)

    def report_sections(self) -> list[dict[str, Any]]:
        """Per stage: router accuracy, the confusion matrix (true task x chosen expert), and each task's
        score with the router beside its score with oracle routing (tables, see :func:`routing_sections`)."""
        return routing_sections(self.routing_report())

    # -- state -----------------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        tensors = super().state_tensors()
        if self.router_experts:
            tensors.update(named_adapters_tensors(self.backbone, [ROUTER]))
        return tensors

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        super().load_state_tensors(tensors)
        if self.router_experts:
            self._ensure_router()
            load_adapter_tensors(self.backbone, adapter_part(tensors, ROUTER), ROUTER)
        if self.trained:
            self.backbone.model.set_adapter(self.trained[-1])

    def state_json(self) -> dict[str, Any]:
        return {
            **super().state_json(),
            "routing_set": self.routing_set,
            "router_experts": self.router_experts,
            "routing_report": self.routing_report(),
        }

    def load_state_json(self, state: dict[str, Any]) -> None:
        super().load_state_json(state)
        self.routing_set = {name: list(ids) for name, ids in state.get("routing_set", {}).items()}
        self.router_experts = int(state.get("router_experts", 0))
        self.routing, self.router_training = {}, []
        self.load_routing_report(state.get("routing_report", {}))
