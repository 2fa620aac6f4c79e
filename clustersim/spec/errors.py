"""The one error type for unusable input, carrying what a user needs to fix it."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class PlanIssue:
    """One problem in a plan file: where it is, what was there, what would be valid."""

    path: str
    message: str
    value: object = None
    valid: str = ""

    def render(self) -> str:
        """One line: ``field: message (got X; valid: Y)``."""
        text = f"{self.path}: {self.message}" if self.path else self.message
        details = []
        if self.value is not None:
            details.append(f"got {self.value!r}")
        if self.valid:
            details.append(f"valid: {self.valid}")
        if details:
            text += f" ({'; '.join(details)})"
        return text


class PlanError(Exception):
    """A plan (or trace) file that cannot be used. The CLI prints it and exits with code 2."""

    def __init__(self, source: str, issues: Iterable[PlanIssue] | str):
        if isinstance(issues, str):
            issues = [PlanIssue(path="", message=issues)]
        self.source = source
        self.issues = list(issues)
        super().__init__(self.render())

    def render(self) -> str:
        """The message: the file, then one line per issue."""
        if len(self.issues) == 1:
            return f"{self.source}: {self.issues[0].render()}"
        lines = [f"{self.source}: {len(self.issues)} problems"]
        lines += [f"  - {issue.render()}" for issue in self.issues]
        return "\n".join(lines)


def did_you_mean(word: str, options: Iterable[str]) -> str:
    """A ``did you mean 'x'?`` hint, or an empty string when nothing is close.

    Case-insensitive; an option that starts with ``word`` wins (``H100`` -> ``H100-SXM``).
    """
    by_lower = {o.lower(): o for o in options}
    low = word.lower()
    prefixed = [o for lo, o in by_lower.items() if low and lo.startswith(low)]
    if len(prefixed) == 1:
        return f"did you mean '{prefixed[0]}'?"
    close = difflib.get_close_matches(low, list(by_lower), n=1, cutoff=0.6)
    return f"did you mean '{by_lower[close[0]]}'?" if close else ""


# Names other tools and papers give the plan's fields (Megatron-LM arguments, Hugging Face
# configs, DeepSpeed): an unknown key that is one of these is pointed at the plan's own name.
KEY_ALIASES = {
    "tensor_parallel": "tp",
    "tensor_model_parallel_size": "tp",
    "tp_size": "tp",
    "pipeline_parallel": "pp",
    "pipeline_model_parallel_size": "pp",
    "pp_size": "pp",
    "data_parallel": "dp",
    "data_parallel_size": "dp",
    "dp_size": "dp",
    "context_parallel": "cp",
    "context_parallel_size": "cp",
    "expert_parallel": "ep",
    "expert_model_parallel_size": "ep",
    "ep_size": "ep",
    "expert_tensor_parallel": "etp",
    "expert_tensor_parallel_size": "etp",
    "virtual_pipeline_model_parallel_size": "virtual_stages",
    "virtual_pipeline_parallel": "virtual_stages",
    "vpp": "virtual_stages",
    "micro_batch": "micro_batch_size",
    "mbs": "micro_batch_size",
    "gradient_accumulation_steps": "num_microbatches",
    "num_micro_batches": "num_microbatches",
    "activation_checkpointing": "recompute",
    "recompute_granularity": "recompute",
    "use_distributed_optimizer": "distributed_optimizer",
    "zero_stage": "dp_sharding",
    "fsdp": "dp_sharding",
    "precision": "dtype",
    "num_hidden_layers": "num_layers",
    "intermediate_size": "ffn_hidden_size",
    "moe_intermediate_size": "ffn_hidden_size",
    "num_key_value_heads": "num_kv_heads",
    "n_routed_experts": "num_experts",
    "num_local_experts": "num_experts",
    "num_experts_per_tok": "top_k",
    "moe_router_topk": "top_k",
    "n_shared_experts": "num_shared_experts",
    "num_gpus_per_node": "gpus_per_node",
    "nodes": "num_nodes",
}


def suggest_key(word: str, fields: Iterable[str]) -> str:
    """A hint for an unknown key: its alias among ``fields`` (``expert_parallel`` -> ``ep``),
    else :func:`did_you_mean`."""
    fields = list(fields)
    alias = KEY_ALIASES.get(word.lower().replace("-", "_"))
    if alias in fields:
        return f"did you mean '{alias}'?"
    return did_you_mean(word, fields)
