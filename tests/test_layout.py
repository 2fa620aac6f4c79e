"""Parallel layout against hand-computed groups (reference.md "Parallel groups") and invariants."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clustersim.layout import GROUP_KINDS, Layout
from clustersim.spec import Plan, load_plan, plan_from_dict

SMALL_MOE: dict[str, Any] = {
    "num_layers": 16,
    "hidden_size": 1024,
    "num_attention_heads": 16,
    "ffn_hidden_size": 4096,
    "vocab_size": 1000,
    "moe": {"num_experts": 16, "top_k": 2},
}
SMALL_DENSE: dict[str, Any] = {k: v for k, v in SMALL_MOE.items() if k != "moe"}


def make_plan(
    *,
    tp: int = 1,
    pp: int = 1,
    dp: int = 1,
    cp: int = 1,
    ep: int = 1,
    etp: int | None = None,
    gpus_per_node: int = 8,
    model: dict[str, Any] | None = None,
    **parallel: Any,
) -> Plan:
    world = tp * pp * dp * cp
    par: dict[str, Any] = {"tp": tp, "pp": pp, "dp": dp, "cp": cp, "ep": ep, **parallel}
    if etp is not None:
        par["etp"] = etp
    raw = {
        "model": model if model is not None else SMALL_MOE,
        "hardware": {
            "gpu": "H100-SXM",
            "num_nodes": -(-world // gpus_per_node),
            "gpus_per_node": gpus_per_node,
        },
        "parallel": par,
    }
    return plan_from_dict(raw, "<test>")


def make_layout(**kwargs: Any) -> Layout:
    return Layout(make_plan(**kwargs))


# ---- the reference.md example --------------------------------------------------------------
# world 16, t2 p2 -> d4; etp1 ep4 -> edp2


@pytest.fixture
def ref() -> Layout:
    return make_layout(tp=2, pp=2, dp=4, ep=4, etp=1)


def test_reference_example_sizes(ref: Layout) -> None:
    assert ref.world_size == 16
    assert ref.expert_folding_ok
    assert ref.edp == 2
    assert ref.ep_groups == 4


def test_reference_example_tp_groups(ref: Layout) -> None:
    assert ref.groups("tp") == [[2 * i, 2 * i + 1] for i in range(8)]


def test_reference_example_dp_groups(ref: Layout) -> None:
    assert ref.groups("dp") == [[0, 2, 4, 6], [1, 3, 5, 7], [8, 10, 12, 14], [9, 11, 13, 15]]


def test_reference_example_ep_groups(ref: Layout) -> None:
    assert ref.groups("ep") == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]


def test_reference_example_edp_groups(ref: Layout) -> None:
    expected = [[0, 4], [1, 5], [2, 6], [3, 7], [8, 12], [9, 13], [10, 14], [11, 15]]
    assert sorted(ref.groups("edp")) == expected


def test_reference_example_pp_groups(ref: Layout) -> None:
    assert ref.groups("pp") == [[r, r + 8] for r in range(8)]


def test_reference_example_trivial_groups(ref: Layout) -> None:
    assert ref.groups("cp") == [[r] for r in range(16)]
    assert ref.groups("etp") == [[r] for r in range(16)]


def test_reference_example_coords(ref: Layout) -> None:
    c = ref.coords(13)  # 13 = tp 1 + 2 * (dp 2 + 4 * pp 1)
    assert (c.tp, c.cp, c.dp, c.pp) == (1, 0, 2, 1)
    assert (c.etp, c.ep, c.edp) == (0, 1, 1)  # 13 = 0 + 1 * (ep 1 + 4 * (edp 1 + 2 * pp 1))
    assert (c.node, c.local_rank) == (1, 5)
    assert ref.rank_of(tp=1, dp=2, pp=1) == 13


def test_group_of(ref: Layout) -> None:
    assert ref.group_of("dp", 10) == [8, 10, 12, 14]
    assert ref.group_of("edp", 10) == [10, 14]
    assert ref.group_of("pp", 10) == [2, 10]


def test_bad_rank_and_kind(ref: Layout) -> None:
    with pytest.raises(IndexError):
        ref.coords(16)
    with pytest.raises(IndexError):
        ref.coords(-1)
    with pytest.raises(ValueError, match="unknown group kind"):
        ref.groups("sp")


# ---- invariants over small shapes ----------------------------------------------------------


@st.composite
def shapes(draw: st.DrawFn) -> dict[str, int]:
    tp = draw(st.sampled_from([1, 2, 4]))
    cp = draw(st.sampled_from([1, 2]))
    dp = draw(st.integers(1, 4))
    pp = draw(st.integers(1, 3))
    per_stage = tp * cp * dp
    folds = [
        (e, t)
        for e in range(1, per_stage + 1)
        for t in range(1, per_stage + 1)
        if per_stage % (e * t) == 0
    ]
    ep, etp = draw(st.sampled_from(folds))
    gpn = draw(st.sampled_from([1, 2, 4, 8]))
    return {"tp": tp, "cp": cp, "dp": dp, "pp": pp, "ep": ep, "etp": etp, "gpus_per_node": gpn}


@settings(max_examples=60, deadline=None)
@given(shapes())
def test_coords_round_trip(shape: dict[str, int]) -> None:
    lay = make_layout(**shape)
    world = shape["tp"] * shape["cp"] * shape["dp"] * shape["pp"]
    assert lay.world_size == world
    seen = set()
    for rank in range(world):
        c = lay.coords(rank)
        assert c.rank == rank
        assert 0 <= c.tp < shape["tp"] and 0 <= c.cp < shape["cp"]
        assert 0 <= c.dp < shape["dp"] and 0 <= c.pp < shape["pp"]
        assert lay.rank_of(tp=c.tp, cp=c.cp, dp=c.dp, pp=c.pp) == rank
        assert c.node * shape["gpus_per_node"] + c.local_rank == rank
        assert 0 <= c.local_rank < shape["gpus_per_node"]
        seen.add((c.tp, c.cp, c.dp, c.pp))
        # expert coordinates: etp fastest, then ep, then edp, inside the same pipeline stage
        assert c.etp is not None and c.ep is not None and c.edp is not None
        etp, ep = shape["etp"], shape["ep"]
        assert rank == c.etp + etp * (c.ep + ep * (c.edp + lay.edp * c.pp))
    assert len(seen) == world  # coordinates are a bijection


@settings(max_examples=60, deadline=None)
@given(shapes())
def test_every_group_kind_partitions_the_ranks(shape: dict[str, int]) -> None:
    lay = make_layout(**shape)
    world = lay.world_size
    per_stage = shape["tp"] * shape["cp"] * shape["dp"]
    sizes = {
        **{k: shape[k] for k in ("tp", "cp", "dp", "pp", "ep", "etp")},
        "edp": per_stage // (shape["ep"] * shape["etp"]),
    }
    assert lay.edp == sizes["edp"]
    for kind in GROUP_KINDS:
        groups = lay.groups(kind)
        assert all(len(g) == sizes[kind] for g in groups), kind
        assert len(groups) == world // sizes[kind], kind
        flat = sorted(r for g in groups for r in g)
        assert flat == list(range(world)), kind  # each rank in exactly one group


@settings(max_examples=60, deadline=None)
@given(shapes())
def test_group_members_differ_only_in_their_coordinate(shape: dict[str, int]) -> None:
    lay = make_layout(**shape)
    dense = ("tp", "cp", "dp", "pp")
    expert = ("etp", "ep", "edp")
    for kind in GROUP_KINDS:
        for group in lay.groups(kind):
            cs = [lay.coords(r) for r in group]
            # members are in coordinate order 0, 1, 2, ...
            assert [getattr(c, kind) for c in cs] == list(range(len(group))), kind
            others = [d for d in (dense if kind in dense else (*expert, "pp")) if d != kind]
            for other in others:
                assert len({getattr(c, other) for c in cs}) == 1, (kind, other)
            if kind in expert:  # expert groups never leave a pipeline stage
                assert len({c.pp for c in cs}) == 1


@settings(max_examples=40, deadline=None)
@given(shapes())
def test_ep_group_holds_every_expert_once(shape: dict[str, int]) -> None:
    ep = shape["ep"]
    model = {**SMALL_MOE, "moe": {"num_experts": 2 * ep, "top_k": 1}}
    lay = make_layout(model=model, **shape)
    for group in lay.groups("ep"):
        held = [e for r in group for e in lay.experts_of(r)]
        assert sorted(held) == list(range(2 * ep))


# ---- expert folding ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "ok", "edp"),
    [
        ({"tp": 4, "dp": 2, "ep": 16}, False, None),  # seed 000: EP 16 from 8 ranks per stage
        ({"tp": 4, "dp": 2, "ep": 16, "etp": 1}, False, None),
        ({"tp": 8, "dp": 1, "ep": 8}, False, None),  # etp defaults to tp: 8 * 8 > 8
        ({"tp": 8, "dp": 1, "ep": 8, "etp": 8}, False, None),
        ({"tp": 8, "dp": 1, "ep": 8, "etp": 1}, True, 1),
        ({"tp": 2, "dp": 4, "ep": 4}, True, 1),  # etp = tp = 2: 2 * 4 = 8 ranks
        ({"tp": 2, "dp": 4, "ep": 2}, True, 2),
        ({"tp": 2, "dp": 3, "ep": 4, "etp": 1}, False, None),  # 4 does not divide 6
        ({"tp": 2, "dp": 4, "ep": 8, "etp": 1, "pp": 2}, True, 1),
    ],
)
def test_expert_folding_flag(shape: dict[str, int], ok: bool, edp: int | None) -> None:
    lay = make_layout(**shape)
    assert lay.expert_folding_ok is ok
    assert lay.edp == edp
    if not ok:
        assert lay.groups("ep") == [] and lay.groups("edp") == [] and lay.groups("etp") == []
        assert lay.ep_groups == 0
        c = lay.coords(0)
        assert (c.etp, c.ep, c.edp) == (None, None, None)
        assert list(lay.experts_of(0)) == []


def test_etp_defaults_to_tp() -> None:
    lay = make_layout(tp=2, dp=4, ep=2)
    assert lay.etp == 2
    assert lay.groups("etp") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert lay.groups("ep") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert lay.groups("edp") == [[0, 4], [1, 5], [2, 6], [3, 7]]


# ---- node placement ------------------------------------------------------------------------


def test_tp8_stays_inside_8_gpu_nodes_pp_crosses() -> None:
    lay = make_layout(tp=8, pp=2, ep=8, etp=1)
    assert lay.groups("tp") == [list(range(8)), list(range(8, 16))]
    assert not lay.crosses_nodes("tp")
    assert not lay.crosses_nodes("ep")
    assert lay.crosses_nodes("pp")
    assert lay.groups("pp") == [[r, r + 8] for r in range(8)]


def test_node_crossing_default_plan() -> None:
    lay = Layout(load_plan(None))  # tp2 pp2 dp4 ep8 etp1 on 2 x 8
    assert not lay.crosses_nodes("tp")
    assert not lay.crosses_nodes("dp")  # 8 ranks of a stage = one node
    assert not lay.crosses_nodes("ep")
    assert lay.crosses_nodes("pp")


def test_tp_larger_than_node_crosses() -> None:
    assert make_layout(tp=16).crosses_nodes("tp")
    assert make_layout(tp=4, gpus_per_node=2).crosses_nodes("tp")
    assert not make_layout(tp=4, dp=2, gpus_per_node=4).crosses_nodes("tp")
    assert make_layout(tp=4, dp=2, gpus_per_node=4).crosses_nodes("dp")


# ---- layers per stage ----------------------------------------------------------------------


def test_even_split() -> None:
    lay = make_layout(pp=4, model={**SMALL_MOE, "num_layers": 32})
    assert lay.layers_per_stage == [8, 8, 8, 8]
    assert lay.stage_layers[1] == list(range(8, 16))
    assert lay.stage_layers[3] == list(range(24, 32))


def test_explicit_split() -> None:
    lay = make_layout(pp=4, model={**SMALL_MOE, "num_layers": 32}, layers_per_stage=[10, 6, 8, 8])
    assert lay.layers_per_stage == [10, 6, 8, 8]
    assert lay.stage_layers[0] == list(range(0, 10))
    assert lay.stage_layers[1] == list(range(10, 16))
    assert lay.stage_layers[3] == list(range(24, 32))


def test_uneven_split_covers_every_layer_once() -> None:
    lay = make_layout(pp=4, model={**SMALL_MOE, "num_layers": 30})
    assert sum(lay.layers_per_stage) == 30
    assert sorted(i for s in lay.stage_layers for i in s) == list(range(30))
    assert lay.layers_per_stage == [7, 7, 7, 9]  # remainder on the last stage (documented)


def test_interleaved_chunks() -> None:
    # 32 layers, p2, v4 -> 8 chunks of 4; stage s holds chunks s, s+2, s+4, s+6
    lay = make_layout(
        pp=2,
        model={**SMALL_MOE, "num_layers": 32},
        schedule="interleaved",
        virtual_stages=4,
    )
    assert lay.stage_layers[0] == [*range(0, 4), *range(8, 12), *range(16, 20), *range(24, 28)]
    assert lay.stage_layers[1] == [*range(4, 8), *range(12, 16), *range(20, 24), *range(28, 32)]
    assert lay.layers_per_stage == [16, 16]


def test_interleaved_three_stages() -> None:
    # 12 layers, p3, v2 -> 6 chunks of 2: stage 0 chunks 0, 3; stage 1 chunks 1, 4; ...
    lay = make_layout(pp=3, model={**SMALL_MOE, "num_layers": 12}, virtual_stages=2)
    assert lay.stage_layers == [[0, 1, 6, 7], [2, 3, 8, 9], [4, 5, 10, 11]]


# ---- MoE layers and experts per GPU --------------------------------------------------------


def test_moe_layers_layer_freq_2() -> None:
    model = {**SMALL_MOE, "moe": {"num_experts": 16, "top_k": 2, "layer_freq": 2}}
    lay = make_layout(pp=2, model=model)  # MoE layers 0, 2, ..., 14
    assert lay.plan.model.num_moe_layers == 8
    assert lay.moe_layers_per_stage == [4, 4]


def test_moe_layers_first_k_dense_and_freq() -> None:
    moe = {"num_experts": 16, "top_k": 2, "layer_freq": 2, "first_k_dense": 3}
    lay = make_layout(pp=2, model={**SMALL_MOE, "moe": moe})
    # MoE layers 3, 5, 7 | 9, 11, 13, 15
    assert [i for i in range(16) if lay.plan.model.is_moe_layer(i)] == [3, 5, 7, 9, 11, 13, 15]
    assert lay.moe_layers_per_stage == [3, 4]


def test_deepseek_v3_moe_layers() -> None:
    raw = {
        "model": {"preset": "deepseek-v3"},
        "hardware": {"gpu": "H800", "num_nodes": 32, "gpus_per_node": 8},
        "parallel": {"tp": 1, "pp": 4, "dp": 64, "ep": 64, "layers_per_stage": [16, 15, 15, 15]},
    }
    lay = Layout(plan_from_dict(raw, "<test>"))
    assert lay.plan.model.num_layers == 61
    assert lay.plan.model.num_moe_layers == 58
    assert lay.moe_layers_per_stage == [13, 15, 15, 15]  # layers 0-2 are dense
    assert lay.experts_per_gpu_per_layer == 4  # 256 / 64
    assert lay.experts_per_gpu_by_stage == [52, 60, 60, 60]
    assert lay.experts_per_gpu == 60


def test_experts_per_gpu_16_experts_16_layers_pp4_ep8() -> None:
    lay = make_layout(pp=4, dp=8, ep=8, etp=1)
    assert lay.experts_per_gpu_per_layer == 2
    assert lay.layers_per_stage == [4, 4, 4, 4]
    assert lay.experts_per_gpu == 8
    assert lay.ep_groups == 4  # 32 ranks / 8


def test_default_plan_experts() -> None:
    lay = Layout(load_plan(None))  # Mixtral: 8 experts, 32 layers; pp2 ep8
    assert lay.world_size == 16
    assert lay.layers_per_stage == [16, 16]
    assert lay.experts_per_gpu_per_layer == 1
    assert lay.experts_per_gpu == 16
    assert lay.ep_groups == 2
    assert lay.edp == 1


def test_dense_model_has_no_experts() -> None:
    lay = make_layout(tp=2, dp=2, model=SMALL_DENSE)
    assert lay.moe_layers_per_stage == [0]
    assert lay.experts_per_gpu_per_layer == 0
    assert lay.experts_per_gpu == 0
    assert list(lay.experts_of(0)) == []


def test_experts_of_ranges() -> None:
    # tp2 pp2 dp4, etp1 ep4 (the reference layout), 8 experts -> 2 per rank
    lay = make_layout(
        tp=2, pp=2, dp=4, ep=4, etp=1, model={**SMALL_MOE, "moe": {"num_experts": 8, "top_k": 2}}
    )
    assert lay.experts_of(0) == range(0, 2)
    assert lay.experts_of(3) == range(6, 8)
    assert lay.experts_of(5) == range(2, 4)  # ep coordinate 1
    assert lay.experts_of(9) == range(2, 4)  # stage 1, ep coordinate 1
    assert lay.experts_of(15) == range(6, 8)


def test_experts_of_with_etp() -> None:
    # etp2 ep2 on 4 ranks: ranks 0,1 shard experts 0-7, ranks 2,3 shard 8-15
    lay = make_layout(tp=2, dp=2, ep=2, etp=2)
    assert [lay.experts_of(r) for r in range(4)] == [range(0, 8)] * 2 + [range(8, 16)] * 2
