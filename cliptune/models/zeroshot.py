"""Zero-shot classifier weights: per class, the mean of its normalised template embeddings.

The pieces are shared by every method whose classifier is the zero-shot head of a (possibly training)
text tower: tokenise the (class, template) grid once, encode it (with or without gradients), average.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from cliptune.models.towers import TextTower


def class_prompts(classname: str, templates: Sequence[str]) -> list[str]:
    return [template.format(classname) for template in templates]


def prompt_grid_tokens(text: TextTower, classnames: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """Token ids of every (class, template) prompt, class-major."""
    return text.tokenize([p for name in classnames for p in class_prompts(name, templates)])


def encode_prompt_grid(text: TextTower, tokens: torch.Tensor, num_classes: int, chunk: Optional[int] = None) -> torch.Tensor:
    """(classes, templates, dim) unit-norm prompt features; `chunk` bounds memory when no gradient is kept."""
    pieces = tokens.split(chunk or len(tokens))
    features = torch.cat([text.encode(piece, normalize=True) for piece in pieces])
    return features.view(num_classes, len(tokens) // num_classes, -1)


def class_embeddings(prompt_features: torch.Tensor) -> torch.Tensor:
    """(classes, dim): the normalised mean over templates of a prompt grid."""
    return F.normalize(prompt_features.mean(dim=1), dim=-1)


@torch.no_grad()
def zeroshot_weights(text: TextTower, classnames: Sequence[str], templates: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """(classes, dim) unit-norm class embeddings, as in CLIP's prompt ensembling."""
    tokens = prompt_grid_tokens(text, classnames, templates)
    return class_embeddings(encode_prompt_grid(text, tokens, len(classnames), batch_size))
