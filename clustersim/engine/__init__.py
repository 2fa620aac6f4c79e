"""SimPy discrete-event engine: lanes of GPUs, collectives, pipeline schedules, training."""
