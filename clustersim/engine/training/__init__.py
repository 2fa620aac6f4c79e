"""The training engine: per-stage SimPy simulation of one iteration, op times, pipeline
schedules, the sampled workload, MoE routing sources."""
