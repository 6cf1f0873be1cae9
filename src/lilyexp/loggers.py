"""Remote metric loggers (``logger=none|wandb``). The JSON record and per-step JSONL are written either way."""

from __future__ import annotations

import netrc
import os
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
