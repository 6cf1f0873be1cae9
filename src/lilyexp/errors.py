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
    """SIGINT or SIGTERM stopped training; ``step`` is the last completed optimizer step, checkpointed."""

    def __init__(self, signal_name: str, step: int, record: object = None):
        super().__init__(f"{signal_name} after step {step}")
        self.signal_name, self.step, self.record = signal_name, step, record
