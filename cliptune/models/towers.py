"""Thin adapters over open_clip's two towers.

Methods reach token embeddings, transformer blocks, pooling and projections only through these
classes, so supporting another tower type (e.g. a Hugging Face text encoder) means teaching the
adapter, not every method.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from open_clip.hf_configs import arch_dict
from open_clip.hf_model import HFTextEncoder
from open_clip.timm_model import TimmModel
from open_clip.transformer import TextTransformer, VisionTransformer, text_global_pool
from torch import nn

from cliptune.core.errors import CliptuneError

# Called before block `index` with the hidden states; returns the (possibly edited) hidden states.
LayerHook = Callable[[int, torch.Tensor], torch.Tensor]


def run_block(owner: nn.Module, block: nn.Module, x: torch.Tensor, **kwargs) -> torch.Tensor:
    """`block(x, **kwargs)`, recomputed in the backward pass when `owner` has gradient checkpointing on
    (`--grad-checkpointing`: open_clip's `set_grad_checkpointing`), as open_clip's own block loops do."""
    if getattr(owner, "grad_checkpointing", False) and torch.is_grad_enabled():
        from torch.utils.checkpoint import checkpoint

        return checkpoint(block, x, use_reentrant=False, **kwargs)
    return block(x, **kwargs)


class TextTower:
    """open_clip's native text transformer, whether it lives on `CLIP` itself or on `CustomTextCLIP.text`."""

    # Token layout seen by prompt learning: [SOS] words [EOT] [pad ...]; learned context starts after [SOS].
    prompt_start = 1

    def __init__(self, clip: nn.Module, tokenizer):
        # open_clip's CLIP / CustomTextCLIP and their towers are duck-typed here: their attributes differ by class
        self.clip: Any = clip
        self.tokenizer = tokenizer
        owner = getattr(clip, "text", None)
        if owner is None:
            owner = clip
        elif not isinstance(owner, TextTransformer):
            raise CliptuneError(
                f"text tower {type(owner).__name__} is not supported by this method yet (needs open_clip's TextTransformer)"
            )
        self.owner: Any = owner

    @property
    def context_length(self) -> int:
        return self.owner.positional_embedding.shape[0]

    @property
    def pad_id(self) -> int:
        return getattr(self.owner, "pad_id", 0)

    @property
    def width(self) -> int:
        return self.owner.token_embedding.weight.shape[1]

    @property
    def vocab_size(self) -> int:
        return self.owner.token_embedding.weight.shape[0]

    @property
    def blocks(self) -> nn.ModuleList:
        return self.owner.transformer.resblocks

    @property
    def output_dim(self) -> int:
        """Dimension of the text features (the shared embedding space)."""
        projection = self.owner.text_projection
        if projection is None:
            return self.width
        return projection.out_features if isinstance(projection, nn.Linear) else projection.shape[1]

    @property
    def device(self) -> torch.device:
        return self.owner.token_embedding.weight.device

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(texts)).to(self.device)

    def embed_tokens(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.owner.token_embedding(token_ids)

    def encode_embeddings(
        self, embeddings: torch.Tensor, token_ids: torch.Tensor, layer_hook: Optional[LayerHook] = None
    ) -> torch.Tensor:
        """Run the transformer on token embeddings; pooling uses `token_ids` to find the end token.

        Methods that replace embeddings (prompt learning) keep the token layout of `token_ids`, so
        the end-of-text position is still the real one.
        """
        owner = self.owner
        transformer = owner.transformer
        cast_dtype = transformer.get_cast_dtype()
        length = embeddings.shape[1]  # may be shorter than the context: see pooled_prefix_length
        x = embeddings.to(cast_dtype) + owner.positional_embedding[:length].to(cast_dtype)
        attn_mask = owner.attn_mask[:length, :length] if owner.attn_mask is not None else None
        if not transformer.batch_first:
            x = x.transpose(0, 1)
        for index, block in enumerate(transformer.resblocks):
            if layer_hook is not None:  # hooks always see (batch, tokens, width)
                x = layer_hook(index, x) if transformer.batch_first else layer_hook(index, x.transpose(0, 1)).transpose(0, 1)
            x = run_block(transformer, block, x, attn_mask=attn_mask)
        if not transformer.batch_first:
            x = x.transpose(0, 1)
        x = owner.ln_final(x)
        pool_type = getattr(owner, "text_pool_type", None) or getattr(owner, "pool_type", "argmax")
        x = text_global_pool(x, token_ids, pool_type, eos_token_id=getattr(owner, "text_eos_id", None))
        if isinstance(x, tuple):
            x = x[0]
        projection = owner.text_projection
        if projection is not None:
            x = projection(x) if isinstance(projection, nn.Linear) else x @ projection
        return x

    def encode(self, token_ids: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        features = self.encode_embeddings(self.embed_tokens(token_ids), token_ids)
        return F.normalize(features, dim=-1) if normalize else features

    def pooled_prefix_length(self, token_ids: torch.Tensor) -> int:
        """Shortest prefix of these sequences that `encode_embeddings` pools to the same features.

        With a causal mask and end-token (argmax) pooling, no token after the last end token can reach
        the pooled one, so prompt learning encodes only this prefix (often a quarter of the context).
        """
        owner = self.owner
        pool_type = getattr(owner, "text_pool_type", None) or getattr(owner, "pool_type", "argmax")
        if owner.attn_mask is None or pool_type != "argmax" or getattr(owner, "cls_emb", None) is not None:
            return token_ids.shape[1]
        return int(token_ids.argmax(dim=-1).max()) + 1

    def parameters(self) -> List[nn.Parameter]:
        """The text tower's own weights (on `CLIP` they sit on the model itself, beside the logit scale)."""
        if self.owner is not self.clip:
            return list(self.owner.parameters())
        return [p for n, p in self.clip.named_parameters() if not n.startswith(("visual.", "logit_"))]

    def head_parameters(self) -> List[nn.Parameter]:
        """Final norm and projection: what sits after the last block."""
        params = list(self.owner.ln_final.parameters())
        projection = self.owner.text_projection
        if isinstance(projection, nn.Module):
            params += list(projection.parameters())
        elif projection is not None:
            params.append(projection)
        return params


class HFTextTower:
    """open_clip's `HFTextEncoder` (e.g. BiomedCLIP's PubMedBERT): a Hugging Face encoder, a pooler, a projection.

    Same interface as `TextTower`. Token layout: [CLS] words [SEP] [PAD ...]; the attention mask comes
    from the pad id, as in `HFTextEncoder.forward`, so prompts that keep the layout of their token ids
    are masked and pooled like the text they replace.
    """

    prompt_start = 1  # after [CLS]

    def __init__(self, clip: Any, tokenizer):  # a CustomTextCLIP
        self.clip: Any = clip
        self.tokenizer = tokenizer
        self.owner: Any = clip.text  # an HFTextEncoder
        self.model: Any = self.owner.transformer  # the Hugging Face PreTrainedModel

    @property
    def context_length(self) -> int:
        return self.tokenizer.context_length

    @property
    def pad_id(self) -> int:
        return self.owner.config.pad_token_id

    @property
    def width(self) -> int:
        return self.model.get_input_embeddings().weight.shape[1]

    @property
    def vocab_size(self) -> int:
        return self.model.get_input_embeddings().weight.shape[0]

    @property
    def blocks(self) -> nn.ModuleList:
        """The encoder layers (e.g. `BertLayer`s): open_clip's `layer_attr` for the architecture, else a usual name."""
        encoder = getattr(self.model, "encoder", self.model)
        known = arch_dict.get(self.owner.config.model_type, {}).get("config_names", {}).get("layer_attr")
        for name in filter(None, (known, "layer", "layers", "block")):
            if isinstance(getattr(encoder, name, None), nn.ModuleList):
                return getattr(encoder, name)
        raise CliptuneError(f"cannot find the layers of the {self.owner.config.model_type} text encoder")

    @property
    def output_dim(self) -> int:
        return self.owner.output_dim

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(texts)).to(self.device)

    def embed_tokens(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Word embeddings only: the HF model adds position/type embeddings and its LayerNorm itself."""
        return self.model.get_input_embeddings()(token_ids)

    def encode_embeddings(
        self, embeddings: torch.Tensor, token_ids: torch.Tensor, layer_hook: Optional[LayerHook] = None
    ) -> torch.Tensor:
        """`HFTextEncoder.forward` on `inputs_embeds`; `layer_hook` runs as a pre-hook of every encoder layer."""
        attention_mask = (token_ids != self.pad_id).long()
        handles = []
        if layer_hook is not None:
            for index, block in enumerate(self.blocks):
                def pre_hook(module, args, index=index):
                    return (layer_hook(index, args[0]), *args[1:])

                handles.append(block.register_forward_pre_hook(pre_hook, prepend=True))  # before any other pre-hook
        try:
            out = self.model(inputs_embeds=embeddings, attention_mask=attention_mask)
        finally:
            for handle in handles:
                handle.remove()
        return self.owner.proj(self.owner.pooler(out, attention_mask))

    def encode(self, token_ids: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        features = self.encode_embeddings(self.embed_tokens(token_ids), token_ids)
        return F.normalize(features, dim=-1) if normalize else features

    def pooled_prefix_length(self, token_ids: torch.Tensor) -> int:
        """Shortest prefix that encodes the same (see `TextTower`): padding is masked out, so up to the last real token."""
        positions = torch.arange(1, token_ids.shape[1] + 1, device=token_ids.device)
        return int(((token_ids != self.pad_id) * positions).max())

    def parameters(self) -> List[nn.Parameter]:
        return list(self.owner.parameters())

    def head_parameters(self) -> List[nn.Parameter]:
        """Pooler and projection (BERT-style layers end with their own LayerNorm, so there is no final norm)."""
        return list(self.owner.pooler.parameters()) + list(self.owner.proj.parameters())


def text_tower(clip: nn.Module, tokenizer) -> TextTower | HFTextTower:
    """The adapter for the model's text tower."""
    if isinstance(getattr(clip, "text", None), HFTextEncoder):
        return HFTextTower(clip, tokenizer)
    return TextTower(clip, tokenizer)


# either text tower: what prompt learning, zero-shot heads and distillation take
AnyTextTower = Union[TextTower, HFTextTower]


class ImageTower:
    """open_clip's image tower (ViT, ResNet or timm): encoding only, through the model's own forward."""

    def __init__(self, clip: nn.Module):
        self.clip: Any = clip

    @property
    def module(self) -> nn.Module:
        return self.clip.visual

    @property
    def blocks(self) -> nn.ModuleList | nn.Sequential:
        """The ViT's transformer blocks: open_clip's `resblocks`, or a timm ViT trunk's `blocks` (ResNets have none)."""
        visual = self.clip.visual
        if isinstance(visual, TimmModel) and hasattr(visual.trunk, "blocks"):
            return visual.trunk.blocks
        transformer = getattr(visual, "transformer", None)
        if transformer is None or not hasattr(transformer, "resblocks"):
            raise CliptuneError(
                f"image tower {type(visual).__name__} has no transformer blocks (needs a ViT: open_clip's or timm's)"
            )
        return transformer.resblocks

    def parameters(self) -> List[nn.Parameter]:
        return list(self.clip.visual.parameters())

    def head_parameters(self) -> List[nn.Parameter]:
        """Attention poolers, final norm and projection of a ViT: what sits after the last block."""
        visual = self.clip.visual
        params = []
        if isinstance(visual, TimmModel):  # timm ViT: final norms and pooler of the trunk, then open_clip's projection head
            owners = [getattr(visual.trunk, name, None) for name in ("norm", "fc_norm", "attn_pool")] + [visual.head]
            return [p for module in owners if isinstance(module, nn.Module) for p in module.parameters()]
        for name in ("attn_pool", "attn_pool_contrastive", "ln_post"):
            module = getattr(visual, name, None)
            if isinstance(module, nn.Module):
                params += list(module.parameters())
        if isinstance(getattr(visual, "proj", None), nn.Parameter):
            params.append(visual.proj)
        return params

    def encode(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        features = self.clip.encode_image(images)
        return F.normalize(features, dim=-1) if normalize else features

    @property
    def width(self) -> int:
        """Token width of the ViT's transformer."""
        if isinstance(self.module, TimmModel):
            return self.module.trunk.embed_dim
        first: Any = self.blocks[0]  # an open_clip ResidualAttentionBlock
        return first.ln_1.normalized_shape[0]

    def _prompt_stages(self, images: torch.Tensor):
        """A ViT forward cut where prompts go in: (patch tokens after the pre-norm, the pre-norm, run one block,
        final tokens -> image features), for open_clip's VisionTransformer or a timm ViT trunk."""
        visual = self.module
        if isinstance(visual, TimmModel) and hasattr(visual.trunk, "blocks"):
            trunk = visual.trunk
            tokens = trunk.norm_pre(trunk.patch_drop(trunk._pos_embed(trunk.patch_embed(images))))
            timm_head = lambda x: visual.head(trunk.forward_head(trunk.norm(x)))  # noqa: E731 - TimmModel.forward's tail
            return tokens, trunk.norm_pre, lambda block, x: run_block(trunk, block, x), timm_head
        if not isinstance(visual, VisionTransformer):
            raise CliptuneError(
                f"image tower {type(visual).__name__} does not take visual prompts (needs a ViT: open_clip's or timm's)"
            )
        batch_first = visual.transformer.batch_first

        def run(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
            if batch_first:
                return run_block(visual.transformer, block, x)
            return run_block(visual.transformer, block, x.transpose(0, 1)).transpose(0, 1)

        def head(x: torch.Tensor) -> torch.Tensor:
            pooled, _ = visual._pool(x)
            return pooled @ visual.proj if visual.proj is not None else pooled

        return visual._embeds(images), visual.ln_pre, run, head  # _embeds includes ln_pre

    def encode_prompted(self, images: torch.Tensor, prompts: Sequence[torch.Tensor], normalize: bool = True) -> torch.Tensor:
        """ViT forward with deep visual prompts (VPT-deep / MaPLe): `prompts[i]` is (n, width) for block i.

        `prompts[0]` is appended to the patch sequence before the pre-norm (as in MaPLe's CLIP); before each
        later block `i < len(prompts)` the prompt tokens are replaced by `prompts[i]`; deeper blocks carry
        the previous block's outputs at those positions. Prompt tokens are dropped before pooling.
        """
        if not prompts:
            return self.encode(images, normalize)
        tokens, pre_norm, run_block, head = self._prompt_stages(images)
        batch, length = images.shape[0], tokens.shape[1]
        # the pre-norm is per-token: pre_norm(cat(a, b)) == cat(pre_norm(a), pre_norm(b))
        x = torch.cat([tokens, pre_norm(prompts[0].to(tokens.dtype)).expand(batch, -1, -1)], dim=1)
        for index, block in enumerate(self.blocks):
            if 0 < index < len(prompts):
                x = torch.cat([x[:, :length], prompts[index].to(x.dtype).expand(batch, -1, -1)], dim=1)
            x = run_block(block, x)
        pooled = head(x[:, :length])
        return F.normalize(pooled, dim=-1) if normalize else pooled
