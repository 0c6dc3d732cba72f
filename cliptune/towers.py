"""Thin adapters over open_clip's two towers.

Methods reach token embeddings, transformer blocks, pooling and projections only through these
classes, so supporting another tower type (e.g. a Hugging Face text encoder) means teaching the
adapter, not every method.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from open_clip.transformer import TextTransformer, text_global_pool
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
            if layer_hook is not None:
                x = layer_hook(index, x)
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


class ImageTower:
    """open_clip's image tower (ViT, ResNet or timm): encoding only, through the model's own forward."""

    def __init__(self, clip: nn.Module):
        self.clip = clip

    @property
    def module(self) -> nn.Module:
        return self.clip.visual

    def encode(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        features = self.clip.encode_image(images)
        return F.normalize(features, dim=-1) if normalize else features
