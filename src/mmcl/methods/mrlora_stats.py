"""MR-LoRA's routing statistics (Zhao et al., 2025, "MLLM-CL: Continual Learning for Multimodal Large
Language Models", arXiv:2506.05453) for :mod:`mmcl.methods.mrlora`: the raw counters of each (stage, task),
their readable summary (router accuracy, confusion matrix, score with the router and with oracle routing),
and the report's sections built from it (data: tables, see :meth:`mmcl.methods.base.Method.report_sections`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from mmcl.data.sample import Sample
from mmcl.methods.mrlora_router import BASE_ROUTE, NOT_EVALUATED, MrLoraConfig

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


def merge_counters(routing: dict[str, dict[str, Any]], report: Mapping[str, Any]) -> None:
    """Add the raw counters of a routing report written earlier to ``routing`` (stage key -> raw counters);
    a (stage, task) already counted in ``routing`` is kept as it is."""
    for key, summary in report.get("stages", {}).items():
        raw = raw_stage(summary)
        stage = routing.setdefault(key, {"experts": raw["experts"], "evaluated": raw["evaluated"], "tasks": {}})
        for name, entry in raw["tasks"].items():
            stage["tasks"].setdefault(name, entry)


def routing_set_fit(own: Sequence[int], choices: Sequence[int], experts: Sequence[str]) -> tuple[dict[str, float], list[int]]:
    """How the router routed its routing set, sample i being of expert ``own[i]`` and sent to ``choices[i]``:
    per expert (task name, in letter order) the percentage of its samples sent to it (100 without any), and
    the positions of the misrouted samples."""
    accuracy = {}
    for expert, name in enumerate(experts):
        mine = [int(c) == expert for e, c in zip(own, choices) if e == expert]
        accuracy[name] = 100.0 * sum(mine) / len(mine) if mine else 100.0
    wrong = [i for i, (e, c) in enumerate(zip(own, choices)) if int(c) != e]
    return accuracy, wrong


def count_batch(
    stage: dict[str, Any],
    samples: Sequence[Sample],
    answers: Sequence[str],
    routes: Sequence[str],
    fallbacks: Sequence[bool],
    scorers: Mapping[str, str],
    experts: Sequence[str],
    evaluated: bool,
    oracle_answers: Mapping[int, str] | None,
) -> None:
    """Add one evaluated batch to the raw counters of ``stage``: per sample its route (``routes[i]``: the
    expert task's name, ``base`` or ``not-evaluated``), whether an illegal router answer sent it to a random
    expert, and, for tasks with a scorer in ``scorers`` (task name -> scorer), the score of its answer and,
    when ``oracle_answers`` is given (position -> the answer of the sample's own expert), the oracle score
    of the samples whose task has one of the ``experts``. A stage the protocol does not evaluate
    (``evaluated`` false) counts samples only."""
    from mmcl.evaluation.scorers import score_one

    if not evaluated:
        for sample in samples:
            entry = stage["tasks"].setdefault(sample.task, new_entry())
            entry["n"] += 1
            entry["routed"][NOT_EVALUATED] = entry["routed"].get(NOT_EVALUATED, 0) + 1
        return
    for index, (sample, answer) in enumerate(zip(samples, answers)):
        entry = stage["tasks"].setdefault(sample.task, new_entry())
        entry["n"] += 1
        route = routes[index]
        entry["routed"][route] = entry["routed"].get(route, 0) + 1
        entry["fallback"] += int(fallbacks[index]) if index < len(fallbacks) else 0
        if sample.task not in scorers:
            continue
        scorer_name = scorers[sample.task]
        entry["score_sum"] += score_one(scorer_name, answer, sample.reference)
        entry["score_n"] += 1
        if oracle_answers is not None and sample.task in experts:
            entry["oracle_sum"] += score_one(scorer_name, oracle_answers[index], sample.reference)
            entry["oracle_n"] += 1


def entry_delta(entry: Mapping[str, Any], base: Mapping[str, Any]) -> dict[str, Any]:
    """What ``entry`` counted beyond ``base`` (two raw counter entries of one (stage, task))."""
    routed = {route: count - base["routed"].get(route, 0) for route, count in entry["routed"].items()}
    delta = {key: entry[key] - base[key] for key in RAW_KEYS if key != "routed"}
    return {**delta, "routed": {route: count for route, count in routed.items() if count}}


def add_entries(total: dict[str, Any], part: Mapping[str, Any]) -> dict[str, Any]:
    """``total`` plus ``part`` (raw counter entries), in place; returns ``total``."""
    for key in RAW_KEYS:
        if key == "routed":
            for route, count in part["routed"].items():
                total["routed"][route] = total["routed"].get(route, 0) + count
        else:
            total[key] += part[key]
    return total


def protocol_note(config: MrLoraConfig) -> str:
    """One sentence on what the rows of the matrix mean under the configured router protocol."""
    if config.router_protocol == "paper":
        return (
            "Router protocol 'paper' (MLLM-CL repo): the router is trained once, after the last task, on "
            f"{config.router_samples_per_task} samples of every task, and generates its answer (an "
            "illegal answer goes to a random expert, counted as 'fallback'). Only the last row of the "
            "matrix is an MR-LoRA result: the rows of the stages before it are NOT evaluated (their "
            "answers are empty placeholders scored 0; ignore them and every metric built on them, such "
            "as BWT and forgetting)."
        )
    return (
        "Router protocol 'per-stage' (ours): after every task from the second on the router is trained "
        f"further on {config.router_samples_per_task} samples of every task so far and picks the "
        "expert whose letter has the highest logit; every row of the matrix is an MR-LoRA result."
    )


TITLE = "MR-LoRA routing"


def _cell(value: Any) -> str:
    return "-" if value is None else f"{value:.1f}" if isinstance(value, float) else str(value)


def routing_sections(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The report's sections from a routing report (:meth:`MrLora.routing_report`): one table with the
    router accuracy per stage (stages the protocol does not evaluate marked so), then per evaluated stage
    the confusion matrix (true task x chosen expert) with each task's router accuracy and its score with
    the router beside its score with oracle routing."""
    stages = report["stages"]
    if not stages:
        return []
    overview, details, skipped = [], [], False
    for key, stage in stages.items():
        if not stage.get("evaluated", True):
            skipped = True
            overview.append([key, "not evaluated", "-"])
            continue
        fallbacks = sum(entry.get("fallback", 0) for entry in stage["tasks"].values())
        overview.append([key, _cell(stage["router_accuracy"]), str(fallbacks)])
        confusion = stage["confusion"]
        rows = [
            [task, *map(str, counts), *(_cell(stage["tasks"][task][k]) for k in ("router_accuracy", "score", "oracle_score"))]
            for task, counts in zip(confusion["rows"], confusion["counts"])
        ]
        fallback_note = f" {fallbacks} illegal router answers were sent to a random expert." if fallbacks else ""
        details.append({
            "title": f"{TITLE} after stage {key}: router accuracy {_cell(stage['router_accuracy'])}%",
            "kind": "table",
            "note": "Rows: the samples' true tasks; columns: how many went to each expert, the router accuracy, "
            f"the task score with the router and with oracle routing (%).{fallback_note}",
            "columns": ["true task \\ expert", *confusion["columns"], "router acc.", "score", "oracle score"],
            "rows": rows,
        })  # fmt: skip
    note = report["protocol_note"]
    if skipped:
        note += (
            f" Stages marked 'not evaluated': the '{report['protocol']}' router protocol defines no model there "
            "(the router is trained after the last task only): the answers of those rows are empty placeholders, "
            "not results."
        )
    summary = {"title": TITLE, "kind": "table", "note": note,
               "columns": ["after stage", "router accuracy (%)", "illegal router answers"], "rows": overview}  # fmt: skip
    return [summary, *details]
