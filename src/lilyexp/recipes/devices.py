"""What a run on a GPU needs that a CPU run never exercises: the accelerator every recipe trains under (sharded
strategies refused), the numerics flags (TF32, determinism) set and recorded, fp32 master weights for trainable
tensors of a half-precision backbone, a warning where fp16 weights would train without loss scaling, and each
library's own gradient-checkpointing switch."""

from __future__ import annotations

import logging
import os

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType

from lilyexp.errors import ConfigError

log = logging.getLogger("lilyexp")

HALF = (torch.float16, torch.bfloat16)
SHARDED = (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM)
# Each library's own switch and its arguments, in the order tried: transformers (5.x, then 4.x names; non-reentrant,
# so frozen inputs need no enable_input_require_grads), diffusers, timm (our Vim follows timm's name).
CHECKPOINTING_SWITCHES = {
    "activation_checkpointing_enable": {"activation_checkpointing_kwargs": {"use_reentrant": False}},
    "gradient_checkpointing_enable": {"gradient_checkpointing_kwargs": {"use_reentrant": False}},
    "enable_gradient_checkpointing": {},
    "set_grad_checkpointing": {"enable": True},
}


def make_accelerator(trainer) -> Accelerator:
    """The accelerator of one run, with ``trainer.mixed_precision`` (which wins over an ``accelerate config``
    file's, so a cell's precision is in its identity) and the numerics flags set. accelerate keeps one
    precision per process, so a sweep's earlier cell's is cleared first (the process group, if any, is kept)."""
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(mixed_precision=trainer.mixed_precision)
    refuse_sharded(accelerator)
    warn_precision_not_run(accelerator, trainer)
    return accelerator


def refuse_sharded(accelerator: Accelerator) -> None:
    """lilyexp's checkpoints, best-state copies, exports and generation read whole tensors from one process;
    under FSDP or DeepSpeed those are shards, so a run would save and test a fraction of the model."""
    if accelerator.distributed_type in SHARDED:
        raise ConfigError(f"{accelerator.distributed_type.value} is not supported: lilyexp's checkpoints, exports "
                          f"and evaluation need whole tensors on every process; launch with DDP "
                          f"(conf/accelerate/ddp.yaml) or on one device.")


def set_numerics(trainer) -> None:
    """``trainer.tf32``: None is PyTorch's defaults (TF32 off for matmuls, on for cuDNN convolutions), which the
    official scripts ran with; true/false sets both. ``trainer.deterministic``: deterministic kernels (warn where
    none exists), so a resumed run equals an uninterrupted one on a GPU too. Set for every run (a sweep's earlier
    cell must not leave its flags to the next) and before the backbone loads (cuBLAS reads its workspace setting
    once, at its first call: PiSSA's SVDs may be it)."""
    matmul, cudnn = (False, True) if trainer.tf32 is None else (trainer.tf32, trainer.tf32)
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
    torch.backends.cudnn.benchmark = False  # autotuning picks kernels by timing, which differs between runs
    if trainer.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's deterministic workspace
    torch.backends.cudnn.deterministic = trainer.deterministic
    torch.use_deterministic_algorithms(trainer.deterministic, warn_only=True)


def precision_ran(accelerator: Accelerator, trainer) -> dict:
    """What ``trainer.mixed_precision`` became: on a CPU accelerate runs fp16 without autocast or a loss scaler
    (plain fp32), which the record must say rather than "fp16"."""
    autocast = accelerator.mixed_precision if accelerator.native_amp else "no"
    scaler = accelerator.scaler is not None
    return {"requested": trainer.mixed_precision, "autocast": autocast, "grad_scaler": scaler}


def warn_precision_not_run(accelerator: Accelerator, trainer) -> None:
    if trainer.mixed_precision != "no" and not accelerator.native_amp:
        log.warning("trainer.mixed_precision=%s does not run on %s (accelerate computes in fp32 there); the record "
                    "states what ran (precision.autocast=no)", trainer.mixed_precision, accelerator.device.type)


def upcast_trainable(model: torch.nn.Module) -> int:
    """Keep fp32 master weights for every trainable tensor of a half-precision backbone (full fine-tuning, a
    head): AdamW's epsilon rounds to 0 in fp16 and GradScaler refuses to unscale fp16 gradients. peft already
    creates adapters in fp32 on such bases; frozen weights stay as loaded. Returns how many tensors were cast."""
    cast = 0
    for param in model.parameters():
        if param.requires_grad and param.dtype in HALF:
            param.data = param.data.float()
            cast += 1
    if cast:
        log.info("%d trainable tensors of the half-precision backbone train in fp32 (master weights)", cast)
    return cast


def warn_unscaled_half_precision(model: torch.nn.Module, accelerator: Accelerator) -> None:
    """fp16 base weights on a GPU without ``trainer.mixed_precision=fp16`` run without loss scaling, where small
    gradients flowing back through the fp16 backbone underflow to 0 (the official runs used fp16 autocast with
    a GradScaler)."""
    if accelerator.device.type == "cpu" or accelerator.mixed_precision != "no":
        return
    if any(p.dtype == torch.float16 for p in model.parameters()):
        log.warning("the backbone's weights are fp16 but trainer.mixed_precision=no: gradients through it are not "
                    "loss-scaled and may underflow; set trainer.mixed_precision=fp16 (what the paper's runs used).")


def enable_gradient_checkpointing(model: torch.nn.Module) -> str:
    """Turn on the backbone library's own activation checkpointing (through peft's wrappers, which forward
    attribute lookups to the model they wrap); refuse a model that has none. Returns the switch used."""
    for switch, arguments in CHECKPOINTING_SWITCHES.items():
        if callable(getattr(model, switch, None)):
            getattr(model, switch)(**arguments)
            return switch
    raise ConfigError(f"trainer.gradient_checkpointing=true, but {type(model).__name__} has no activation-"
                      f"checkpointing switch ({', '.join(CHECKPOINTING_SWITCHES)}); set it to false.")


def release_processes() -> None:
    """End a distributed launch's process group before the process exits: with gloo, its threads otherwise
    abort an exiting process now and then ("terminate called without an active exception", SIGABRT), so a
    launch whose record is written can still exit with an error. A run of one process has nothing to end."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # local: no barrier, which would hang beside a crashed process
