"""What ``--deterministic`` costs in speed: the same small experiment with the kernels the machine picks
itself and with each pinned level, every run in a fresh process (the pins are read when torch loads),
timed by the run's own training and evaluation seconds (results.json).

    .venv/bin/python benchmarks/deterministic_cost.py --repeats 3 --threads 2

Prints per level the median training and evaluation seconds, their ratio to the unpinned kernels, and
whether the predictions are identical to the first run of the pinned ``avx2`` level."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

EXPERIMENT = {  # the default experiment, made small: what is timed is the kernels, not the stream
    "name": "deterministic-cost",
    "stream": {"name": "synth-domain", "options": {"train_per_task": 60, "test_per_task": 40}},
    "training": {"max_steps": 15, "progress_bar": False},
    "evaluation": {"general": {"set": "none"}},
}
LEVELS = ("native", "avx2", "baseline")


def run_once(level: str, threads: int, folder: Path, index: int) -> dict:
    config = folder / "experiment.yaml"
    config.write_text(yaml.safe_dump(EXPERIMENT), encoding="utf-8")
    out = folder / f"{level}-{index}"
    command = [sys.executable, "-m", "mmcl", "run", str(config), "--out", str(out)]
    if level != "native":
        command += ["--deterministic", "--set", f"deterministic_isa={level}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{level}: mmcl run failed: {done.stderr.strip().splitlines()[-1:]}")
    timing = json.loads((out / "results.json").read_text())["timing"]
    return {"train": timing["train_seconds"], "eval": timing["eval_seconds"], "dir": out}


def predictions(run_dir: Path) -> dict[str, list]:
    """Every predictions file's records, the header's generation time left out."""
    from mmcl.reproduce import prediction_records, prediction_files

    return {str(rel): prediction_records(run_dir / rel) for rel in prediction_files(run_dir)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs per level (the median is printed)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of each run")
    parser.add_argument("--levels", nargs="+", default=list(LEVELS), choices=LEVELS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        runs = {level: [run_once(level, args.threads, Path(tmp), i) for i in range(args.repeats)] for level in args.levels}
        reference = predictions(runs["avx2"][0]["dir"]) if "avx2" in runs else None
        base = statistics.median(run["train"] for run in runs[args.levels[0]])
        base_eval = statistics.median(run["eval"] for run in runs[args.levels[0]])
        print(f"{'level':10} {'train s':>8} {'x':>6} {'eval s':>8} {'x':>6}  predictions vs avx2")
        for level, found in runs.items():
            train = statistics.median(run["train"] for run in found)
            evaluation = statistics.median(run["eval"] for run in found)
            same = "n/a" if reference is None else ", ".join(
                "identical" if predictions(run["dir"]) == reference else "differ" for run in found)
            print(f"{level:10} {train:8.1f} {train / base:6.2f} {evaluation:8.1f} {evaluation / base_eval:6.2f}  {same}")


if __name__ == "__main__":
    main()
