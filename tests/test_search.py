"""clustersim search and the nearest-valid-plan fix of check: tiny models, small spaces."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from clustersim.audit.checks import audit
from clustersim.audit.nearest import nearest_valid_plan
from clustersim.cli import app
from clustersim.explore.search import SearchError, SearchSpace, candidate_id, search
from clustersim.spec import load_plan
from clustersim.spec.load import plan_from_dict

SEEDS = Path(__file__).resolve().parent.parent / "configs" / "seeds"

# A dense ~3.7 B-parameter model, 4 layers: with 18 bytes per parameter (no distributed
# optimizer) its weights, gradients and Adam states take ~62 GiB; split over TP 4 that is ~16
# GiB per GPU, over TP 2 ~31 GiB, unsplit ~62 GiB. On 28 GiB GPUs only TP 4 fits.
DENSE = {
    "name": "tiny-dense",
    "seed": 0,
    "model": {
        "num_layers": 4,
        "hidden_size": 8192,
        "num_attention_heads": 64,
        "ffn_hidden_size": 4 * 8192,
        "vocab_size": 32000,
        "activation": "gelu",
    },
    "hardware": {"gpu": "H100-SXM", "num_nodes": 1, "gpus_per_node": 4, "memory_gib": 28},
    "parallel": {"tp": 1, "pp": 1, "dp": 4, "micro_batch_size": 1, "num_microbatches": 2},
    "workload": {"mode": "training", "seq_len": {"dist": "fixed", "value": 256}},
}

# A tiny MoE on 8 GPUs: 4 layers, 8 experts, short sequences (a simulation takes ~10 ms).
MOE = {
    "name": "tiny-moe",
    "seed": 3,
    "model": {
        "num_layers": 4,
        "hidden_size": 1024,
        "num_attention_heads": 8,
        "num_kv_heads": 8,
        "ffn_hidden_size": 1024,
        "vocab_size": 8000,
        "moe": {"num_experts": 8, "top_k": 2},
    },
    "hardware": {"gpu": "H100-SXM", "num_nodes": 1, "gpus_per_node": 8},
    "parallel": {"tp": 1, "pp": 2, "dp": 4, "ep": 4, "micro_batch_size": 1, "num_microbatches": 4},
    "workload": {"mode": "training", "seq_len": {"dist": "uniform", "min": 64, "max": 256}},
    "targets": {"memory_per_gpu_gib_max": 60},
}
MOE_SPACE = SearchSpace(
    gpus=8, tp=(1, 2), pp=(1, 2), ep=(2, 4, 8), micro_batch_size=(1, 2), recompute=("none",)
)


def _plan(data):
    return plan_from_dict(copy.deepcopy(data), "<test>")


def test_only_layout_that_fits_memory_wins(tmp_path):
    space = SearchSpace(
        gpus=4,
        tp=(1, 2, 4),
        pp=(1,),
        micro_batch_size=(1,),
        recompute=("none",),
        schedules=("1f1b",),
    )
    result = search(
        _plan(DENSE), 4, "throughput", space=space, workers=1, out=tmp_path / "s.parquet"
    )
    assert result.counts == {"oom": 2, "simulated": 1}
    best = result.best()
    assert (best["tp"], best["pp"], best["dp"]) == (4, 1, 1)
    assert best["memory_per_gpu_gib"] < 28


def test_objectives_order_is_evident():
    # same layout, more micro-batches of the fixed global batch: throughput and cost agree,
    # and the iteration with the same tokens in fewer pipeline-free steps is not slower
    result = search(_plan(MOE), 8, "cost", space=MOE_SPACE, workers=1)
    ranked = result.ranked()
    assert ranked, result.counts
    costs = [r["cost_gpu_ms_per_token"] for r in ranked]
    assert costs == sorted(costs)
    for r in ranked:
        assert r["cost_gpu_ms_per_token"] == pytest.approx(8 / r["throughput_tokens_per_ms"])
    by_tput = search(_plan(MOE), 8, "throughput", space=MOE_SPACE, workers=1)
    assert [r["candidate_id"] for r in by_tput.ranked()] == [r["candidate_id"] for r in ranked]
    lat = search(_plan(MOE), 8, "latency", space=MOE_SPACE, workers=1).ranked()
    assert [r["latency_ms"] for r in lat] == sorted(r["latency_ms"] for r in lat)


def test_returned_plans_pass_the_auditor_and_the_front_is_nondominated():
    result = search(_plan(MOE), 8, "throughput", space=MOE_SPACE, workers=1, pareto_axis="memory")
    assert result.counts.get("invalid", 0) > 0  # e.g. EP 8 x ETP 2 cannot fold into 8 ranks
    for row in result.ranked():
        report = audit(result.plan_for(row))
        assert not report.has_errors, [f.message for f in report.errors]
        assert row["meets_targets"]
    front = result.pareto()
    assert front
    for a in front:
        for b in result.ranked():
            assert not (
                b["throughput_tokens_per_ms"] > a["throughput_tokens_per_ms"]
                and b["memory_per_gpu_gib"] < a["memory_per_gpu_gib"]
            )


def test_same_seed_same_ranking_across_workers(tmp_path):
    one = search(_plan(MOE), 8, space=MOE_SPACE, workers=1, out=tmp_path / "a.parquet")
    two = search(_plan(MOE), 8, space=MOE_SPACE, workers=2, out=tmp_path / "b.parquet")
    assert [r["candidate_id"] for r in one.ranked()] == [r["candidate_id"] for r in two.ranked()]
    assert pq.read_table(tmp_path / "a.parquet").equals(pq.read_table(tmp_path / "b.parquet"))
    other = search(_plan(MOE), 8, space=MOE_SPACE, workers=1, seed=11)
    assert [r["latency_ms"] for r in other.ranked()] != [r["latency_ms"] for r in one.ranked()]


def test_interrupt_and_resume_gives_the_same_table(tmp_path):
    full = tmp_path / "full.parquet"
    search(_plan(MOE), 8, space=MOE_SPACE, workers=1, out=full)
    part = tmp_path / "part.parquet"
    first = search(_plan(MOE), 8, space=MOE_SPACE, workers=1, out=part, limit=3)
    assert not first.complete and first.simulated_now == 3
    statuses = pq.read_table(part).column("status").to_pylist()
    assert statuses.count("simulated") == 3 and "pending" in statuses
    second = search(_plan(MOE), 8, space=MOE_SPACE, workers=2, out=part, resume=True)
    assert second.resumed == 3 and second.complete
    assert pq.read_table(part).equals(pq.read_table(full))
    assert pq.read_table(part).schema.metadata == pq.read_table(full).schema.metadata


def test_resume_refuses_a_table_of_another_plan(tmp_path):
    out = tmp_path / "s.parquet"
    search(_plan(MOE), 8, space=MOE_SPACE, workers=1, out=out, limit=1)
    with pytest.raises(SearchError, match="another base plan"):
        search(_plan(MOE), 8, space=MOE_SPACE, workers=1, out=out, resume=True, seed=5)


def test_candidate_ids_are_stable():
    params = {
        "tp": 2,
        "pp": 1,
        "dp": 4,
        "ep": 4,
        "etp": 1,
        "micro_batch_size": 1,
        "num_microbatches": 2,
        "schedule": "1f1b",
        "virtual_stages": 1,
        "recompute": "none",
    }
    assert candidate_id(params) == candidate_id(dict(reversed(params.items())))
    assert candidate_id(params) != candidate_id({**params, "tp": 1})


def test_cli_search_writes_table_and_json(tmp_path, write_plan):
    path = write_plan(MOE)
    out = tmp_path / "t.parquet"
    res = CliRunner().invoke(
        app,
        [
            "search",
            str(path),
            "--gpus",
            "8",
            "--tp",
            "1,2",
            "--pp",
            "1,2",
            "--ep",
            "2,4",
            "--mbs",
            "1",
            "--recompute",
            "none",
            "-w",
            "1",
            "-o",
            str(out),
            "--objective",
            "latency",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["objective"] == "latency" and data["ranking"]
    assert data["best_parallel"]["tp"] in (1, 2)
    assert pq.read_table(out).num_rows == data["summary"]["candidates"]
    bad = CliRunner().invoke(app, ["search", str(path), "--tp", "x"])
    assert bad.exit_code == 2


def test_ray_backend_agrees_or_says_how_to_install(tmp_path):
    try:
        import ray  # noqa: F401
    except ImportError:
        from clustersim.explore.backends import BackendError

        with pytest.raises(BackendError, match="ray extra"):
            search(_plan(MOE), 8, space=MOE_SPACE, workers=1, backend="ray", limit=1)
        return
    pytest.skip("Ray is installed: covered by the slow test below")


@pytest.mark.slow
def test_ray_backend_agrees_with_local(tmp_path):
    pytest.importorskip("ray")
    local = search(_plan(MOE), 8, space=MOE_SPACE, workers=2, out=tmp_path / "l.parquet")
    remote = search(
        _plan(MOE), 8, space=MOE_SPACE, workers=2, out=tmp_path / "r.parquet", backend="ray"
    )
    assert remote.counts == local.counts
    assert pq.read_table(tmp_path / "l.parquet").equals(pq.read_table(tmp_path / "r.parquet"))


# ---- check proposes the nearest valid plan --------------------------------------------------
@pytest.mark.parametrize(
    "seed",
    ["000_current", "000_required", "001_current", "002_current", "002_required", "003_required"],
)
def test_nearest_valid_plan_is_valid_and_cheap(seed):
    plan = load_plan(SEEDS / f"{seed}.yaml")
    started = time.perf_counter()
    fix = nearest_valid_plan(plan)
    assert time.perf_counter() - started < 1.0
    assert fix is not None
    errors = [f for f in audit(fix.plan).errors if not f.node.startswith("claims.")]
    assert not errors
    changed = {k for k in fix.changes}
    assert changed == {
        k for k in changed if getattr(plan.parallel, k) != getattr(fix.plan.parallel, k)
    }
    assert fix.parallel_yaml().startswith("parallel:\n")


def test_nearest_valid_plan_by_hand():
    # 000_current: EP 8 x ETP (= TP) 8 = 64 cannot fold into TP 8 x DP 1 = 8 ranks; ETP 1 alone
    # fixes it (one field).
    fix = nearest_valid_plan(load_plan(SEEDS / "000_current.yaml"))
    assert fix.changes == {"etp": (None, 1)}
    # 001_current: TP 3 does not divide 32 heads; the nearest TP that does is 4 (or 2): one field
    fix = nearest_valid_plan(load_plan(SEEDS / "001_current.yaml"))
    assert list(fix.changes) == ["tp"]
    # a valid plan needs no fix
    assert nearest_valid_plan(_plan(MOE)) is None


def test_check_prints_the_suggestion():
    path = str(SEEDS / "000_required.yaml")
    res = CliRunner().invoke(app, ["check", path, "--static", "--json"])
    assert res.exit_code == 1
    data = json.loads(res.stdout)
    assert data["suggestion"]["yaml"].startswith("parallel:")
    assert data["suggestion"]["changes"]
    md = CliRunner().invoke(app, ["check", path, "--static", "--format", "markdown"])
    assert "## Suggested fix" in md.stdout and "```yaml\nparallel:" in md.stdout
    table = CliRunner().invoke(app, ["check", path, "--static"])
    assert "suggested fix" in table.stdout
    ok = CliRunner().invoke(app, ["check", str(SEEDS / "004_current.yaml"), "--static", "--json"])
    assert json.loads(ok.stdout)["suggestion"] is None


def test_search_offers_dualpipe_only_where_it_runs():
    """--schedules dualpipe: candidates only with PP even and micro-batches even and >= 2 PP
    (PP 1 stays 1F1B); every ranked DualPipe plan passes the auditor."""
    base = copy.deepcopy(MOE)
    base["parallel"]["num_microbatches"] = 8
    space = SearchSpace(
        gpus=8,
        tp=(1,),
        pp=(1, 2),
        ep=(4,),
        micro_batch_size=(1, 2),
        recompute=("none",),
        schedules=("dualpipe",),
    )
    result = search(_plan(base), 8, "throughput", space=space, workers=1)
    rows = result.ranked()
    dual = [r for r in rows if r["schedule"] == "dualpipe"]
    assert dual and all(r["pp"] % 2 == 0 for r in dual)
    assert all(r["schedule"] == "1f1b" for r in rows if r["pp"] == 1)
    for row in dual:
        plan = result.plan_for(row)
        m, p = plan.parallel.num_microbatches, plan.parallel.pp
        assert m % 2 == 0 and m >= 2 * p
        assert not audit(plan).has_errors
