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
"""

from __future__ import annotations

import random
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from mmcl.streams.stream import Task
from mmcl.config import LoraSettings, TrainingConfig, setting
from mmcl.data.sample import Sample
from mmcl.errors import ConfigError, MmclError
from mmcl.methods.base import register_method
from mmcl.methods.experts import TaskExperts, adapter_name
from mmcl.methods.lora_utils import adapter_part, adapter_tensors, load_adapter_tensors, lora_config, named_adapters_tensors
from mmcl.layout import BASE_LABEL, row_name

ROUTER = "router"
BASE_ROUTE = "base"  # the route of samples answered by the base model (no expert yet)
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
ROUTER_INIT_SEED_OFFSET = 7919  # the router adapter's init seed is seed + this (experts use seed + task index)
ROUTER_TRAIN_SEED_OFFSET = 1000  # router training after task index i uses seed + this + i
ROUTER_ROUND_SEED_STEP = 100  # ... plus this per extra round (see MrLora.train_router)
DESCRIPTION_MODES = ("line", "title", "name")
ROUTER_PROTOCOLS = ("per-stage", "paper")
NOT_EVALUATED = "not-evaluated"  # the route of samples of a row the protocol does not define (paper protocol)


@dataclass
class MrLoraConfig:
    """Router settings; the experts use the run's ``lora`` and ``training`` settings. Sources: "paper" =
    Zhao et al. 2025 (arXiv:2506.05453), "repo" = github.com/bjzhb666/MLLM-CL at commit 80bf389; the
    paper's experts are one LoRA per task, r=128, alpha=256 (repo scripts/LLaVA/Train_dom_single/
    12_Sci.sh: ``--lora_r 128``, alpha = 2 r, 3 epochs at lr 2e-5, batch 4 x 8 GPUs)."""

    # Routing-set size per task. Repo: the router's data is ``task5Router_train20.json`` with images
    # ``num5sample_images20`` (README "MR-LoRA training and evaluation", scripts/LLaVA/Train_dom_single/
    # 0_train_router.sh): 20 samples of every task.
    router_samples_per_task: int = setting(20, help="training samples of each task in the routing set (repo: 20)")
    # Router LoRA rank and alpha; None = the experts'. Repo 0_train_router.sh: ``--lora_r 128 --lora_alpha
    # 256``, the same as the experts.
    router_rank: int | None = setting(None, help="rank of the router LoRA (null: the experts' lora.rank)")
    router_alpha: float | None = setting(None, help="alpha of the router LoRA (null: the experts' lora.alpha)")
    # Router training. Repo 0_train_router.sh: 40 epochs (35 for the ability stream,
    # Train_ability_single/0_train_router.sh) at lr 5e-6, batch 4 per GPU x 8 GPUs = 32, cosine schedule,
    # warmup 3%. Ours, calibrated on the shipped tiny-llava and synth-domain (router accuracy 100% on every
    # task's 100 test samples at every stage): 20 epochs at lr 5e-3, batch 8. With 10 epochs stage 5 fell
    # to 96%; with batch 4 training was unstable. Router training still costs more than an expert stage
    # there (20 epochs of 40-100 prompts of ~190 tokens, against a few epochs of 300 prompts of ~60 tokens).
    router_epochs: float = setting(20.0, help="epochs of one router training round (calibrated on tiny-llava; repo: 40)")
    router_learning_rate: float = setting(5e-3, help="learning rate of router training (calibrated on tiny-llava; repo: 5e-6)")
    router_batch_size: int = setting(8, help="batch size of router training")
    # "per-stage" protocol: at most this many rounds of ``router_epochs``; a round follows the first only
    # while the router still sends some of its own routing-set samples to a wrong expert. Ours: tasks that
    # share their images and differ only in the question (CoIN's VQAv2 and Grounding) are told apart much
    # later in training than tasks with different images (the router first learns "this kind of image ->
    # this letter"), so a fixed budget calibrated on synth-domain stopped with a whole task routed to its
    # image twin's expert. Misrouted prompts are repeated in the next round (see MrLora.train_router).
    # Synth-domain needs one round (100% on its routing set), so it costs nothing there but one routing pass
    # over the routing set per stage. The repo trains a fixed 40 epochs without a check.
    router_max_rounds: int = setting(4, help="per-stage protocol: at most this many training rounds, repeated while "
                                     "the router misroutes part of its own routing set")
    # How each expert is described in the router prompt: "line" = the first line of the task's description,
    # "title" = that line's part before its first colon, or all of it if it has none ("Remote sensing: count
    # buildings ..." -> "Remote sensing"), "name" = the task's name. Ours: "title", a short label; the full
    # line doubles router training time on the tiny model (its tokenizer spells unknown words letter by
    # letter), while at test time it costs little (the prompt prefix is shared, see MrLora.next_token_logits).
    # Repo (ETrain/Eval/LLaVA/CoIN/model_agents_select_lora.py, ROUTING_PROMPT): hand-written
    # one-sentence descriptions of each expert ("A financial expert specializing in ...").
    router_description: str = setting("title", help="how the router prompt names an expert: line (first line of the "
                                      "task's description), title (its part before a colon), name (the task's name)")
    # When the router is trained and how it picks an expert (see ROUTER_PROTOCOLS):
    # "per-stage" (ours, the default): after every task from the second on, the router is trained further
    # on the routing sets of all tasks so far, and it picks an expert by comparing the logits of the
    # experts' letters at its first answer token (never an illegal output); every row of the matrix is an
    # MR-LoRA result. "paper" (repo README steps 3-4, 0_train_router.sh, model_agents_select_lora.py): the
    # router is trained once, after the last task, on the routing sets of every task, and *generates* its
    # answer (greedy); the answer is read like the repo's ``choose_ans``: more than one character that is
    # not an expert letter = illegal, else the first expert letter (in letter order) found in it, and an
    # illegal answer or one without a letter goes to a random expert (seeded per sample here). It needs
    # every task's routing samples, so only the last row of the matrix is an MR-LoRA result: earlier rows
    # are not evaluated (empty answers as placeholders, flagged in the routing report; see
    # MrLora.evaluates_stage).
    router_protocol: str = setting("per-stage", help="per-stage: router trained after every task, letter logits "
                                   "compared; paper: trained once after the last task, generated answer (MLLM-CL repo)")
    # "paper" protocol only: how many tokens the router may generate. Repo model_agents_select_lora.py:
    # ``--max_new_tokens`` default 16, greedy (``--temperature 0``).
    router_max_new_tokens: int = setting(16, help="paper protocol: tokens the router may generate (repo: 16)")
    # Also score oracle routing in the report (an extra generation for misrouted samples only). Ours: a
    # diagnostic that separates routing errors from expert errors; the paper reports router accuracy apart.
    oracle_scores: bool = setting(True, help="also score oracle routing (each sample answered by its own task's "
                                  "expert) in the routing report")

    def __post_init__(self) -> None:
        if self.router_samples_per_task < 1:
            raise ConfigError(
                f"method.options.router_samples_per_task: must be >= 1, got {self.router_samples_per_task}"
            )
        for key in ("router_rank", "router_batch_size", "router_max_new_tokens", "router_max_rounds"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"method.options.{key}: must be >= 1, got {value}")
        if self.router_description not in DESCRIPTION_MODES:
            raise ConfigError(
                f"method.options.router_description: expected one of {', '.join(DESCRIPTION_MODES)}, "
                f"got {self.router_description!r}"
            )
        if self.router_protocol not in ROUTER_PROTOCOLS:
            raise ConfigError(
                f"method.options.router_protocol: expected one of {', '.join(ROUTER_PROTOCOLS)}, "
                f"got {self.router_protocol!r}"
            )
        for key in ("router_alpha", "router_epochs", "router_learning_rate"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ConfigError(f"method.options.{key}: must be > 0, got {value}")


# -- pure parts -----------------------------------------------------------------------------------
def describe(task: Task, mode: str = "line") -> str:
    """How the router prompt names ``task``'s expert (see ``MrLoraConfig.router_description``); the task's
    name when its description is empty."""
    if mode == "name":
        return task.name
    line = next((line.strip() for line in task.description.splitlines() if line.strip()), "")
    if mode == "title":
        line = line.split(":", 1)[0].strip()
    return line or task.name


def router_prompt(sample: Sample, descriptions: Sequence[str], answer: str = "") -> Sample:
    """The router's view of ``sample``: a request for the letter only, the experts as option letters with
    one-line descriptions, then the user's question (its ``<image>`` placeholders and images kept).
    ``answer`` is the training target (the expert's letter); earlier turns are dropped."""
    if len(descriptions) > len(LETTERS):
        raise MmclError(f"mrlora: at most {len(LETTERS)} experts can be routed, got {len(descriptions)}")
    options = "\n".join(f"{letter}. {text}" for letter, text in zip(LETTERS, descriptions))
    # The question comes last, right before the answer: the letter is read at the next position, and a
    # fixed instruction between the question and that position (as the prompt had it first) left a weak
    # router's letter logits the same for every prompt (see MrLoraConfig.router_max_rounds).
    text = (
        "Which expert should answer the question below? Answer with the letter only.\n"
        f"{options}\n"
        f"Question: {sample.prompt}"
    )
    return replace(sample, prompt=text, answer=answer, history=())


def choose_experts(letter_logits: torch.Tensor) -> torch.Tensor:
    """Index of the chosen expert per row of ``letter_logits`` (batch, experts): the argmax (first on ties)."""
    if letter_logits.ndim != 2 or letter_logits.shape[1] == 0:
        raise ValueError(f"expected (batch, experts) letter logits, got shape {tuple(letter_logits.shape)}")
    return letter_logits.argmax(dim=1)


def read_router_answer(text: str, count: int) -> int | None:
    """The expert (0-based) that a *generated* router answer names, or None if the answer is illegal
    ("paper" protocol). Read as the repo's ``choose_ans`` (ETrain/Eval/LLaVA/CoIN/
    model_agents_select_lora.py) reads it: the stripped text is illegal if more than one of its
    characters is not one of the ``count`` expert letters; otherwise the first expert letter *in letter
    order* that occurs in it wins ("B A" -> A), and a text without any is illegal too."""
    letters = LETTERS[:count]
    text = text.strip()
    if sum(1 for char in text if char not in letters) > 1:
        return None
    return next((index for index, letter in enumerate(letters) if letter in text), None)


def fallback_expert(seed: int, sample_id: str, count: int) -> int:
    """The random expert an illegal router answer goes to (repo: ``random.randint`` over the experts);
    here drawn from a generator seeded by the run seed and the sample id, so reruns and resumes agree."""
    return random.Random(f"mrlora-fallback-{seed}-{sample_id}").randrange(count)


def group_by_expert(choices: Sequence[int] | torch.Tensor) -> dict[int, list[int]]:
    """Positions of the batch per chosen expert (experts in increasing order, positions in batch order)."""
    values = choices.tolist() if isinstance(choices, torch.Tensor) else list(choices)
    groups: dict[int, list[int]] = {}
    for position, expert in enumerate(values):
        groups.setdefault(int(expert), []).append(position)
    return dict(sorted(groups.items()))


def generate_grouped(
    samples: Sequence[Sample],
    choices: Sequence[int] | torch.Tensor,
    run_expert: Callable[[int, list[Sample]], list[str]],
) -> list[str]:
    """Answers for ``samples`` where sample i is answered by expert ``choices[i]``: ``run_expert`` is called
    once per chosen expert with that expert's samples, and the answers are put back in batch order."""
    answers: list[str | None] = [None] * len(samples)
    for expert, positions in group_by_expert(choices).items():
        outputs = run_expert(expert, [samples[p] for p in positions])
        if len(outputs) != len(positions):
            raise RuntimeError(f"expert {expert}: {len(outputs)} answers for {len(positions)} samples")
        for position, output in zip(positions, outputs):
            answers[position] = output
    return [answer if answer is not None else "" for answer in answers]


def common_prefix_length(input_ids: torch.Tensor, attention_mask: torch.Tensor, stop_token: int | None) -> int:
    """Length of the token prefix shared by every row of a left-padded batch, cut before the first
    ``stop_token`` (an image token: its embedding depends on the row's image)."""
    pads = (attention_mask == 0).sum(dim=1).tolist()
    rows = [input_ids[i, pad:] for i, pad in enumerate(pads)]
    limit = min(row.shape[0] for row in rows)
    reference = rows[0][:limit]
    same = torch.ones(limit, dtype=torch.bool, device=input_ids.device)
    for row in rows[1:]:
        same &= row[:limit] == reference
    if stop_token is not None:
        same &= reference != stop_token
    differs = (~same).nonzero()
    length = int(differs[0, 0]) if differs.numel() else limit
    return min(length, limit - 1)  # keep at least one token of every row for the second pass


def letter_token_ids(backbone, count: int) -> list[int]:
    """Token id the router must emit first for each of the first ``count`` letters.

    Read from the training encoding of a text-only router answer (the first label token), so it is the
    very token the router is trained to produce right after the generation prompt, whatever the
    tokenizer does with spaces or merges."""
    ids = []
    for letter in LETTERS[:count]:
        probe = Sample(id=f"letter-{letter}", task=ROUTER, images=(), prompt="Which expert?", answer=letter)
        labels = backbone.encode_for_training(probe)["labels"]
        targets = (labels != -100).nonzero()
        if targets.numel() == 0:
            raise MmclError(f"backbone {backbone.name}: the answer {letter!r} encodes to no target token")
        ids.append(int(labels[targets[0, 0]]))
    if len(set(ids)) != len(ids):
        raise MmclError(f"backbone {backbone.name}: option letters share first tokens ({ids}); cannot route by letter")
    return ids


RAW_KEYS = ("n", "routed", "score_sum", "score_n", "oracle_sum", "oracle_n", "fallback")


def new_entry() -> dict[str, Any]:
    """Raw counters of one (stage, task); ``fallback`` counts illegal generated router answers sent to a
    random expert ("paper" protocol)."""
    return {"n": 0, "routed": {}, "score_sum": 0.0, "score_n": 0, "oracle_sum": 0.0, "oracle_n": 0, "fallback": 0}


def summarize_stage(raw: dict[str, Any]) -> dict[str, Any]:
    """The readable report of one stage from its raw counters (see :meth:`MrLora.routing_report`); the
    counters stay in it, so :func:`raw_stage` recovers them."""
    experts: list[str] = raw["experts"]
    evaluated = raw.get("evaluated", True)
    columns = (experts or [BASE_ROUTE]) if evaluated else [NOT_EVALUATED]
    tasks_out: dict[str, Any] = {}
    rows, counts = [], []
    seen_total = seen_correct = 0
    for task_name, entry in raw["tasks"].items():
        n = entry["n"]
        routed = {column: entry["routed"].get(column, 0) for column in columns}
        seen = evaluated and task_name in experts
        correct = routed.get(task_name, 0) if seen else None
        if seen:
            seen_total += n
            seen_correct += correct
        tasks_out[task_name] = {
            **entry,
            "routed": routed,
            "router_accuracy": 100.0 * correct / n if seen and n else None,
            "score": 100.0 * entry["score_sum"] / entry["score_n"] if entry["score_n"] else None,
            "oracle_score": 100.0 * entry["oracle_sum"] / entry["oracle_n"] if entry["oracle_n"] else None,
        }
        rows.append(task_name)
        counts.append([routed[column] for column in columns])
    return {
        "experts": experts,
        "evaluated": evaluated,
        "router_accuracy": 100.0 * seen_correct / seen_total if seen_total else None,
        "tasks": tasks_out,
        "confusion": {"rows": rows, "columns": columns, "counts": counts},
    }


def raw_stage(summary: dict[str, Any]) -> dict[str, Any]:
    """The raw counters of one stage back from its :func:`summarize_stage` report."""
    tasks = {name: {key: entry.get(key, new_entry()[key]) for key in RAW_KEYS} for name, entry in summary["tasks"].items()}
    return {"experts": list(summary["experts"]), "evaluated": summary.get("evaluated", True), "tasks": tasks}


# -- the method -----------------------------------------------------------------------------------
@register_method
class MrLora(TaskExperts[MrLoraConfig]):
    name = "mrlora"
    reference = False  # routes by a learned router, not by the true task: a continual learner
    description = "MR-LoRA: a fresh LoRA expert per task and a LoRA router (an MLLM prompt) that picks the expert"

    def init_state(self) -> None:
        super().init_state()
        self.routing_set: dict[str, list[str]] = {}  # task name -> training-sample ids, in task order
        self.router_experts = 0  # number of experts (letters) the router was last trained on; 0 = none
        self.routing: dict[str, dict[str, Any]] = {}  # stage key -> raw routing counters
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

    def _router_settings(self) -> LoraSettings:
        return replace(
            self.lora,
            rank=self.config.router_rank or self.lora.rank,
            alpha=self.config.router_alpha or self.lora.alpha,
        )

    def _ensure_router(self) -> None:
        model = self.backbone.model
        if ROUTER not in model.peft_config:
            torch.manual_seed(self.seed + ROUTER_INIT_SEED_OFFSET)
            model.add_adapter(ROUTER, lora_config(self._router_settings(), self.backbone))

    def pick_routing_ids(self, task: Task) -> list[str]:
        """``router_samples_per_task`` training-sample ids of ``task`` (all if fewer), fixed by the seed."""
        ids = [sample.id for sample in task.train_samples]
        rng = random.Random(f"mrlora-routing-{self.seed}-{task.name}")
        return rng.sample(ids, min(self.config.router_samples_per_task, len(ids)))

    def routing_set_samples(self) -> list[tuple[Sample, int]]:
        """The routing set of every task with an expert: (training sample, index of its own expert)."""
        pairs = []
        for expert, task in enumerate(self.expert_tasks):
            by_id = {sample.id: sample for sample in task.train_samples}
            for sample_id in self.routing_set.get(task.name, []):
                if sample_id not in by_id:
                    raise MmclError(
                        f"mrlora: routing-set sample {sample_id!r} is not in task {task.name}'s training set"
                    )
                pairs.append((by_id[sample_id], expert))
        return pairs

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
        accuracy = {}
        for expert, task in enumerate(self.expert_tasks):
            mine = [int(c) == expert for (_, e), c in zip(pairs, choices) if e == expert]
            accuracy[task.name] = 100.0 * sum(mine) / len(mine) if mine else 100.0
        wrong = [i for i, ((_, e), c) in enumerate(zip(pairs, choices)) if int(c) != e]
        return accuracy, wrong

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
            with tempfile.TemporaryDirectory(prefix="mmcl-router-") as work:
                metrics = train_on_samples(self.backbone, samples + extra, settings, Path(work), seed=seed)
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
        return sum(p.numel() for n, p in model.named_parameters() if any(f".{name}." in n for name in names))

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
            return self.route_by_generation([router_prompt(sample, descriptions) for sample in samples], samples)
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

    def route_by_generation(self, prompts: Sequence[Sample], samples: Sequence[Sample]) -> torch.Tensor:
        """"paper" protocol: the router generates its answer (greedy, ``router_max_new_tokens``), which is
        read by :func:`read_router_answer`; an illegal answer goes to :func:`fallback_expert`."""
        count = len(self.trained)
        self.backbone.model.set_adapter(ROUTER, inference_mode=True)
        outputs = self.backbone.generate(list(prompts), self.config.router_max_new_tokens)
        choices = [read_router_answer(text, count) for text in outputs]
        self.last_fallbacks = [choice is None for choice in choices]
        return torch.tensor(
            [fallback_expert(self.seed, s.id, count) if c is None else c for s, c in zip(samples, choices)],
            dtype=torch.long,
        )

    @torch.inference_mode()
    def next_token_logits(self, prompts: Sequence[Sample], share_prefix: bool = True) -> torch.Tensor:
        """Logits (batch, vocab) of the first answer token of each prompt, with the active adapter(s).

        Router prompts of one batch start with the same tokens (instruction and expert list). With
        ``share_prefix`` that common prefix (up to the first image token) is run once, its key/value
        cache repeated over the batch, and only each prompt's own rest is run on top of it: the
        routing pass then costs about one forward pass over the questions, however long the expert
        descriptions are. Position ids continue the prefix without gaps, so the result equals a plain
        forward pass over each full prompt (up to float rounding)."""
        model = self.backbone.model
        batch = self.backbone.prompt_batch(prompts)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        image_token = getattr(self.backbone.model.config, "image_token_id", None)
        prefix = common_prefix_length(ids, mask, image_token) if share_prefix and ids.shape[0] > 1 else 0
        self._shared_prefix = prefix
        if prefix < 2 or ids.shape[0] < 2:
            return model(**batch, logits_to_keep=1).logits[:, -1, :]
        width = ids.shape[1]
        pads = (mask == 0).sum(dim=1)  # left padding: row i's tokens are columns pads[i]..width-1
        start = int(pads.min()) + prefix  # the suffix window: columns start..width-1
        first = int(pads[0])
        cached = model(
            input_ids=ids[:1, first : first + prefix],
            attention_mask=mask[:1, first : first + prefix],
            use_cache=True,
            logits_to_keep=1,
        ).past_key_values
        cached.batch_repeat_interleave(ids.shape[0])
        columns = torch.arange(start, width, device=ids.device)
        own = columns[None, :] >= (pads + prefix)[:, None]  # the window's columns that are the row's own suffix
        window = ids[:, start:]
        suffix_ids = torch.where(own, window, torch.full_like(window, self.backbone.tokenizer.pad_token_id))
        suffix_mask = own.to(mask.dtype)
        positions = (prefix + suffix_mask.cumsum(dim=1) - 1).clamp(min=prefix)
        extra = {key: value for key, value in batch.items() if key not in ("input_ids", "attention_mask")}
        return model(
            input_ids=suffix_ids,
            attention_mask=torch.cat([torch.ones_like(mask[:, :prefix]), suffix_mask], dim=1),
            position_ids=positions,
            past_key_values=cached,
            use_cache=True,
            logits_to_keep=1,
            **extra,
        ).logits[:, -1, :]

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
        from mmcl.evaluation.scorers import score_one

        tasks = {task.name: task for task in self.tasks}  # the stream's tasks are scored, the general set is not
        if evaluated_task.name != GENERAL_TASK:
            tasks.setdefault(evaluated_task.name, evaluated_task)  # a later task under forward transfer
        experts = [task.name for task in self.expert_tasks]
        evaluated = self.evaluates_stage(len(self.trained), self.n_tasks)
        stage = self.routing.setdefault(self.stage_key(), {"experts": experts, "evaluated": evaluated, "tasks": {}})
        oracle_answers = dict(enumerate(answers))
        if not evaluated:
            for sample in samples:
                entry = stage["tasks"].setdefault(sample.task, new_entry())
                entry["n"] += 1
                entry["routed"][NOT_EVALUATED] = entry["routed"].get(NOT_EVALUATED, 0) + 1
            return
        if self.config.oracle_scores and experts:
            wrong = [i for i, s in enumerate(samples) if s.task in experts and self.last_routes[i] != s.task]
            if wrong:
                own = [experts.index(samples[i].task) for i in wrong]
                fixed = generate_grouped(
                    [samples[i] for i in wrong], own, lambda e, group: self._run_expert(e, group, max_new_tokens)
                )
                oracle_answers.update(zip(wrong, fixed))
        for index, (sample, answer) in enumerate(zip(samples, answers)):
            entry = stage["tasks"].setdefault(sample.task, new_entry())
            entry["n"] += 1
            route = self.last_routes[index]
            entry["routed"][route] = entry["routed"].get(route, 0) + 1
            entry["fallback"] += int(self.last_fallbacks[index]) if index < len(self.last_fallbacks) else 0
            if sample.task not in tasks:
                continue
            scorer_name = tasks[sample.task].scorer
            entry["score_sum"] += score_one(scorer_name, answer, sample.reference)
            entry["score_n"] += 1
            if self.config.oracle_scores and sample.task in experts:
                entry["oracle_sum"] += score_one(scorer_name, oracle_answers[index], sample.reference)
                entry["oracle_n"] += 1

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
            "protocol_note": self.protocol_note(),
            "stages": {key: summarize_stage(raw) for key, raw in self.routing.items()},
            "router_training": list(self.router_training),
        }

    def protocol_note(self) -> str:
        """One sentence on what the rows of the matrix mean under the configured router protocol."""
        if self.config.router_protocol == "paper":
            return (
                "Router protocol 'paper' (MLLM-CL repo): the router is trained once, after the last task, on "
                f"{self.config.router_samples_per_task} samples of every task, and generates its answer (an "
                "illegal answer goes to a random expert, counted as 'fallback'). Only the last row of the "
                "matrix is an MR-LoRA result: the rows of the stages before it are NOT evaluated (their "
                "answers are empty placeholders scored 0; ignore them and every metric built on them, such "
                "as BWT and forgetting)."
            )
        return (
            "Router protocol 'per-stage' (ours): after every task from the second on the router is trained "
            f"further on {self.config.router_samples_per_task} samples of every task so far and picks the "
            "expert whose letter has the highest logit; every row of the matrix is an MR-LoRA result."
        )

    def load_routing_report(self, report: dict[str, Any]) -> None:
        """Take back the counters of a report written earlier (a resumed run's evaluations of a stage
        add to them). Tasks already counted in this process are kept as they are."""
        for key, summary in report.get("stages", {}).items():
            raw = raw_stage(summary)
            stage = self.routing.setdefault(key, {"experts": raw["experts"], "evaluated": raw["evaluated"], "tasks": {}})
            for name, entry in raw["tasks"].items():
                stage["tasks"].setdefault(name, entry)
        if len(report.get("router_training", [])) > len(self.router_training):
            self.router_training = list(report["router_training"])

    # hooks for the runner: a method-specific summary of the evaluations, stored next to the predictions
    def evaluation_summary(self) -> dict[str, Any]:
        """The routing report, to be stored by the runner after each evaluation."""
        return self.routing_report()

    def load_evaluation_summary(self, summary: dict[str, Any]) -> None:
        """Restore what :meth:`evaluation_summary` returned (when a run is resumed)."""
        self.load_routing_report(summary)

    def report_sections(self) -> list[dict[str, str]]:
        """Per stage: router accuracy, the confusion matrix (true task x chosen expert), and each task's
        score with the router beside its score with oracle routing."""
        from html import escape

        def cell(value: Any) -> str:
            return "-" if value is None else f"{value:.1f}" if isinstance(value, float) else escape(str(value))

        report = self.routing_report()
        parts = []
        for key, stage in report["stages"].items():
            if not stage.get("evaluated", True):
                parts.append(
                    f"<h3>after stage {escape(key)}: not evaluated</h3><p>The '{escape(report['protocol'])}' "
                    "router protocol defines no model at this stage (the router is trained after the last "
                    "task only): the answers of this row are empty placeholders, not results.</p>"
                )
                continue
            confusion = stage["confusion"]
            fallbacks = sum(entry.get("fallback", 0) for entry in stage["tasks"].values())
            header = "".join(f"<th>{escape(c)}</th>" for c in confusion["columns"])
            rows = "".join(
                f"<tr><th>{escape(task)}</th>{''.join(f'<td>{n}</td>' for n in counts)}"
                f"<td>{cell(stage['tasks'][task]['router_accuracy'])}</td><td>{cell(stage['tasks'][task]['score'])}</td>"
                f"<td>{cell(stage['tasks'][task]['oracle_score'])}</td></tr>"
                for task, counts in zip(confusion["rows"], confusion["counts"])
            )
            fallback_note = f" ({fallbacks} illegal router answers sent to a random expert)" if fallbacks else ""
            parts.append(
                f"<h3>after stage {escape(key)}: router accuracy {cell(stage['router_accuracy'])}%{fallback_note}</h3>"
                f"<table><tr><th>true task \\ expert</th>{header}<th>router acc.</th><th>score</th>"
                f"<th>oracle score</th></tr>{rows}</table>"
            )
        if not parts:
            return []
        return [{"title": "MR-LoRA routing", "html": f"<p>{escape(report['protocol_note'])}</p>" + "".join(parts)}]

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
