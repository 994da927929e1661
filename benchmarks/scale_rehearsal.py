"""Scale rehearsal: every registered method at a real model size, with random weights.

Usage: python benchmarks/scale_rehearsal.py [--size smolvlm-256m] [--device cpu] [--dtype bfloat16]
       [--methods seq-lora,experts,...] [--steps 2] [--test 4] [--out DIR]

The architecture is built from the published config values below (no download): a local BPE tokenizer, the
family's processor, weights created in ``--dtype`` on ``--device`` (never an fp32 copy of a bf16 model), the
embedding matrix at the checkpoint's vocabulary size. Each method then runs ``mmcl run`` on the first 3
synth-domain tasks, ``--steps`` optimisation steps per task (batch 2) and ``--test`` test samples per task,
each stage in a fresh process (``--stop-after-stage``), so that a stage's peak resident memory (``wait4``'s
``ru_maxrss``) is its own. Printed per method: peak RSS per stage (MiB; on CUDA also peak allocated),
growth from stage 1 to stage 3, seconds per training step and per evaluated sample (from the run dir's
stage and prediction files), each as a ratio to ``seq-lora``, and the stored state per stage against what
the method declares (``Method.state_growth``: ``constant`` or ``per-task``).

Per-method costs are scaled down with the other sizes (``SCALED_OPTIONS``): Fisher/importance samples,
router batches of ``BATCH`` like training (with 2 routing samples per task the default router batch of 8 would
only fill from the fourth task on, so its memory would grow until then),
router samples and epochs, GRPO prompts and group size, EvoLMM images and samples, DER's buffer; every
other option is the method's default. Images: synth-domain's 48-px images, resized by the processor to one
512-px view for SmolVLM (64 visual tokens; ``--tiled``: the processor's 2x2 grid of tiles plus the global
view, 320 tokens). The processed-input cache is off, so that stage peaks are the method's own.

Last, the evaluation throughput of mmcl's batched generation (``evaluation.batch_size`` 8, left padding)
beside batch size 1 (the peers' protocol: LLaVA's and MCITlib's eval scripts answer one question at a
time), on the same ``--throughput-samples`` test samples with the base weights, and how many greedy answers
differ between the two (padding can change them).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from mmcl.backbones.tiny_archs import TinyArchSpec, build_tiny_arch, default_corpus

# published config values (config.json of each hub checkpoint)
SIZES: dict[str, tuple[str, TinyArchSpec]] = {
    "tiny": ("smolvlm", TinyArchSpec()),  # smoke tests of the script itself
    "tiny-llava": ("llava", TinyArchSpec()),
    # HuggingFaceTB/SmolVLM-256M-Instruct: SmolLM2-135M + SigLIP-B/16 at 512 px, pixel shuffle 4
    "smolvlm-256m": ("smolvlm", TinyArchSpec(
        text_hidden=576, text_layers=30, text_heads=9, text_kv_heads=3, text_intermediate=1536, max_positions=8192,
        vision_hidden=768, vision_layers=12, vision_heads=12, vision_mlp_ratio=4, idefics_tile=512, idefics_patch=16,
        idefics_scale=4, model_vocab=49280)),
    # Qwen/Qwen2-VL-2B-Instruct: Qwen2-1.5B + a 675M ViT (patch 14, 2x2 merge); images up to 448 px here
    "qwen2-vl-2b": ("qwen2-vl", TinyArchSpec(
        text_hidden=1536, text_layers=28, text_heads=12, text_kv_heads=2, text_intermediate=8960, max_positions=32768,
        vision_hidden=1280, vision_layers=32, vision_heads=16, vision_mlp_ratio=4, image_size=448,
        model_vocab=151936, tie_embeddings=True)),
    # llava-hf/llava-1.5-7b-hf: Vicuna-7B (Llama-2 dimensions) + CLIP ViT-L/14 at 336 px, 576 visual tokens;
    # 14 GB in bf16: build it on a GPU machine (or with --dtype bfloat16 on a host with > 30 GB free)
    "llava-1.5-7b": ("llava", TinyArchSpec(
        text_hidden=4096, text_layers=32, text_heads=32, text_kv_heads=32, text_intermediate=11008, max_positions=4096,
        vision_hidden=1024, vision_layers=24, vision_heads=16, vision_mlp_ratio=4, image_size=336, llava_patch=14,
        model_vocab=32064)),
}  # fmt: skip
TASKS = 3
BATCH = 2
# without --tiled, one view per image: SmolVLM's processor would cut the 48-px images, upscaled, into a 2x2 grid
# of 512-px tiles plus the global view (320 visual tokens); one 512-px view gives 64
SINGLE_VIEW: dict[str, dict[str, Any]] = {"smolvlm-256m": {"size": {"longest_edge": 512}}}
# each method's own loops scaled with the steps (names as `mmcl list --method X` prints them)
SCALED_OPTIONS: dict[str, dict[str, Any]] = {
    "mrlora": {"router_samples_per_task": 2, "router_epochs": 1.0, "router_max_rounds": 1, "router_batch_size": BATCH},
    "grpo": {"steps": 2, "prompts_per_step": 2, "group_size": 2, "filter": False, "sft_warmup_steps": 0,
             "max_new_tokens": 4},
    "sft-grpo": {"steps": 2, "prompts_per_step": 2, "group_size": 2, "max_new_tokens": 4},
    "evolmm": {"steps_per_task": 2, "images_per_step": 2, "solver_samples": 2},
    "ewc": {"fisher_samples": 4},
    "mas": {"importance_samples": 4},
    "der": {"per_task": 2},
}  # fmt: skip


def processor_options(args: argparse.Namespace) -> dict[str, Any]:
    return {} if args.tiled else SINGLE_VIEW.get(args.size, {})


def build_model(size: str, dtype: str, device: str, folder: Path) -> int:
    """Save the ``size`` architecture with random weights into ``folder``; returns its parameter count."""
    from safetensors import safe_open

    family, spec = SIZES[size]
    # the local BPE learns " A".." H" as single tokens, as the hub tokenizers have them (MR-LoRA's router
    # answers with one option letter and needs each letter's first token to differ)
    corpus = default_corpus() + [f"Assistant: {letter}" for letter in "ABCDEFGH" for _ in range(20)]
    build_tiny_arch(family, folder, corpus=corpus, spec=spec, dtype=dtype, device=device)
    count = 0
    for shard in folder.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as handle:
            for key in handle.keys():
                shape = handle.get_slice(key).get_shape()
                count += math.prod(shape)
    return count


def run_config(method: str, model: Path, data: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    from mmcl.streams.synth import SYNTH_DOMAIN_TASKS

    tasks = [{"name": spec.name, "train": str(data / spec.name / "train.json"), "test": str(data / spec.name / "test.json"),
              "scorer": spec.scorer, "max_new_tokens": spec.max_new_tokens} for spec in SYNTH_DOMAIN_TASKS[:TASKS]]
    return {
        "name": method, "output_dir": str(out / method),
        "backbone": {"name": str(model), "dtype": args.dtype, "device": args.device, "max_length": 2048,
                     "processor_options": processor_options(args)},
        "stream": {"name": "rehearsal", "tasks": tasks},
        "method": {"name": method, "options": SCALED_OPTIONS.get(method, {})},
        "training": {"max_steps": args.steps, "batch_size": BATCH, "progress_bar": False, "warmup_ratio": 0.0,
                     "bf16": args.dtype == "bfloat16" and args.device != "cpu"},
        # no processed-input cache: its (bounded, results-neutral) memory would count as the method's growth
        "evaluation": {"batch_size": 8, "input_cache_mb": 0, "forward_transfer": False, "evaluate_base": False, "general": "none",
                       "max_new_tokens": 4},
    }  # fmt: skip


def run_stage(config_file: Path, stage: int, env: dict[str, str], log: Path) -> float:
    """One stage in a fresh process; its peak resident memory in MiB (``wait4``'s ``ru_maxrss``, KiB on Linux)."""
    command = [sys.executable, "-m", "mmcl.cli", "run", str(config_file), "--stop-after-stage", str(stage)]
    with log.open("a", encoding="utf-8") as output:
        child = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        tail = log.read_text(encoding="utf-8").strip().splitlines()
        raise RuntimeError(tail[-1] if tail else f"exit code {child.returncode}")
    return usage.ru_maxrss / 1024


def measure(method: str, model: Path, data: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    from mmcl.methods import METHODS

    config_file = out / f"{method}.yaml"
    config_file.write_text(yaml.safe_dump(run_config(method, model, data, out, args), sort_keys=False))
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count() or 1))}
    run_dir = out / method
    peaks = []
    for stage in range(1, TASKS + 1):
        peaks.append(run_stage(config_file, stage, env, out / f"{method}.log"))
        if sum(p.is_dir() for p in (run_dir / "stages").iterdir()) < stage:  # no new stage: finished (joint)
            peaks.pop()
            break
    stage_dirs = sorted(p for p in (run_dir / "stages").iterdir() if p.is_dir())
    stages = [json.loads((d / "stage.json").read_text()) for d in stage_dirs]
    eval_seconds = eval_samples = 0.0
    for file in (run_dir / "predictions").rglob("*.jsonl"):
        meta = json.loads(file.read_text().splitlines()[0])["meta"]
        eval_seconds, eval_samples = eval_seconds + meta["seconds"], eval_samples + meta["n"]
    return {
        "method": method, "peak_mib": peaks, "cuda_mib": [stage.get("peak_cuda_memory_mib") for stage in stages],
        "growth_mib": peaks[-1] - peaks[0],
        # a stage's training seconds (the method's own per-task work included) over its optimisation steps
        "seconds_per_step": sum(stage["seconds"] for stage in stages) / (args.steps * len(stages)),
        "seconds_per_sample": eval_seconds / max(eval_samples, 1),
        "stored_bytes": [(d / "state.safetensors").stat().st_size if (d / "state.safetensors").exists() else 0 for d in stage_dirs],
        "declared": METHODS[method].state_growth,
    }  # fmt: skip


def eval_throughput(model: Path, data: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Samples per second of batched generation (batch 8) and of batch size 1 on the same samples."""
    from mmcl.backbones.registry import load_backbone
    from mmcl.data.readers import read_samples
    from mmcl.evaluation.evaluator import generate_answers
    from mmcl.streams.synth import SYNTH_DOMAIN_TASKS

    backbone = load_backbone(str(model), dtype=args.dtype, device=args.device, max_length=2048,
                             processor_options=processor_options(args))
    samples = [sample for spec in SYNTH_DOMAIN_TASKS[:TASKS]
               for sample in read_samples(data / spec.name / "test.json", spec.name, split="test")]  # fmt: skip
    result: dict[str, Any] = {"samples": len(samples)}
    answers = {}
    for batch_size in (8, 1):
        generate_answers(backbone.generate, samples[:batch_size], 4, batch_size)  # warm-up
        started = time.perf_counter()
        answers[batch_size] = generate_answers(backbone.generate, samples, 4, batch_size)
        result[f"samples_per_second_batch{batch_size}"] = len(samples) / (time.perf_counter() - started)
    result["answers_differing"] = sum(a != b for a, b in zip(answers[8], answers[1]))
    return result


def growth_verdict(row: dict[str, Any]) -> str:
    """Whether the stored state grew as declared: ``constant`` within 5% of stage 1, ``per-task`` by a
    positive step at every stage (per-task parts may be small, e.g. DER's stored logits)."""
    if len(row["stored_bytes"]) < TASKS:
        return "one stage"  # joint: every task in one stage
    first, second, third = row["stored_bytes"]
    if row["declared"] == "constant":
        return "ok" if abs(third - first) <= 0.05 * max(first, 1) else "GROWS"
    return "ok" if third > second > first else "FLAT"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="smolvlm-256m", choices=sorted(SIZES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--methods", default=None, help="comma-separated; default: every registered method")
    parser.add_argument("--steps", type=int, default=2, help="optimisation steps per task")
    parser.add_argument("--test", type=int, default=4, help="test samples per task")
    parser.add_argument("--throughput-samples", type=int, default=8, help="test samples per task for the "
                        "batched-vs-batch-1 evaluation throughput (0: skip it)")
    parser.add_argument("--tiled", action="store_true", help="keep the processor's own image tiling (SmolVLM: "
                        "4 tiles + global view) instead of one view per image")
    parser.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    args = parser.parse_args()

    from mmcl.methods import METHODS
    from mmcl.streams.synth import write_synth_domain

    methods = args.methods.split(",") if args.methods else sorted(METHODS)
    out = Path(args.out or tempfile.mkdtemp(prefix="mmcl-rehearsal-"))
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    count = build_model(args.size, args.dtype, args.device, out / "model")
    print(f"{args.size}: {count / 1e6:.1f}M parameters ({args.dtype}, {args.device}), built in "
          f"{time.perf_counter() - started:.0f}s; work folder {out}")
    data = write_synth_domain(out / "data", seed=0, train_per_task=args.steps * BATCH, test_per_task=args.test)
    methods = ["seq-lora"] + [m for m in methods if m != "seq-lora"]  # the reference of the ratios, first
    rows: list[dict[str, Any]] = []
    report: dict[str, Any] = {"size": args.size, "parameters": count, "dtype": args.dtype, "device": args.device,
                              "steps": args.steps, "methods": rows}
    for method in methods:
        try:
            rows.append(measure(method, out / "model", data, out, args))
        except RuntimeError as exc:
            print(f"{method:12s} failed: {exc}")
            continue
        print_row(rows[-1], next((row for row in rows if row["method"] == "seq-lora"), None))
        (out / "rehearsal.json").write_text(json.dumps({**report, "methods": rows}, indent=1))  # after every row
    if args.throughput_samples:
        throughput_data = write_synth_domain(out / "throughput-data", seed=1, train_per_task=1,
                                             test_per_task=args.throughput_samples)
        report["throughput"] = speed = eval_throughput(out / "model", throughput_data, args)
        print(f"evaluation throughput on {speed['samples']} samples: batch 8 {speed['samples_per_second_batch8']:.2f} "
              f"samples/s, batch 1 {speed['samples_per_second_batch1']:.2f} samples/s "
              f"({speed['samples_per_second_batch8'] / speed['samples_per_second_batch1']:.2f}x); "
              f"{speed['answers_differing']} answers differ")
    (out / "rehearsal.json").write_text(json.dumps(report, indent=1))
    print(f"table: {out / 'rehearsal.json'}")


def print_row(row: dict[str, Any], base: dict[str, Any] | None) -> None:
    peaks = "/".join(f"{value:.0f}" for value in row["peak_mib"])
    if any(value is not None for value in row["cuda_mib"]):
        peaks += " cuda " + "/".join(f"{value:.0f}" for value in row["cuda_mib"] if value is not None)
    ratio = (lambda key: f"{row[key] / base[key]:.2f}x" if base and base[key] else "-")
    first, *later = row["stored_bytes"]
    stored = f"{first / 2**20:.1f} " + "/".join(f"{(value - first) / 2**10:+.0f}K" for value in later)
    print(f"{row['method']:12s} peak RSS MiB {peaks:>17s}  growth {row['growth_mib']:+6.0f}  "
          f"s/step {row['seconds_per_step']:6.2f} ({ratio('seconds_per_step')})  "
          f"s/sample {row['seconds_per_sample']:5.2f} ({ratio('seconds_per_sample')})  "
          f"state MiB {stored} {row['declared']} {growth_verdict(row)}")


if __name__ == "__main__":
    main()
