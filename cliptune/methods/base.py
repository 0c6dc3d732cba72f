"""What every method supplies to the shared training loop: parameters, a forward, a loss.

A method is an `nn.Module` holding the (frozen or not) CLIP model plus its own parameters. The
engine never looks inside: it trains `trainable_parameters()`, feeds `forward()` either cached
image features (when `uses_image_features`) or image batches, and saves `trainable_state_dict()`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cliptune.models import LoadedModel


@dataclass
class MethodConfig:
    """Base of the per-method option dataclasses (the `<method>:` section of a recipe)."""

    def to_dict(self) -> Dict:
        return asdict(self)


class Method(nn.Module):
    name: str = ""
    config_class = MethodConfig
    # True when the image tower is frozen: the engine then caches image features and feeds those.
    uses_image_features: bool = True
    # True when learned state only makes sense for the training class list (e.g. a linear head).
    class_specific: bool = False
    # Formats `cliptune export` can write for this method.
    export_formats: tuple = ()

    def __init__(
        self,
        model: LoadedModel,
        classnames: Sequence[str],
        templates: Sequence[str],
        config: MethodConfig,
        descriptions: Optional[Dict[str, List[str]]] = None,
    ):
        super().__init__()
        self.model = model
        self.clip = model.clip
        self.classnames = list(classnames)
        self.templates = list(templates)
        self.config = config
        self.descriptions = descriptions or {}
        for parameter in self.clip.parameters():
            parameter.requires_grad_(False)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Logits (batch, classes) for image features or images."""
        raise NotImplementedError

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
        """Mean loss over the batch."""
        return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)

    def set_classes(self, classnames: Sequence[str]) -> None:
        """Switch to another class list for evaluation (only for methods that are not class-specific)."""
        self.classnames = list(classnames)

    def trainable_parameters(self) -> List[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def trainable_state_dict(self) -> Dict[str, torch.Tensor]:
        return {name: p.detach().clone() for name, p in self.named_parameters() if p.requires_grad}

    def load_trainable_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        own = dict(self.named_parameters())
        missing = sorted(set(n for n, p in own.items() if p.requires_grad) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise ValueError(f"method state does not match: missing {missing[:3]}, unexpected {unexpected[:3]}")
        with torch.no_grad():
            for name, tensor in state.items():
                own[name].copy_(tensor.to(own[name].dtype))

    def after_optimizer_step(self) -> None:
        """Called by the engine after every optimizer step (e.g. for running weight averages)."""

    def train(self, mode: bool = True):
        """Keep frozen towers in eval mode (dropout off) whatever the engine asks."""
        super().train(mode)
        self.clip.eval()
        return self
