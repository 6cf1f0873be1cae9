"""Training loops, one per paradigm (causal-LM SFT here; classification and diffusion reuse :mod:`.core`)."""
