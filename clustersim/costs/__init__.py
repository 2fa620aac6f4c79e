"""Pure cost models: compute time, collective time, memory per GPU, and the pipeline
schedules' step orders (which the engine runs and the memory model walks)."""
