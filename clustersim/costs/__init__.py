"""Pure cost models: compute time, collective time, memory per GPU."""
