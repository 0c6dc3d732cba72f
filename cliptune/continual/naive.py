"""Sequential fine-tuning: each task's method trains from the previous task's weights, nothing added (the baseline
every continual paper reports; ZSCL's `mtil/scripts/finetune.sh`)."""

from __future__ import annotations

from cliptune.continual.base import Strategy


class Naive(Strategy):
    name = "naive"
    summary = "sequential fine-tuning, nothing added"
