"""What every method supplies to the shared training loop, and the hooks the loop calls.

A method is an `nn.Module` holding the (frozen or not) CLIP model plus its own parameters. The
engine never looks inside: it calls `prepare()` once, trains `trainable_parameters()` (possibly none),
feeds `forward()` cached image features (when `uses_image_features`) or image batches, asks `loss()`
for the batch loss, calls `after_epoch()`, and at the end saves `final_state()` or the selected
checkpoint (`learned_state_dict()`: trainable parameters plus the buffers the method fitted).
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar, Dict, List, Optional, Protocol, Sequence, Type, cast

import torch
import torch.nn.functional as F
from torch import nn

from cliptune.core.errors import CliptuneError
from cliptune.models.loading import LoadedModel
from cliptune.core.options import option, validate_fields


@dataclass
class MethodConfig:
    """Base of the per-method option dataclasses (the `<method>:` section of a recipe).

    Fields are declared with `cliptune.core.options.option(...)`; `__post_init__` coerces and checks them
    (subclasses add cross-field checks after calling it), so a bad value fails before any work.
    """

    section: ClassVar[str] = ""  # the method name; set when the method is registered (cliptune/methods/__init__.py)

    def __post_init__(self) -> None:
        validate_fields(self, prefix=f"{self.section}." if self.section else "")

    @classmethod
    def from_options(cls, options: Optional[Dict[str, Any]] = None) -> "MethodConfig":
        """Build from a mapping of option names, refusing unknown names with the list of valid ones."""
        options = dict(options or {})
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise CliptuneError(f"unknown option '{cls.section}.{unknown[0]}' (valid: {', '.join(names) or 'none'})")
        return cls(**options)

    def to_dict(self) -> Dict:
        return asdict(self)


def text_chunk_option():
    """`text_chunk`, the same option for every method that encodes class prompts with gradients."""
    return option(0, "class prompts per text-encoder call, each call recomputed in the backward pass (bounds memory "
                     "with many classes; 0 = as many as fit 512 MB of activations, at most 128)", min=0)


class Mergeable(Protocol):
    """A method whose learned weights fold into CLIP's: `export_formats` holds "merged" (checked at registration)."""

    def merged_state_dict(self) -> Dict[str, torch.Tensor]: ...


class Adaptable(Protocol):
    """A method that exports a peft adapter: `export_formats` holds "adapter" (checked at registration)."""

    def adapter_config(self) -> Any: ...

    def adapter_state_dict(self) -> Dict[str, torch.Tensor]: ...

    def load_adapter_state_dict(self, state: Dict[str, torch.Tensor]) -> None: ...


class Method(nn.Module, metaclass=ABCMeta):
    name: ClassVar[str] = ""
    config_class: ClassVar[Type[MethodConfig]] = MethodConfig
    # One line each for `cliptune methods`: what trains, and the paper the method follows.
    trains: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    # One line, where the defaults deliberately differ from the original code (shown by `cliptune methods show`).
    differs: ClassVar[str] = ""
    # True when the image tower is frozen: the engine then caches image features and feeds those.
    uses_image_features: bool = True
    # True when learned state only makes sense for the training class list (e.g. a linear head).
    class_specific: bool = False  # a class attribute; an instance may set its own (e.g. full with a linear head)
    # Formats `cliptune export` can write for this method ("merged" needs `merged_state_dict()`,
    # "adapter" needs `adapter_config()`, `adapter_state_dict()` and `load_adapter_state_dict()`).
    export_formats: ClassVar[tuple] = ()
    # True when WiSE-FT can mix a run's `wise_parts()` with those of `zeroshot_endpoint(...)`.
    wise_ft: ClassVar[bool] = False
    # True when the method trains on multi-label targets (each image's label set as a distribution, 2-D `labels`):
    # its loss is cross-entropy on its class logits, which such targets turn into the multi-label softmax loss.
    multi_label: ClassVar[bool] = False

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

    # ----- training defaults (issue: a recipe-less `--method X` must adapt) -----
    @classmethod
    def training_defaults(cls, shots: Optional[int]) -> Dict[str, Any]:
        """RunConfig values this method trains best with (between the engine defaults and a recipe)."""
        return {}

    # ----- `cliptune sweep` -----
    @classmethod
    def search_space(cls, shots: Optional[int]) -> Dict[str, tuple]:
        """What `cliptune sweep` searches by default: keys as `--set` names them, each `("log", low, high)`,
        `("float", low, high)`, `("int", low, high)` or `("choice", [values])`. The base: the lr log-uniform within
        10x of the method's default and the training budget between a quarter of its default and the default."""
        defaults = cls.training_defaults(shots)
        space: Dict[str, tuple] = {}
        if "lr" in defaults:
            space["lr"] = ("log", defaults["lr"] / 10, defaults["lr"] * 10)
        for budget in ("steps", "epochs"):
            if budget in defaults and defaults[budget] > 1:
                space[budget] = ("int", max(1, defaults[budget] // 4), defaults[budget])
                break
        return space

    # ----- what the engine calls -----
    @abstractmethod
    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Logits (batch, classes) for image features or images.

        While training, a method may return something else that only its own `loss()` reads (e.g.
        image features for a contrastive loss): that is the feature-level loss path.
        """

    def loss(self, outputs: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
        """Mean loss over the batch."""
        return F.cross_entropy(outputs, labels, label_smoothing=label_smoothing)

    def prepare(self, train, val=None) -> None:
        """Called once before the optimizer is built, with the engine's training (and validation) inputs;
        a method may fit buffers from them (e.g. a cache of training features)."""

    def after_optimizer_step(self) -> None:
        """Called after every optimizer step (e.g. for running weight averages)."""

    def after_epoch(self, epoch: int) -> None:
        """Called after every epoch (1-based), before validation."""

    def final_state(self, val=None) -> Optional[Dict[str, torch.Tensor]]:
        """Called once after training with the selected checkpoint loaded: the learned state to save and
        evaluate instead (e.g. after tuning on validation), or None to keep the selected checkpoint."""
        return None

    def set_classes(self, classnames: Sequence[str]) -> None:
        """Switch to another class list for evaluation (only for methods that are not class-specific)."""
        self.classnames = list(classnames)

    @property
    def reads_sample_ids(self) -> bool:
        """True while `loss` takes `sample_ids`, the batch's rows of the training inputs `prepare` saw (e.g. to pair
        each image with its own caption)."""
        return False

    @property
    def gathers_across_processes(self) -> bool:
        """True while `loss` all-gathers the batch across processes: the engine then calls it on every process, even
        one whose slice of the batch is empty (a process that skipped it would leave the others waiting)."""
        return False

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """(batch, dim) features of the images this method classifies (a method that prompts the image tower returns
        its own); what `cliptune predict` and exports normalise and compare."""
        return self.model.image.encode(images, normalize=False)

    @classmethod
    def multi_label_problem(cls, options: Dict[str, Any]) -> Optional[str]:
        """Why this method, with these options, cannot train on multi-label data (None when it can)."""
        return None if cls.multi_label else f"{cls.name} trains on one label per image"

    # ----- continual learning (cliptune/continual/) -----
    @classmethod
    def continual_problem(cls, options: Dict[str, Any]) -> Optional[str]:
        """Why this method, with these options, cannot learn a sequence of tasks although its weights merge into
        CLIP (None when it can): continual learning evaluates every task with the zero-shot head."""
        return None

    @classmethod
    def continual_defaults(cls) -> Dict[str, Any]:
        """Run settings that replace `training_defaults` when the method learns the tasks of `cliptune continual`
        (a recipe, flag or `--set` still overrides them)."""
        return {}

    # ----- WiSE-FT (cliptune/deploy/wise.py) -----
    def linear_head(self) -> Optional[nn.Linear]:
        """The linear classification head on image features, for methods that have one."""
        return None

    def wise_parts(self) -> Dict[str, Dict[str, torch.Tensor]]:
        """What WiSE-FT mixes: `clip` (the merged open_clip state_dict) and/or a linear `head`."""
        parts = {}
        if "merged" in self.export_formats:
            parts["clip"] = cast(Mergeable, self).merged_state_dict()
        head = self.linear_head()
        if head is not None:
            parts["head"] = {key: value.detach().clone() for key, value in head.state_dict().items()}
        return parts

    def load_wise_parts(self, parts: Dict[str, Dict[str, torch.Tensor]]) -> None:
        if "clip" in parts:
            self.clip.load_state_dict(parts["clip"])
        head = self.linear_head()
        if "head" in parts and head is not None:
            head.load_state_dict(parts["head"])

    @classmethod
    def zeroshot_endpoint(cls, model: LoadedModel, classnames: Sequence[str], templates: Sequence[str],
                          options: Dict[str, Any]) -> "Method":
        """A fresh method holding the zero-shot weights a run of this method started from, classifying as the run
        does (WiSE-FT's alpha = 0)."""
        return cls(model, classnames, templates, cls.config_class.from_options(options))

    # ----- state -----
    def trainable_parameters(self) -> List[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def trainable_state_dict(self) -> Dict[str, torch.Tensor]:
        """The trainable parameters only (what weight averaging averages)."""
        return {name: p.detach().clone() for name, p in self.named_parameters() if p.requires_grad}

    def _learned_names(self) -> List[str]:
        """The method's own state (parameters, trained or fitted, and persistent buffers) and whatever
        trains inside the CLIP model; the rest of CLIP is the base model and never saved."""
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        return [name for name in self.state_dict() if not name.startswith("clip.") or name in trainable]

    def learned_state_dict(self) -> Dict[str, torch.Tensor]:
        """Everything the method learned (see `_learned_names`)."""
        state = self.state_dict()
        return {name: state[name].detach().clone() for name in self._learned_names()}

    def load_learned_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        own = self.state_dict(keep_vars=True)
        expected = set(self._learned_names())
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise CliptuneError(f"method state does not match: missing {missing[:3]}, unexpected {unexpected[:3]}")
        with torch.no_grad():
            for name, tensor in state.items():
                if own[name].shape != tensor.shape:
                    raise CliptuneError(f"method state '{name}' has shape {tuple(tensor.shape)}, expected {tuple(own[name].shape)}")
                own[name].copy_(tensor.to(own[name].dtype))

    def train(self, mode: bool = True):
        """Keep frozen towers in eval mode (dropout off) whatever the engine asks."""
        super().train(mode)
        self.clip.eval()
        return self


class TextFeatureCache:
    """Class text features depend only on the class prompts and the text-side parameters: the one cache
    every method keeps them in (computed once per state of those, e.g. once per evaluation pass).

    While the text side trains (training mode or gradients on, with parameters) they are always computed
    anew; with no text-side parameters (a frozen text tower) they are computed once per class list. The key
    changes when a parameter is updated in place (version counter) or moved, or the prompts are rebuilt.
    """

    def __init__(self):
        self.key: Optional[tuple] = None
        self.value: Optional[torch.Tensor] = None

    def get(self, prompt_tokens: torch.Tensor, parameters: Sequence[torch.Tensor], compute, training: bool) -> torch.Tensor:
        if parameters and (training or torch.is_grad_enabled()):
            return compute()
        key = (prompt_tokens.data_ptr(), tuple(prompt_tokens.shape)) + tuple((p.data_ptr(), p._version) for p in parameters)
        if key != self.key or self.value is None:
            with torch.no_grad():
                self.key, self.value = key, compute()
        return self.value
