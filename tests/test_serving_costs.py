"""Serving cost coefficients (costs/serving.py) against the op costs they come from."""

from __future__ import annotations

import pytest
from serving_plans import DENSE, MOE, make_plan

from clustersim.costs.comm import collective_time_ms
from clustersim.costs.memory import GIB, kv_cache_bytes
from clustersim.costs.params import count_params
from clustersim.costs.serving import kv_bytes_per_token_layer, kv_capacity, step_costs
from clustersim.engine.serving.moe_table import MoEStepTable
from clustersim.layout import Layout


@pytest.mark.parametrize("tokens", [1, 7, 256, 4096])
def test_step_parts_are_the_layer_kernels_and_collectives(tokens):
    plan = make_plan(MOE)
    costs = step_costs(plan, Layout(plan))
    hw = plan.hardware
    dense, attn, logits, allreduce, *_ = costs.parts(tokens, tokens)
    k = costs.timer(tokens, tokens)
    assert (k is costs.graph) == (tokens <= 512)  # decode-only batches replay CUDA graphs
    ranks = [0, 1]
    eager_allreduce = collective_time_ms("all_reduce", tokens * 4096 * 2, ranks, 8, hw)
    want_allreduce = eager_allreduce
    if k is costs.graph:  # a replayed collective pays one graph launch, not the per-call time
        coll = hw.calibration.collectives
        want_allreduce += (
            hw.calibration.kernel.graph_launch_us - coll.intra_node_base_latency_us
        ) * 1e-3
        # or NCCL's LL ring: 6.6 us + 0.6 us per step, 2(n-1)/n S at half the bus bandwidth
        bus = hw.intra_node.bandwidth_gbps * hw.calibration.collectives.intra_node_efficiency
        ll = (6.6 + 2 * 0.6) * 1e-3 + 1 * tokens * 4096 * 2 / (0.5 * bus * 1e6)
        want_allreduce = min(want_allreduce, ll)
    assert allreduce == pytest.approx(want_allreduce, rel=1e-9)
    # the KV-cache write: the new keys and values read and written once, a plain stream
    assert costs.cache_write_bytes_per_token == 2 * kv_bytes_per_token_layer(plan.model, 2)
    cache = float(k.memory_ms(tokens, costs.cache_write_bytes_per_token))
    block = float(k.attention_block_ms(tokens)) + cache
    assert dense == pytest.approx(block + float(k.dense_mlp_ms(tokens)) + 2 * allreduce)
    assert attn == pytest.approx(block + float(k.moe_block_ms(tokens)) + allreduce)
    assert logits == pytest.approx(float(k.logits_ms(tokens)))
    assert costs.tp_allreduce.scalar_ms(0) == 0 and float(k.dense_mlp_ms(0)) == 0


def test_one_decode_token_reads_every_weight():
    plan = make_plan(DENSE)
    costs, model, hw = step_costs(plan, Layout(plan)), plan.model, plan.hardware
    cal = hw.calibration
    counts = count_params(model)
    byte_rate = hw.hbm_bandwidth_gbps * 1e9 * cal.gemm.memory_efficiency
    # decode (CUDA graphs): two weight GEMMs, the activation and the residual add, each its
    # fixed GPU time plus one kernel-to-kernel gap; the weights dominate the bytes. The
    # activation (one thread block per token) moves its one row (gate, up, out) at one
    # block's rate, memory.row_gbps
    gap = cal.kernel.graph_launch_us
    kernel_ms = (3 * (cal.kernel.fixed_us + gap) + cal.kernel.stream_fixed_us + gap) * 1e-3
    row_bytes = 3 * model.ffn_hidden_size * 2
    kernel_ms += row_bytes / (cal.memory.row_gbps * 1e9) * 1e3
    weights_ms = counts.dense_mlp * 2 / byte_rate * 1e3
    decode = float(costs.graph.dense_mlp_ms(1))
    assert decode >= weights_ms
    assert decode == pytest.approx(weights_ms + kernel_ms, rel=2e-3)
    # prefill of 4096 tokens is compute-bound: FLOPs at the GEMM shape efficiency
    h, ffn, half = model.hidden_size, model.ffn_hidden_size, cal.gemm.half_dim

    def shape(*dims):
        out = 1.0
        for x in dims:
            out *= x / (x + half)
        return out

    rate = hw.peak_tflops * 1e12 * cal.gemm.efficiency
    gemms_ms = (
        2 * 4096 * h * 2 * ffn / (rate * shape(4096, 2 * ffn, h))
        + 2 * 4096 * ffn * h / (rate * shape(4096, h, ffn))
    ) * 1e3
    prefill = float(costs.eager.dense_mlp_ms(4096))
    assert prefill > gemms_ms
    assert prefill == pytest.approx(gemms_ms, rel=0.15)  # + activation and residual passes


def test_layer_counts_per_stage():
    plan = make_plan(MOE)
    costs = step_costs(plan, Layout(plan))
    assert costs.dense_layers == (0, 0) and costs.moe_layers == (16, 16)


def test_kv_bytes_per_token_match_the_memory_model():
    for base in (DENSE, MOE):
        plan = make_plan(base)
        layout = Layout(plan)
        req = plan.workload.requests
        tokens = (req.prompt_len.longest + req.output_len.longest) * req.max_batch_size
        layers = len(layout.stage_layers[0])
        per_token = kv_cache_bytes(plan, layout, 0) / tokens / layers
        assert kv_bytes_per_token_layer(plan.model, plan.parallel.tp) == pytest.approx(per_token)


def test_kv_capacity_is_the_memory_left_in_blocks():
    plan = make_plan(DENSE)
    kv = kv_capacity(plan, Layout(plan))
    usable = 0.9 * 80
    free = usable - kv.weights_gib[0] - kv.activations_gib[0]
    assert kv.free_gib[0] == pytest.approx(free)
    per_token = 32 * 2 * 32 * 128 * 2  # layers x (K, V) x heads x head size x bf16
    assert kv.num_blocks == int(free * GIB / per_token // 16)
    assert kv.weights_gib[0] == pytest.approx(count_params(plan.model).total * 2 / GIB)
    override = make_plan(DENSE, requests={"num_gpu_blocks": 123})
    assert kv_capacity(override, Layout(override)).num_blocks == 123


def test_moe_table_is_deterministic_and_grows_with_tokens():
    plan = make_plan(MOE)
    first, second = MoEStepTable(plan, Layout(plan)), MoEStepTable(plan, Layout(plan))
    rows = [first.lookup(n) for n in (1, 8, 64, 1000, 8192)]
    assert rows == [second.lookup(n) for n in (8192, 1000, 64, 8, 1)][::-1]
    times = [r[0] for r in rows]
    assert times == sorted(times)
    assert first.lookup(0) == (0.0, 0.0, 100.0, 0.0)
    # one decode token activates top_k = 2 experts: the busiest rank reads one or two experts'
    # weights, far less than all 8 (decode is bound by the experts the batch activates)
    expert_bytes = 3 * 4096 * 14336 * 2
    one_expert_ms = expert_bytes / (plan.hardware.hbm_bandwidth_gbps * 1e9) * 1e3
    assert rows[0][0] - rows[0][1] < 2.2 * one_expert_ms
    # interpolated points lie between their grid neighbours
    assert first.lookup(70)[0] <= first.lookup(1000)[0]


def test_even_routing_has_perfect_balance():
    plan = make_plan(
        MOE, model={"preset": "mixtral-8x7b", "moe": {"num_experts": 8, "routing": "even"}}
    )
    table = MoEStepTable(plan, Layout(plan))
    assert table.lookup(64)[2] == pytest.approx(100.0)  # 128 copies over 8 experts


@pytest.mark.parametrize("tokens", [8, 512, 4096])
def test_expert_tp_folding_conserves_serving_expert_work(tokens):
    """(EP 4, ETP 2) and (EP 8, ETP 1) spread the same expert FLOPs over the same 8 GPUs of a
    stage: with even routing the busiest GPU's expert time agrees up to GEMM shape (narrower
    FFN slices under ETP) and the all-to-all moves each token copy once either way."""
    expert_ms = {}
    for ep, etp in ((4, 2), (8, 1)):
        plan = make_plan(
            MOE,
            parallel={"ep": ep, "etp": etp},
            model={"preset": "mixtral-8x7b", "moe": {"routing": "even"}},
        )
        layer_ms, comm_ms, *_ = MoEStepTable(plan, Layout(plan)).lookup(tokens)
        expert_ms[etp] = layer_ms - comm_ms
    assert expert_ms[2] == pytest.approx(expert_ms[1], rel=0.15)


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_graph_allreduce_uses_the_low_latency_protocol_for_small_messages(tp):
    """A decode step's TP all-reduce replayed from a CUDA graph: NCCL's LL ring latency
    (6.6 us + 2(n-1) x 0.6 us, hand-computed) when it beats the calibrated Simple-protocol
    model, never slower than the eager collective, and non-decreasing in the message."""
    plan = make_plan(DENSE, hardware={"gpus_per_node": 8}, parallel={"tp": tp})
    costs = step_costs(plan, Layout(plan))
    hw, h = plan.hardware, plan.model.hidden_size
    ranks = list(range(tp))
    latency_us = 6.6 + 2 * (tp - 1) * 0.6
    bus_gbps = 0.5 * hw.intra_node.bandwidth_gbps * hw.calibration.collectives.intra_node_efficiency
    previous = 0.0
    for tokens in (1, 8, 64, 512):
        size = tokens * h * 2
        ll_ms = latency_us * 1e-3 + 2 * (tp - 1) / tp * size / (bus_gbps * 1e6)
        graph = costs.tp_allreduce_graph.scalar_ms(tokens)
        eager = collective_time_ms("all_reduce", size, ranks, 8, hw)
        assert graph <= ll_ms * (1 + 1e-6)
        assert graph <= eager
        assert graph >= previous
        previous = graph
    one_token = costs.tp_allreduce_graph.scalar_ms(1)
    if tp == 8:  # 14 ring steps of the calibrated latency are slower than LL's
        assert one_token == pytest.approx(
            latency_us * 1e-3 + 2 * 7 / 8 * h * 2 / (bus_gbps * 1e6), rel=1e-6
        )
