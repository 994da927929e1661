"""Inference cost of MR-LoRA's two-stage inference (route, then answer with the chosen expert) as a
ratio to plain batched generation with one LoRA adapter active, on the same synth-domain test samples.

Usage: python benchmarks/mrlora_inference_cost.py [--samples-per-task 100] [--batch-size 64]
                                                  [--router-description title|line|name] [--backbone tiny-llava]
                                                  [--answer-tokens 4 32 128]

The method gets an expert for each of the five synth-domain tasks and a router, all freshly
initialised (no training: the cost of a pass does not depend on the weights). Each task's test
samples are answered in batches, as the runner does, once by ``MrLora.generate`` (one router
forward pass per batch + one ``generate`` per chosen expert) and once by ``backbone.generate`` with
that task's expert active. An untrained router spreads a batch over several experts, which a trained
one does not (router accuracy is ~100% on synth-domain); so by default the router pass is run and
paid for in full, but its choice is replaced by the sample's own expert, as a perfectly accurate
router would choose (``--raw-router`` keeps the untrained router's choices). The routing report's
oracle scoring is switched off here (it only re-answers misrouted samples).

``--answer-tokens N ...`` forces every answer to exactly N new tokens (``min_new_tokens = max_new_tokens = N``
in both paths), one measurement per N: the router's single forward pass is then set against answers of known
length; without it each task's own budget is used and answers stop at the end token.
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import contextmanager
from typing import Iterator
from pathlib import Path

import torch

import mmcl.backbones.backbone as backbone_module
from mmcl.backbones.registry import TINY_LLAVA_DIR, load_backbone
from mmcl.streams.registry import SYNTH_DOMAIN_DEFAULTS
from mmcl.streams.stream import StreamConfig, build_stream
from mmcl.config import LoraSettings
from mmcl.methods.experts import adapter_name
from mmcl.methods.mrlora import MrLora
from mmcl.methods.mrlora_router import DESCRIPTION_MODES, ROUTER, MrLoraConfig, router_prompt


def batches(samples, size):
    return [samples[begin : begin + size] for begin in range(0, len(samples), size)]


@contextmanager
def forced_length(tokens: int | None) -> Iterator[None]:
    """Every generate call decodes exactly ``tokens`` new tokens (None: unchanged)."""
    if tokens is None:
        yield
        return
    original = backbone_module.decoding_settings
    backbone_module.decoding_settings = lambda budget: {**original(tokens), "min_new_tokens": tokens}
    try:
        yield
    finally:
        backbone_module.decoding_settings = original


def measure(work, method, backbone, tokens: int | None) -> tuple[float, float, float]:
    """(MR-LoRA seconds, plain seconds, generate calls per batch) over every task's batches."""
    routed_seconds = plain_seconds = 0.0
    generate_calls = total_batches = 0
    for task, task_batches in work:
        budget = tokens or task.max_new_tokens
        started = time.perf_counter()
        for batch in task_batches:
            method.generate(batch, task, budget)
            generate_calls += len(set(method.last_routes))  # one generate call per chosen expert
            total_batches += 1
        routed = time.perf_counter() - started
        backbone.model.set_adapter(adapter_name(task), inference_mode=True)
        started = time.perf_counter()
        for batch in task_batches:
            backbone.generate(batch, budget)
        plain = time.perf_counter() - started
        routed_seconds += routed
        plain_seconds += plain
        n = sum(len(batch) for batch in task_batches)
        print(f"{task.name:>5}: {n} samples  mrlora {routed:7.2f}s  plain {plain:7.2f}s  ratio {routed / plain:.2f}")
    return routed_seconds, plain_seconds, generate_calls / max(total_batches, 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples-per-task", type=int, default=SYNTH_DOMAIN_DEFAULTS["test_per_task"])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--router-description", default=MrLoraConfig.router_description, choices=DESCRIPTION_MODES)
    parser.add_argument("--backbone", default="tiny-llava", help="preset or model directory (default: tiny-llava)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--raw-router", action="store_true", help="keep the untrained router's choices")
    parser.add_argument("--answer-tokens", type=int, nargs="+", default=None,
                        help="force answers of exactly these lengths (one measurement each)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    if args.backbone == "tiny-llava" and not (TINY_LLAVA_DIR / "model.safetensors").is_file():
        print(f"tiny-llava weights are not present in {TINY_LLAVA_DIR}; build them with `mmcl pretrain-tiny` first")
        return 2
    options = {**SYNTH_DOMAIN_DEFAULTS, "test_per_task": args.samples_per_task}
    tasks = build_stream(StreamConfig(options=options), Path.cwd())
    backbone = load_backbone(args.backbone, device="cpu" if not torch.cuda.is_available() else "auto")

    method = MrLora(MrLoraConfig(router_description=args.router_description, oracle_scores=False), LoraSettings(), 0)
    method.setup(backbone)
    method.see_tasks(tasks, len(tasks))
    for index, task in enumerate(tasks):
        method.before_task(index, task)  # adds the task's expert adapter (freshly initialised)
        method.trained.append(adapter_name(task))
    method._ensure_router()
    method.router_experts = len(tasks)
    if not args.raw_router:
        names = [task.name for task in tasks]
        route = method.route

        def accurate_route(samples):
            route(samples)  # the full routing pass is paid for ...
            return torch.tensor([names.index(sample.task) for sample in samples])  # ... a perfect router's choice

        method.route = accurate_route

    work = [(task, batches(task.test_samples[: args.samples_per_task], args.batch_size)) for task in tasks]
    warm_task, warm_batches = work[0]
    method.generate(warm_batches[0][:4], warm_task, warm_task.max_new_tokens)  # warm-up both paths
    backbone.generate(warm_batches[0][:4], warm_task.max_new_tokens)

    for tokens in args.answer_tokens or [None]:
        with forced_length(tokens):
            routed_seconds, plain_seconds, calls = measure(work, method, backbone, tokens)
        label = f"{tokens} tokens" if tokens else "own budgets"
        print(f"total ({label}): mrlora {routed_seconds:.2f}s  plain {plain_seconds:.2f}s  "
              f"ratio {routed_seconds / plain_seconds:.2f}x  generate calls per batch {calls:.2f}")

    # the router prompt's length against the plain prompt's, for the record
    sample = tasks[-1].test_samples[0]
    plain_tokens = backbone.prompt_batch([sample])["input_ids"].shape[1]
    router_tokens = backbone.prompt_batch([router_prompt(sample, method.descriptions())])["input_ids"].shape[1]
    print(f"router prompt {router_tokens} tokens vs plain prompt {plain_tokens} tokens ({args.router_description})")
    chooser = f"untrained {ROUTER}" if args.raw_router else f"{ROUTER} pass run, own expert chosen"
    print(f"routing: {chooser}; router prefix shared through the KV cache: {method._prefix_sharing}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
