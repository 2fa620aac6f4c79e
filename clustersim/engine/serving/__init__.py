"""The serving engine: replicas, continuous-batching scheduler, step timing, MoE step table,
the request stream."""
