"""What the analysis figures (Figs. 3-6, 9, 12-13) share: the finished records of a group, the artifacts runs
saved beside them, display names read from the table specs, the cells an experiment file sweeps (so a figure
names its missing cells from the same files ``make`` runs), and a matplotlib figure that needs no display."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from omegaconf import OmegaConf

from lilyexp.compose import CONF_DIR
from lilyexp.records import beside
from lilyexp.tables.build import load_spec, lookup, newest_per_seed, read_records

METHOD_LABELS = {"lily": "Lily", "lora": "LoRA", "pissa": "PiSSA", "milora": "MiLoRA", "adaptformer": "AdaptFormer",
                 "full": "Full FT", "linear_probe": "Linear probe"}
COLORS = {"Lily": "tab:red", "LoRA": "tab:blue"}


def method_label(record: dict) -> str:
    name = record["config"]["method"]["name"]
    return METHOD_LABELS.get(name, name)


def setting(record: dict, dotted: str) -> Any:
    return lookup(record["config"], dotted)


def finished(results_dir: Path, groups: list[str]) -> list[dict]:
    """The finished records of ``groups``, oldest first."""
    return [r for r in read_records(Path(results_dir), groups) if r.get("status") == "finished"]


def group_of(record: dict) -> str:
    """The record group a record belongs to (its folder)."""
    return Path(record["_path"]).parent.name


def first_seed(records: list[dict]) -> dict:
    """The newest record of the lowest seed: the run a figure shows."""
    return newest_per_seed(records)[0]


def artifact(record: dict, suffix: str) -> Path:
    """A file a run saved beside its record: ``<record stem>.<suffix>``."""
    return beside(Path(record["_path"]), suffix)


def read_artifact(record: dict, suffix: str) -> dict | None:
    try:
        return json.loads(artifact(record, suffix).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def groups_of(group: str | None, default: str | list[str]) -> list[str]:
    """``--group a,b`` reads several groups; without it, the figure's own."""
    if group:
        return group.split(",")
    return [default] if isinstance(default, str) else list(default)


def output_name(figure: str, group: str | None) -> str:
    """``figN`` for the figure's own records, ``figN_<group>`` for another group's (a CPU replication)."""
    return figure if not group else f"{figure}_{group.replace(',', '+')}"


def training_length(record: dict) -> str | None:
    """How long the run trained, as its config says: ``N steps`` when capped, else ``N epochs``."""
    steps, epochs = setting(record, "trainer.max_steps"), setting(record, "trainer.epochs")
    if steps:
        return f"{steps} steps"
    return f"{epochs} epoch{'s' if epochs != 1 else ''}" if epochs else None


def task_of(record: dict) -> str:
    """The subset a record ran (GLUE or VTAB-1K task), else its task's name."""
    subset = setting(record, "task.subset")
    return subset if isinstance(subset, str) else setting(record, "task.name")


def task_labels() -> dict[str, str]:
    """Display names of the GLUE and VTAB-1K subsets, as the paper tables print them."""
    labels = {}
    for table in ("table3", "table4"):
        for column in load_spec(table)["columns"]:
            subset = (column.get("where") or {}).get("task.subset")
            if subset is not None:
                labels.setdefault(subset, column["label"])
    return labels


def task_label(subset: Any) -> str:
    return task_labels().get(subset, str(subset))


# ------------------------------------------------------------------------------------- experiment files

def experiment_node(name: str) -> Any:
    """An experiment file merged over the experiment files it extends (its ``/experiment/...`` defaults);
    group overrides (``override /method: ...``) are left out. None: no such file."""
    path = CONF_DIR / "experiment" / f"{name}.yaml"
    if not path.is_file():
        return None
    node = OmegaConf.load(path)
    merged = OmegaConf.create()
    for parent in node.pop("defaults", []):
        if isinstance(parent, str) and parent.startswith("/experiment/"):
            merged = OmegaConf.merge(merged, experiment_node(parent.removeprefix("/experiment/")) or {})
    return OmegaConf.merge(merged, node)


def swept(name: str, key: str) -> list[str] | None:
    """The values experiment file ``name`` sweeps ``key`` over (None: no file, or not swept)."""
    node = experiment_node(name)
    params = OmegaConf.select(node, "hydra.sweeper.params") if node is not None else None
    if params is None or key not in params:
        return None
    return [value.strip() for value in str(params[key]).split(",")]


def command(experiment: str, **overrides: Any) -> str:
    """The command that runs an experiment file's cells (restricted by ``overrides``)."""
    extra = "".join(f" {key}={value}" for key, value in overrides.items())
    return f"python -m lilyexp.run -m experiment={experiment}{extra}"


def experiment_exists(name: str) -> bool:
    return (CONF_DIR / "experiment" / f"{name}.yaml").is_file()


# ------------------------------------------------------------------------------------------- matplotlib

def new_figure(width: float, height: float) -> Figure:
    """A figure drawn off-screen (no pyplot state, no display)."""
    figure = Figure(figsize=(width, height), layout="constrained")
    return figure


def caption(figure: Figure, text: str) -> None:
    """The figure's caption under the panels: what is shown, in our setting."""
    figure.supxlabel(text, fontsize=8, wrap=True)


def no_data(axes, text: str = "no record yet") -> None:
    axes.text(0.5, 0.5, text, ha="center", va="center", transform=axes.transAxes, color="grey")
    axes.set_xticks([])
    axes.set_yticks([])
