"""Step-time overhead of RegLoRA's penalty (SEFE) on a LoRA training step of a backbone (default:
the shipped tiny-llava), as a percent of the plain step time.

Usage: python benchmarks/reglora_overhead.py [--steps 20] [--batch-size 8] [--top-ratio 0.02]
                                             [--tasks 1] [--backbone tiny-llava] [--threads 1]

Key positions are set as after ``--tasks`` finished tasks (each: the LoRA's B drawn at random, then
``after_task`` picks the top ``--top-ratio`` of |B A|, merges and re-draws the LoRA); B is then made
non-zero so the penalty has work to do. A step is forward + backward + AdamW update on one batch of
synth-domain training samples; steps with and without the penalty alternate (after two warm-up
steps each) and the medians are compared. The penalty alone (forward + backward) is timed too.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from mmcl.backbones.registry import TINY_LLAVA_DIR, load_backbone
from mmcl.streams.stream import StreamConfig, build_stream
from mmcl.config import LoraSettings
from mmcl.methods.reglora import RegLora, RegLoraConfig


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--top-ratio", type=float, default=RegLoraConfig.top_ratio)
    parser.add_argument("--tasks", type=int, default=1, help="finished tasks whose key positions are united")
    parser.add_argument("--backbone", default="tiny-llava", help="preset or model directory (default: tiny-llava)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    if args.backbone == "tiny-llava" and not (TINY_LLAVA_DIR / "model.safetensors").is_file():
        print(f"tiny-llava weights are not present in {TINY_LLAVA_DIR}; build them with `mmcl pretrain-tiny` first")
        return 2
    with tempfile.TemporaryDirectory() as cache:
        options = {"train_per_task": args.batch_size, "test_per_task": 1}
        tasks = build_stream(StreamConfig(options=options, cache_dir=cache), Path.cwd())
        backbone = load_backbone(args.backbone, device="cpu" if not torch.cuda.is_available() else "auto")
        batch = backbone.collate([backbone.encode_for_training(s) for s in tasks[0].train_samples[: args.batch_size]])

    method = RegLora(RegLoraConfig(top_ratio=args.top_ratio), LoraSettings(), seed=0)
    method.setup(backbone)
    method.see_tasks(tasks, len(tasks))
    model = backbone.model

    def randomise_B() -> None:
        with torch.no_grad():
            for layer in method._layers.values():
                layer.lora_B["default"].weight.normal_(0, 0.02)

    for index in range(args.tasks):
        randomise_B()
        method.after_task(index, tasks[index % len(tasks)])
    randomise_B()
    positions = sum(p.numel() for p in method.positions.values())
    weights = sum(layer.get_base_layer().weight.numel() for layer in method._layers.values())
    model.train()
    device = next(model.parameters()).device
    batch = {key: value.to(device) if hasattr(value, "to") else value for key, value in batch.items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)

    def step(with_penalty: bool) -> float:
        started = time.perf_counter()
        loss = model(**batch).loss
        if with_penalty:
            loss = loss + method.extra_loss(model, batch, None)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter() - started

    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(2):
        step(False), step(True)
    for _ in range(args.steps):
        for flag in (False, True):
            times[flag].append(step(flag))

    penalty_times = []
    for _ in range(args.steps):
        started = time.perf_counter()
        method.extra_loss(model, batch, None).backward()
        penalty_times.append(time.perf_counter() - started)
    optimizer.zero_grad(set_to_none=True)

    plain, regularised = statistics.median(times[False]), statistics.median(times[True])
    alone = statistics.median(penalty_times)
    print(f"backbone {args.backbone}: {len(method._layers)} LoRA modules, {positions} key positions "
          f"({100 * positions / weights:.2f}% of {weights} weights), batch {args.batch_size}, {args.steps} steps each")  # fmt: skip
    print(f"step without penalty: {1000 * plain:.2f} ms (median)")
    print(f"step with penalty:    {1000 * regularised:.2f} ms (median)")
    print(f"penalty alone (forward + backward): {1000 * alone:.2f} ms = {100 * alone / plain:.1f}% of a plain step")
    print(f"overhead: {100 * (regularised - plain) / plain:+.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
