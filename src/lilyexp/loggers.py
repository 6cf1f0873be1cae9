"""Metric loggers (``logger=none|wandb|tensorboard|mlflow``). The JSON record and per-step JSONL are written either
way."""

from __future__ import annotations

import importlib.util
import netrc
import os
from pathlib import Path
from typing import Any


class NullLogger:
    """Logs nothing remotely."""

    def start(self, run_name: str, config: dict, run_id: str | None = None) -> None:
        pass

    def log_metrics(self, metrics: dict, step: int) -> None:
        pass

    def finish(self, summary: dict, failed: bool = False) -> None:
        pass


def wandb_key_configured() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


class WandbLogger:
    """wandb run per lilyexp run; ``mode: auto`` is online with an API key configured, else offline."""

    def __init__(self, project: str = "lilyexp", entity: str | None = None, group: str | None = None,
                 tags: list[str] | None = None, mode: str = "auto", dir: str | None = None):
        self.settings = {"project": project, "entity": entity, "group": group, "tags": list(tags or []), "dir": dir,
                         "mode": ("online" if wandb_key_configured() else "offline") if mode == "auto" else mode}
        self.run: Any = None

    def start(self, run_name: str, config: dict, run_id: str | None = None) -> None:
        """One wandb run per cell; ``run_id`` (stable per cell) makes a resumed or requeued cell continue it."""
        import wandb

        if self.settings["dir"]:
            os.makedirs(self.settings["dir"], exist_ok=True)
        self.run = wandb.init(name=run_name, config=config, reinit="finish_previous", id=run_id,
                              resume="allow" if run_id else None, **self.settings)

    def log_metrics(self, metrics: dict, step: int) -> None:
        self.run.log(metrics, step=step)

    def finish(self, summary: dict, failed: bool = False) -> None:
        """Final numbers into the run's summary; a failed cell is marked failed (exit code 1)."""
        self.run.summary.update(summary)
        self.run.finish(exit_code=1 if failed else 0)


def flat_config(config: dict, prefix: str = "") -> dict:
    """A nested config as ``a.b.c: value`` with scalars only (lists and others as text): what TensorBoard's hparams
    and MLflow's params take."""
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_config(value, f"{name}."))
        else:
            out[name] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out


# accelerate's trackers by name: (the class, the module it needs, the pip package that brings it)
TRACKERS = {"tensorboard": ("accelerate.tracking.TensorBoardTracker", "tensorboard", "tensorboard"),
            "mlflow": ("accelerate.tracking.MLflowTracker", "mlflow", "mlflow-skinny")}


class TrackerLogger:
    """One of accelerate's trackers (``logger=tensorboard`` or ``logger=mlflow``) with the calls the wandb logger
    answers: one run per cell named as the record, the resolved config (flattened) at the start, the same metric
    names per step, the final numbers and parameter counts at the end. Both write to ``dir`` on this machine: no
    server or account (MLflow's tracking URI is that folder unless MLFLOW_TRACKING_URI says otherwise)."""

    def __init__(self, kind: str, project: str = "lilyexp", dir: str = "logs"):
        from lilyexp.errors import ConfigError

        if kind not in TRACKERS:
            raise ConfigError(f"logger kind '{kind}' is none of {', '.join(TRACKERS)}.")
        _, module, package = TRACKERS[kind]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"logger={kind} needs {package}: pip install {package} (or \"lilyexp[{kind}]\").")
        self.kind, self.project, self.dir, self.tracker = kind, project, dir, None

    def start(self, run_name: str, config: dict, run_id: str | None = None) -> None:
        from hydra.utils import get_class

        folder = Path(self.dir).expanduser().resolve()
        folder.mkdir(parents=True, exist_ok=True)
        cls = get_class(TRACKERS[self.kind][0])
        if self.kind == "mlflow":
            if "MLFLOW_TRACKING_URI" not in os.environ:  # a folder on this machine (MLflow's file store)
                os.environ["MLFLOW_TRACKING_URI"] = folder.as_uri()
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            self.tracker = cls(experiment_name=self.project, logging_dir=str(folder), run_name=run_name,
                               tags={"lilyexp_run_id": run_id or run_name})
        else:
            self.tracker = cls(run_name, logging_dir=str(folder / self.project))
        self.tracker.start()
        self.tracker.store_init_configuration(flat_config({**config, "lilyexp_run_id": run_id or run_name}))

    def log_metrics(self, metrics: dict, step: int) -> None:
        self.tracker.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)

    def finish(self, summary: dict, failed: bool = False) -> None:
        final = {f"final/{k}": v for k, v in summary.items() if isinstance(v, (int, float))}
        self.tracker.log({**final, "final/failed": int(failed)})
        self.tracker.finish()
