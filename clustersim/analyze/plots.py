"""``clustersim analyze --plot``: a timeline (Gantt) of a time window, an expert-load heatmap and
per-GPU utilisation bars, in one PNG (matplotlib, an optional dependency: ``clustersim[plot]``).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from clustersim.analyze.serving import ServingTraceAnalysis, in_system_steps, kv_usage_curves
from clustersim.analyze.training import TraceAnalysis
from clustersim.spec.outputs import atomic_output
from clustersim.trace import schema as S


class PlotError(RuntimeError):
    """Plotting is not possible (matplotlib missing, nothing to draw)."""


def require_pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotError("plotting needs matplotlib: pip install 'clustersim[plot]'") from None
    return plt


def plot_analysis(analysis: TraceAnalysis, out: str | Path) -> Path:
    """Draw the three panels into ``out`` (PNG)."""
    plt = require_pyplot()
    heat = analysis.expert_tokens is not None and len(analysis.moe_layers) > 0
    links = bool(analysis.network.busy)
    ratios = [3] + [2] * heat + [2] * links + [2]
    fig, axes = plt.subplots(
        len(ratios), 1, figsize=(14, 5 + 4 * (len(ratios) - 1)),
        gridspec_kw={"height_ratios": ratios},
    )  # fmt: skip
    _gantt(axes[0], analysis)
    if heat:
        _heatmap(fig, axes[1], analysis)
    if links:
        _link_heatmap(fig, axes[1 + heat], analysis)
    _utilisation(axes[-1], analysis)
    fig.tight_layout()
    return _save(plt, fig, out)


def plot_serving(
    analysis: ServingTraceAnalysis, out: str | Path, window_ms: tuple[float, float] | None = None
) -> Path:
    """A serving trace in one PNG: every request over time (prefill, waiting included, then
    decode; one row per request, by arrival), the continuous batch over time (requests in
    prefill and in decode) and, when the trace has it, each replica's KV-cache use."""
    plt = require_pyplot()
    cols = analysis.requests
    done = np.flatnonzero(~cols["rejected"])
    if done.size == 0:
        raise PlotError(f"{analysis.path}: no request completed, nothing to draw")
    done = done[np.argsort(cols["arrival_ms"][done], kind="stable")]
    arrival, first, finish = (cols[k][done] for k in ("arrival_ms", "first_token_ms", "finish_ms"))
    usage = analysis.kv_usage
    panels = 3 if usage is not None and usage.num_segments else 2
    fig, axes = plt.subplots(panels, 1, figsize=(14, 4.5 * panels), sharex=True)
    top, bottom = axes[0], axes[1]
    y = np.arange(done.size)
    top.hlines(y, arrival, first, colors="tab:orange", linewidth=1, label="prefill (with waiting)")
    top.hlines(y, first, finish, colors="tab:blue", linewidth=1, label="decode")
    top.set_ylabel("request (by arrival)")
    top.set_title(f"{analysis.plan_name}: {done.size} requests (seed {analysis.seed})")
    top.legend(loc="upper left")
    times, prefill, decode = in_system_steps(cols)
    bottom.step(times, prefill, where="post", color="tab:orange", label="in prefill")
    bottom.step(times, decode, where="post", color="tab:blue", label="in decode (batch)")
    bottom.set_ylabel("requests")
    bottom.legend(loc="upper left")
    if panels == 3:
        _kv_usage(axes[2], usage)
    axes[-1].set_xlabel("time (ms)")
    if window_ms is not None:
        axes[-1].set_xlim(max(window_ms[0], 0.0), min(window_ms[1], float(finish.max())))
    fig.tight_layout()
    return _save(plt, fig, out)


def _kv_usage(ax, usage) -> None:
    """Each replica's KV-cache use over time (%, the first 16 replicas)."""
    peak = 0.0
    for replica, times, use in kv_usage_curves(usage):
        ax.plot(times, use, linewidth=0.8, label=f"replica {replica}")
        peak = max(peak, float(use.max()))
    ax.set_ylabel("KV cache in use (%)")
    ax.set_ylim(0, min(100.0, max(1.15 * peak, 1.0)))
    ax.legend(loc="upper left", fontsize=7, ncol=4)


def plot_capacity(
    title: str,
    curve: list[dict],
    limits: dict[str, float],
    capacity: float | None,
    out: str | Path,
) -> Path:
    """``clustersim capacity``'s latency-vs-rate curve: TTFT p99 and TPOT p99 against the
    request rate (probes stopped early, whose latencies are unknown, marked at the top), the
    p99 limits as dashed lines, the capacity as a vertical line."""
    plt = require_pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, metric, limit_name, label in (
        (axes[0], "ttft_ms_p99", "ttft_ms_p99_max", "TTFT p99 (ms)"),
        (axes[1], "tpot_ms_p99", "tpot_ms_p99_max", "TPOT p99 (ms)"),
    ):
        known = [p for p in curve if p[metric] is not None]
        ax.plot([p["rate_req_per_s"] for p in known], [p[metric] for p in known], "o-", label=label)
        stopped = [p["rate_req_per_s"] for p in curve if p["stopped_early"]]
        if stopped:
            ax.plot(stopped, [ax.get_ylim()[1]] * len(stopped), "x", color="tab:red",
                    label="stopped early (SLOs missed)")  # fmt: skip
        if limits.get(limit_name) is not None:
            ax.axhline(limits[limit_name], linestyle="--", color="grey", label=limit_name)
        if capacity is not None:
            ax.axvline(capacity, color="tab:green", label=f"capacity {capacity:.3g} req/s")
        ax.set_xlabel("request rate (requests/s)")
        ax.set_ylabel(label)
        ax.legend(loc="upper left", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(plt, fig, out)


def _gantt(ax, analysis: TraceAnalysis) -> None:
    rows = analysis.window_rows
    end_ms = analysis.metrics["iteration_time_ms"]
    lo, hi = analysis.window_ms or (0.0, end_ms)
    hi = min(hi, end_ms) if math.isinf(hi) else hi  # no --window: the whole iteration
    ax.set_title(
        f"timeline {lo:g}-{hi:g} ms ({analysis.plan_name}); one row per lane (TP group), "
        f"asynchronous communication in the thin bar below"
    )
    ax.set_xlim(lo, hi)
    ax.set_xlabel("time (ms)")
    if rows is None:
        ax.text(0.5, 0.5, "no events in this window", ha="center", transform=ax.transAxes)
        return
    cmap = _op_colours()
    lanes = np.unique(rows["lane"])
    y_of = {int(ln): i for i, ln in enumerate(lanes)}
    seen = set()
    for op in np.unique(rows["op"]):
        for asynchronous in (False, True):
            is_async = rows["kind"] == S.KIND_CODE["comm_async"]
            mask = (rows["op"] == op) & (is_async == asynchronous)
            for lane in np.unique(rows["lane"][mask]):
                sel = mask & (rows["lane"] == lane)
                spans = list(
                    zip(
                        rows["start_s"][sel] * 1e3,
                        (rows["end_s"][sel] - rows["start_s"][sel]) * 1e3,
                        strict=True,
                    )
                )
                y = y_of[int(lane)] + (0.45 if asynchronous else 0.0)
                label = S.OPS[op] if op not in seen else None
                seen.add(op)
                ax.broken_barh(
                    spans, (y - 0.35, 0.1 if asynchronous else 0.7), color=cmap[op], label=label
                )
    ax.set_yticks(range(len(lanes)), [f"lane {ln}" for ln in lanes])
    ax.invert_yaxis()
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7)


def _op_colours() -> dict[int, tuple]:
    import matplotlib

    palette = matplotlib.colormaps["tab20"]
    return {i: palette(i % 20) for i in range(len(S.OPS))}


def _heatmap(fig, ax, analysis: TraceAnalysis) -> None:
    tokens = analysis.expert_tokens
    load = tokens / tokens.mean(axis=1, keepdims=True)
    image = ax.imshow(load, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_title("expert load per MoE layer (tokens / mean over experts, whole iteration)")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ticks = np.linspace(0, len(analysis.moe_layers) - 1, min(len(analysis.moe_layers), 8))
    ax.set_yticks(ticks.astype(int), [analysis.moe_layers[int(t)] for t in ticks])
    fig.colorbar(image, ax=ax, label="load / mean")


LINK_BINS = 200
"""Time bins of the link-utilisation heatmap."""


def _link_heatmap(fig, ax, analysis: TraceAnalysis) -> None:
    """Busy fraction of the most used links over the iteration (time bins)."""
    wall = analysis.metrics["iteration_time_ms"]
    names = sorted(analysis.network.busy)
    edges = np.linspace(0.0, wall, LINK_BINS + 1)
    grid = np.zeros((len(names), LINK_BINS))
    for row, name in enumerate(names):
        for start, end in analysis.network.busy[name].tolist():
            overlap = np.minimum(edges[1:], end) - np.maximum(edges[:-1], start)
            grid[row] += np.clip(overlap, 0.0, None)
    grid /= edges[1] - edges[0]
    image = ax.imshow(
        grid, aspect="auto", cmap="magma", interpolation="nearest", vmin=0.0, vmax=1.0,
        extent=(0.0, wall, len(names) - 0.5, -0.5),
    )  # fmt: skip
    ax.set_title("link utilisation (busy fraction per time bin; most contended links)")
    ax.set_xlabel("time (ms)")
    ticks = np.linspace(0, len(names) - 1, min(len(names), 12)).astype(int)
    ax.set_yticks(ticks, [names[t] for t in ticks], fontsize=7)
    fig.colorbar(image, ax=ax, label="busy fraction")


def _utilisation(ax, analysis: TraceAnalysis) -> None:
    gpus = analysis.gpus
    x = np.arange(len(gpus))
    util = np.array([g["utilization_pct"] for g in gpus])
    wall = analysis.metrics["iteration_time_ms"]
    exposed = np.array([100 * g["exposed_comm_ms"] / wall for g in gpus])
    ax.bar(x, util, color="tab:green", label="compute-busy")
    ax.bar(x, exposed, bottom=util, color="tab:red", label="exposed communication")
    ax.set_title(f"per-GPU utilisation (mean {analysis.metrics['gpu_utilization_pct']:.1f}%)")
    ax.set_xlabel("GPU")
    ax.set_ylabel("% of iteration")
    ax.set_ylim(0, 100)
    ax.legend(loc="upper right", fontsize=8)


def _save(plt, fig, out: str | Path) -> Path:
    """Save a PNG atomically (a temporary file renamed; a FIFO or directory refused)."""
    try:
        with atomic_output(out) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)
    return Path(out)
