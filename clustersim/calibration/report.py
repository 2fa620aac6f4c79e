"""Markdown tables of a validation run (``clustersim validate --markdown``): the per-set tables
of ``VALIDATION.md``, written from the results (or their ``--json`` form), never by hand."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


def _num(x: Any) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def _pct(x: Any) -> str:
    return "–" if x is None else f"{x:+.1f}"


def _summary_line(name: str, s: Mapping[str, Any]) -> str:
    if not s.get("n"):
        return f"**{name}**: no rows."
    return (
        f"**{name}**: {s['n']} rows; in sample mean |error| {s['in_mean']:.1f} %, worst "
        f"{s['in_worst']:.1f} %; out of sample mean {s['oos_mean']:.1f} %, worst "
        f"{s['oos_worst']:.1f} %."
    )


def _rows_table(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    lines = [
        "| row | configuration | metric | published | in-sample | err % | out-of-sample | err % "
        "| fitted w/o row |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        without = "–"
        if r.get("param") and r.get("param_without") is not None:
            without = f"{r['param'].split('.')[-1]} = {r['param_without']:.2f}"
        lines.append(
            f"| {r['row_id']} | {r['label']} | {r['metric']} | {_num(r['published'])} | "
            f"{_num(r['in_sample'])} | {_pct(r['error_in_pct'])} | {_num(r['out_of_sample'])} | "
            f"{_pct(r['error_oos_pct'])} | {without} |"
        )
    return lines


def _med(g: Mapping[str, Any], key: str) -> str:
    value = g.get(key)
    return "–" if value is None or value != value else f"{value:.1f}"


def _groups_table(groups: Iterable[Mapping[str, Any]]) -> list[str]:
    lines = [
        "| group | rows | in-sample median \\|err\\| % | mean % | worst % | "
        "out-of-sample median % | mean % | worst % |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for g in groups:
        lines.append(
            f"| {g['name']} | {g['n']} | {_med(g, 'in_median')} | {g['in_mean']:.1f} | "
            f"{g['in_worst']:+.1f} | {_med(g, 'oos_median')} | {g['oos_mean']:.1f} | "
            f"{g['oos_worst']:+.1f} |"
        )
    return lines


def markdown(results: Iterable[Mapping[str, Any]], skipped_rows: bool = True) -> str:
    """One section per set: its rows (or groups), summary, fitted parameters and (with
    ``skipped_rows``) the rows not expressible, from ``SetResult.to_dict()`` forms."""
    out: list[str] = []
    for s in results:
        out += [f"### {s['name']}", "", s.get("title", ""), ""]
        if s.get("status", "ok") != "ok":
            out += [f"Status: {s['status']}", ""]
            continue
        if s.get("rows"):
            out += _rows_table(s["rows"])
        if s.get("groups"):
            out += ([""] if s.get("rows") else []) + _groups_table(s["groups"])
        out += ["", _summary_line(s["name"], s["summary"])]
        params = {k: v for k, v in (s.get("params") or {}).items() if ":" not in k}
        if params:
            out += ["", "parameters: " + ", ".join(f"`{k}` = {_num(v)}" for k, v in params.items())]
        skipped = (s.get("skipped") or []) if skipped_rows else []
        if skipped:
            out += ["", f"Not expressible ({len(skipped)} rows):", ""]
            out += [f"- {k.get('row_id', '')}: {k.get('reason', '')}" for k in skipped]
        out.append("")
    return "\n".join(out)
