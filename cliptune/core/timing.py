"""Where a run's wall time goes, from the run's own timestamps (metrics.json `time`, and the log's last lines).

Start-up counts from the process's start as the operating system recorded it, so it includes Python's
imports; a second command in the same process (a notebook, the tests) counts from its own call.
"""

from __future__ import annotations

import resource
import sys
import time
from contextlib import contextmanager
from typing import Dict

import torch

_commands_started = 0


def command_started() -> float:
    """time.time() at which this command began: the process start for the first command of a process."""
    global _commands_started
    _commands_started += 1
    if _commands_started == 1:
        import psutil

        return psutil.Process().create_time()
    return time.time()


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: allocated on a CUDA device, else the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


class PhaseClock:
    """Wall seconds per named phase; decoding into the image cache is counted apart, wherever it happens.

    `decoded` is the session's running total of decoding seconds (a dict shared with the session).
    """

    def __init__(self, started: float, decoded: Dict[str, float]):
        self.started = started
        self.decoded = decoded
        self.seconds: Dict[str, float] = {}

    @contextmanager
    def phase(self, name: str):
        began, decoding = time.time(), self.decoded["decode"]
        try:
            yield
        finally:
            spent = time.time() - began - (self.decoded["decode"] - decoding)
            self.seconds[name] = self.seconds.get(name, 0.0) + spent

    def mark_startup(self) -> None:
        """Everything until now (imports, data scan, model load, method set-up) is start-up."""
        self.seconds["startup"] = time.time() - self.started - self.decoded["decode"]

    def report(self, device: torch.device, **measured: float) -> Dict:
        """The phases, `measured` ones (training and validation, timed by the trainer), `other` (the rest:
        checkpoints, logging), the total, the share of training and the peak memory."""
        seconds = {**self.seconds, "decode": self.decoded["decode"], **measured}
        total = time.time() - self.started
        seconds["other"] = total - sum(seconds.values())
        report = {name: round(value, 3) for name, value in seconds.items()}
        report["total"] = round(total, 3)
        report["train_share"] = round(seconds.get("train", 0.0) / total, 4) if total > 0 else 0.0
        report["peak_memory_mb"] = round(peak_memory_mb(device), 1)
        return report


def describe(report: Dict) -> str:
    names = {"startup": "start-up", "decode": "decoding", "zeroshot": "zero-shot", "inputs": "features", "train": "training",
             "eval": "validation", "final_eval": "final evaluation", "other": "checkpoints/other"}
    parts = [f"{label} {report[key]:.1f}" for key, label in names.items() if key in report]
    return (f"time: {report['total']:.1f} s = " + ", ".join(parts)
            + f"; training {report['train_share']:.0%} of wall; peak memory {report['peak_memory_mb']:.0f} MB")
