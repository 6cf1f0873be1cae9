"""Moved to :mod:`lilyexp.figures.captures` (0.2); this name still imports, so ``trainer.callbacks`` targets
written for 0.1 (``lilyexp.captures.RouterCapture``) keep working."""

from lilyexp.figures.captures import *  # noqa: F401,F403
