"""Ctrl-C and SIGTERM (a scheduler's preemption) during training: finish the step, checkpoint, stop.

A KeyboardInterrupt raised in the middle of a step would leave half-accumulated gradients and a
half-stepped optimizer, so the first signal only asks the loop to stop at the next step boundary, where
it writes a checkpoint that resumes exactly. A second Ctrl-C stops at once (the newest complete
checkpoint is still there). Once the artifact is saved (`artifact_saved`), the only work left is the
final evaluation, which has nothing to save: then the first signal stops it at once.
"""

from __future__ import annotations

import signal
import threading

import torch


class StopRequest:
    def __init__(self, console):
        self.console, self.flag, self.previous, self.at_once = console, False, {}, False

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signal handlers can only live there
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def artifact_saved(self) -> None:
        """From now on a signal stops what runs at once (the final evaluation): the artifact is on disk."""
        self.at_once = True

    def _handle(self, signum, frame):
        if self.at_once:
            self.console.print("[yellow]stopping the final evaluation[/] (the artifact is saved)")
            raise KeyboardInterrupt
        if self.flag and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.flag = True
        self.console.print("[yellow]stopping after this step[/] to write a checkpoint (Ctrl-C again to stop at once)")

    def requested(self, accelerator, collective_ok: bool) -> bool:
        """True when this step is where to stop. Several processes must stop at the same step: they agree
        with one all-reduce, done only where the loop syncs anyway (`collective_ok`: log steps)."""
        if accelerator.num_processes == 1:
            return self.flag
        if not collective_ok:
            return False
        flag = torch.tensor([int(self.flag)], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item())
