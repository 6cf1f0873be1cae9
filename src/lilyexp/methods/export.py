"""What a finished run leaves for other tools: the selected adapter in peft's file layout
(``adapter_config.json`` + ``adapter_model.safetensors``), and :func:`load_adapter`, which loads any lilyexp export.

* Methods peft expresses (LoRA, PiSSA, MiLoRA, any peft config, and the Lily variants upstream peft's Lily tuner
  computes) export in peft's own format: ``peft.PeftModel.from_pretrained(base, directory)`` loads them. PiSSA and
  MiLoRA train on a residual base; they export the form peft documents for that (``save_pretrained(...,
  path_initial_model_for_weight_conversion=...)``): a LoRA of twice the rank that applies to the ORIGINAL weights.
* Everything else (Lily's sliced, parallel, per-target or Vim variants, AdaptFormer, full fine-tuning, linear
  probing) exports in lilyexp's format: ``adapter_config.json`` names the method's config node under
  ``lilyexp_method``, and its ``peft_type`` is a sentence upstream peft cannot resolve, so ``PeftModel`` refuses the
  directory (it would otherwise load an untrained adapter and warn) and the error says what to call instead.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from lilyexp.compose import method_node
from lilyexp.errors import ConfigError
from lilyexp.records import RunContext, task_label

if TYPE_CHECKING:
    from lilyexp.contracts import Method

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"


def refusal(method: str) -> str:
    """The ``peft_type`` of a lilyexp-format export: what upstream peft shows when it refuses it."""
    return (f"lilyexp:{method} -- not a peft adapter type: this directory holds a lilyexp export; load it with "
            f"lilyexp.load_adapter(model, directory)")


def write_lilyexp_config(directory: str | Path, method: str, node: dict, **details: Any) -> None:
    """``adapter_config.json`` of a lilyexp-format export: the method's config node (``_target_`` and arguments)
    and whatever the loader needs beside it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": refusal(method), "lilyexp_method": node, **details}
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, default=list) + "\n")


def read_config(directory: str | Path) -> dict:
    path = Path(directory) / CONFIG_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path} is not a readable adapter config ({exc}); is {directory} an exported adapter?"
                          ) from None


MISSING_KEYS_WARNING = "Found missing adapter keys"
CELL_FILE = "lilyexp_cell.json"  # the method settings that made an export (beside peft's files, which ignore it)


def method_settings(identity: dict) -> dict:
    """The part of a cell identity that decides what an adapter is: the method and its settings."""
    return {k: v for k, v in identity.items() if (k == "method" or k.startswith("method.")) and k != "method.load_from"}


def write_export_cell(directory: str | Path, identity: dict, params: dict) -> None:
    """The method settings that made the export and its parameter counts as trained."""
    cell = {"settings": method_settings(identity), "params": params}
    (Path(directory) / CELL_FILE).write_text(json.dumps(cell, indent=2, default=str) + "\n")


def export_cell(directory: str | Path) -> dict | None:
    path = Path(directory) / CELL_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def check_export_matches(directory: str | Path, identity: dict) -> None:
    """An evaluation-only cell must evaluate what its command names: refuse an export made by another method or
    other method settings (its record would file one method's numbers under another's cell). Exports written
    before lilyexp recorded this are accepted."""
    cell = export_cell(directory)
    if cell is None:
        return
    made, asked = cell["settings"], method_settings(identity)
    if made != asked:
        differing = sorted(k for k in set(made) | set(asked) if made.get(k) != asked.get(k))
        raise ConfigError(f"method.load_from={directory} holds an adapter made with {describe(made, differing)}, but "
                          f"this command evaluates {describe(asked, differing)}; give the export's method settings, "
                          f"so the record is filed under the cell that made it.")


def describe(settings: dict, keys: list[str]) -> str:
    return ", ".join(f"{key}={settings.get(key, '(default)')}" for key in keys)


def load_adapter(model: torch.nn.Module, directory: str | Path) -> torch.nn.Module:
    """``model`` adapted with the exported adapter in ``directory``, whichever method made it: a lilyexp-format
    export through its method's own ``load``, a peft-format one through ``peft.PeftModel.from_pretrained``."""
    config = read_config(directory)
    node = config.get("lilyexp_method")
    if node is None:
        return load_peft(model, directory)
    return instantiate(node, _convert_="all").load(model, directory)


def load_for_cell(method: Method, model: torch.nn.Module, directory: str | Path) -> torch.nn.Module:
    """An evaluation-only cell's model. An export whose cell file shows it was made with this cell's method
    settings (:func:`check_export_matches` refused any other) loads through the method's own ``load``, so
    settings that only change evaluation apply as the command gives them (Lily's ``eval_pooling: sample``: a
    peft-format Lily export loaded with peft would pool its router over every batch). An export without a cell
    file (written before lilyexp recorded one) loads with the config it saved (:func:`load_adapter`)."""
    if export_cell(directory) is None:
        return load_adapter(model, directory)
    return method.load(model, directory)


def load_peft(model: torch.nn.Module, directory: str | Path) -> torch.nn.Module:
    from peft import PeftModel

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loaded = PeftModel.from_pretrained(model, str(directory))
    except Exception as exc:  # peft raises OSError, ValueError, RuntimeError or safetensors errors here
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise ConfigError(f"cannot load the adapter in {directory}: {type(exc).__name__}: {first}") from None
    for warning in caught:
        if str(warning.message).startswith(MISSING_KEYS_WARNING):
            # peft only warns and leaves those weights at their initialisation: every output would be silently
            # wrong (e.g. an adapter written by an older lilyexp in peft's layout with lilyexp-only fields).
            raise ConfigError(f"cannot load the adapter in {directory}: its weights do not match the adapter its "
                              f"adapter_config.json builds (peft found missing adapter keys): was it exported from "
                              f"another base model (other layers or module names), or its files changed since?")
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    refuse_unused_tensors(loaded, directory)
    return loaded


def refuse_unused_tensors(loaded: torch.nn.Module, directory: str | Path) -> None:
    """peft drops saved tensors that no module of the base takes (a base with fewer layers): refuse instead."""
    from peft import get_peft_model_state_dict
    from safetensors import safe_open

    path = Path(directory) / WEIGHTS_FILE
    if not path.is_file():
        return
    with safe_open(str(path), framework="pt") as handle:
        saved = set(handle.keys())
    unused = sorted(saved - set(get_peft_model_state_dict(loaded)))
    if unused:
        raise ConfigError(f"cannot load the adapter in {directory}: {len(unused)} of its tensors fit no module of "
                          f"this model (e.g. {unused[0]}); it was probably exported from another base model (more "
                          f"layers or other module names).")


def describe_export(directory: str | Path, *, base: str | None, run_name: str, method: str, settings: dict,
                    task: str, metrics: dict, params: dict, command: str, note: str | None = None) -> None:
    """Make an export useful on the hub: ``base_model_name_or_path`` names the published base model (not the local
    copy a run loaded, nor null), and README.md is a model card with the method and its settings, the task, the
    run's metrics and parameter counts, the command that made it and how to load it (``push_to_hub`` shows it),
    with the backbone's ``card_note`` (what loading it needs beyond peft) when it has one."""
    directory = Path(directory)
    config_path = directory / "adapter_config.json"
    if config_path.exists():
        config = json.loads(config_path.read_text())
        config["base_model_name_or_path"] = base
        config_path.write_text(json.dumps(config, indent=2) + "\n")
    (directory / "README.md").write_text(model_card(base=base, run_name=run_name, method=method, settings=settings,
                                                    task=task, metrics=metrics, params=params, command=command,
                                                    note=note))


def model_card(*, base: str | None, run_name: str, method: str, settings: dict, task: str, metrics: dict,
               params: dict, command: str, note: str | None = None) -> str:
    front = ["---", "library_name: peft", f"tags: [lilyexp, {method}, {task}]"]
    front += [f"base_model: {base}"] if base else []
    lines = [*front, "---", "", f"# {run_name}", "",
             f"A **{method}** adapter trained on **{task}** with "
             f"[lilyexp](https://arxiv.org/abs/2407.09946) (a reproduction suite for Lily, Low-Rank Interconnected "
             f"Adaptation across Layers), on "
             + (f"`{base}`." if base else "a randomly initialised test backbone (no published base model)."), "",
             "## Method settings", "", "| setting | value |", "|---|---|"]
    lines += [f"| {key} | `{value}` |" for key, value in sorted(settings.items())]
    lines += ["", "## Results (the run's record)", "", "| metric | value |", "|---|---|"]
    lines += [f"| {key} | {value:.4g} |" for key, value in metrics.items() if isinstance(value, (int, float))]
    lines += ["", "## Parameters", "", *[f"- {key}: {value:,}" for key, value in params.items()], "",
              "## Reproduce", "", "```bash", command, "```", "", "## Load", "", "```python", "import lilyexp",
              "model = lilyexp.load_adapter(base_model, adapter_folder)  # or peft.PeftModel.from_pretrained",
              "```", ""]
    lines += [note, ""] if note else []
    return "\n".join(lines)


def export_run_adapter(method: Method, model: torch.nn.Module, run: RunContext, cfg: DictConfig, metrics: dict,
                       params: dict) -> dict:
    """A finished run's selected adapter in peft's layout, under the run's checkpoint folder, with the method
    settings that made it (an evaluation-only run is checked against them) and a model card; what the record says
    of it (``adapter``)."""
    directory = (run.work_dir / "adapter").resolve()  # absolute: the record is read from anywhere
    method.export(model, directory, method_node(cfg.method))
    write_export_cell(directory, run.identity, params)
    describe_export(directory, base=cfg.backbone.get("hub_id"), run_name=run.name, method=cfg.method.name,
                    settings=method_settings(run.identity), task=task_label(cfg), metrics=metrics, params=params,
                    command=" ".join(["python -m lilyexp.run", *run.overrides]), note=cfg.backbone.get("card_note"))
    size = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())  # the card included
    return {"path": str(directory), "load": "lilyexp.load_adapter(model, path)", "size_bytes": size}
