"""Errors the runner turns into one clear sentence instead of a stack trace."""


class ConfigError(ValueError):
    """Bad input found before any expensive work: unknown values, impossible settings, missing data."""


class BackboneUnavailable(ConfigError):
    """A model could not be fetched (hub unreachable) and no local copy was given."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the step."""


class CellBusy(ConfigError):
    """Another process is running the same cell (it holds the cell's lock)."""


class RunInterrupted(BaseException):
    """SIGINT or SIGTERM stopped the run; ``step`` is the last checkpointed optimizer step (None: not known where
    the signal arrived, outside the training loop; the runner reads it from the checkpoint)."""

    def __init__(self, signal_name: str, step: int | None, record: object = None):
        super().__init__(f"{signal_name} after step {step}")
        self.signal_name, self.step, self.record = signal_name, step, record


class DiskFull(RuntimeError):
    """A write of the run's files (checkpoint, record, export) found no space left; the last complete checkpoint is
    kept, so the same command with trainer.resume=true continues once there is room."""


NO_SPACE = (28, 122)  # ENOSPC, EDQUOT


def is_disk_full(exc: BaseException) -> bool:
    """An OSError for a full disk or quota, or safetensors' wrapping of one (its message carries the OS code)."""
    if isinstance(exc, OSError) and exc.errno in NO_SPACE:
        return True
    text = str(exc)
    return type(exc).__name__ == "SafetensorError" and any(f"code: {code}," in text for code in NO_SPACE)


def one_line(exc: BaseException) -> str:
    """An error as one line: its type and the first line of its message."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"
