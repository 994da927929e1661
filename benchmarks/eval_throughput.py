"""Evaluation throughput of the shipped tiny backbone: batched greedy generation vs batch size 1.

Usage: python benchmarks/eval_throughput.py [--samples 200] [--batch-sizes 1 16 64]
Prints samples per second for each batch size on one synth-domain task's test set.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from mmcl.backbones.registry import load_backbone
from mmcl.streams.registry import SYNTH_DOMAIN_DEFAULTS
from mmcl.streams.stream import StreamConfig, build_stream


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--task", default="rs")
    args = parser.parse_args()

    options = {**SYNTH_DOMAIN_DEFAULTS, "test_per_task": args.samples}
    tasks = build_stream(StreamConfig(options=options), Path.cwd())
    task = next(t for t in tasks if t.name == args.task)
    samples = task.test_samples[: args.samples]
    backbone = load_backbone("tiny-llava")
    backbone.generate(samples[:4], task.max_new_tokens)  # warm-up
    for batch_size in args.batch_sizes:
        started = time.perf_counter()
        for begin in range(0, len(samples), batch_size):
            backbone.generate(samples[begin : begin + batch_size], task.max_new_tokens)
        seconds = time.perf_counter() - started
        print(f"batch_size {batch_size:4d}: {len(samples) / seconds:8.1f} samples/s  ({seconds:.2f}s for {len(samples)})")


if __name__ == "__main__":
    main()
