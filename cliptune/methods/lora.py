"""LoRA on CLIP's attention (CLIP-LoRA, Zanella & Ben Ayed, CVPRW'24), injected with peft.

Design choice (why not peft's own nn.MultiheadAttention LoRA): open_clip's blocks use
`nn.MultiheadAttention`, whose q/k/v share one packed `in_proj_weight`. peft's MHA LoRA cannot adapt
q without k and v, and it merges the full weight delta into that packed matrix on every forward,
which costs a (3d x d) weight rebuild per layer per step. Instead each adapted block's attention is
swapped for `SplitAttention`: the same computation with q/k/v/out as separate `nn.Linear` layers
(weights copied exactly), which peft's plain Linear LoRA wraps. LoRA then only adds a rank-r side
path x·Aᵀ·Bᵀ, so a step costs about as much as the frozen forward + backward. Merging folds
B·A·scale into each Linear (peft's `merge`) and packs q/k/v back into an `nn.MultiheadAttention`,
so the merged model has open_clip's own state_dict keys and loads with plain open_clip.

Other towers (e.g. BiomedCLIP): a timm ViT block's fused `attn.qkv` Linear is swapped for `SplitQKV`
(three Linears whose concatenated outputs are the fused output; packed back on merge) and "out" is
`attn.proj`; a Hugging Face BERT layer already has separate Linears: q/k/v = `attention.self.query/
key/value`, out = `attention.output.dense`. `_attention_linears` holds this mapping.

Classification: image features against class text features from the (adapted) text tower, averaged
over the run's templates exactly like the zero-shot classifier; the text side is encoded once per
step (and once per evaluation when it is frozen or not training).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from cliptune.core.errors import CliptuneError
from cliptune.methods.full import FullConfig, FullFineTune
from cliptune.methods.base import Method, MethodConfig, TextFeatureCache, text_chunk_option
from cliptune.core.options import comma_list, option
from cliptune.models.zeroshot import class_embeddings, encode_prompt_grid, prompt_grid_tokens

TOWERS = ("vision", "text")
TARGETS = ("q", "k", "v", "out")
ADAPTER_NAME = "default"


@dataclass
class LoRAConfig(MethodConfig):
    lora_r: int = option(2, "rank of each update B·A", min=1)
    lora_alpha: float = option(1.0, "scaling numerator: the update is scaled by alpha/sqrt(r) (rslora) or alpha/r", above=0.0)
    lora_scaling: str = option("rslora", "rslora: alpha/sqrt(r) as CLIP-LoRA's code; standard: alpha/r as the LoRA paper",
                               choices=("rslora", "standard"))
    lora_dropout: float = option(0.25, "dropout on the LoRA branch's input (training only)", min=0.0, max=0.99)
    lora_towers: str = option("vision,text", "towers to adapt, comma list of vision,text", comma_choices=TOWERS)
    lora_targets: str = option("q,k,v", "attention projections, comma list of q,k,v,out", comma_choices=TARGETS)
    lora_layers: Union[str, int] = option("all", "blocks to adapt: all, or indices/ranges like 6-11 or 0,2,4-5")
    text_chunk: int = text_chunk_option()


def parse_layers(spec: str | int, depth: int, tower: str) -> List[int]:
    """Block indices from "all", "6-11", "0,3" or "0-2,5" (inclusive ranges), checked against `depth`."""
    if str(spec).strip().lower() == "all":
        return list(range(depth))
    indices: List[int] = []
    try:
        for part in str(spec).split(","):
            first, _, last = part.strip().partition("-")
            indices += range(int(first), int(last or first) + 1)
    except ValueError:
        raise CliptuneError(f"lora.lora_layers must be 'all' or indices/ranges like '6-11' or '0,2', got {spec!r}") from None
    if not indices or min(indices) < 0 or max(indices) >= depth:
        raise CliptuneError(f"lora.lora_layers {spec!r} is out of range for the {tower} tower ({depth} blocks: 0-{depth - 1})")
    return sorted(set(indices))


def _float_mask(attn_mask: Optional[torch.Tensor], batch: int, heads: int, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """nn.MultiheadAttention's mask conventions (bool True = blocked; 3-D = per batch·head) for SDPA."""
    if attn_mask is None:
        return None
    if attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros(attn_mask.shape, dtype=dtype, device=attn_mask.device).masked_fill(attn_mask, float("-inf"))
    if attn_mask.dim() == 3:
        attn_mask = attn_mask.view(batch, heads, *attn_mask.shape[-2:])
    return attn_mask.to(dtype)


class SplitAttention(nn.Module):
    """`nn.MultiheadAttention` with separate q/k/v/out Linear layers, so peft can adapt each one."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        # one packed q/k/v projection (in_proj_weight is None when k/v have their own sizes)
        if not isinstance(mha, nn.MultiheadAttention) or mha.in_proj_weight is None or mha.bias_k is not None:
            raise CliptuneError(f"LoRA needs open_clip's standard attention blocks, found {type(mha).__name__}")
        dim, bias = mha.embed_dim, mha.in_proj_bias is not None
        self.num_heads, self.dropout, self.batch_first = mha.num_heads, mha.dropout, mha.batch_first
        weight = mha.in_proj_weight.detach()
        factory = {"device": weight.device, "dtype": weight.dtype}
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(dim, dim, bias=bias, **factory) for _ in range(3))
        self.out_proj = nn.Linear(dim, dim, bias=mha.out_proj.bias is not None, **factory)
        with torch.no_grad():
            for index, linear in enumerate((self.q_proj, self.k_proj, self.v_proj)):
                linear.weight.copy_(weight[index * dim : (index + 1) * dim])
                if bias:
                    linear.bias.copy_(mha.in_proj_bias[index * dim : (index + 1) * dim])
            self.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.out_proj.bias is not None:
                self.out_proj.bias.copy_(mha.out_proj.bias)
        self.requires_grad_(False)

    def forward(self, query, key, value, need_weights: bool = False, attn_mask: Optional[torch.Tensor] = None):
        """Same call and result as open_clip's `self.attn(q, k, v, need_weights=False, attn_mask=...)`."""
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        batch, length, dim = query.shape
        heads = self.num_heads

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, -1, heads, dim // heads).transpose(1, 2)

        q, k, v = split(self.q_proj(query)), split(self.k_proj(key)), split(self.v_proj(value))
        mask = _float_mask(attn_mask, batch, heads, q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        out = self.out_proj(out.transpose(1, 2).reshape(batch, length, dim))
        return (out if self.batch_first else out.transpose(0, 1)), None

    def to_multihead(self) -> nn.MultiheadAttention:
        """Pack the (merged) plain Linear layers back into open_clip's `nn.MultiheadAttention` layout."""
        weight = self.q_proj.weight
        dim = weight.shape[1]
        mha = nn.MultiheadAttention(dim, self.num_heads, dropout=self.dropout, bias=self.q_proj.bias is not None,
                                    batch_first=self.batch_first, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            mha.in_proj_weight.copy_(torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight]))
            if mha.in_proj_bias is not None:
                mha.in_proj_bias.copy_(torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias]))
            mha.out_proj.weight.copy_(self.out_proj.weight)
            if mha.out_proj.bias is not None:
                mha.out_proj.bias.copy_(self.out_proj.bias)
        return mha.requires_grad_(False)


class SplitQKV(nn.Module):
    """A timm ViT's fused qkv `nn.Linear` as three Linears (q, k, v), so peft can adapt each one."""

    def __init__(self, qkv: nn.Linear):
        super().__init__()
        dim = qkv.out_features // 3
        bias = qkv.bias is not None
        factory = {"device": qkv.weight.device, "dtype": qkv.weight.dtype}
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(qkv.in_features, dim, bias=bias, **factory) for _ in range(3))
        with torch.no_grad():
            for index, linear in enumerate((self.q_proj, self.k_proj, self.v_proj)):
                linear.weight.copy_(qkv.weight[index * dim : (index + 1) * dim])
                if bias:
                    linear.bias.copy_(qkv.bias[index * dim : (index + 1) * dim])
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)

    def to_linear(self) -> nn.Linear:
        """Pack the (merged) q/k/v Linears back into timm's fused layout."""
        weight = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])
        qkv = nn.Linear(weight.shape[1], weight.shape[0], bias=self.q_proj.bias is not None,
                        device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            qkv.weight.copy_(weight)
            if qkv.bias is not None:
                qkv.bias.copy_(torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias]))
        return qkv.requires_grad_(False)


def _attention_linears(block: nn.Module) -> Dict[str, str]:
    """Prepare one transformer block for LoRA: its q/k/v/out `nn.Linear` names (relative to the block) by target."""
    attn: Any = getattr(block, "attn", None)
    if isinstance(getattr(attn, "qkv", None), nn.Linear):  # timm ViT
        attn.qkv = SplitQKV(attn.qkv)
        return {"q": "attn.qkv.q_proj", "k": "attn.qkv.k_proj", "v": "attn.qkv.v_proj", "out": "attn.proj"}
    self_attention = getattr(getattr(block, "attention", None), "self", None)
    if isinstance(getattr(self_attention, "query", None), nn.Linear):  # Hugging Face BERT-style layer
        return {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
                "out": "attention.output.dense"}
    block.attn = SplitAttention(attn)  # open_clip (raises a clear error for anything else)
    return {target: f"attn.{target}_proj" for target in TARGETS}


class LoRA(Method):
    # buffers (registered in __init__/prepare; declared for type checkers)
    prompt_tokens: torch.Tensor
    name = "lora"
    multi_label = True  # its loss is cross-entropy on class logits
    config_class = LoRAConfig
    config: LoRAConfig
    trains = "low-rank updates of the attention projections (peft)"
    paper = "CLIP-LoRA (Zanella & Ben Ayed, CVPRW'24)"
    uses_image_features = False  # per instance: True when only the text tower is adapted
    class_specific = False
    export_formats = ("merged", "adapter")
    wise_ft = True

    @classmethod
    def training_defaults(cls, shots):
        # CLIP-LoRA run_utils.py:28-30 (lr 2e-4, 500 iterations per shot, batch 32), lora.py:73-76 (AdamW, weight decay
        # 0.01, CosineAnnealingLR(total_iters, eta_min=1e-6) stepped every iteration), main.py:38-43
        # (RandomResizedCrop(0.08-1) + flip); lora.py:143 evaluates the last iteration.
        return {"optimizer": "adamw", "lr": 2e-4, "weight_decay": 0.01, "batch_size": 32, "steps": 500 * (shots or 16),
                "min_lr": 1e-6, "warmup_epochs": 0, "aug_crop_scale": [0.08, 1.0], "aug_hflip": True, "select": "last"}

    @classmethod
    def search_space(cls, shots):
        return {**super().search_space(shots), "lora.lora_r": ("choice", [1, 2, 4, 8, 16]), "lora.lora_alpha": ("log", 0.5, 16.0),
                "lora.lora_towers": ("choice", ["vision,text", "vision", "text"])}

    @classmethod
    def zeroshot_endpoint(cls, model, classnames, templates, options):
        """The base CLIP as a zero-shot classifier: WiSE-FT mixes the merged weights with it."""
        return FullFineTune(model, classnames, templates, FullConfig())

    def __init__(self, model, classnames, templates, config: LoRAConfig, descriptions=None):
        super().__init__(model, classnames, templates, config, descriptions)
        from peft import LoraConfig, inject_adapter_in_model

        towers = comma_list(config.lora_towers, TOWERS, "lora.lora_towers")
        targets = comma_list(config.lora_targets, TARGETS, "lora.lora_targets")
        self.uses_image_features = "vision" not in towers
        self.text_adapted = "text" in towers
        paths = {id(module): name for name, module in self.clip.named_modules()}
        target_modules = []
        for tower in towers:
            blocks = model.image.blocks if tower == "vision" else model.text.blocks
            for index in parse_layers(config.lora_layers, len(blocks), tower):
                block = blocks[index]
                linears = _attention_linears(block)
                target_modules += [f"{paths[id(block)]}.{linears[target]}" for target in targets]
        # a regex string is matched against whole module names; a list would also match name suffixes, so the text
        # tower's "transformer.resblocks.0.attn.out_proj" would catch the image tower's "visual.transformer..." too
        pattern = "|".join(re.escape(name) for name in target_modules)
        alpha: Any = config.lora_alpha  # peft annotates an int; its scaling alpha / r takes a float as well
        self._adapter_config = LoraConfig(r=config.lora_r, lora_alpha=alpha, lora_dropout=config.lora_dropout,
                                          target_modules=pattern, bias="none", use_rslora=config.lora_scaling == "rslora")
        inject_adapter_in_model(self._adapter_config, self.clip, adapter_name=ADAPTER_NAME)
        for name, parameter in self.clip.named_parameters():
            parameter.requires_grad_(".lora_" in name)
        self._text_cache = TextFeatureCache()
        self.set_classes(classnames)

    # ----- classification -----
    def set_classes(self, classnames) -> None:
        super().set_classes(classnames)
        self.register_buffer("prompt_tokens", prompt_grid_tokens(self.model.text, self.classnames, self.templates),
                             persistent=False)

    def class_features(self) -> torch.Tensor:
        """(classes, dim) unit-norm class embeddings, computed like `zeroshot_weights` (but differentiable)."""
        text_parameters = [p for p in self.model.text.parameters() if p.requires_grad]  # the text LoRA factors, if any

        def compute() -> torch.Tensor:
            tokens = self.prompt_tokens
            return class_embeddings(encode_prompt_grid(self.model.text, tokens, len(self.classnames), self.config.text_chunk))

        return self._text_cache.get(self.prompt_tokens, text_parameters, compute, self.training)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        image = inputs if self.uses_image_features else self.model.image.encode(inputs, normalize=False)
        text = self.class_features()
        return self.model.logit_scale * F.normalize(image, dim=-1) @ text.to(image.dtype).T

    def train(self, mode: bool = True):
        """Frozen towers stay in eval mode, but the LoRA dropout follows `mode`."""
        super().train(mode)
        for module in self._lora_layers(self.clip):
            module.lora_dropout.train(mode)
        return self

    # ----- merge and adapter export -----
    def adapter_config(self):
        """The peft `LoraConfig` the adapter was injected with (written beside an adapter export)."""
        return self._adapter_config

    @staticmethod
    def _lora_layers(module: nn.Module):
        from peft.tuners.lora import LoraLayer

        return [m for m in module.modules() if isinstance(m, LoraLayer)]

    def merged_clip(self) -> nn.Module:
        """A copy of the CLIP model with every LoRA update merged in, in open_clip's own module layout."""
        from peft.tuners.lora import LoraLayer

        clip = copy.deepcopy(self.clip)
        for name, module in list(clip.named_modules()):
            if isinstance(module, LoraLayer):
                module.merge(safe_merge=True)
                parent_name, _, child = name.rpartition(".")
                setattr(clip.get_submodule(parent_name), child, module.get_base_layer())
        for module in clip.modules():
            if isinstance(getattr(module, "attn", None), SplitAttention):
                module.attn = module.attn.to_multihead()
            elif isinstance(getattr(module, "qkv", None), SplitQKV):
                module.qkv = module.qkv.to_linear()
        del clip.peft_config
        return clip.eval()

    def merged_state_dict(self) -> Dict[str, torch.Tensor]:
        """The full open_clip state_dict with LoRA merged (what `export --format merged` writes)."""
        return {key: value.detach().clone().contiguous() for key, value in self.merged_clip().state_dict().items()}

    def adapter_state_dict(self) -> Dict[str, torch.Tensor]:
        """LoRA weights in peft's `save_pretrained` layout (adapter name stripped from the keys)."""
        from peft import get_peft_model_state_dict

        state = get_peft_model_state_dict(self.clip, adapter_name=ADAPTER_NAME)
        return {key: value.detach().clone().contiguous() for key, value in state.items()}

    def load_adapter_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict

        expected = set(self.adapter_state_dict())
        if set(state) != expected:
            missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
            raise CliptuneError(f"adapter does not match this run's LoRA layout: missing {missing[:2]}, unexpected {unexpected[:2]}")
        set_peft_model_state_dict(self.clip, state, adapter_name=ADAPTER_NAME)
