"""Training-time captures behind the paper's analysis figures (§4.5): training-loop callbacks
(``trainer.callbacks``) that save artifacts beside the run's record.

* :class:`DeltaWeightCapture` (Fig. 3, "Does it have high-rank weight updates?"): the weight update ΔW of chosen
  adapted layers (e.g. the query projections of layers 0-2), as the ``(out, in)`` matrix the layer adds to its
  frozen weight. Two measures: **accumulated**, the sum over training steps of the ΔW each layer applied to that
  step's batch (its parameters at the step's forward and, for Lily, the mixture of B experts its router gave
  that batch), which is what the paper ranks ("accumulated weight updates over multiple epochs"); and **final**,
  the ΔW of the last weights (for Lily with the router weights averaged over the validation split). Saved as
  ``<record stem>.<name>.safetensors`` (the matrices) and ``.json`` (singular values and numerical ranks at the
  stated tolerance).
* :class:`RouterCapture` (Fig. 4, "Does it exhibit selectivity?"): per Lily layer, its router's softmax outputs
  summed over the tokens and steps of training, per B expert (``<record stem>.<name>.json``).

Layers are found by what they are, not by the method's name: a Lily layer or branch holds ``lily_A``,
``lily_B`` and a router (ΔW = s·B̄ᵀA with B̄ = Σ_e w_e B_e); any other peft tuner layer computes its own
``get_delta_weight`` (LoRA: scaling·B·A; PiSSA and MiLoRA likewise).

A capture attaches to the model when training starts (``on_train_start``) and holds every step from there; the
artifact names the first step it holds: 1, or the step after the last checkpoint in a resumed run, which starts
its captures afresh. Under several processes each capture sees its own process's batches; router sums are added over
processes, ΔW is the main process's. Gradient checkpointing repeats forwards in the backward pass, which the
router sums would count twice: capture without it.
"""

from __future__ import annotations

import abc
import json
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from safetensors.torch import save_file
from torch import nn

from lilyexp.errors import ConfigError
from lilyexp.methods.lily import RowGroups, routing_weights
from lilyexp.recipes.loop import Callback

ACCUMULATED_DEFINITION = ("sum over training steps of the update each layer applied to that step's batch: its "
                          "parameters at the step's forward, Lily's B experts mixed by the router weights of that "
                          "batch")
FINAL_DEFINITION = "the update of the last weights (Lily: router weights averaged over the validation split)"
RANK_DEFINITION = "numerical rank: singular values greater than rtol x the largest one"


# ------------------------------------------------------------------------------------------- numerical rank

def default_rtol(shape: Sequence[int]) -> float:
    """max(m, n)·ε(float32): the relative tolerance numpy and torch use for a float32 matrix's rank (the
    updates are computed in float32; sums are kept in float64)."""
    return max(shape) * torch.finfo(torch.float32).eps


def singular_values(matrix: torch.Tensor) -> torch.Tensor:
    """Singular values in float64, largest first."""
    return torch.linalg.svdvals(matrix.detach().to(torch.float64).cpu())


def rank_of(values: torch.Tensor | Sequence[float], rtol: float) -> int:
    """How many singular values exceed ``rtol`` times the largest (0 for a zero matrix)."""
    values = torch.as_tensor(values, dtype=torch.float64)
    if values.numel() == 0 or values.max() <= 0:
        return 0
    return int((values > rtol * values.max()).sum())


def numerical_rank(matrix: torch.Tensor, rtol: float | None = None) -> int:
    """The number of singular values of ``matrix`` above ``rtol``·σ_max (default: :func:`default_rtol`)."""
    return rank_of(singular_values(matrix), default_rtol(matrix.shape) if rtol is None else rtol)


# ------------------------------------------------------------------------------------ adapted layers and ΔW

def is_lily(module: nn.Module) -> bool:
    return all(hasattr(module, name) for name in ("lily_A", "lily_B", "lily_router", "variant"))


def is_adapter_layer(module: nn.Module) -> bool:
    """A module whose weight update can be read: a Lily layer or branch, or a peft tuner layer computing
    ``get_delta_weight`` (Lily's upstream layer has one that refuses, hence Lily first)."""
    return is_lily(module) or (callable(getattr(module, "get_delta_weight", None))
                               and hasattr(module, "active_adapters"))


def adapter_names(module: nn.Module) -> list[str]:
    active = list(getattr(module, "active_adapters", None) or [])
    if is_lily(module):
        return [name for name in module.lily_A if not active or name in active]
    return active


def is_routed(module: nn.Module) -> bool:
    """A Lily holder whose B experts a router mixes (not the no-router ablation)."""
    return is_lily(module) and any(module.variant[a].use_router for a in adapter_names(module))


def layer_index(name: str) -> int | None:
    """The first integer in a module's dotted name: its block (``...encoder.layer.2.attention.self.query`` → 2)."""
    found = re.search(r"(?:^|\.)(\d+)(?:\.|$)", name)
    return int(found.group(1)) if found else None


def target_of(name: str, module: nn.Module) -> str:
    """What a layer adapts: a Lily holder's group suffix (``query``, ``qkv.k``, ``mlp``), else the name's end."""
    group = getattr(module, "lily_group", None)
    return group[0] if group else name.rsplit(".", 1)[-1]


def find_layers(model: nn.Module, modules: Sequence[str] | None, layers: Sequence[int] | None,
                keep: Callable[[nn.Module], bool] = is_adapter_layer) -> dict[str, nn.Module]:
    """Adapted layers by name: those whose target (or name's last parts) is in ``modules`` (None: any) and whose
    block index is in ``layers`` (None: any), in model order."""
    found = {}
    for name, module in model.named_modules():
        if not keep(module):
            continue
        if modules is not None and not any(target_of(name, module) == m or name.endswith(f".{m}") for m in modules):
            continue
        if layers is not None and layer_index(name) not in layers:
            continue
        found[name] = module
    return found


def experts_of(holder: nn.Module, adapter: str) -> torch.Tensor:
    """A Lily holder's B experts as (E, r, out), the layout its forward mixes."""
    weight = holder.lily_B[adapter].weight
    return weight.reshape(holder.num_B[adapter], -1, weight.shape[1])


def lily_delta_weight(holder: nn.Module, adapter: str, mixture: torch.Tensor | None) -> torch.Tensor:
    """s·B̄ᵀA as (out, in), B̄ = Σ_e w_e B_e with ``mixture`` w (the experts' mean when there is no router)."""
    config = holder.variant[adapter]
    if not isinstance(holder.lily_activation[adapter], nn.Identity):
        raise ConfigError("a Lily adapter with an activation after A is not a linear update: it has no ΔW matrix.")
    experts = experts_of(holder, adapter).detach().to(torch.float64)
    if mixture is None or not config.use_router:
        mixture = torch.full((experts.shape[0],), 1.0 / experts.shape[0], dtype=torch.float64)
    mixed = torch.einsum("e,eio->io", mixture.to(experts), experts)
    scale = holder.scaling[adapter] if config.apply_scaling else 1.0
    return scale * mixed.T @ holder.lily_A[adapter].weight.detach().to(torch.float64)


def delta_weight(layer: nn.Module, mixture: torch.Tensor | None = None) -> torch.Tensor:
    """The (out, in) update ``layer`` adds to its weight, float64, summed over its active adapters."""
    names = adapter_names(layer)
    if not names:
        raise ConfigError(f"{type(layer).__name__} has no active adapter to read a weight update from.")
    if is_lily(layer):
        return sum(lily_delta_weight(layer, name, mixture) for name in names)
    return sum(layer.get_delta_weight(name).detach().to(torch.float64) for name in names)


@contextmanager
def parameters_as(layer: nn.Module, values: dict[str, torch.Tensor]) -> Iterator[None]:
    """``layer``'s parameters temporarily holding ``values`` (a snapshot taken earlier)."""
    parameters = dict(layer.named_parameters())
    current = {name: parameters[name].data for name in values}
    try:
        for name, value in values.items():
            parameters[name].data = value
        yield
    finally:
        for name, value in current.items():
            parameters[name].data = value


def trainable_snapshot(layer: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in layer.named_parameters() if p.requires_grad}


# --------------------------------------------------------------------------------------- routing of Lily

def pooled_mixture(logits: torch.Tensor, pooling: str, token_weights: torch.Tensor | None,
                   groups: RowGroups | None = None) -> torch.Tensor:
    """The expert weights a Lily layer applied to a batch (:func:`routing_weights`), averaged over the batch (E,):
    ΔW is linear in them, so this mixture gives the layer's mean update. Per-group weights (evaluation routing per
    sample) are averaged over the tokens that took them; per-token and per-sample weights over tokens and rows."""
    weights = routing_weights(logits, pooling, token_weights, groups)
    if weights.dim() == 1:
        return weights
    if pooling == "batch_mean":  # per group: each token took its group's mixture
        rows = logits.shape[0]
        tokens = logits.new_ones(rows, logits[0].numel() // logits.shape[-1]) if token_weights is None \
            else token_weights.reshape(rows, -1).to(logits)
        per_row = weights[groups.index_on(weights.device)]
        return (per_row * tokens.sum(1, keepdim=True)).sum(0) / tokens.sum().clamp_min(1)
    return weights.reshape(-1, weights.shape[-1]).mean(0)


def recomputing() -> bool:
    """Whether this forward runs inside backward: activation checkpointing replaying a block, whose routing was
    already told once (a private torch call; -1 outside any backward pass)."""
    return torch._C._current_graph_task_id() != -1


class RoutingTap:
    """What a Lily holder's router gives each batch, told to listeners: the holder's ``mix`` (the Eq. 3
    combination every forward calls) is wrapped once, however many captures listen; unwrapped when the last
    listener leaves. A listener is called as ``listener(token_sum, tokens, mixture, training)``: the per-token
    softmax summed over the batch's tokens (E,), how many tokens, the pooled mixture (E,)."""

    def __init__(self, holder: nn.Module):
        self.holder, self.original, self.listeners = holder, holder.mix, []
        holder.mix = self.mix

    @classmethod
    def of(cls, holder: nn.Module) -> "RoutingTap":
        tap = holder.__dict__.get("routing_tap")
        if tap is None:
            tap = holder.__dict__["routing_tap"] = cls(holder)
        return tap

    def remove(self, listener: Callable) -> None:
        self.listeners = [known for known in self.listeners if known is not listener]
        if not self.listeners:
            self.holder.mix = self.original
            self.holder.__dict__.pop("routing_tap", None)

    def mix(self, hidden, experts, router, pooling, token_weights=None, groups=None):
        if router is not None and self.listeners and not recomputing():
            with torch.no_grad():
                self.tell(hidden, router, pooling, token_weights, groups)
        return self.original(hidden, experts, router, pooling, token_weights, groups)

    def tell(self, hidden: torch.Tensor, router: nn.Module, pooling: str, token_weights, groups) -> None:
        logits = router(hidden).to(torch.float64)
        probabilities = logits.softmax(-1)
        flat = probabilities.reshape(-1, probabilities.shape[-1])
        weights = torch.ones(flat.shape[0], dtype=flat.dtype, device=flat.device) if token_weights is None \
            else token_weights.reshape(-1).to(flat)
        token_sum, tokens = (flat * weights.unsqueeze(-1)).sum(0), weights.sum()
        mixture = pooled_mixture(logits, pooling, token_weights, groups)
        for listener in list(self.listeners):
            listener(token_sum, tokens, mixture, self.holder.training)


def listen(holder: nn.Module, listener: Callable) -> Callable[[], None]:
    """Subscribe ``listener`` to ``holder``'s routing; returns the unsubscribe function."""
    tap = RoutingTap.of(holder)
    tap.listeners.append(listener)
    return lambda: tap.remove(listener)


# ------------------------------------------------------------------------------------------- the callbacks

class Capture(Callback, abc.ABC):
    """Attach to the model when training starts, detach and save at the end of training."""

    def __init__(self, name: str):
        self.name, self.model, self.first_step, self.steps, self.detachers = name, None, None, 0, []

    def on_train_start(self, loop: Any) -> None:
        self.attach(loop.unwrapped)
        self.first_step = getattr(loop, "start", 0) + 1

    def on_step_end(self, loop: Any, step: int) -> None:
        self.step_done(step)
        self.steps += 1

    def on_train_end(self, loop: Any) -> None:
        if self.model is None:  # no training (an evaluation-only run): nothing was captured
            return
        try:
            payload = self.finish(loop)
            if getattr(loop, "main", True):
                self.save(payload, loop.inputs.run)
        finally:
            for detach in self.detachers:
                detach()
            self.detachers, self.model = [], None

    def attach(self, model: nn.Module) -> None:
        self.model = model

    def step_done(self, step: int) -> None:
        """After optimizer step ``step`` (a step the capture saw from its start)."""

    @abc.abstractmethod
    def finish(self, loop: Any) -> dict:
        """What the capture measured, once training ends."""

    @abc.abstractmethod
    def save(self, payload: dict, run: Any) -> list[Path]:
        """Write ``payload`` beside the run's record; the paths written."""

    def write_json(self, data: dict, run: Any) -> Path:
        path = run.side_file(f"{self.name}.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=1) + "\n")
        return path


class LayerTrack:
    """One layer's running ΔW: its trainable parameters as they were at its first training forward of the step,
    the router mixtures of the step's micro-batches, the sum of the per-step updates; and, while the validation
    pass runs, the token-weighted router mixture over the validation split."""

    def __init__(self, layer: nn.Module):
        self.layer, self.routed = layer, is_routed(layer)
        self.snapshot, self.step_mixture, self.step_calls = None, 0.0, 0
        self.total, self.training_mixture, self.training_calls = None, 0.0, 0
        self.collecting, self.validation_mixture, self.validation_tokens = False, 0.0, 0.0

    def before_forward(self, module: nn.Module, args: tuple) -> None:
        if module.training and self.snapshot is None:
            self.snapshot = trainable_snapshot(module)

    def on_routing(self, token_sum, tokens, mixture, training: bool) -> None:
        if training:  # kept on the device: no host synchronisation per forward
            self.step_mixture, self.step_calls = self.step_mixture + mixture, self.step_calls + 1
        elif self.collecting:
            self.validation_mixture = self.validation_mixture + mixture * tokens
            self.validation_tokens = self.validation_tokens + tokens

    def step_done(self) -> None:
        """Add the update this layer applied in the step that just ended."""
        if self.snapshot is None:
            return
        mixture = self.step_mixture / self.step_calls if self.routed and self.step_calls else None
        with parameters_as(self.layer, self.snapshot):
            update = delta_weight(self.layer, mixture)
        self.total = update if self.total is None else self.total + update
        if mixture is not None:
            self.training_mixture, self.training_calls = self.training_mixture + mixture, self.training_calls + 1
        self.snapshot, self.step_mixture, self.step_calls = None, 0.0, 0

    def final_mixture(self) -> torch.Tensor | None:
        """The validation split's mixture if it ran, else the mean over training steps (None: not routed)."""
        if not self.routed:
            return None
        if float(self.validation_tokens):
            return self.validation_mixture / self.validation_tokens
        return self.training_mixture / self.training_calls if self.training_calls else None


class DeltaWeightCapture(Capture):
    """Fig. 3's weight updates of the layers named by ``modules`` (targets or name endings, e.g. ``[query]``)
    in blocks ``layers`` (e.g. ``[0, 1, 2]``): accumulated over training and final, with their numerical ranks
    at ``rtol`` (None: max(m, n)·ε(float32) per matrix). ``validation_mixture``: Lily's final ΔW mixes its B
    experts with the router weights averaged over one extra pass over the validation split (else: averaged over
    training)."""

    def __init__(self, modules: Sequence[str] | None = ("query",), layers: Sequence[int] | None = (0, 1, 2),
                 rtol: float | None = None, validation_mixture: bool = True, name: str = "delta_w"):
        super().__init__(name)
        self.modules = None if modules is None else [str(m) for m in modules]
        self.layers = None if layers is None else [int(i) for i in layers]
        self.rtol, self.validation_mixture, self.tracks = rtol, validation_mixture, {}

    def attach(self, model: nn.Module) -> None:
        super().attach(model)
        layers = find_layers(model, self.modules, self.layers)
        if not layers:
            candidates = list(find_layers(model, None, None))[:6]
            raise ConfigError(f"DeltaWeightCapture found no adapted layer named {self.modules} in blocks "
                              f"{self.layers}; adapted layers are e.g. {candidates}.")
        for name, layer in layers.items():
            track = self.tracks[name] = LayerTrack(layer)
            self.detachers.append(layer.register_forward_pre_hook(track.before_forward).remove)
            if track.routed:
                self.detachers.append(listen(layer, track.on_routing))

    def step_done(self, step: int) -> None:
        for track in self.tracks.values():
            track.step_done()

    def finish(self, loop: Any) -> dict:
        if self.validation_mixture and any(track.routed for track in self.tracks.values()):
            self.validation_pass(loop)
        return {name: {"accumulated": track.total, "final": delta_weight(track.layer, track.final_mixture())}
                for name, track in self.tracks.items()}

    def validation_pass(self, loop: Any) -> None:
        for track in self.tracks.values():
            track.collecting = True
        try:
            loop.objective.validate(loop.model)
        finally:
            for track in self.tracks.values():
                track.collecting = False

    def summary(self, name: str, matrices: dict[str, torch.Tensor | None]) -> dict:
        shape = next(m for m in matrices.values() if m is not None).shape
        rtol = default_rtol(shape) if self.rtol is None else self.rtol
        entry = {"name": name, "target": target_of(name, self.tracks[name].layer), "layer": layer_index(name),
                 "shape": list(shape), "rtol": rtol}
        for measure, matrix in matrices.items():
            values = singular_values(matrix).tolist() if matrix is not None else []
            entry[measure] = {"rank": rank_of(values, rtol) if values else None, "singular_values": values}
        return entry

    def save(self, payload: dict, run: Any) -> list[Path]:
        tensors = {f"{measure}.{name}": matrix.to(torch.float32).contiguous().cpu()
                   for name, matrices in payload.items() for measure, matrix in matrices.items() if matrix is not None}
        summary = {"definition": {"accumulated": ACCUMULATED_DEFINITION, "final": FINAL_DEFINITION,
                                  "rank": RANK_DEFINITION, "layout": "(out, in), the layer's weight layout"},
                   "rtol": self.rtol if self.rtol is not None else "max(m, n) x float32 epsilon, per matrix",
                   "first_step": self.first_step, "steps": self.steps,
                   "layers": [self.summary(name, matrices) for name, matrices in payload.items()]}
        path = run.side_file(f"{self.name}.safetensors")
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, path, metadata={"first_step": str(self.first_step), "steps": str(self.steps),
                                           "accumulated": ACCUMULATED_DEFINITION, "final": FINAL_DEFINITION})
        return [path, self.write_json(summary, run)]


class RouterCapture(Capture):
    """Fig. 4's router weights: for every routed Lily layer (optionally only ``modules`` in blocks ``layers``),
    the router's per-token softmax summed over the tokens and steps of training, per B expert. A model
    without routers (LoRA) saves nothing."""

    def __init__(self, modules: Sequence[str] | None = None, layers: Sequence[int] | None = None,
                 name: str = "router_weights"):
        super().__init__(name)
        self.modules = None if modules is None else [str(m) for m in modules]
        self.layers = None if layers is None else [int(i) for i in layers]
        self.sums: dict[str, dict] = {}

    def attach(self, model: nn.Module) -> None:
        super().attach(model)
        for name, layer in find_layers(model, self.modules, self.layers, keep=is_routed).items():
            entry = self.sums[name] = {"layer": layer, "sum": 0.0, "tokens": 0.0}
            self.detachers.append(listen(layer, self.adder(entry)))

    @staticmethod
    def adder(entry: dict) -> Callable:
        def add(token_sum, tokens, mixture, training: bool) -> None:
            if training:
                entry["sum"], entry["tokens"] = entry["sum"] + token_sum, entry["tokens"] + tokens
        return add

    def finish(self, loop: Any) -> dict:
        accelerator = getattr(loop, "accelerator", None)
        rows = []
        for name, entry in self.sums.items():
            total, tokens = torch.as_tensor(entry["sum"]), torch.as_tensor(entry["tokens"])
            if accelerator is not None and accelerator.num_processes > 1:
                total, tokens = accelerator.reduce(total, "sum"), accelerator.reduce(tokens, "sum")
            rows.append({"name": name, "target": target_of(name, entry["layer"]), "layer": layer_index(name),
                         "sums": total.cpu().tolist(), "tokens": float(tokens)})
        return {"definition": "per B expert, the router's softmax output summed over the tokens and steps of "
                              "training", "first_step": self.first_step, "steps": self.steps, "layers": rows}

    def save(self, payload: dict, run: Any) -> list[Path]:
        return [self.write_json(payload, run)] if payload["layers"] else []
