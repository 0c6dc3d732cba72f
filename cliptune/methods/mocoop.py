"""MoCoOp (Du et al., "Mixture of Prompt Learning for Vision Language Models", 2024): several soft prompts, a router
that mixes the best two for each image, and text-level supervision that keeps each prompt near its hand-written
templates.

The run's templates are split into groups (`groups`: their sizes in order; one template per group by default), one
prompt per group. Each prompt is a CoOp context initialised from the words of its group's first template and placed
around the class name as that template places them ("a photo of a {}." -> 4 tokens before the name, "{} texture."
-> 1 after it), full stop included, so a prompt starts exactly as its template (the original leaves the full stop
out of the learned prompts). A gate (a Linear on the unit-norm image feature) scores the prompts for each image;
the `top_k` best scores, softmaxed, weight those prompts' class text features, and the logits are the model's
scale times the image feature against that mixture. A learned shift shared by all prompts is added to their text features before
normalisation (ENABLE_CORRECTION in every config of the original). Training adds, as dyabel/mocoop computes them:

- the text loss (`text_weight`): each prompt's class text features against its group's hand-written prototypes of
  every class (the group's template features averaged), cross-entropy over unscaled cosines
  (`prompting/losses.py:87-108`);
- the gate loss (`gate_weight`): cross-entropy of the gate's scores against the softmax of the image's cosine to each
  group's prototype of its label class, the two best raised by 10 (`prompting/moe.py:509-523`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from cliptune.core.errors import CliptuneError
from cliptune.core.options import option
from cliptune.methods.base import Method, MethodConfig, TextFeatureCache, text_chunk_option
from cliptune.methods.coop import DASSL_DIFFERENCE, dassl_schedule
from cliptune.methods.prompts import ClassPrompts, initial_context, phrase_length
from cliptune.models.zeroshot import encode_prompt_grid, prompt_grid_tokens

GATE_TARGET_BOOST = 10.0  # prompting/moe.py:511 (`increase_top2_logits(..., increment=10.0)`)


@dataclass
class MoCoOpConfig(MethodConfig):
    groups: str = option("", "template group sizes in the templates' order, e.g. 1,1,1,4,2 (adding up to the number of "
                             "templates); one prompt per group; '' = one group per template", flag="--mocoop-groups")
    top_k: int = option(2, "prompts mixed for each image (the original's top-2)", min=1, flag="--mocoop-top-k")
    text_weight: float = option(5.0, "weight of the text loss between each prompt and its group's hand-written prompts",
                                min=0, flag="--mocoop-text-weight")
    gate_weight: float = option(1.0, "weight of the gate loss towards the groups closest to the image's class", min=0,
                                flag="--mocoop-gate-weight")
    text_chunk: int = text_chunk_option()


def group_sizes(spec: str, templates: int) -> List[int]:
    """The group sizes `spec` names ("1,1,4"), checked against the number of templates; '' = one per template."""
    if not str(spec).strip():
        return [1] * templates
    try:
        sizes = [int(part) for part in str(spec).split(",")]
    except ValueError:
        raise CliptuneError(f"mocoop.groups must be comma-separated group sizes like 1,1,4, got {spec!r}") from None
    if any(size < 1 for size in sizes) or sum(sizes) != templates:
        raise CliptuneError(f"mocoop.groups {spec!r} must be positive sizes adding up to the {templates} templates")
    return sizes


def template_words(template: str) -> Tuple[str, str]:
    """(the template's words without the class name and final full stop, the words before the class name)."""
    body = template.strip()
    body = body[:-1] if body.endswith(".") else body
    before, after = (part.strip() for part in body.split("{}"))
    words = " ".join(part for part in (before, after) if part)
    if not words:
        raise CliptuneError(f"MoCoOp learns the words of each group's first template; {template!r} has none")
    return words, before


TEXT_LOSS_LOGITS = 2**24  # cosines per chunk of the text loss (64 MB of float32): it grows with the classes squared


def text_loss(prompt_features: torch.Tensor, prototypes: torch.Tensor, rows: int = 0) -> torch.Tensor:
    """(prompts, classes, dim) features against (groups = prompts, classes, dim) prototypes: per prompt and class,
    cross-entropy of the cosines to its group's prototypes of every class, the class's own as the target.

    The cosines are (prompts, classes, classes): computed `rows` classes at a time (by default as many as fit
    TEXT_LOSS_LOGITS), each chunk recomputed in the backward pass, so 10000 classes need no 1.2 GB tensor."""
    groups, classes = prompt_features.shape[:2]
    rows = rows or max(1, TEXT_LOSS_LOGITS // (groups * classes))
    prototypes = prototypes.to(prompt_features.dtype)
    if rows >= classes:
        return _text_loss_sum(prompt_features, prototypes, 0) / (groups * classes)
    total = prompt_features.new_zeros(())
    for start in range(0, classes, rows):
        part = prompt_features[:, start : start + rows]
        if torch.is_grad_enabled():
            total = total + checkpoint(_text_loss_sum, part, prototypes, start, use_reentrant=False)
        else:
            total = total + _text_loss_sum(part, prototypes, start)
    return total / (groups * classes)


def _text_loss_sum(part: torch.Tensor, prototypes: torch.Tensor, first: int) -> torch.Tensor:
    """The summed text loss of classes first .. first + len(part) - 1."""
    logits = torch.einsum("gcd,ged->gce", part, prototypes)
    targets = torch.arange(first, first + part.shape[1], device=part.device).repeat(part.shape[0])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets, reduction="sum")


def gate_loss(scores: torch.Tensor, image: torch.Tensor, prototypes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The gate's (batch, groups) scores against soft targets: the softmax of each image's cosine to every group's
    prototype of its class, the two highest raised by GATE_TARGET_BOOST."""
    similarity = torch.einsum("bd,gbd->bg", image, prototypes[:, labels].to(image.dtype))
    best = similarity.topk(min(2, similarity.shape[1]), dim=1).indices
    targets = similarity.scatter_add(1, best, torch.full(best.shape, GATE_TARGET_BOOST, dtype=similarity.dtype,
                                                         device=similarity.device))
    return F.cross_entropy(scores, targets.softmax(dim=1))


class MoCoOp(Method):
    # buffers (registered in __init__/prepare; declared for type checkers)
    scale: torch.Tensor
    prototypes: torch.Tensor
    name = "mocoop"
    config_class = MoCoOpConfig
    config: MoCoOpConfig
    trains = "one prompt context per template group, a router mixing the best two per image, a shared text shift"
    paper = "MoCoOp (Du et al., Mixture of Prompt Learning for Vision Language Models, 2024)"
    differs = ("the image tower's LayerNorms stay frozen (the original trains them at 0.1x lr), so MoCoOp trains on cached "
               "image features; the text loss covers the training classes (the original adds the novel class names in "
               "base-to-novel runs); " + DASSL_DIFFERENCE)
    uses_image_features = True

    @classmethod
    def training_defaults(cls, shots):
        # configs/MoCoOp/vit_b16_c4_ep25_batch32_cls_t2t_5_wcl_25_g1_b_lr32.yaml: batch 32 (:3), SGD lr 0.032 (:17),
        # 25 epochs (:18), 3 constant warm-up epochs at 1e-5 (:20), cosine; PREC amp, so gradients are clipped at
        # norm 1.0 (prompting/moe.py:632)
        return {**dassl_schedule(0.032, 32, 25), "warmup_epochs": 3, "max_grad_norm": 1.0}

    @classmethod
    def search_space(cls, shots):
        return {**super().search_space(shots), "mocoop.text_weight": ("log", 0.5, 50.0), "mocoop.top_k": ("int", 1, 2)}

    def __init__(self, model, classnames, templates, config: MoCoOpConfig, descriptions=None):
        super().__init__(model, classnames, templates, config, descriptions)
        text, device = model.text, model.text.device
        self.sizes = group_sizes(config.groups, len(self.templates))
        if config.top_k > len(self.sizes):
            raise CliptuneError(f"mocoop.top_k={config.top_k} is more than the {len(self.sizes)} prompts (template groups)")
        firsts = [sum(self.sizes[:group]) for group in range(len(self.sizes))]
        self.prompts = nn.ModuleList()
        contexts = []
        for words, before in (template_words(self.templates[first]) for first in firsts):
            n_ctx, n_before = phrase_length(text, words), phrase_length(text, before) if before else 0
            self.prompts.append(ClassPrompts(text, self.classnames, n_ctx, words, before=n_before))
            contexts.append(nn.Parameter(initial_context(text, n_ctx, words).to(device)))
        self.ctx = nn.ParameterList(contexts)
        self.gate = nn.Linear(text.output_dim, len(self.sizes)).to(device)
        self.shift = nn.Parameter(torch.zeros(1, text.output_dim, device=device))
        self.register_buffer("scale", model.logit_scale.detach().clone(), persistent=False)
        self.register_buffer("prototypes", self._prototypes(), persistent=False)
        self._cache = TextFeatureCache()
        self._for_loss: Optional[tuple] = None

    @torch.no_grad()
    def _prototypes(self) -> torch.Tensor:
        """(groups, classes, dim): per group, the normalised mean of its templates' unit-norm class text features."""
        text = self.model.text
        grid = encode_prompt_grid(text, prompt_grid_tokens(text, self.classnames, self.templates), len(self.classnames))
        return torch.stack([F.normalize(group.mean(dim=1), dim=-1) for group in grid.split(self.sizes, dim=1)])

    @property
    def prompt_sets(self) -> List[ClassPrompts]:
        """The soft prompts, one `ClassPrompts` per expert (held in an `nn.ModuleList` so they train and save)."""
        return cast(List[ClassPrompts], list(self.prompts))

    def set_classes(self, classnames) -> None:
        super().set_classes(classnames)
        for prompts in self.prompt_sets:
            prompts.set_classes(self.classnames)
        self.prototypes = self._prototypes().to(self.prototypes.device)

    def prompt_features(self) -> torch.Tensor:
        """(prompts, classes, dim) unit-norm class text features of every prompt, shifted."""
        def compute() -> torch.Tensor:
            features = [prompts.encode_in_chunks(ctx, prompts.chunk(self.config.text_chunk))
                        for prompts, ctx in zip(self.prompt_sets, self.ctx)]
            return F.normalize(torch.stack(features) + self.shift.to(features[0].dtype), dim=-1)

        return self._cache.get(self.prompt_sets[0].token_ids, [*self.ctx, self.shift], compute, self.training)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        image = F.normalize(image_features, dim=-1)
        features = self.prompt_features()
        scores = self.gate(image.to(self.gate.weight.dtype))
        best, chosen = scores.topk(self.config.top_k, dim=1)
        # the mixture's logits are the mixture of each chosen prompt's logits (the original mixes the features first)
        per_prompt = torch.einsum("bd,pcd->bpc", image.to(features.dtype), features)
        chosen_logits = per_prompt.gather(1, chosen.unsqueeze(-1).expand(-1, -1, per_prompt.shape[-1]))
        self._for_loss = (image, scores, features) if self.training else None
        return self.scale * (best.softmax(dim=1).unsqueeze(-1).to(chosen_logits.dtype) * chosen_logits).sum(dim=1)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
        loss = super().loss(logits, labels, label_smoothing)
        if self._for_loss is None:
            return loss
        image, scores, features = self._for_loss
        self._for_loss = None
        c = self.config
        return (loss + c.text_weight * text_loss(features, self.prototypes)
                + c.gate_weight * gate_loss(scores, image, self.prototypes, labels))
