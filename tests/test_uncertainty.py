"""Tests for mmcl.evaluation.uncertainty (bootstrap over test samples, intervals of every metric, over seeds
for compare) and the uncertainty fields of results.json. Expected values are computed here independently."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import numpy as np
import pytest

from mmcl.evaluation import uncertainty as U
from mmcl.evaluation.metrics import run_metrics
from mmcl.layout import RunLayout
from mmcl.results import SCHEMA_VERSION, collect_results, load_results, results_from_dict, write_results


def file_scores(values: list[float], prefix: str = "s") -> list[tuple[str, float]]:
    return [(f"{prefix}{i:04d}", float(v)) for i, v in enumerate(values)]


def bernoulli(n: int, p: float, seed: int) -> list[float]:
    """Exactly round(p n) ones among n, in a seeded random order."""
    values = np.zeros(n)
    values[: round(p * n)] = 1.0
    np.random.default_rng(seed).shuffle(values)
    return values.tolist()


# -- one cell ----------------------------------------------------------------------------------------


def test_constant_scores_collapse() -> None:
    column = U.align([file_scores([1.0] * 50)])
    replicates = U.column_replicates(column, 0)
    cell = U.cell_uncertainty(column.scores[0], replicates[:, 0])
    assert cell == {"se": 0.0, "low": 100.0, "high": 100.0, "n": 50}


def test_bernoulli_standard_error_and_interval() -> None:
    scores = np.array(bernoulli(400, 0.5, seed=1))
    expected_se = 100 * math.sqrt(0.25 * 400 / 399) / math.sqrt(400)  # sample std (n-1) / sqrt(n), in points
    assert U.standard_error(scores) == pytest.approx(expected_se)
    assert U.standard_error(scores) == pytest.approx(2.5, abs=0.01)
    column = U.align([file_scores(scores.tolist())])
    cell = U.cell_uncertainty(column.scores[0], U.column_replicates(column, 0)[:, 0])
    assert cell["se"] == pytest.approx(expected_se, abs=1e-4) and cell["n"] == 400
    half_width = (cell["high"] - cell["low"]) / 2
    assert half_width == pytest.approx(1.96 * 2.5, rel=0.15)  # the normal approximation's ±4.9
    assert cell["low"] < 50.0 < cell["high"]


def test_soft_scores_are_resampled_alike() -> None:
    values = [0.0, 0.25, 0.5, 0.75, 1.0, 0.4, 0.6, 1.0, 0.0, 0.33]  # IoU / partial credit / VQA soft accuracy
    assert U.standard_error(np.array(values)) == pytest.approx(100 * statistics.stdev(values) / math.sqrt(len(values)))
    column = U.align([file_scores(values)])
    cell = U.cell_uncertainty(column.scores[0], U.column_replicates(column, 0)[:, 0])
    assert cell["low"] < 100 * statistics.mean(values) < cell["high"]


def test_too_few_samples_have_no_interval() -> None:
    column = U.align([file_scores([1.0]), None])
    cells = [U.cell_uncertainty(s, U.column_replicates(column, 0)[:, i]) for i, s in enumerate(column.scores)]
    assert cells == [{"se": None, "low": None, "high": None, "n": 1}, None]
    assert U.percentile_interval(np.array([np.nan, np.nan, 1.0])) is None  # mostly undefined
    assert U.percentile_interval(np.array([np.nan, 1.0, 1.0])) == [1.0, 1.0]


# -- pairing -----------------------------------------------------------------------------------------


def test_rows_are_aligned_by_id_and_paired() -> None:
    values = bernoulli(200, 0.6, seed=2)
    row = file_scores(values)
    shuffled = list(reversed(row))  # the same samples in another file order
    column = U.align([row, None, shuffled])
    assert column.paired and column.key == U.align([row]).key
    replicates = U.column_replicates(column, 3)
    assert np.isnan(replicates[:, 1]).all()
    assert np.array_equal(replicates[:, 0], replicates[:, 2])  # one draw for every row
    assert not np.array_equal(replicates[:, 0], U.column_replicates(U.align([row]), 4)[:, 0])  # per task stream


def test_differing_ids_fall_back_to_unpaired() -> None:
    column = U.align([file_scores([1.0, 0.0, 1.0]), file_scores([1.0, 0.0, 1.0], prefix="t")])
    assert not column.paired and column.key is None
    replicates = U.column_replicates(column, 0)
    assert not np.array_equal(replicates[:, 0], replicates[:, 1])  # each cell its own draw
    assert not U.align([[("a", 1.0), ("a", 0.0)], [("a", 1.0), ("a", 0.0)]]).paired  # repeated ids


def matrix_samples(matrix: list[list[float | None]], n: int, seed: int = 0) -> list[list[list[tuple[str, float]] | None]]:
    """Per-sample scores whose means are exactly the matrix's entries (percent, multiples of 100/n)."""
    return [
        [None if value is None else file_scores(bernoulli(n, value / 100, seed + 7 * r + t), prefix=f"t{t}-")
         for t, value in enumerate(row)]
        for r, row in enumerate(matrix)
    ]  # fmt: skip


MATRIX = [[20.0, 10.0, 30.0], [80.0, None, None], [60.0, 90.0, None], [50.0, 70.0, 85.0]]  # no forward transfer
CHANCE = [25.0, 0.0, 50.0]


def test_metric_intervals_contain_the_point_estimates() -> None:
    bootstrap = U.bootstrap_matrix(matrix_samples(MATRIX, 100), lambda R: run_metrics(R, CHANCE))
    point = run_metrics(MATRIX, CHANCE)
    intervals = bootstrap.intervals()
    assert set(intervals) == {name for name, value in point.items() if value is not None}
    assert "FWT" not in intervals and point["FWT"] is None  # R[1][1] not evaluated: no FWT, no interval
    for name, (low, high) in intervals.items():
        assert low <= point[name] <= high, name
        assert high > low, name
    assert bootstrap.cells[1][2] is None and bootstrap.cells[0][0]["n"] == 100


def test_vectorised_metrics_equal_the_metrics_of_each_replicate() -> None:
    """metrics.py on vectors of replicates gives, for each replicate, what it gives on that replicate's matrix
    (T_F included: a task learned above chance in some replicates only)."""
    matrix = [[20.0, 10.0, 30.0], [28.0, 15.0, 40.0], [60.0, 88.0, 30.0], [20.0, 70.0, 85.0]]
    chance = [25.0, 84.0, 50.0]  # both tasks are learned barely above chance: in some replicates neither is
    bootstrap = U.bootstrap_matrix(matrix_samples(matrix, 25), lambda R: run_metrics(R, chance), replicates=200)
    assert np.isnan(bootstrap.metrics["T_F"]).any() and np.isfinite(bootstrap.metrics["T_F"]).any()
    for b in range(200):
        replicate = [[float(v) for v in row] for row in bootstrap.matrices[b]]
        metrics = run_metrics(replicate, chance)
        assert set(metrics) <= set(bootstrap.metrics)
        for name, values in bootstrap.metrics.items():
            value, got = metrics.get(name), values[b]
            assert (value is None and np.isnan(got)) or got == pytest.approx(value), (name, b)


def test_paired_rows_cancel_in_differences() -> None:
    """A task scored on the same answers just after learning and at the end forgot nothing in any replicate:
    BWT's interval is exactly [0, 0] (unpaired resampling would give a wide one)."""
    samples = matrix_samples([[50.0, 50.0], [50.0, 20.0], [50.0, 60.0]], 100)
    samples[2][0] = samples[1][0]
    bootstrap = U.bootstrap_matrix(samples, lambda R: run_metrics(R, [None, None]))
    assert bootstrap.intervals()["BWT"] == [0.0, 0.0]
    assert bootstrap.intervals()["ACC"][1] - bootstrap.intervals()["ACC"][0] > 5


def test_deterministic() -> None:
    samples = matrix_samples(MATRIX, 60)
    first = U.bootstrap_matrix(samples, lambda R: run_metrics(R, CHANCE))
    again = U.bootstrap_matrix(samples, lambda R: run_metrics(R, CHANCE))
    assert first.intervals() == again.intervals() and first.cells == again.cells
    other = U.bootstrap_matrix(samples, lambda R: run_metrics(R, CHANCE), seed=U.SEED + 1)
    assert other.intervals() != first.intervals()


# -- over seeds ----------------------------------------------------------------------------------------


def replicates_of(values: list[float], position: int = 0) -> np.ndarray:
    column = U.align([file_scores(values)])
    return U.column_replicates(column, position)[:, 0]


def test_pooled_replicates_of_one_run_are_its_own() -> None:
    run = replicates_of(bernoulli(100, 0.3, seed=3))
    rng = np.random.default_rng(0)
    assert np.array_equal(U.pooled_replicates([run], rng, shared_samples=True), run)
    assert np.array_equal(np.sort(U.pooled_replicates([run], rng, shared_samples=False)), np.sort(run))


def test_pooled_replicates_include_the_spread_over_seeds() -> None:
    runs = [replicates_of(bernoulli(400, p, seed=4)) for p in (0.3, 0.5, 0.7)]
    pooled = U.percentile_interval(U.pooled_replicates(runs, np.random.default_rng(0), shared_samples=True))
    single = U.percentile_interval(runs[1])
    assert pooled[0] < 50.0 < pooled[1] and pooled[1] - pooled[0] > 2 * (single[1] - single[0])


def test_identical_runs_differ_by_exactly_zero() -> None:
    runs = [replicates_of(bernoulli(100, p, seed=5)) for p in (0.4, 0.6)]
    for paired_seeds in (True, False):
        diff = U.difference_replicates(runs, [r.copy() for r in runs], np.random.default_rng(0), paired_seeds, True)
        if paired_seeds:
            assert U.percentile_interval(diff) == [0.0, 0.0] and U.within_noise(U.percentile_interval(diff))
        else:  # seeds resampled independently on each side: the spread over seeds stays, centred on 0
            assert U.within_noise(U.percentile_interval(diff))


def test_clearly_different_runs_are_separated_and_close_ones_are_not() -> None:
    low = [replicates_of(bernoulli(200, 0.30, seed=s)) for s in (6, 7)]
    high = [replicates_of(bernoulli(200, 0.70, seed=s)) for s in (8, 9)]
    close = [replicates_of(bernoulli(200, 0.32, seed=s)) for s in (10, 11)]
    rng = np.random.default_rng(0)
    for paired_seeds in (True, False):
        for shared in (True, False):
            separated = U.percentile_interval(U.difference_replicates(high, low, rng, paired_seeds, shared))
            assert separated[0] > 30 and not U.within_noise(separated)
            noise = U.percentile_interval(U.difference_replicates(close, low, rng, paired_seeds, shared))
            assert U.within_noise(noise)


def test_paired_seeds_need_as_many_runs() -> None:
    with pytest.raises(ValueError, match="as many runs"):
        U.difference_replicates([replicates_of([1.0, 0.0])], [], np.random.default_rng(0), True, True)


# -- results.json --------------------------------------------------------------------------------------


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    from test_compare import make_run

    return make_run(tmp_path, "seq", "seq-lora", 0, [[0, 25, 0], [100, 50, 25], [50, 100, 25], [25, 75, 100]])


def test_results_carry_uncertainty_and_round_trip(run_dir: Path) -> None:
    results = collect_results(run_dir)
    assert results.uncertainty == {"method": "bootstrap over test samples", "replicates": U.REPLICATES,
                                   "level": 0.95, "seed": U.SEED, "unpaired_tasks": []}  # fmt: skip
    assert len(results.matrix_uncertainty) == 4 and results.matrix_uncertainty[0][0]["n"] == 4
    assert results.matrix_uncertainty[1][0] == {"se": 0.0, "low": 100.0, "high": 100.0, "n": 4}
    assert set(results.metric_intervals) == {"ACC", "MFT", "MAA", "BWT", "Forgetting", "FWT", "T_F"}
    for name, (low, high) in results.metric_intervals.items():
        assert low <= results.metrics[name] <= high
    write_results(RunLayout(run_dir), results)
    data = json.loads((run_dir / "results.json").read_text(encoding="utf-8"))
    assert data["schema_version"] == SCHEMA_VERSION and data["metric_intervals"]["ACC"] == results.metric_intervals["ACC"]
    assert load_results(run_dir) == results
    assert collect_results(run_dir).metric_intervals == results.metric_intervals  # deterministic


def test_results_without_uncertainty_fields_still_load(run_dir: Path) -> None:
    data = json.loads(collect_results(run_dir).to_json())
    for key in ("matrix_uncertainty", "metric_intervals", "uncertainty"):
        del data[key]
    assert results_from_dict(data).metric_intervals == {}
    older = {**data, "schema_version": 2}  # an older schema is rebuilt from the run dir, intervals included
    (run_dir / "results.json").write_text(json.dumps(older), encoding="utf-8")
    assert load_results(run_dir).metric_intervals["ACC"]


def test_report_shows_the_intervals(run_dir: Path) -> None:
    from mmcl.report.formatting import metric_interval, plus_minus
    from mmcl.report.render import format_table, write_report

    results = collect_results(run_dir)
    acc = results.metric_intervals["ACC"]
    text = format_table(results)
    assert f"ACC 66.7{plus_minus(acc)}" in text and plus_minus(acc) == f"±{(acc[1] - acc[0]) / 2:.1f}"
    assert "FWT +25.0±" in text and "95% bootstrap interval" in text
    page = write_report(run_dir, results).read_text(encoding="utf-8")
    assert f'<td class="num">{metric_interval("ACC", acc)}</td>' in page and metric_interval("BWT", [-75, -2.5]) == "[-75.0, -2.5]"
    cell = results.matrix_uncertainty[3][1]  # 75 on 4 samples
    assert f'title="SE {cell["se"]:.1f}, 95% interval [{cell["low"]:.1f}, {cell["high"]:.1f}], 4 samples">75.0<small class="pm">' in page


# -- mmcl compare --------------------------------------------------------------------------------------


def make_scored_run(root: Path, name: str, seed: int, matrix: list[list[float]], *, rank: int = 8, n: int = 200,
                    ids: str = "s") -> Path:  # fmt: skip
    """A compare-test run dir (see test_compare.make_run) whose predictions files hold ``n`` samples each, ids
    ``<ids>0000``..., right on a seeded random subset of the size the matrix says."""
    from test_compare import TASKS, make_run

    run_dir = make_run(root, name, "seq-lora", seed, matrix, rank=rank)
    for r, row in enumerate(matrix):
        for t, (task, score) in enumerate(zip(TASKS, row)):
            right = bernoulli(n, score / 100, seed=1000 * seed + 10 * r + t)
            lines = [json.dumps({"meta": {"scorer": "exact_match", "n": n, "seconds": 0.1}})]
            lines += [json.dumps({"id": f"{ids}{i:04d}", "prediction": "yes" if ok else "no", "answer": "yes", "score": ok})
                      for i, ok in enumerate(right)]  # fmt: skip
            label = "base" if r == 0 else TASKS[r - 1]
            (run_dir / "predictions" / f"{r}_{label}" / f"{task}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return run_dir


LOW = [[10, 10, 10], [60, 10, 10], [30, 60, 10], [20, 30, 60]]
HIGH = [[10, 10, 10], [90, 10, 10], [80, 90, 10], [70, 80, 90]]


def read_csv(path: Path) -> list[dict[str, str]]:
    import csv

    with path.open(encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def test_compare_identical_variants_are_within_noise(tmp_path: Path) -> None:
    from mmcl.report.compare import compare_runs

    dirs = [make_scored_run(tmp_path, f"r{rank}s{seed}", seed, LOW, rank=rank) for rank in (8, 16) for seed in (0, 1)]
    comparison = compare_runs(dirs, tmp_path / "cmp")
    pairs = read_csv(comparison.pairs_path)
    assert {p["metric"] for p in pairs} == {"ACC", "MFT", "MAA", "BWT", "Forgetting", "FWT", "T_F"}
    for pair in pairs:  # the same predictions: the difference is exactly 0 in every replicate
        assert (pair["difference"], pair["low"], pair["high"], pair["within_noise"]) == ("0", "0", "0", "true"), pair
        assert pair["paired_seeds"] == pair["paired_samples"] == "true"
    means = [row for row in read_csv(comparison.csv_path) if row["kind"] == "mean"]
    assert len(means) == 2 and float(means[0]["ACC_low"]) < float(means[0]["ACC"]) < float(means[0]["ACC_high"])
    runs = [row for row in read_csv(comparison.csv_path) if row["kind"] == "run"]
    assert [float(runs[0]["ACC_low"]), float(runs[0]["ACC_high"])] == collect_results(dirs[0]).metric_intervals["ACC"]
    assert "within noise" in comparison.text and "seeds, samples" in comparison.text


def test_compare_separates_clearly_different_variants(tmp_path: Path) -> None:
    from mmcl.report.compare import compare_runs

    dirs = [make_scored_run(tmp_path, f"low{seed}", seed, LOW) for seed in (0, 1)]
    dirs += [make_scored_run(tmp_path, f"high{seed}", seed, HIGH, rank=16) for seed in (0, 1)]
    comparison = compare_runs(dirs, tmp_path / "cmp")
    acc = next(p for p in read_csv(comparison.pairs_path) if p["metric"] == "ACC")
    assert float(acc["difference"]) == pytest.approx((20 + 30 + 60 - 70 - 80 - 90) / 3)
    assert float(acc["high"]) < 0 and acc["within_noise"] == "false"
    assert "separated" in comparison.text
    page = comparison.html_path.read_text(encoding="utf-8")
    assert "<h2>Differences between variants</h2>" in page and "separated" in page and 'class="num separated"' in page
    assert "Per variant, mean and 95% interval over seeds and test samples" in page


def test_compare_runs_of_other_test_samples_pair_over_seeds_only(tmp_path: Path) -> None:
    from mmcl.report.compare import compare_runs

    dirs = [make_scored_run(tmp_path, f"a{seed}", seed, LOW) for seed in (0, 1)]
    dirs += [make_scored_run(tmp_path, f"b{seed}", seed, LOW, rank=16, ids="other") for seed in (0, 1)]
    comparison = compare_runs(dirs, tmp_path / "cmp")
    acc = next(p for p in read_csv(comparison.pairs_path) if p["metric"] == "ACC")
    assert (acc["paired_seeds"], acc["paired_samples"]) == ("true", "false")
    assert acc["within_noise"] == "true" and float(acc["low"]) < 0 < float(acc["high"])  # unpaired: not exactly 0
    assert "different test samples" in comparison.text
    assert "different test samples" in comparison.html_path.read_text(encoding="utf-8")
