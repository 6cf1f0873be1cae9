"""Any peft method from its config (LoRA, PiSSA, Lily, DoRA, FourierFT, AdaLoRA, ...): ``get_peft_model``."""

from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from peft import PeftConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from lilyexp.errors import ConfigError
from lilyexp.methods import MethodSettings
from lilyexp.methods.export import load_peft
from lilyexp.settings import knob, meta


@dataclass
class LoraSettings(MethodSettings):
    """method=lora and method=milora: a peft LoraConfig."""

    r: int = knob(32)
    alpha: float = knob(64, passed_as="lora_alpha")
    dropout: float = knob(0.05, passed_as="lora_dropout")
    target_modules: Optional[list] = knob(None, help="None: the backbone's adapter_targets.lora")
    init: Any = knob(True, help="peft's init_lora_weights: true (kaiming A, zero B), gaussian, pissa, ...",
                     passed_as="init_lora_weights")


@dataclass
class PissaSettings(LoraSettings):
    """method=pissa: LoRA initialised from the principal singular components (peft's init_lora_weights)."""

    init: Any = knob("pissa", help="pissa (full SVD) or pissa_niter_<K> (randomised SVD, K iterations)",
                     passed_as="init_lora_weights")


@dataclass
class PeftSettings(MethodSettings):
    """method=peft: any peft config, given whole under ``config`` (its ``_target_`` names the class). Its
    ``name`` may be set (``method.name=loha``), so two peft methods are two cells, rows and record names."""

    nameable: bool = meta(True)
    target_modules: Optional[list] = knob(None)
    config: Any = knob(None)


def check_ranks(peft_model: torch.nn.Module) -> None:
    """A residual initialisation takes r singular components of each adapted weight: r <= min(out, in)."""
    from peft.tuners.lora import LoraLayer

    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer):
            weight = module.get_base_layer().weight
            rank = max(module.r.values())
            if rank > min(weight.shape):
                raise ConfigError(f"rank {rank} exceeds the rank of '{name}' ({tuple(weight.shape)} weight).")


class PeftMethod:
    """Wrap the backbone with ``config`` (a peft config object built by Hydra from the method yaml)."""

    def __init__(self, config: PeftConfig):
        rank = getattr(config, "r", None)
        if isinstance(rank, int) and rank <= 0:
            raise ConfigError(f"the adapter rank r must be a positive integer, got {rank}.")
        if not getattr(config, "target_modules", True):
            raise ConfigError("the method has no target modules; set method.target_modules.")
        self.config = config
        self.initial: dict[str, torch.Tensor] | None = None  # a residual-initialised adapter's starting point

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        try:
            peft_model = get_peft_model(model, self.config)
        except ValueError as exc:  # e.g. a target module name the backbone does not have
            raise ConfigError(f"peft could not adapt the backbone: {exc}") from None
        self.initialise(peft_model)
        return self.remember_initial(peft_model)

    def check(self, skeleton: torch.nn.Module) -> None:
        """Refuse targets the backbone lacks and ranks its weights cannot hold, on its weightless skeleton."""
        config = copy.deepcopy(self.config)
        config.init_lora_weights = True  # the structure only: no SVD of meta weights
        try:
            with torch.device("meta"):  # the adapter's tensors too: an 8B model's r=8192 factors would fill memory
                peft_model = get_peft_model(skeleton, config)
        except ValueError as exc:
            raise ConfigError(f"peft could not adapt the backbone: {exc}") from None
        if self.residual_init():
            check_ranks(peft_model)

    def initialise(self, peft_model: PeftModel) -> None:
        """Re-initialise the adapter peft built (a subclass's hook: MiLoRA); peft's own init is kept here."""

    def residual_init(self) -> bool:
        """Whether the adapter starts from a part of W removed from the base (PiSSA), so that its export must be
        converted to apply to the original weights."""
        return str(getattr(self.config, "init_lora_weights", "")).lower().startswith("pissa")

    def remember_initial(self, peft_model: PeftModel) -> PeftModel:
        if self.residual_init():
            self.initial = {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(peft_model).items()}
        return peft_model

    @staticmethod
    def summary(model: torch.nn.Module) -> None:
        return None

    def export(self, model: PeftModel, directory: str | Path, node: dict) -> None:
        """peft's ``save_pretrained`` (safetensors, the task head via modules_to_save); a residual-initialised
        adapter as the rank-2r LoRA on the original weights that peft's conversion makes."""
        if self.initial is None:
            model.save_pretrained(str(directory), safe_serialization=True)
            return
        with tempfile.TemporaryDirectory() as scratch:
            initial = Path(scratch) / "initial"
            config = copy.deepcopy(model.peft_config[model.active_adapter])
            config.init_lora_weights = True  # loading the starting point must not decompose W again
            config.save_pretrained(str(initial))
            save_file(self.initial, initial / "adapter_model.safetensors")
            model.save_pretrained(str(directory), safe_serialization=True,
                                  path_initial_model_for_weight_conversion=str(initial))

    @staticmethod
    def load(model: torch.nn.Module, directory: str | Path) -> PeftModel:
        """Adapt ``model`` with a saved adapter; a corrupt or mismatched one is a clear error."""
        return load_peft(model, directory)
