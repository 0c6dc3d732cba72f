"""LwF (Li & Hoiem) as ZSCL's baseline runs it (Thunderbeee/ZSCL `mtil/scripts/lwf.sh`: the ZSCL code path with
`--ref-dataset` the current task and `--ref-model` the previous one): the previous model's features of the current
task's class prompts, scored on a separate stream of the current task's training images read with the eval
transform (`finetune.py:140-145`, `:172-175`)."""

from __future__ import annotations

from cliptune.continual.base import FeatureDistillation
from cliptune.models.zeroshot import zeroshot_weights


class LwF(FeatureDistillation):
    name = "lwf"
    summary = "distil the previous model's class-prompt distribution on the task's own images"

    def distillation_inputs(self, teacher, data, templates):
        return data.split("train").files, zeroshot_weights(teacher.text, data.classnames, templates)
