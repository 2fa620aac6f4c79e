"""Parallel layout: rank <-> coordinates, process groups, node placement, layer and expert split.

Megatron-Core order "tp-cp-ep-dp-pp" (first varies fastest) with MoE parallel folding:

* dense/attention layers decompose a rank as ``rank = tp + t*(cp + c*(dp + d*pp))``;
* expert layers refold the same ranks of a stage as ``rank = etp + e_t*(ep + e*(edp + x*pp))``,

so the two decompositions share the pipeline coordinate and differ inside a stage. Expert
folding needs ``ep * etp`` to divide ``tp * cp * dp``; :attr:`Layout.expert_folding_ok` says
whether it does, and the expert groups are empty when it does not.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from clustersim.spec.schema import Plan

GROUP_KINDS = ("tp", "cp", "dp", "pp", "ep", "etp", "edp")


@dataclass(frozen=True)
class Coords:
    """Where one rank sits: node, and its coordinate in every parallel dimension."""

    rank: int
    node: int
    local_rank: int
    tp: int
    cp: int
    dp: int
    pp: int
    etp: int | None
    ep: int | None
    edp: int | None


class Layout:
    """The parallel layout of a plan. Pure arithmetic; no validation beyond what it needs.

    A disaggregated plan (``parallel.prefill`` and ``parallel.decode``) places the prefill
    pool on ranks ``0 .. P-1`` and the decode pool on ``P .. P+D-1``; its layout counts both
    in ``world_size`` and is otherwise the decode pool's (each pool's own layout is
    ``Layout(plan.pool(name))``)."""

    def __init__(self, plan: Plan):
        par, hw = plan.parallel, plan.hardware
        self.plan = plan
        self.tp, self.cp, self.dp, self.pp = par.tp, par.cp, par.dp, par.pp
        self.etp, self.ep = par.expert_tp, par.ep
        self.world_size = par.world_size  # disaggregated: both pools (the rest: decode pool)
        self.pool_world_size = par.pool_world_size
        self.gpus_per_node = hw.gpus_per_node
        self.nvlink_domain_gpus = hw.nvlink_domain
        self.cluster_gpus = hw.num_gpus
        ranks_per_stage = self.tp * self.cp * self.dp
        self.expert_folding_ok = ranks_per_stage % (self.ep * self.etp) == 0
        self.edp = ranks_per_stage // (self.ep * self.etp) if self.expert_folding_ok else None

    # ---- coordinates ---------------------------------------------------------------------
    def coords(self, rank: int) -> Coords:
        """Coordinates of ``rank`` (0 <= rank < world_size)."""
        if not 0 <= rank < self.world_size:
            raise IndexError(f"rank {rank} outside world of {self.world_size}")
        tp, rest = rank % self.tp, rank // self.tp
        cp, rest = rest % self.cp, rest // self.cp
        dp, pp = rest % self.dp, rest // self.dp
        etp = ep = edp = None
        if self.expert_folding_ok:
            etp, rest = rank % self.etp, rank // self.etp
            ep, rest = rest % self.ep, rest // self.ep
            edp = rest % self.edp
        node, local = divmod(rank, self.gpus_per_node)
        return Coords(rank, node, local, tp, cp, dp, pp, etp, ep, edp)

    def rank_of(self, tp: int = 0, cp: int = 0, dp: int = 0, pp: int = 0) -> int:
        """The rank at dense coordinates (inverse of :meth:`coords`)."""
        return tp + self.tp * (cp + self.cp * (dp + self.dp * pp))

    # ---- groups --------------------------------------------------------------------------
    @cached_property
    def _dense_grid(self) -> np.ndarray:
        return np.arange(self.pool_world_size).reshape(self.pp, self.dp, self.cp, self.tp)

    @cached_property
    def _expert_grid(self) -> np.ndarray | None:
        if not self.expert_folding_ok:
            return None
        return np.arange(self.pool_world_size).reshape(self.pp, self.edp, self.ep, self.etp)

    def groups(self, kind: str) -> list[list[int]]:
        """All process groups of one kind (one of ``GROUP_KINDS``), each a list of ranks."""
        dense_axes = {"pp": 0, "dp": 1, "cp": 2, "tp": 3}
        expert_axes = {"edp": 1, "ep": 2, "etp": 3}
        if kind in dense_axes:
            grid, axis = self._dense_grid, dense_axes[kind]
        elif kind in expert_axes:
            if self._expert_grid is None:
                return []
            grid, axis = self._expert_grid, expert_axes[kind]
        else:
            raise ValueError(f"unknown group kind {kind!r}; valid: {', '.join(GROUP_KINDS)}")
        moved = np.moveaxis(grid, axis, -1)
        return moved.reshape(-1, grid.shape[axis]).tolist()

    def group_of(self, kind: str, rank: int) -> list[int]:
        """The group of ``kind`` that contains ``rank``."""
        for group in self.groups(kind):
            if rank in group:
                return group
        raise IndexError(f"rank {rank} is in no {kind} group")

    def crosses_nodes(self, kind: str) -> bool:
        """Whether any group of this kind spans more than one node."""
        return any(len({r // self.gpus_per_node for r in group}) > 1 for group in self.groups(kind))

    def crosses_nvlink_domain(self, kind: str) -> bool:
        """Whether any group of this kind spans more than one NVLink domain (so its
        collectives leave NVLink; the same as :meth:`crosses_nodes` unless
        ``hardware.nvlink_domain_gpus`` joins several nodes into one domain)."""
        domain = self.nvlink_domain_gpus
        return any(len({r // domain for r in group}) > 1 for group in self.groups(kind))

    # ---- layers and experts --------------------------------------------------------------
    @cached_property
    def stage_layers(self) -> list[list[int]]:
        """0-based layer indices held by each pipeline stage (all its virtual chunks)."""
        return [a.tolist() for a in self._stage_index]

    @cached_property
    def _stage_index(self) -> list[np.ndarray]:
        """Layer indices of each stage as int64 arrays (may run past the model, see below)."""
        num_layers = self.plan.model.num_layers
        par = self.plan.parallel
        chunks = self._explicit_chunks
        if chunks is not None:  # one entry per virtual stage: stage s holds chunks c*pp + s
            v = par.virtual_stages
            return [
                np.array(sum((chunks[c * self.pp + s] for c in range(v)), []), dtype=np.int64)
                for s in range(self.pp)
            ]
        if par.layers_per_stage is not None:
            bounds = np.cumsum([0, *par.layers_per_stage])
            return [np.arange(bounds[s], bounds[s + 1]) for s in range(len(par.layers_per_stage))]
        chunks = self.pp * par.virtual_stages
        per_chunk = num_layers // chunks
        # Chunk c goes to stage c % pp: stage s holds chunks s, s + pp, ...
        starts = np.arange(chunks).reshape(-1, self.pp) * per_chunk  # (v, pp)
        offsets = np.arange(per_chunk)
        stages = [(starts[:, s, None] + offsets).ravel() for s in range(self.pp)]
        # Layers that do not divide evenly go to the last stage (the audit flags this).
        stages[-1] = np.concatenate([stages[-1], np.arange(chunks * per_chunk, num_layers)])
        return [a.astype(np.int64) for a in stages]

    @cached_property
    def stage_layer_arrays(self) -> list[np.ndarray]:
        """``stage_layers`` as int64 arrays without indices past the model's last layer (an
        explicit split that claims more layers than the model has does not invent them)."""
        num_layers = self.plan.model.num_layers
        return [a[a < num_layers] for a in self._stage_index]

    @property
    def num_stages(self) -> int:
        """Pipeline stages (``pp``, or the length of an explicit ``layers_per_stage``)."""
        return len(self._stage_index)

    @cached_property
    def _explicit_chunks(self) -> list[list[int]] | None:
        """Layers of each virtual stage (Megatron's order: the first chunks of stages
        0 .. pp-1, then the second chunks, ...) when ``layers_per_stage`` lists pp x v
        entries with v > 1; else None."""
        par = self.plan.parallel
        split, v = par.layers_per_stage, par.virtual_stages
        if split is None or v == 1 or len(split) != self.pp * v:
            return None
        bounds = np.cumsum([0, *split]).tolist()
        return [list(range(bounds[i], bounds[i + 1])) for i in range(len(split))]

    def chunk_layers(self, stage: int, chunk: int) -> list[int]:
        """Layers of model chunk ``chunk`` of ``stage`` (virtual stage ``chunk * pp + stage``):
        the explicit per-virtual-stage split, else an even split of the stage's layers."""
        chunks = self._explicit_chunks
        if chunks is not None:
            return chunks[chunk * self.pp + stage]
        layers = self.stage_layers[stage]
        per_chunk = len(layers) // self.plan.parallel.virtual_stages
        return layers[chunk * per_chunk : (chunk + 1) * per_chunk]

    def held_stages(self, stage: int) -> list[int]:
        """Model stages whose layers the GPUs of pipeline stage ``stage`` hold: ``stage``; under
        DualPipe also ``pp - 1 - stage`` (its second chunk, the pipeline fed from the other
        end), so every model stage is held twice."""
        if self.plan.parallel.schedule == "dualpipe" and self.num_stages == self.pp:
            return [stage, self.pp - 1 - stage]
        return [stage]

    @property
    def layers_per_stage(self) -> list[int]:
        """Number of layers on each pipeline stage."""
        return [len(layers) for layers in self._stage_index]

    @property
    def moe_layers_per_stage(self) -> list[int]:
        """Number of MoE layers on each pipeline stage."""
        mask = self.plan.model.moe_layer_mask()
        return [int(mask[layers].sum()) for layers in self.stage_layer_arrays]

    @property
    def experts_per_gpu_per_layer(self) -> float:
        """Routed experts one GPU holds in one MoE layer (E / EP); 0 for dense models."""
        moe = self.plan.model.moe
        return moe.num_experts / self.ep if moe else 0.0

    @property
    def experts_per_gpu_by_stage(self) -> list[float]:
        """Routed experts one GPU holds over all its MoE layers, per pipeline stage."""
        return [self.experts_per_gpu_per_layer * n for n in self.moe_layers_per_stage]

    @property
    def experts_per_gpu(self) -> float:
        """Routed experts held by the most-loaded GPU, all its layers together."""
        return max(self.experts_per_gpu_by_stage)

    def experts_of(self, rank: int) -> range:
        """Expert indices (within one MoE layer) held by ``rank``; empty for dense models."""
        moe = self.plan.model.moe
        c = self.coords(rank)
        if moe is None or c.ep is None:
            return range(0)
        per = moe.num_experts // self.ep
        return range(c.ep * per, (c.ep + 1) * per)

    @property
    def ep_groups(self) -> int:
        """Number of expert-parallel groups in the whole cluster."""
        return self.pool_world_size // self.ep if self.expert_folding_ok else 0
