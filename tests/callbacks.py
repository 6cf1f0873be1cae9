"""Training-loop callbacks the tests inject through ``trainer.callbacks`` (the subprocess finds this module
because ``conftest.run_cli`` puts tests/ on PYTHONPATH)."""

from __future__ import annotations

import os
import signal

from lilyexp.recipes.loop import Callback


class KillAfterStep(Callback):
    """SIGKILL the process right after optimizer step ``step``: a crash, with nothing written after it."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, loop, step: int) -> None:
        if step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def kill_after(step: int) -> str:
    """The override that installs the callback."""
    return f"trainer.callbacks=[{{_target_:callbacks.KillAfterStep,step:{step}}}]"


class HoldMemory(Callback):
    """Hold ``megabytes`` of memory from optimizer step ``step`` to the end of training (a run with a large
    footprint, for per-run peak-memory tests)."""

    def __init__(self, megabytes: int, step: int = 1):
        self.megabytes, self.step, self.held = megabytes, step, None

    def on_step_end(self, loop, step: int) -> None:
        if step == self.step:
            self.held = bytearray(self.megabytes * 2**20)
            self.held[::4096] = b"\x01" * len(self.held[::4096])  # touch every page so it is resident

    def on_train_end(self, loop) -> None:
        self.held = None


class SignalAtStep(Callback):
    """Send this process ``signal`` (SIGINT = Ctrl-C, SIGTERM = what SLURM sends before a kill) after ``step``."""

    def __init__(self, step: int, signal: str = "SIGTERM"):
        self.step, self.signal = step, signal

    def on_step_end(self, loop, step: int) -> None:
        if step == self.step:
            os.kill(os.getpid(), getattr(signal, self.signal))


class SleepAtStep(Callback):
    """Sleep ``seconds`` after ``step`` (a long-running cell, for lock tests)."""

    def __init__(self, step: int, seconds: float):
        self.step, self.seconds = step, seconds

    def on_step_end(self, loop, step: int) -> None:
        if step == self.step:
            import time
            time.sleep(self.seconds)


class SignalAtTrainEnd(Callback):
    """Send this process ``signal`` when training has ended, before the selected weights are tested (outside the
    training loop's own handlers)."""

    def __init__(self, signal: str = "SIGTERM"):
        self.signal = signal

    def on_train_end(self, loop) -> None:
        os.kill(os.getpid(), getattr(signal, self.signal))


class SignalTwice(Callback):
    """Send SIGINT after ``step``, and again ``gap`` seconds later from a timer (two Ctrl-C in quick succession)."""

    def __init__(self, step: int, gap: float = 0.05):
        self.step, self.gap = step, gap

    def on_step_end(self, loop, step: int) -> None:
        if step == self.step:
            import threading
            pid = os.getpid()
            threading.Timer(self.gap, lambda: os.kill(pid, signal.SIGINT)).start()
            os.kill(pid, signal.SIGINT)
