"""The router of MR-LoRA (Zhao et al., 2025, "MLLM-CL: Continual Learning for Multimodal Large Language
Models", arXiv:2506.05453) for :mod:`mmcl.methods.mrlora`: its options, its prompt, how its choice is read
(letter logits under the "per-stage" protocol, a generated answer under the repo's "paper" protocol), the
batch split by chosen expert, and the shared-prefix routing pass.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import torch

from mmcl.config import LoraSettings, setting
from mmcl.data.sample import Sample
from mmcl.errors import ConfigError, MmclError
from mmcl.streams.stream import Task

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

    def router_lora(self, lora: LoraSettings) -> LoraSettings:
        """The router adapter's LoRA settings: the experts' ``lora`` with ``router_rank``/``router_alpha``."""
        return replace(lora, rank=self.router_rank or lora.rank, alpha=self.router_alpha or lora.alpha)

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


def describe(task: Task, mode: str = "line") -> str:
    """How the router prompt names ``task``'s expert (see ``MrLoraConfig.router_description``); the task's
    name when its description is empty."""
    if mode == "name":
        return task.name
    line = next((line.strip() for line in task.description.splitlines() if line.strip()), "")
    if mode == "title":
        line = line.split(":", 1)[0].strip()
    return line or task.name


def pick_routing_ids(task: Task, seed: int, count: int) -> list[str]:
    """``count`` training-sample ids of ``task`` (all if fewer), drawn by a generator fixed by ``seed`` and
    the task's name: the task's routing set."""
    ids = [sample.id for sample in task.train_samples]
    rng = random.Random(f"mrlora-routing-{seed}-{task.name}")
    return rng.sample(ids, min(count, len(ids)))


def routing_set_pairs(expert_tasks: Sequence[Task], routing_set: Mapping[str, Sequence[str]]) -> list[tuple[Sample, int]]:
    """The routing set (task name -> sample ids) of every task with an expert (``expert_tasks``, in letter
    order) as (training sample, index of its own expert)."""
    pairs = []
    for expert, task in enumerate(expert_tasks):
        by_id = {sample.id: sample for sample in task.train_samples}
        for sample_id in routing_set.get(task.name, []):
            if sample_id not in by_id:
                raise MmclError(f"mrlora: routing-set sample {sample_id!r} is not in task {task.name}'s training set")
            pairs.append((by_id[sample_id], expert))
    return pairs


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


def route_by_generation(
    backbone, prompts: Sequence[Sample], samples: Sequence[Sample], seed: int, count: int, max_new_tokens: int
) -> tuple[torch.Tensor, list[bool]]:
    """"paper" protocol: the router (adapter ``router``, made active here) generates its answer to each of
    the router ``prompts`` (greedy, ``max_new_tokens``), read by :func:`read_router_answer`; an illegal
    answer sends its sample to :func:`fallback_expert`. Returns the chosen experts (of ``count``) and, per
    sample, whether it was such a fallback."""
    backbone.model.set_adapter(ROUTER, inference_mode=True)
    outputs = backbone.generate(list(prompts), max_new_tokens)
    choices = [read_router_answer(text, count) for text in outputs]
    chosen = [fallback_expert(seed, s.id, count) if c is None else c for s, c in zip(samples, choices)]
    return torch.tensor(chosen, dtype=torch.long), [choice is None for choice in choices]


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


@torch.inference_mode()
def first_answer_logits(backbone, prompts: Sequence[Sample], share_prefix: bool = True) -> tuple[torch.Tensor, int]:
    """Logits (batch, vocab) of the first answer token of each prompt, with the active adapter(s), and the
    length of the common prefix found (below 2: not shared, a plain forward pass).

    Router prompts of one batch start with the same tokens (instruction and expert list). With
    ``share_prefix`` that common prefix (up to the first image token) is run once, its key/value
    cache repeated over the batch, and only each prompt's own rest is run on top of it: the
    routing pass then costs about one forward pass over the questions, however long the expert
    descriptions are. Position ids continue the prefix without gaps, so the result equals a plain
    forward pass over each full prompt (up to float rounding)."""
    model = backbone.model
    batch = backbone.prompt_batch(prompts)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    image_token = getattr(backbone.model.config, "image_token_id", None)
    prefix = common_prefix_length(ids, mask, image_token) if share_prefix and ids.shape[0] > 1 else 0
    if prefix < 2 or ids.shape[0] < 2:
        return model(**batch, logits_to_keep=1).logits[:, -1, :], prefix
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
    suffix_ids = torch.where(own, window, torch.full_like(window, backbone.tokenizer.pad_token_id))
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
    ).logits[:, -1, :], prefix
