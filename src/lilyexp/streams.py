"""Standard streams that survive their reader: when the terminal or pipe a run writes to goes away (a dropped ssh
session, a killed ``| tee``), writing raises BrokenPipeError, which would fail the run mid-training and lose its
checkpoint; these streams turn into a sink instead and the run goes on to its record."""

from __future__ import annotations

import errno
import os
import sys
from typing import Any, TextIO

GONE = (BrokenPipeError, ConnectionResetError)


class SurvivingStream:
    """Writes to ``stream`` until its reader has gone, then to /dev/null."""

    def __init__(self, stream: TextIO):
        self.stream, self.gone = stream, False

    def _sink(self) -> None:
        self.gone = True
        self.stream = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except GONE:
            self._sink()
        except OSError as exc:
            if exc.errno != errno.EPIPE:
                raise
            self._sink()
        return len(text)

    def flush(self) -> None:
        try:
            self.stream.flush()
        except (*GONE, OSError):
            self._sink()

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding, ...: the stream's own
        return getattr(self.stream, name)


def survive_lost_readers() -> None:
    """Wrap stdout and stderr (before logging and progress bars take hold of them)."""
    sys.stdout, sys.stderr = SurvivingStream(sys.stdout), SurvivingStream(sys.stderr)
