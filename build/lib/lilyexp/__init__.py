"""lilyexp: a config-driven reproduction suite for Lily (Low-Rank Interconnected Adaptation across Layers,
arXiv 2407.09946) and the LoRA, PiSSA and MiLoRA baselines."""

__version__ = "0.1.0"
