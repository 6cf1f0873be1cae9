"""MiLoRA (minor singular components LoRA): LoRA whose factors start from the r *smallest* singular triplets of W,
while the frozen weight keeps the rest, so the adapted model computes exactly W·x at initialisation.

peft ships PiSSA (the r largest components, ``init_lora_weights="pissa"``) but not MiLoRA; this follows
``LoraLayer.pissa_init``'s conventions (fp32 SVD, S_r / scaling, A = √S_r·Vh_r, B = U_r·√S_r,
W ← W − scaling·B·A), so peft's PiSSA-style export (``path_initial_model_for_weight_conversion``) works too.
"""

from __future__ import annotations

import torch
from peft.tuners.lora import LoraLayer
from peft.utils.other import transpose

from lilyexp.errors import ConfigError
from lilyexp.methods.peft_method import PeftMethod


@torch.no_grad()
def milora_init(layer: LoraLayer, adapter: str) -> None:
    base = layer.get_base_layer()
    fan_in_fan_out = getattr(layer, "fan_in_fan_out", False)
    dtype = base.weight.dtype
    weight = transpose(base.weight.to(torch.float32), fan_in_fan_out)
    rank, scaling = layer.r[adapter], layer.scaling[adapter]
    if rank > min(weight.shape):
        raise ConfigError(f"MiLoRA rank {rank} exceeds the rank of a {tuple(weight.shape)} weight.")
    U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
    minor = S[-rank:] / scaling
    lora_A = torch.sqrt(minor)[:, None] * Vh[-rank:]
    lora_B = U[:, -rank:] * torch.sqrt(minor)[None, :]
    # contiguous: SVD factors come back with column-major strides, which safetensors refuses to save
    layer.lora_A[adapter].weight.data = lora_A.to(layer.lora_A[adapter].weight.dtype).contiguous()
    layer.lora_B[adapter].weight.data = lora_B.to(layer.lora_B[adapter].weight.dtype).contiguous()
    residual = weight - scaling * lora_B @ lora_A
    base.weight.data = transpose(residual.to(dtype), fan_in_fan_out).contiguous()


class MiLoRAMethod(PeftMethod):
    """A peft LoRA config (``init_lora_weights=True``) re-initialised from the minor singular components."""

    def initialise(self, peft_model: torch.nn.Module) -> None:
        adapter = peft_model.active_adapter
        for module in peft_model.modules():
            if isinstance(module, LoraLayer) and adapter in module.lora_A:
                milora_init(module, adapter)

    def residual_init(self) -> bool:
        return True  # the minor components were removed from W
