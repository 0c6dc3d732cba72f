"""Full and partial fine-tuning of CLIP's towers with a CE, contrastive (FLYP) or soft-target loss.

The contrastive losses pair each image with a caption: its own when the data has one (a manifest's caption
column, an image's `.txt` sidecar; `caption_prob` of the time), else a random class template, as FLYP does.
`caption_prob` is 0.5: evaluation classifies with the class templates, and pairs made only of captions left them
untrained (benchmarks/captions.py: test top-1 84.0 -> 62.8 on the demo, 84.7 -> 82.5 on textures, 26.2 -> 27.5 on
shapes, templates only -> captions only; 78.3, 84.4 and 26.9 at 0.5).

Two heads:
- `zeroshot` (default): the zero-shot head of the current towers (class text features, templates
  averaged, recomputed from the text tower while it trains), so the result stays a plain CLIP model:
  it can be exported, WiSE-FT interpolated with the zero-shot weights, and used on other classes.
- `linear`: WiSE-FT's fine-tuning (mlfoundations/wise-ft `src/models/zeroshot.py::get_zeroshot_classifier`
  and `src/models/modeling.py::ClassificationHead`): a linear head on the normalised image features,
  initialised to the zero-shot weights × the logit scale with zero bias, trained with the image tower.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

from cliptune.core.errors import CliptuneError
from cliptune.methods.losses import (SAME_CLASS, class_similarity, contrastive_loss, gather_with_grad, soft_contrastive_targets,
                             soft_target_loss)
from cliptune.methods.base import Method, MethodConfig, TextFeatureCache, text_chunk_option
from cliptune.core.options import comma_list, option
from cliptune.models.zeroshot import class_embeddings, class_prompts, encode_prompt_grid, prompt_grid_tokens, zeroshot_weights

TOWERS = ("vision", "text")
LOSSES = ("ce", "contrastive", "soft-target", "soft-contrastive")
CAPTION_LOSSES = ("contrastive", "soft-contrastive")  # losses over (image, caption) pairs of the batch
HEADS = ("zeroshot", "linear")
CAPTION_CHUNK = 256  # captions per text-encoder call when a frozen text tower encodes them once

log = logging.getLogger("cliptune")


@dataclass
class FullConfig(MethodConfig):
    train_towers: str = option("vision,text", "towers to fine-tune, comma list of vision,text", comma_choices=TOWERS)
    unlock_last: Optional[int] = option(None, "train only the last N blocks of each tower (+ final norms/projections); unset = all", min=0)
    lock_logit_scale: bool = option(True, "keep the logit scale fixed")
    loss: str = option("ce", "ce | contrastive (FLYP) | soft-target | soft-contrastive (soft targets inside FLYP's loss)",
                       choices=LOSSES)
    soft_epsilon: float = option(0.1, "soft-target share moved to the other classes", min=0.0, max=1.0)
    soft_tau: float = option(0.05, "soft-target class-similarity temperature", above=0.0)
    same_class: str = option("negative", "contrastive: captions of the image's class other than its own are negatives "
                             "(FLYP's arange targets) or positives", choices=SAME_CLASS)
    caption_prob: float = option(0.5, "contrastive losses: chance that an image with a caption of its own is paired with it "
                                 "rather than a class template (0.5: the class prompts evaluation uses keep training)",
                                 min=0.0, max=1.0)
    head: str = option("zeroshot", "zeroshot: the text tower's class features; linear: WiSE-FT's head from zero-shot "
                       "weights x logit scale", choices=HEADS)
    text_chunk: int = text_chunk_option()


class FullFineTune(Method):
    # buffers (registered in __init__/prepare; declared for type checkers)
    prompt_tokens: torch.Tensor
    similarity: torch.Tensor
    class_cosine: torch.Tensor
    prompt_features: torch.Tensor
    name = "full"
    multi_label = True  # with loss ce: cross-entropy on class logits
    config_class = FullConfig
    config: FullConfig
    trains = "whole towers or their last N blocks (CE, FLYP contrastive or soft-target loss)"
    paper = "WiSE-FT (Wortsman et al., CVPR'22) / FLYP (Goyal et al., CVPR'23)"
    differs = ("batch 32, where WiSE-FT and FLYP use 512 (a CPU-sized default; recipes/flyp.yaml and wise-ft.yaml use 512); "
               "the 500 warm-up steps are capped at a fifth of a shorter run")
    uses_image_features = False
    class_specific = False
    export_formats = ("merged",)
    wise_ft = True

    @classmethod
    def training_defaults(cls, shots):
        # FLYP README.md:34 (AdamW lr 1e-5, weight decay 0.1, 10 epochs), wise-ft src/args.py:96 + models/utils.py:15-30
        # (500 warm-up steps, then cosine), wise-ft src/models/finetune.py:89 (gradient norm clipped at 1.0) and
        # finetune.py:119-120 (the last epoch is kept); clip/clip.py:68 RandomResizedCrop(0.9-1), no flip.
        return {"optimizer": "adamw", "lr": 1e-5, "weight_decay": 0.1, "batch_size": 32, "epochs": 10,
                "warmup_epochs": 0, "warmup_steps": 500, "max_grad_norm": 1.0, "aug_crop_scale": [0.9, 1.0],
                "aug_hflip": False, "select": "last"}

    @classmethod
    def search_space(cls, shots):
        return {**super().search_space(shots), "weight_decay": ("log", 0.01, 0.3)}

    def __init__(self, model, classnames, templates, config: FullConfig, descriptions=None):
        super().__init__(model, classnames, templates, config, descriptions)
        self.towers = comma_list(config.train_towers, TOWERS, "full.train_towers")
        self.has_linear_head = config.head == "linear"
        self.has_captions = False  # set by `prepare` when the training images have captions for a contrastive loss
        if self.has_linear_head and (self.text_trains or config.loss in CAPTION_LOSSES):
            raise CliptuneError("full.head=linear trains the image tower and a linear head with a classification loss: "
                                "set full.train_towers=vision and full.loss to ce or soft-target")
        self.class_specific = self.has_linear_head  # a linear head only knows the training classes
        # A frozen image tower is a fixed feature extractor: let the engine cache its features.
        self.uses_image_features = "vision" not in self.towers
        for parameter in self._unlocked_parameters():
            parameter.requires_grad_(True)
        self._text_cache = TextFeatureCache()
        if self.has_linear_head:
            weights = zeroshot_weights(model.text, self.classnames, self.templates)
            self.head = torch.nn.Linear(weights.shape[1], len(self.classnames))
            with torch.no_grad():
                self.head.weight.copy_(weights * self.clip.logit_scale.exp())
                self.head.bias.zero_()
        else:
            self.clip.logit_scale.requires_grad_(not config.lock_logit_scale)
            self._prepare_classes()
        if config.loss in ("soft-target", "soft-contrastive"):
            descriptions = self._description_features()
            self.register_buffer("similarity", class_similarity(descriptions, config.soft_tau), persistent=False)
            self.register_buffer("class_cosine", descriptions @ descriptions.T, persistent=False)

    # ----- what trains -----

    def linear_head(self):
        return self.head if self.has_linear_head else None

    @classmethod
    def multi_label_problem(cls, options):
        loss = cls.config_class.from_options(options).loss
        return None if loss == "ce" else f"full.loss {loss} trains on one label per image: use full.loss=ce"

    @classmethod
    def continual_problem(cls, options):
        if cls.config_class.from_options(options).head != "zeroshot":
            return "continual learning evaluates every task with the zero-shot head: use full.head=zeroshot"
        return None

    @classmethod
    def continual_defaults(cls):
        # ZSCL's MTIL protocol (Thunderbeee/ZSCL): mtil/scripts/ZSCL.sh:9-26 (lr 1e-5, --ls 0.2, --iterations 1000),
        # mtil/src/args.py:11-16 (batch 64, wd 0, 100 warm-up steps); finetune.py:305-307 (no gradient clipping)
        # and :346-349 (the last iterate, or the weight ensemble, carries on to the next task).
        return {"lr": 1e-5, "batch_size": 64, "weight_decay": 0.0, "label_smoothing": 0.2, "warmup_steps": 100,
                "steps": 1000, "max_grad_norm": None, "select": "last"}

    def _unlocked_parameters(self) -> List[torch.nn.Parameter]:
        n = self.config.unlock_last
        towers = {"vision": self.model.image, "text": self.model.text}
        parameters = []
        for name in self.towers:
            tower = towers[name]
            if n is None:
                parameters += tower.parameters()
                continue
            if n > len(tower.blocks):
                raise CliptuneError(f"--unlock-last {n} exceeds the {len(tower.blocks)} blocks of the {name} tower")
            parameters += [p for block in list(tower.blocks)[len(tower.blocks) - n :] for p in block.parameters()]
            parameters += tower.head_parameters()
        return parameters

    @property
    def text_trains(self) -> bool:
        return "text" in self.towers

    # ----- class text features -----
    def _prepare_classes(self) -> None:
        """Tokenise every (class, template) prompt once; encode them once too when the text tower is frozen."""
        text = self.model.text
        self.register_buffer("prompt_tokens", prompt_grid_tokens(text, self.classnames, self.templates), persistent=False)
        if not self.text_trains:
            with torch.no_grad():
                self.register_buffer("prompt_features", self._encode_prompts(), persistent=False)

    def _encode_prompts(self) -> torch.Tensor:
        """(classes, templates, dim) unit-norm features of all prompts, `text_chunk` prompts per text-encoder call."""
        return encode_prompt_grid(self.model.text, self.prompt_tokens, len(self.classnames), self.config.text_chunk)

    def class_features(self) -> torch.Tensor:
        """(classes, dim) zero-shot head: the normalised mean of the normalised template features."""
        if not self.text_trains:
            return class_embeddings(self.prompt_features)
        text_parameters = [p for p in self.model.text.parameters() if p.requires_grad]
        return self._text_cache.get(self.prompt_tokens, text_parameters,
                                    lambda: class_embeddings(self._encode_prompts()), self.training)

    @torch.no_grad()
    def _description_features(self) -> torch.Tensor:
        """(classes, dim) frozen initial text features of each class's descriptions (else its templates)."""
        text = self.model.text
        rows = []
        for name in self.classnames:
            sentences = self.descriptions.get(name) or class_prompts(name, self.templates)
            rows.append(F.normalize(text.encode(text.tokenize(sentences), normalize=True).mean(dim=0), dim=-1))
        return torch.stack(rows)

    def logit_scale(self) -> torch.Tensor:
        # FLYP trains the scale unclamped (clip/model.py:378 returns logit_scale.exp()); a clamp would cut its gradient
        return self.clip.logit_scale.exp()

    # ----- captions -----
    def prepare(self, train, val=None) -> None:
        """Index the training images' own captions (tokenised once; encoded once too when the text tower is frozen)."""
        self.has_captions = bool(self.config.loss in CAPTION_LOSSES and self.config.caption_prob > 0 and train.captions
                                 and any(train.captions))
        if not self.has_captions:
            return
        texts = sorted({caption for caption in train.captions if caption})
        row = {caption: i for i, caption in enumerate(texts)}
        text = self.model.text
        # plain attributes, not buffers: DDP would broadcast buffers at every step
        self.caption_index = torch.tensor([row[caption] if caption else -1 for caption in train.captions], device=text.device)
        self.caption_tokens = text.tokenize(texts)  # (distinct captions, context)
        if not self.text_trains:
            with torch.no_grad():
                chunks = self.caption_tokens.split(CAPTION_CHUNK)
                self.caption_features = torch.cat([text.encode(chunk, normalize=True) for chunk in chunks])
        log.info("%d of %d training images have a caption (%d distinct); each is paired with it with probability %g",
                 int((self.caption_index >= 0).sum()), len(train.captions), len(texts), self.config.caption_prob)

    @property
    def reads_sample_ids(self) -> bool:
        return self.gathers_across_processes and self.has_captions

    # ----- forward and loss -----
    @property
    def gathers_across_processes(self) -> bool:
        """True while the loss all-gathers the batch (the engine then calls it even on an empty slice)."""
        return self.training and self.config.loss in CAPTION_LOSSES

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Class logits; while training with a caption loss, the unit-norm image features instead.

        The contrastive losses need the captions of the batch's labels, which only `loss()` sees;
        evaluation always gets class logits.
        """
        if self.uses_image_features:
            image = F.normalize(inputs, dim=-1)
        else:
            image = self.model.image.encode(inputs, normalize=True)
        if self.gathers_across_processes:
            return image
        if self.has_linear_head:
            return self.head(image)
        return self.logit_scale() * image @ self.class_features().T

    def loss(self, outputs: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0,
             sample_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.gathers_across_processes:
            return self._caption_loss(outputs, labels, label_smoothing, sample_ids)
        if self.config.loss == "soft-target":
            return soft_target_loss(outputs, labels, self.similarity, self.config.soft_epsilon, label_smoothing)
        return F.cross_entropy(outputs, labels, label_smoothing=label_smoothing)

    def _caption_loss(self, images: torch.Tensor, labels: torch.Tensor, label_smoothing: float,
                      sample_ids: Optional[torch.Tensor]) -> torch.Tensor:
        """CLIP's loss over the whole global batch: every process's images and captions, gathered with
        their gradient (open_clip's `ClipLoss(gather_with_grad=True)`), so N processes compute what one
        process computes on the same global batch."""
        all_labels = gather_with_grad(labels)
        images = gather_with_grad(images)
        captions = gather_with_grad(self._caption_features(labels, len(all_labels), sample_ids))
        config = self.config
        targets = None
        if config.loss == "soft-contrastive":
            targets = soft_contrastive_targets(all_labels, self.class_cosine, config.soft_epsilon, config.soft_tau)
        return contrastive_loss(images, captions, self.logit_scale(), all_labels, label_smoothing, config.same_class, targets)

    def _caption_features(self, labels: torch.Tensor, global_size: int, sample_ids: Optional[torch.Tensor]) -> torch.Tensor:
        """One caption per image: its own (`caption_prob` of the time, when it has one), else a random template
        filled with its class name; both draws use the engine-seeded RNG.

        The draws cover the global batch and each process keeps its slice (`rank::world`, as the engine slices
        batches), so the captions do not depend on the number of processes.
        """
        rank, world = _rank_and_world()
        choice = torch.randint(len(self.templates), (global_size,))[rank::world].to(labels.device)
        own = self._own_captions(sample_ids, global_size, rank, world)
        if not self.text_trains:
            features = self.prompt_features[labels, choice]
            if own is None:
                return features
            return torch.where((own >= 0)[:, None], self.caption_features[own.clamp(min=0)], features)
        tokens = self.prompt_tokens[labels * len(self.templates) + choice]
        if own is not None:  # one text pass over the batch's mix of own captions and templates
            tokens = torch.where((own >= 0)[:, None], self.caption_tokens[own.clamp(min=0)], tokens)
        return self.model.text.encode(tokens, normalize=True)

    def _own_captions(self, sample_ids: Optional[torch.Tensor], global_size: int, rank: int, world: int) -> Optional[torch.Tensor]:
        """Row of each image's own caption in `caption_tokens`, -1 where it gets a template (it has no caption, or
        the `caption_prob` draw said so); None when the data has no captions."""
        if sample_ids is None or not self.has_captions:
            return None
        own = self.caption_index[sample_ids]
        if self.config.caption_prob < 1:
            keep = torch.rand(global_size)[rank::world].to(own.device) < self.config.caption_prob
            own = torch.where(keep, own, torch.full_like(own, -1))
        return own

    # ----- state -----
    def merged_state_dict(self):
        """The fine-tuned open_clip state_dict (what `export --format merged` and WiSE-FT use).

        With `head: linear` the head (`self.head`) is not in it: an open_clip checkpoint has no place for one.
        """
        return {key: value.detach().clone().contiguous() for key, value in self.clip.state_dict().items()}

    def set_classes(self, classnames: Sequence[str]) -> None:
        super().set_classes(classnames)
        if not self.has_linear_head:
            self._prepare_classes()



def _rank_and_world() -> tuple:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
