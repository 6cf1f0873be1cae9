"""Errors the runner turns into one clear sentence instead of a stack trace."""


class ConfigError(ValueError):
    """Bad input found before any expensive work: unknown values, impossible settings, missing data."""


class BackboneUnavailable(ConfigError):
    """A model could not be fetched (hub unreachable) and no local copy was given."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the step."""
