"""Thin adapters over open_clip's two towers.

Methods reach token embeddings, transformer blocks, pooling and projections only through these
classes, so supporting another tower type (e.g. a Hugging Face text encoder) means teaching the
adapter, not every method.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from open_clip.transformer import TextTransformer, VisionTransformer, text_global_pool
from torch import nn

from cliptune.errors import CliptuneError

# Called before block `index` with the hidden states; returns the (possibly edited) hidden states.
LayerHook = Callable[[int, torch.Tensor], torch.Tensor]


class TextTower:
    """open_clip's native text transformer, whether it lives on `CLIP` itself or on `CustomTextCLIP.text`."""

    def __init__(self, clip: nn.Module, tokenizer):
        self.clip = clip
        self.tokenizer = tokenizer
        owner = getattr(clip, "text", None)
        if owner is None:
            owner = clip
        elif not isinstance(owner, TextTransformer):
            raise CliptuneError(
                f"text tower {type(owner).__name__} is not supported by this method yet (needs open_clip's TextTransformer)"
            )
        self.owner = owner

    @property
    def context_length(self) -> int:
        return self.owner.positional_embedding.shape[0]

    @property
    def width(self) -> int:
        return self.owner.token_embedding.weight.shape[1]

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
        x = embeddings.to(cast_dtype) + owner.positional_embedding.to(cast_dtype)
        attn_mask = owner.attn_mask
        if not transformer.batch_first:
            x = x.transpose(0, 1)
        for index, block in enumerate(transformer.resblocks):
            if layer_hook is not None:  # hooks always see (batch, tokens, width)
                x = layer_hook(index, x) if transformer.batch_first else layer_hook(index, x.transpose(0, 1)).transpose(0, 1)
            x = block(x, attn_mask=attn_mask)
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


class ImageTower:
    """open_clip's image tower (ViT, ResNet or timm): encoding only, through the model's own forward."""

    def __init__(self, clip: nn.Module):
        self.clip = clip

    @property
    def module(self) -> nn.Module:
        return self.clip.visual

    @property
    def blocks(self) -> nn.ModuleList:
        """The ViT's transformer blocks (ResNet and timm towers have none)."""
        transformer = getattr(self.clip.visual, "transformer", None)
        if transformer is None or not hasattr(transformer, "resblocks"):
            raise CliptuneError(
                f"image tower {type(self.clip.visual).__name__} has no transformer blocks (needs open_clip's VisionTransformer)"
            )
        return transformer.resblocks

    def parameters(self) -> List[nn.Parameter]:
        return list(self.clip.visual.parameters())

    def head_parameters(self) -> List[nn.Parameter]:
        """Attention poolers, final norm and projection of a ViT: what sits after the last block."""
        visual = self.clip.visual
        params = []
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
        return self.blocks[0].ln_1.normalized_shape[0]

    def encode_prompted(self, images: torch.Tensor, prompts: Sequence[torch.Tensor], normalize: bool = True) -> torch.Tensor:
        """ViT forward with deep visual prompts (VPT-deep / MaPLe): `prompts[i]` is (n, width) for block i.

        `prompts[0]` is appended to the patch sequence before the pre-norm (as in MaPLe's CLIP); before each
        later block `i < len(prompts)` the prompt tokens are replaced by `prompts[i]`; deeper blocks carry
        the previous block's outputs at those positions. Prompt tokens are dropped before pooling.
        """
        visual = self.module
        if not isinstance(visual, VisionTransformer):
            raise CliptuneError(f"image tower {type(visual).__name__} does not take visual prompts (needs open_clip's VisionTransformer)")
        if not prompts:
            return self.encode(images, normalize)
        batch, n = images.shape[0], prompts[0].shape[0]
        x = visual._embeds(images)  # includes ln_pre, which is per-token: ln_pre(cat(a, b)) == cat(ln_pre(a), ln_pre(b))
        x = torch.cat([x, visual.ln_pre(prompts[0].to(x.dtype)).expand(batch, -1, -1)], dim=1)
        transformer = visual.transformer
        for index, block in enumerate(transformer.resblocks):
            if 0 < index < len(prompts):
                x = torch.cat([x[:, :-n], prompts[index].to(x.dtype).expand(batch, -1, -1)], dim=1)
            x = block(x) if transformer.batch_first else block(x.transpose(0, 1)).transpose(0, 1)
        pooled, _ = visual._pool(x[:, :-n])
        if visual.proj is not None:
            pooled = pooled @ visual.proj
        return F.normalize(pooled, dim=-1) if normalize else pooled
