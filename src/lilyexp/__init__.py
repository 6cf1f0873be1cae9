"""lilyexp: a config-driven reproduction suite for Lily (Low-Rank Interconnected Adaptation across Layers,
arXiv 2407.09946) and the LoRA, PiSSA and MiLoRA baselines."""

from importlib import metadata as _metadata

try:  # one version source: pyproject.toml's, as installed
    __version__ = _metadata.version("lilyexp")
except _metadata.PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"


def load_adapter(model, directory):
    """``model`` adapted with an adapter lilyexp exported (``<run>/adapter``), whichever method trained it; peft-
    format exports load in plain peft too (``peft.PeftModel.from_pretrained``). See lilyexp.methods.export."""
    from lilyexp.methods.export import load_adapter as load

    return load(model, directory)
