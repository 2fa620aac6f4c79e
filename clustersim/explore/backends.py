"""Where search candidates are simulated: in this process, a local process pool, or Ray.

Every backend runs :func:`simulate_candidate` on a plan given as a JSON-ready dict (so a task
is small and picklable) and yields ``(candidate_id, row)`` as results arrive. Results do not
depend on the backend: the simulation is deterministic given the plan and its seed.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Any

from clustersim.audit.checks import METRIC_KEYS
from clustersim.run.evaluate import evaluate
from clustersim.spec.schema import Plan

BACKENDS = ("local", "ray")


class BackendError(RuntimeError):
    """A backend cannot be used (e.g. Ray is not installed)."""


def simulate_candidate(plan_dict: dict[str, Any]) -> dict[str, Any]:
    """Evaluate one candidate plan (given as a dict) with :func:`evaluate` (the verdict
    ``check`` and ``run`` print) and return its result row fields."""
    try:
        plan = Plan.model_validate(plan_dict)
        verdict = evaluate(plan)
    except ValueError as exc:
        return {"status": "unsupported", "reason": str(exc)[:300]}
    except Exception as exc:  # noqa: BLE001 - one bad candidate must not end the search
        return {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"[:300]}
    if verdict.run is None:
        return {
            "status": "unsupported",
            "reason": verdict.note.removeprefix("not simulated: ")[:300],
        }
    metrics = verdict.metrics
    failed = sorted(
        {
            f.node.removeprefix("targets.")
            for f in verdict.findings
            if f.severity == "error" and f.node.startswith("targets.")
        }
    )
    row: dict[str, Any] = {k: _num(metrics.get(k)) for k in METRIC_KEYS}
    row.update(
        status="simulated",
        reason=None,
        meets_targets=not failed,
        failed_targets=",".join(failed) or None,
        events=int(verdict.run.events),
        exit_code=verdict.exit_code,
    )
    return row


def _num(value: Any) -> float | None:
    return None if value is None else float(value)


def default_workers() -> int:
    """All the cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


TaskFn = Callable[[dict[str, Any]], dict[str, Any]]


def run_tasks(
    tasks: Sequence[tuple[str, dict[str, Any]]],
    workers: int,
    backend: str = "local",
    fn: TaskFn = simulate_candidate,
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Run ``fn`` (a module-level function: it is pickled) on ``(candidate_id, payload)``
    tasks, by default :func:`simulate_candidate` of a plan dict; yield ``(candidate_id, row)``
    as they end.

    Closing the iterator early (an interruption) cancels the tasks not yet started.
    """
    if backend == "ray":
        yield from _run_ray(tasks, workers, fn)
    elif backend != "local":
        raise BackendError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    elif workers <= 1 or len(tasks) <= 1:
        for cid, plan in tasks:
            yield cid, fn(plan)
    else:
        yield from _run_pool(tasks, workers, fn)


def _pool_context():
    # fork: workers inherit the imported engine (no re-import per worker); elsewhere spawn.
    method = "fork" if sys.platform.startswith("linux") else "spawn"
    return multiprocessing.get_context(method)


def _watch_parent(parent: int) -> None:
    """Worker initializer: the parent handles Ctrl-C and SIGTERM (and ends the workers); a
    worker whose parent is gone (killed, even by SIGKILL) exits within a second."""
    import signal
    import threading
    import time

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="clustersim-parent-watch", daemon=True).start()


def _kill_workers(pool: ProcessPoolExecutor) -> None:
    """End the pool's workers now (an interruption must not wait for running simulations)."""
    for proc in list((getattr(pool, "_processes", None) or {}).values()):
        with contextlib.suppress(Exception):  # already gone
            proc.terminate()


def _run_pool(tasks, workers, fn) -> Iterator[tuple[str, dict[str, Any]]]:
    """At most ``2 x workers`` tasks in flight, so an interruption loses little work. Workers
    exit when the parent dies; an interruption (the iterator closed or an exception, e.g. the
    CLI's SIGTERM) terminates the running ones."""
    pool = ProcessPoolExecutor(
        max_workers=workers,
        mp_context=_pool_context(),
        initializer=_watch_parent,
        initargs=(os.getpid(),),
    )
    pending: dict[Future, str] = {}
    todo = iter(tasks)
    try:
        for cid, plan in todo:
            pending[pool.submit(fn, plan)] = cid
            if len(pending) >= 2 * workers:
                break
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in sorted(done, key=lambda f: pending[f]):
                cid = pending.pop(fut)
                yield cid, fut.result()
                nxt = next(todo, None)
                if nxt is not None:
                    pending[pool.submit(fn, nxt[1])] = nxt[0]
    finally:
        for fut in pending:
            fut.cancel()
        if pending:
            _kill_workers(pool)
        pool.shutdown(wait=True, cancel_futures=True)


def require_ray():
    try:
        import ray
    except ImportError:
        raise BackendError(
            "--backend ray needs Ray: install the ray extra (pip install 'clustersim[ray]')"
        ) from None
    return ray


def _run_ray(tasks, workers, fn) -> Iterator[tuple[str, dict[str, Any]]]:
    """Tasks on a Ray cluster: ``ray.init()`` connects to a running one (RAY_ADDRESS or a local
    head) or starts a local instance with ``workers`` CPUs."""
    ray = require_ray()
    started_here = False
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {
            "ignore_reinit_error": True,
            "log_to_driver": False,
            "include_dashboard": False,
        }
        if not os.environ.get("RAY_ADDRESS"):
            kwargs["num_cpus"] = max(1, workers)
        ray.init(**kwargs)
        started_here = True
    remote = ray.remote(num_cpus=1)(fn)
    refs = {remote.remote(plan): cid for cid, plan in tasks}
    try:
        while refs:
            done, _ = ray.wait(list(refs), num_returns=1)
            for ref in done:
                cid = refs.pop(ref)
                yield cid, ray.get(ref)
    finally:
        for ref in refs:
            ray.cancel(ref, force=True)
        if started_here:
            ray.shutdown()


__all__ = ["BACKENDS", "BackendError", "default_workers", "run_tasks", "simulate_candidate"]
