"""Zero-shot classifier weights: per class, the mean of its normalised template embeddings.

The pieces are shared by every method whose classifier is the zero-shot head of a (possibly training)
text tower: tokenise the (class, template) grid once, encode it (with or without gradients), average.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from cliptune.models.towers import AnyTextTower

# An automatic text chunk keeps one training call's text-tower activations within this many bytes.
TEXT_ACTIVATION_BUDGET = 512 * 2**20
MOST_PROMPTS_PER_CALL = 128  # more prompts per call add memory and hardly any speed (benchmarks/many_classes.py)
# float32 values a transformer block keeps for the backward pass per token, in units of its width (attention inputs,
# q/k/v, output, the two layer norms and the 4x-wide MLP before and after its activation): measured, not derived
ACTIVATIONS_PER_WIDTH = 24


# multi-label zero-shot by prompt pairs: a class's logit is the scaled cosine to its positive prompt minus that to its
# negative one (a linear head, `positive - negative` features), read through a sigmoid
PAIR_TEMPLATES = ("a photo with {}.", "a photo without {}.")


def class_prompts(classname: str, templates: Sequence[str]) -> list[str]:
    return [template.format(classname) for template in templates]


def prompt_grid_tokens(text: AnyTextTower, classnames: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """Token ids of every (class, template) prompt, class-major."""
    return text.tokenize([p for name in classnames for p in class_prompts(name, templates)])


def prompts_per_call(text: AnyTextTower, token_count: int, chunk: int = 0) -> int:
    """Prompts per text-encoder call: `chunk` when set, else as many prompts of `token_count` tokens as keep a
    training call's activations within TEXT_ACTIVATION_BUDGET, at most MOST_PROMPTS_PER_CALL."""
    if chunk > 0:
        return chunk
    per_prompt = len(text.blocks) * token_count * text.width * 4 * ACTIVATIONS_PER_WIDTH
    return int(max(1, min(MOST_PROMPTS_PER_CALL, TEXT_ACTIVATION_BUDGET // per_prompt)))


def encode_prompt_grid(text: AnyTextTower, tokens: torch.Tensor, num_classes: int, chunk: int = 0) -> torch.Tensor:
    """(classes, templates, dim) unit-norm prompt features, `chunk` prompts per text-encoder call (0: from the memory
    budget, `prompts_per_call`). With gradients, each call's activations are recomputed in the backward pass
    (activation checkpointing), so a training text tower's memory follows the chunk, not the class count."""
    pieces = tokens.split(prompts_per_call(text, tokens.shape[1], chunk))
    recompute = torch.is_grad_enabled() and len(pieces) > 1
    features = torch.cat([checkpoint(text.encode, piece, True, use_reentrant=False) if recompute
                          else text.encode(piece, normalize=True) for piece in pieces])
    return features.view(num_classes, len(tokens) // num_classes, -1)


def class_embeddings(prompt_features: torch.Tensor) -> torch.Tensor:
    """(classes, dim): the normalised mean over templates of a prompt grid."""
    return F.normalize(prompt_features.mean(dim=1), dim=-1)


@torch.no_grad()
def zeroshot_weights(text: AnyTextTower, classnames: Sequence[str], templates: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """(classes, dim) unit-norm class embeddings, as in CLIP's prompt ensembling."""
    tokens = prompt_grid_tokens(text, classnames, templates)
    return class_embeddings(encode_prompt_grid(text, tokens, len(classnames), batch_size))
