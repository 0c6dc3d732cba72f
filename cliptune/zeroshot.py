"""Zero-shot classifier weights: per class, the mean of its normalised template embeddings."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from cliptune.towers import TextTower


def class_prompts(classname: str, templates: Sequence[str]) -> list[str]:
    return [template.format(classname) for template in templates]


@torch.no_grad()
def zeroshot_weights(text: TextTower, classnames: Sequence[str], templates: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """(classes, dim) unit-norm class embeddings, as in CLIP's prompt ensembling."""
    prompts = [p for name in classnames for p in class_prompts(name, templates)]
    features = []
    for start in range(0, len(prompts), batch_size):
        features.append(text.encode(text.tokenize(prompts[start : start + batch_size]), normalize=True))
    per_class = torch.cat(features).view(len(classnames), len(templates), -1).mean(dim=1)
    return F.normalize(per_class, dim=-1)
