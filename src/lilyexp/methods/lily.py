"""Lily (Low-Rank Interconnected Adaptation across Layers, arXiv 2407.09946) in every variant the paper's
experiments used, built on peft's upstream Lily (``peft.tuners.lily``, peft >= 0.19).

Upstream reproduces the official NLU/LLM code (github.com/yibozhong/lily at commit 4620efe; its paths, e.g.
natural-language-understanding/lily.py or commonsense-reasoning's peft fork, are what "the official code" names
throughout lilyexp) for whole Linear layers. Where the paper's experiments need more, this module extends it instead of
copying it:

* :class:`LilyVariantConfig` subclasses ``LilyConfig`` with the paper's switches (router placement, router
  pooling, padding mask, no-router ablation, whether ``s`` applies, dropout on h, per-target r / ne_2);
* :class:`LilyVariantLinear` subclasses upstream's ``Linear`` (same ``lily_A``/``lily_B``/``lily_router``
  modules and storage, so weights move between the two) and only replaces the forward's expert mixing;
* :class:`LilyVariantModel` subclasses ``LilyModel`` and replaces the sharing hook: A's are shared by
  ``count // ne_1`` consecutive layers of each (target, weight shape) group (the official stride, which can
  give more than ne_1 A's), and routers can be shared per A or per group;
* ``eval_pooling: sample`` makes batched evaluation reproduce the official batch-1 evaluation: the official
  router pools over all rows of a forward call, so in evaluation, with routing groups set
  (:func:`lilyexp.methods.routing.routing_groups`), it pools per group of rows instead (one prompt's beams,
  one CFG pair, one classification row), padding excluded. Neither the official code nor upstream has it.

peft cannot register a second tuner type without editing its PeftType enum, so this tuner is used as peft
documents for custom tuners: instantiated directly on the model (``LilyVariantModel(model, config)``), with
``save_pretrained``/``load_pretrained`` writing peft's file layout (safetensors, shared tensors once).
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from peft import LilyConfig
from peft.tuners.lily.layer import Linear as UpstreamLinear
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.tuners.lily.model import LilyModel
from torch import nn

from lilyexp.errors import ConfigError
from lilyexp.methods import MethodSettings
from lilyexp.settings import knob

ROUTER_PLACEMENTS = ("layer", "A", "group")  # official & upstream | paper App. A.1.3 | one per group (Vim)
POOLINGS = ("batch_mean", "sample_sum", "token")  # official & upstream | paper Eq. 2 | Vim
EVAL_POOLINGS = ("batch", "sample")  # official (pool each forward call) | per routing group, as batch-1 calls
PER_TARGET_KEYS = ("r", "num_B", "use_router", "activation", "dropout", "detach_input")
ACTIVATIONS = {None: nn.Identity, "relu": nn.ReLU}


@dataclass
class LilyVariantConfig(LilyConfig):
    """Upstream ``LilyConfig`` plus the switches the paper's experiment families differ in."""

    ne_1: Optional[int] = field(default=None, metadata={"help": "A's per (target, shape) group: layers share an A in "
                                "blocks of count // ne_1 (official stride). None: use stride_A."})
    router: str = field(default="layer", metadata={"help": f"router placement, one of {ROUTER_PLACEMENTS}"})
    pooling: str = field(default="batch_mean", metadata={"help": f"router pooling, one of {POOLINGS}"})
    mask_padding: bool = field(default=False, metadata={"help": "leave padding tokens out of router pooling"})
    eval_pooling: str = field(default="batch", metadata={"help": "batch: in evaluation too, batch_mean pools over "
                              "the whole forward call (official). sample: a module in eval mode with routing "
                              "groups set (methods.routing.routing_groups) pools per group of rows, padding "
                              "excluded, as separate batch-1 calls would; training is unchanged"})
    use_router: bool = field(default=True, metadata={"help": "False: the no-router ablation, B experts averaged"})
    apply_scaling: bool = field(default=True, metadata={"help": "False: ignore s (the official LLM code does)"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on h = A(x) (Vim uses 0.1)"})
    detach_input: bool = field(default=False, metadata={"help": "the adapter's input carries no gradient upstream: "
                               "the official Vim kernel drops the dt adapter's term from the x_dbl gradient"})
    per_target: dict = field(default_factory=dict, metadata={"help": "target suffix -> {r, num_B, use_router, "
                                                                     "activation, dropout, detach_input}"})
    slices: dict = field(default_factory=dict, metadata={"help": "fused targets adapted on output slices only: "
                         "suffix -> {parts: [q, k, v], adapt: [k, v]} (timm ViT's qkv)"})
    parallel: list = field(default_factory=list, metadata={"help": "targets adapted as a whole module, in parallel: "
                           "y = module(x) + s·Δ(x) (the ViT MLP adapter)"})

    def __post_init__(self) -> None:
        if self.num_B < 2:  # upstream's own check names its field num_B; the user typed method.ne_2
            raise ConfigError(f"lily ne_2 (B experts per target) must be at least 2 for the router to learn, got "
                              f"{self.num_B}.")
        super().__post_init__()
        if self.router not in ROUTER_PLACEMENTS:
            raise ConfigError(f"lily router must be one of {ROUTER_PLACEMENTS}, got '{self.router}'.")
        if self.pooling not in POOLINGS:
            raise ConfigError(f"lily pooling must be one of {POOLINGS}, got '{self.pooling}'.")
        if self.eval_pooling not in EVAL_POOLINGS:
            raise ConfigError(f"lily eval_pooling must be one of {EVAL_POOLINGS}, got '{self.eval_pooling}'.")
        if self.eval_pooling == "sample" and self.pooling != "batch_mean":
            raise ConfigError(f"lily eval_pooling=sample regroups batch_mean pooling; pooling '{self.pooling}' "
                              f"already routes each row on its own (leave eval_pooling=batch).")
        if self.ne_1 is not None and self.ne_1 < 1:
            raise ConfigError(f"lily ne_1 (number of A's) must be at least 1, got {self.ne_1}.")
        if self.r < 1:
            raise ConfigError(f"lily rank r must be a positive integer, got {self.r}.")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"lily dropout must be in [0, 1), got {self.dropout}.")
        for target, settings in self.per_target.items():
            unknown = set(settings) - set(PER_TARGET_KEYS)
            if unknown:
                raise ConfigError(f"lily per_target['{target}'] has unknown keys {sorted(unknown)}; "
                                  f"allowed: {PER_TARGET_KEYS}.")
            if settings.get("r", 1) < 1 or settings.get("num_B", 1) < 1:
                raise ConfigError(f"lily per_target['{target}'] needs r >= 1 and num_B >= 1.")
            if not 0 <= settings.get("dropout", 0.0) < 1:
                raise ConfigError(f"lily per_target['{target}'] dropout must be in [0, 1).")
            if settings.get("activation") not in ACTIVATIONS:
                raise ConfigError(f"lily activation must be one of {list(ACTIVATIONS)}, got {settings['activation']}.")
        for target, spec in self.slices.items():
            if not set(spec.get("adapt", [])) <= set(spec.get("parts", [])) or not spec.get("adapt"):
                raise ConfigError(f"lily slices['{target}'] must name parts and a non-empty subset of them to adapt.")

    def for_target(self, suffix: str) -> "LilyVariantConfig":
        """This config with ``per_target[suffix]`` applied (validation already ran on the whole config)."""
        settings = copy.copy(self)
        settings.activation = None
        for key, value in self.per_target.get(suffix, {}).items():
            setattr(settings, key, value)
        return settings


@dataclass(frozen=True)
class RowGroups:
    """The rows of a forward call partitioned into groups: row ``i`` is in group ``index[i]`` of ``count``."""

    ids: torch.Tensor
    index: torch.Tensor
    count: int

    @classmethod
    def of(cls, ids: torch.Tensor) -> "RowGroups":
        unique, index = torch.unique(ids, return_inverse=True)
        return cls(ids, index, unique.numel(), {})

    placed: dict = field(default_factory=dict, compare=False, repr=False)

    def index_on(self, device: torch.device) -> torch.Tensor:
        """``index`` on ``device``, copied once per device (every adapted layer of every forward asks)."""
        if device not in self.placed:
            self.placed[device] = self.index.to(device)
        return self.placed[device]


class RoutingContext:
    """Per-forward routing state shared by a model's Lily layers: the attention mask of the current forward,
    captured by a pre-hook on the wrapped model, so the routers can leave padding out (``mask_padding``), and the
    routing groups a recipe set for evaluation (``eval_pooling: sample``)."""

    def __init__(self) -> None:
        self.attention_mask: torch.Tensor | None = None
        self.groups: RowGroups | None = None

    def capture(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.attention_mask = kwargs.get("attention_mask")

    def set_groups(self, group_ids: torch.Tensor | None) -> torch.Tensor | None:
        """Set (or clear, with None) the routing groups; returns the previous group ids."""
        previous = None if self.groups is None else self.groups.ids
        if group_ids is None:
            self.groups = None
        elif previous is not group_ids:  # every layer sets the same tensor: partition it once
            self.groups = RowGroups.of(group_ids)
        return previous

    def token_weights(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """(batch, tokens) 0/1 weights aligned with ``hidden``'s last tokens (KV-cache steps see only those)."""
        mask = self.attention_mask
        if mask is None or hidden.dim() != 3 or mask.dim() != 2 or mask.shape[0] != hidden.shape[0]:
            return None
        return mask[:, -hidden.shape[1]:].to(hidden.dtype)

    def group_token_weights(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """:meth:`token_weights` for per-group pooling, which must leave padding out: a mask that cannot be
        aligned with ``hidden`` (e.g. the 4-D mask a compileable cache builds) is an error, not all-ones."""
        weights = self.token_weights(hidden)
        if weights is None and self.attention_mask is not None:
            raise ValueError(f"per-sample Lily routing needs a 2-D attention mask aligned with the adapter input "
                             f"{tuple(hidden.shape[:-1])}; got one of shape {tuple(self.attention_mask.shape)} "
                             f"(a static/compileable cache passes a 4-D mask: use the default dynamic cache).")
        return weights


class GroupRouted:
    """The routing-groups protocol of :mod:`lilyexp.methods.routing`, for Lily layers and branches."""

    routing: RoutingContext

    def set_routing_groups(self, group_ids: torch.Tensor | None) -> torch.Tensor | None:
        return self.routing.set_groups(group_ids)

    def evaluation_routing(self) -> str:
        """What this layer's router pools over in evaluation (the record states it): ``per_group`` (the
        recipe's groups, ``eval_pooling: sample``), ``per_call`` (every row and token of a forward call, the
        official batch_mean), ``per_row`` (each row alone: sample_sum / token pooling) or ``none`` (no router)."""
        config = next(iter(self.variant.values()))
        if not config.use_router:
            return "none"
        if config.pooling != "batch_mean":
            return "per_row"
        return "per_group" if config.eval_pooling == "sample" else "per_call"


def group_mean(probabilities: torch.Tensor, token_weights: torch.Tensor | None, groups: RowGroups) -> torch.Tensor:
    """(groups, E): per group, the mean of the per-token softmax over its rows' unmasked tokens."""
    rows, num_experts = probabilities.shape[0], probabilities.shape[-1]
    if groups.index.shape[0] != rows:
        raise ValueError(f"routing groups cover {groups.index.shape[0]} rows but this forward call has {rows}; "
                         f"set group ids for the batch actually run (e.g. batch_size * num_beams rows).")
    per_token = probabilities.reshape(rows, -1, num_experts)
    weights = per_token.new_ones(per_token.shape[:2]) if token_weights is None else token_weights.reshape(rows, -1)
    index = groups.index_on(per_token.device)
    sums = per_token.new_zeros(groups.count, num_experts).index_add_(0, index, (per_token * weights[..., None]).sum(1))
    counts = weights.new_zeros(groups.count).index_add_(0, index, weights.sum(1))
    return sums / counts.clamp_min(1)[:, None]


def routing_weights(logits: torch.Tensor, pooling: str, token_weights: torch.Tensor | None = None,
                    groups: RowGroups | None = None) -> torch.Tensor:
    """The expert weights a Lily layer applies, at the grain its pooling routes (the one place the routing math
    lives: the layer's forward and the routing captures both read it). ``batch_mean`` (official): the per-token
    softmax averaged over batch and unmasked tokens (E,), or per group of rows when evaluation routes per sample
    (groups, E); ``token``: each token's softmax (..., E); ``sample_sum`` (paper Eq. 2): each sample's softmax of
    its logits summed over its tokens (rows, E)."""
    if pooling == "batch_mean" and groups is not None:
        return group_mean(logits.softmax(-1), token_weights, groups)
    if pooling == "batch_mean":
        probabilities = logits.softmax(-1)
        if token_weights is None:
            return probabilities.reshape(-1, probabilities.shape[-1]).mean(0)
        return (probabilities * token_weights.unsqueeze(-1)).sum((0, 1)) / token_weights.sum().clamp_min(1)
    if pooling == "token":
        return logits.softmax(-1)
    logits = logits if logits.dim() == 3 else logits.unsqueeze(1)
    summed = logits.sum(1) if token_weights is None else (logits * token_weights.unsqueeze(-1)).sum(1)
    return summed.softmax(-1)


def mix_experts(hidden: torch.Tensor, experts: torch.Tensor, router: nn.Module | None, pooling: str,
                token_weights: torch.Tensor | None = None, groups: RowGroups | None = None) -> torch.Tensor:
    """Δ = h · Σ_e w_e B_e with one matmul (paper Eq. 3: mix the B's first, never N_e matmuls), the weights w
    from :func:`routing_weights`.

    hidden (rows, ..., r); experts (E, r, out); router maps r -> E, or None for the no-router ablation (mean of
    B's). ``groups``: batch_mean pools per group of rows instead of over the whole call (``eval_pooling``).
    """
    if router is None:
        return hidden @ experts.mean(0)
    weights = routing_weights(router(hidden), pooling, token_weights, groups)
    if pooling == "token":  # per-token mixture: (p_t ⊗ h_t) · reshape(B, (E·r, out))
        outer = (weights.unsqueeze(-1) * hidden.unsqueeze(-2)).flatten(-2)
        return outer @ experts.reshape(-1, experts.shape[-1])
    if weights.dim() == 1:  # one mixture for the whole call
        return hidden @ torch.einsum("e,eio->io", weights, experts)
    per_row = torch.einsum("ge,eio->gio", weights, experts)  # per group of rows, or per sample
    if pooling == "batch_mean":  # one mixture per group: each row takes its group's
        per_row = per_row[groups.index_on(per_row.device)]
    tokens = hidden.reshape(hidden.shape[0], -1, hidden.shape[-1])
    return (tokens @ per_row).reshape(*hidden.shape[:-1], experts.shape[-1])


def dropout_module(p: float) -> nn.Module:
    return nn.Dropout(p) if p > 0 else nn.Identity()  # upstream has no dropout: keep p=0 free


def attach_variant(holder: nn.Module, adapter: str, config: LilyVariantConfig, routing: RoutingContext) -> None:
    """What :func:`lily_delta` reads besides A, B and the router, on a Lily layer or branch."""
    holder.lily_dropout = nn.ModuleDict({adapter: dropout_module(config.dropout)})
    holder.lily_activation = nn.ModuleDict({adapter: ACTIVATIONS[config.activation]()})
    holder.variant, holder.routing = {adapter: config}, routing
    holder.mix = mix_experts  # the Eq. 3 combination; `make bench` swaps in a naive reference to time it


def lily_delta(holder: nn.Module, x: torch.Tensor, adapter: str) -> torch.Tensor:
    """s·Δ(x) of one adapter holder (a Lily layer or branch): h = φ(A x), dropout, routed mixture of B's."""
    config = holder.variant[adapter]
    lily_B = holder.lily_B[adapter].weight
    experts = lily_B.reshape(holder.num_B[adapter], -1, lily_B.shape[1])
    # Δ·stop_grad(x): the official Vim kernel's backward omits this term upstream
    x = x.detach() if config.detach_input else x
    hidden = holder.lily_A[adapter](x.to(lily_B.dtype))
    hidden = holder.lily_dropout[adapter](holder.lily_activation[adapter](hidden))
    router = holder.lily_router[adapter] if config.use_router else None
    groups = evaluation_groups(holder, config)
    if groups is None:
        weights = holder.routing.token_weights(hidden) if config.mask_padding else None
        delta = holder.mix(hidden, experts, router, config.pooling, weights)
    else:  # padding is always left out here: a batch-1 call has none
        delta = holder.mix(hidden, experts, router, config.pooling, holder.routing.group_token_weights(hidden), groups)
    return delta * (holder.scaling[adapter] if config.apply_scaling else 1.0)


def evaluation_groups(holder: nn.Module, config: LilyVariantConfig) -> RowGroups | None:
    """The per-sample rule: groups apply iff ``eval_pooling`` is ``sample``, the holder is in eval mode and a
    recipe set groups; training, and evaluation without groups, keep the official whole-call pooling."""
    if config.eval_pooling != "sample" or holder.training or not config.use_router:
        return None
    return holder.routing.groups


class LilyVariantLinear(GroupRouted, UpstreamLinear):
    """Upstream Lily ``Linear`` with the paper variants' expert mixing, dropout on h and optional s."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, r: int, config: LilyVariantConfig,
                 routing: RoutingContext, **kwargs: Any) -> None:
        super().__init__(base_layer, adapter_name, r, config=config, **kwargs)
        if not config.use_router:  # the ablation has no router parameters (official Linear_mono)
            self.lily_router[adapter_name] = nn.Identity()
        attach_variant(self, adapter_name, config, routing)
        self.lily_group = None  # (target name, weight shape), set by the model

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters or not self.active_adapters:
            return result
        for adapter in self.active_adapters:
            if adapter in self.lily_A:
                result = result + lily_delta(self, x, adapter).to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "lily_variant." + super().__repr__().removeprefix("lily.")


class LilyBranch(GroupRouted, nn.Module):
    """A Lily adapter without a base layer (A, B experts, router), for the slice and parallel placements;
    initialised like upstream's layer (kaiming-uniform A and router, B zero unless ``init_weights=False``)."""

    def __init__(self, in_features: int, out_features: int, config: LilyVariantConfig, routing: RoutingContext,
                 adapter: str, group: tuple) -> None:
        super().__init__()
        self.r, self.num_B, self.scaling, self.stride_A = ({adapter: config.r}, {adapter: config.num_B},
                                                           {adapter: config.scaling}, {adapter: 1})
        self.lily_A = nn.ModuleDict({adapter: nn.Linear(in_features, config.r, bias=False)})
        self.lily_B = nn.ModuleDict({adapter: nn.Linear(out_features, config.num_B * config.r, bias=False)})
        router = nn.Linear(config.r, config.num_B, bias=False) if config.use_router else nn.Identity()
        self.lily_router = nn.ModuleDict({adapter: router})
        attach_variant(self, adapter, config, routing)
        self.lily_group = group
        nn.init.kaiming_uniform_(self.lily_A[adapter].weight, a=math.sqrt(5))
        if config.use_router:
            nn.init.kaiming_uniform_(router.weight, a=math.sqrt(5))
        if config.init_weights:
            nn.init.zeros_(self.lily_B[adapter].weight)
        else:
            nn.init.kaiming_uniform_(self.lily_B[adapter].weight, a=math.sqrt(5))

    def forward(self, x: torch.Tensor, adapter: str) -> torch.Tensor:
        return lily_delta(self, x, adapter)


def linear_ends(module: nn.Module) -> tuple[int, int]:
    """(in, out) features of a module: its first Linear's input, its last Linear's output."""
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError(f"a parallel Lily adapter needs a module with Linear layers, not {type(module).__name__}.")
    return linears[0].in_features, linears[-1].out_features


class LilySlicedLinear(nn.Module, BaseTunerLayer):
    """A fused projection (timm ViT's qkv) whose output slices get their own Lily adapters: the official ViT code
    adds Lily to the k and v slices after the fused Linear, keeping its bias
    (visual-adaptation-benchmark/vit/lily.py)."""

    adapter_layer_names = ("lily_parts",)

    def __init__(self, base_layer: nn.Linear, adapter: str, config: LilyVariantConfig, routing: RoutingContext,
                 name: str, spec: dict) -> None:
        super().__init__()
        self.base_layer, self.parts = base_layer, list(spec["parts"])
        self.width = base_layer.out_features // len(self.parts)
        self.lily_parts = nn.ModuleDict({adapter: nn.ModuleDict({
            part: LilyBranch(base_layer.in_features, self.width, config, routing, adapter, (f"{name}.{part}",
                             (self.width, base_layer.in_features))) for part in spec["adapt"]})})
        self._active_adapter, self._disable_adapters, self.merged_adapters = adapter, False, []

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        pieces = list(result.split(self.width, dim=-1))
        for adapter in self.active_adapters:
            for part, branch in self.lily_parts[adapter].items():
                index = self.parts.index(part)
                pieces[index] = pieces[index] + branch(x, adapter).to(result.dtype)
        return torch.cat(pieces, dim=-1)


class LilyParallel(nn.Module, BaseTunerLayer):
    """A Lily adapter beside a whole module: y = module(x) + s·Δ(x) (the official ViT MLP adapter, with a ReLU
    after A and twice the rank, set through ``per_target``)."""

    adapter_layer_names = ("lily_parallel",)

    def __init__(self, base_layer: nn.Module, adapter: str, config: LilyVariantConfig, routing: RoutingContext,
                 name: str) -> None:
        super().__init__()
        self.base_layer = base_layer
        fan_in, fan_out = linear_ends(base_layer)
        self.lily_parallel = nn.ModuleDict({adapter: LilyBranch(fan_in, fan_out, config, routing, adapter,
                                                                (name, (fan_out, fan_in)))})
        self._active_adapter, self._disable_adapters, self.merged_adapters = adapter, False, []

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        for adapter in self.active_adapters:
            result = result + self.lily_parallel[adapter](x, adapter).to(result.dtype)
        return result


@dataclass
class GroupSummary:
    target: str
    shape: tuple[int, int]
    layers: int
    stride: int
    num_A: int
    num_B: int
    r: int
    routers: int


class LilyVariantModel(LilyModel):
    """Upstream ``LilyModel`` creating :class:`LilyVariantLinear` layers and sharing A's, B's and routers the
    way the config asks. Use directly: ``LilyVariantModel(model, config)`` adapts ``model`` in place."""

    def __init__(self, model: nn.Module, config: LilyVariantConfig, adapter_name: str = "default", **kwargs: Any):
        self.routing = RoutingContext()
        self.groups: list[GroupSummary] = []
        super().__init__(model, config, adapter_name, **kwargs)
        self._routing_hook = self.model.register_forward_pre_hook(self.routing.capture, with_kwargs=True)

    def _matched_suffix(self, config: LilyVariantConfig, key: str) -> str:
        targets = [config.target_modules] if isinstance(config.target_modules, str) else config.target_modules
        matches = [t for t in targets if key == t or key.endswith(f".{t}")]
        return max(matches, key=len) if matches else str(config.target_modules)

    def _create_and_replace(self, lily_config, adapter_name, target, target_name, parent, current_key, **kw):
        suffix = self._matched_suffix(lily_config, current_key)
        settings = lily_config.for_target(suffix)
        if suffix in lily_config.parallel:
            new_module = LilyParallel(target, adapter_name, settings, self.routing, suffix)
        elif not isinstance(target, nn.Linear):
            raise ConfigError(f"Lily adapts Linear layers; '{current_key}' is a {type(target).__name__} "
                              f"(list it in `parallel` to adapt the whole module).")
        elif suffix in lily_config.slices:
            new_module = LilySlicedLinear(target, adapter_name, settings, self.routing, suffix,
                                          lily_config.slices[suffix])
        else:
            new_module = LilyVariantLinear(target, adapter_name, settings.r, settings, self.routing)
            new_module.lily_group = (suffix, tuple(target.weight.shape))
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _post_injection_hook(self, model: nn.Module, config: LilyVariantConfig, adapter_name: str) -> None:
        groups: dict[tuple, list[nn.Module]] = {}
        for module in model.modules():  # Lily layers and branches, in traversal (layer) order
            if getattr(module, "lily_group", None) is not None and adapter_name in module.lily_A:
                groups.setdefault(module.lily_group, []).append(module)
        self.groups = [self._share(suffix, shape, layers, config, adapter_name)
                       for (suffix, shape), layers in groups.items()]

    @staticmethod
    def _share(suffix: str, shape: tuple, layers: list[nn.Module], config: LilyVariantConfig,
               adapter: str) -> GroupSummary:
        count = len(layers)
        if config.ne_1 is not None and config.ne_1 > count:
            raise ConfigError(f"lily ne_1={config.ne_1} asks for more A's than the {count} '{suffix}' layers "
                              f"{tuple(shape)} there are to share them.")
        stride = count // config.ne_1 if config.ne_1 is not None else config.stride_A
        for i, layer in enumerate(layers):
            leader = layers[(i // stride) * stride]
            layer.lily_B[adapter] = layers[0].lily_B[adapter]
            layer.lily_A[adapter] = leader.lily_A[adapter]
            layer.stride_A[adapter] = stride
            if config.router == "A":
                layer.lily_router[adapter] = leader.lily_router[adapter]
            elif config.router == "group":
                layer.lily_router[adapter] = layers[0].lily_router[adapter]
        settings = layers[0].variant[adapter]
        routers = {"layer": count, "A": math.ceil(count / stride), "group": 1}[config.router]
        return GroupSummary(suffix, tuple(shape), count, stride, math.ceil(count / stride), layers[0].num_B[adapter],
                            layers[0].r[adapter], routers if settings.use_router else 0)

    def summary(self) -> list[dict]:
        """What was built, per (target, shape) group: layers, stride, number of A's and B's, rank, routers."""
        return [asdict(group) for group in self.groups]

    def save_pretrained(self, directory: str | Path) -> None:
        """lilyexp's adapter format (shared tensors once, the head included): :mod:`lilyexp.methods.lily_io`."""
        from lilyexp.methods.lily_io import export_lilyexp

        export_lilyexp(self, directory)

    @classmethod
    def load_pretrained(cls, model: nn.Module, directory: str | Path) -> "LilyVariantModel":
        """Adapt ``model`` with a saved Lily; a corrupt or mismatched one is a clear error."""
        from lilyexp.methods.export import load_adapter

        return load_adapter(model, directory)


def upcast_half_adapters(model: nn.Module) -> None:
    """fp32 adapters on an fp16/bf16 backbone, as peft's ``autocast_adapter_dtype`` gives LoRA (fp16 AMP cannot
    unscale fp16 gradients). Done in place (``param.data``) so shared A's and B's stay one tensor each; peft's own
    ``cast_adapter_dtype`` assigns new parameters, which would silently unshare them."""
    for name, param in model.named_parameters():
        if "lily_" in name and param.dtype in (torch.float16, torch.bfloat16):
            param.data = param.data.float()


class LilyMethod:
    """The ``method=lily`` object: validates the config before any model loads, then adapts the model."""

    def __init__(self, config: LilyVariantConfig):
        self.config = config

    def apply(self, model: nn.Module) -> LilyVariantModel:
        try:
            adapted = LilyVariantModel(model, self.config)
        except ValueError as exc:
            raise ConfigError(f"Lily could not adapt the backbone: {exc}") from None
        upcast_half_adapters(adapted)
        return adapted

    def check(self, skeleton: nn.Module) -> None:
        """Refuse what cannot be built (more A's than layers, a target the backbone lacks) on the backbone's
        weightless skeleton, before any weights load."""
        try:
            with torch.device("meta"):  # the adapter's A's, B's and routers too: no memory, no initialisation
                LilyVariantModel(skeleton, self.config)
        except ConfigError:
            raise
        except ValueError as exc:  # peft's refusal, e.g. a target module the backbone lacks
            raise ConfigError(f"Lily could not adapt the backbone: {exc}") from None

    @staticmethod
    def summary(model: LilyVariantModel) -> list[dict]:
        return model.summary()

    @staticmethod
    def export(model: LilyVariantModel, directory: str | Path, node: dict | None = None) -> None:
        """peft's format when upstream Lily computes this variant, else lilyexp's (:mod:`lilyexp.methods.lily_io`)."""
        from lilyexp.methods.lily_io import export

        export(model, directory)

    def load(self, model: nn.Module, directory: str | Path) -> LilyVariantModel:
        """Adapt ``model`` with this config and load an export's tensors, in lilyexp's format or peft's (so a
        peft-format export is evaluated by lilyexp's Lily, e.g. with per-sample routing; ``lilyexp.load_adapter``
        loads a peft-format export with peft itself)."""
        from lilyexp.methods.lily_io import load_tensors

        return load_tensors(self.apply(model), directory)


@dataclass
class LilySettings(MethodSettings):
    """method=lily: the paper's names; defaults are the official code's (what produced the paper's numbers)."""

    r: int = knob(16, help="Lily_r")
    s: float = knob(1.0, help="Lily_s, the scaling of the adapter output", passed_as="scaling")
    ne_1: int = knob(4, help="A's per (target, shape) group; consecutive layers share one (stride layers // ne_1)")
    ne_2: int = knob(4, help="B experts per (target, shape) group, shared model-wide", passed_as="num_B")
    router: str = knob("layer", choices=ROUTER_PLACEMENTS)
    pooling: str = knob("batch_mean", choices=POOLINGS)
    eval_pooling: str = knob("batch", choices=EVAL_POOLINGS,
                             help="sample: batched evaluation routes each sample as batch 1 does")
    mask_padding: bool = knob(False)
    use_router: bool = knob(True)
    apply_s: bool = knob(True, passed_as="apply_scaling")
    dropout: float = knob(0.0)
    zero_init_B: bool = knob(True, passed_as="init_weights")
    per_target: dict = knob({})
    slices: dict = knob({})
    parallel: list = knob([])
    target_modules: Optional[list] = knob(None, help="None: the backbone's adapter_targets.lily")
