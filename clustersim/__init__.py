"""clustersim: audit and simulate parallel deployment plans of MoE models on GPU clusters."""

__version__ = "0.1.0"
