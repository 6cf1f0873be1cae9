"""Which device this process computes on, known from the launcher's environment before accelerate's state
exists (the recipe's Accelerator must be the one to create it): a method's initialisation (PiSSA/MiLoRA's SVDs)
and the DreamBooth metric models run there rather than on the CPU; and the numerics flags a record states."""

from __future__ import annotations

import os

import torch


def training_device() -> torch.device:
    """The local rank's GPU under torchrun / accelerate launch (``LOCAL_RANK``), GPU 0 in a plain process, else
    the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def numerics() -> dict:
    """The flags that change a GPU run's numbers (set from ``trainer.tf32`` / ``trainer.deterministic``)."""
    return {"tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "tf32_cudnn": torch.backends.cudnn.allow_tf32,
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "deterministic": torch.are_deterministic_algorithms_enabled()}
