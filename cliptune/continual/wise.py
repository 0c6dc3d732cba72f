"""WiSE-FT after each task: the task's weights interpolated with the task-start (ZSCL's `--wise_merge` baseline) or
the initial weights, `wise_alpha` of the fine-tuned ones."""

from __future__ import annotations

from cliptune.continual.base import Strategy
from cliptune.models.interpolation import interpolate


class WiSE(Strategy):
    name = "wise"
    summary = "interpolate each task's weights with the task-start (or initial) ones"

    def merge(self, state, task_start, initial):
        anchor = task_start if self.config.wise_anchor == "task-start" else initial
        return interpolate(anchor, state, self.config.wise_alpha)
