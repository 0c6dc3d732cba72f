"""Class prompts with learnable context, shared by CoOp, CoCoOp and MaPLe.

A class prompt is the token sequence of "<context> <classname>." whose context positions hold learned
vectors instead of word embeddings: [SOS] [ctx_1 .. ctx_n] [class tokens] [.] [EOT] [pad ...]
([CLS] ... [SEP] [PAD ...] for a Hugging Face BERT tower; the tower adapter says where the context
starts, `prompt_start`, and which id pads, `pad_id`). The token ids of that text (placeholder "X"s,
or the init phrase) are kept for pooling and masking, so the text tower still pools at the real end
token (or [CLS]) and masks the real padding once the context is inserted.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from cliptune.core.errors import CliptuneError
from cliptune.models.towers import AnyTextTower
from cliptune.models.zeroshot import prompts_per_call

POSITIONS = ("end", "middle", "front")


def phrase_length(text: AnyTextTower, phrase: str) -> int:
    """Number of tokens of `phrase` (without start/end tokens)."""
    ids = text.tokenize([phrase])[0]
    return int((ids != text.pad_id).sum()) - text.prompt_start - 1


@torch.no_grad()
def initial_context(text: AnyTextTower, n_ctx: int, ctx_init: str = "") -> torch.Tensor:
    """(n_ctx, width) start vectors: the embeddings of the first n_ctx tokens of `ctx_init`, else N(0, 0.02)."""
    if ctx_init:
        available = phrase_length(text, ctx_init)
        if n_ctx > available:
            raise CliptuneError(f"ctx_init {ctx_init!r} has {available} tokens, fewer than n_ctx={n_ctx}")
        start = text.prompt_start
        return text.embed_tokens(text.tokenize([ctx_init]))[0, start : start + n_ctx].float().clone()
    return torch.randn(n_ctx, text.width) * 0.02


class ClassPrompts(nn.Module):
    """Frozen token embeddings around the context slots of every class prompt (non-persistent buffers).

    `position` places the class tokens after ("end"), inside ("middle") or before ("front") the
    context, as in CoOp; `before` (MoCoOp) puts exactly that many context tokens ahead of the class name instead.
    The sequence length and end-token position do not change.
    """

    # buffers (registered in __init__/prepare; declared for type checkers)
    token_ids: torch.Tensor
    prefix: torch.Tensor
    suffix: torch.Tensor
    order: torch.Tensor

    def __init__(self, text: AnyTextTower, classnames: Sequence[str], n_ctx: int, ctx_init: str = "", position: str = "end",
                 before: Optional[int] = None):
        super().__init__()
        if n_ctx < 1:
            raise CliptuneError(f"n_ctx must be at least 1, got {n_ctx}")
        if position not in POSITIONS:
            raise CliptuneError(f"class_token_position must be one of {', '.join(POSITIONS)}, got {position!r}")
        self.text = text
        self.start = text.prompt_start  # index of the first context token
        self.n_ctx = n_ctx
        self.ctx_init = ctx_init
        self.before = before if before is not None else {"end": n_ctx, "middle": n_ctx // 2, "front": 0}[position]
        self.set_classes(classnames)

    @torch.no_grad()
    def set_classes(self, classnames: Sequence[str]) -> None:
        text, n, s = self.text, self.n_ctx, self.start
        lead = self.ctx_init or " ".join(["X"] * n)
        name_lengths = [phrase_length(text, name) for name in classnames]
        longest = max(range(len(classnames)), key=name_lengths.__getitem__)
        if s + phrase_length(text, lead) + name_lengths[longest] + 2 > text.context_length:  # + "." + end token
            raise CliptuneError(
                f"the prompt for class '{classnames[longest]}' does not fit the text context of "
                f"{text.context_length} tokens after {n} context tokens; use a smaller n_ctx"
            )
        token_ids = text.tokenize([f"{lead} {name}." for name in classnames])
        shortest = getattr(text, "pooled_prefix_length", None)  # exact: drops only padding the end token cannot see
        token_ids = token_ids[:, : shortest(token_ids)] if shortest else token_ids
        embeddings = text.embed_tokens(token_ids)
        self.register_buffer("token_ids", token_ids, persistent=False)
        self.register_buffer("prefix", embeddings[:, :s].clone(), persistent=False)
        self.register_buffer("suffix", embeddings[:, s + n :].clone(), persistent=False)
        order = None
        if self.before < n:  # positions of the "end" layout, per class, in the wanted layout
            rows = []
            length = token_ids.shape[1]
            for m in name_lengths:
                ctx, name, rest = list(range(s, s + n)), list(range(s + n, s + n + m)), list(range(s + n + m, length))
                rows.append(list(range(s)) + ctx[: self.before] + name + ctx[self.before :] + rest)
            order = torch.tensor(rows, device=token_ids.device)
        self.register_buffer("order", order, persistent=False)

    def __len__(self) -> int:
        return self.token_ids.shape[0]

    def assemble(self, ctx: torch.Tensor, rows: slice = slice(None)) -> torch.Tensor:
        """Prompt embeddings (*batch, classes, tokens, width) from context (*batch, classes or 1, n_ctx, width) or
        (n_ctx, width), for the classes `rows` selects (all by default; class-specific context: already those rows)."""
        prefix, suffix = self.prefix[rows], self.suffix[rows]
        order = None if self.order is None else self.order[rows]
        if ctx.dim() == 2:
            ctx = ctx.unsqueeze(0)
        lead = ctx.shape[:-3]
        classes, width = prefix.shape[0], prefix.shape[-1]
        ctx = ctx.expand(*lead, classes, self.n_ctx, width).to(prefix.dtype)
        prompts = torch.cat([prefix.expand(*lead, classes, self.start, width), ctx,
                             suffix.expand(*lead, classes, suffix.shape[1], width)], dim=-2)
        if order is not None:
            index = order.unsqueeze(-1).expand(*lead, classes, order.shape[1], width)
            prompts = prompts.gather(-2, index)
        return prompts

    def encode(self, ctx: torch.Tensor, layer_hook=None, rows: slice = slice(None)) -> torch.Tensor:
        """Unnormalised text features (*batch, classes, dim) of the prompts built from `ctx` (for the classes `rows`)."""
        prompts = self.assemble(ctx, rows)
        lead = prompts.shape[:-3]
        token_ids = self.token_ids[rows]
        flat = prompts.reshape(-1, *prompts.shape[-2:])
        token_ids = token_ids.expand(*lead, *token_ids.shape).reshape(-1, token_ids.shape[1])
        features = self.text.encode_embeddings(flat, token_ids, layer_hook)
        return features.reshape(*lead, prompts.shape[-3], -1)

    def encode_in_chunks(self, ctx: torch.Tensor, chunk: int, layer_hook=None) -> torch.Tensor:
        """`encode` at most `chunk` prompts per text-encoder call. While training, each call's activations are
        recomputed in the backward pass (activation checkpointing), so peak memory follows the chunk, not the
        class count; features and gradients are those of one call (tested). `ctx`: shared (n_ctx, width), one
        per class (classes, n_ctx, width), or one per image (images, 1, n_ctx, width) -> (images, classes, dim)."""
        classes = len(self)
        per_image = ctx.dim() == 4
        images = ctx.shape[0] if per_image else 1
        if chunk >= images * classes or torch.jit.is_tracing():  # a traced graph (ONNX) fixes loop counts: one call
            return self.encode(ctx, layer_hook)
        class_step, image_step = min(chunk, classes), max(1, chunk // classes)
        groups = []
        for first in range(0, images, image_step):
            group = ctx[first : first + image_step] if per_image else ctx
            pieces = []
            for start in range(0, classes, class_step):
                rows = slice(start, start + class_step)
                part = group[rows] if ctx.dim() == 3 and ctx.shape[0] == classes else group
                if torch.is_grad_enabled():
                    pieces.append(checkpoint(self.encode, part, layer_hook, rows, use_reentrant=False))
                else:
                    pieces.append(self.encode(part, layer_hook, rows))
            groups.append(torch.cat(pieces, dim=-2))
        return torch.cat(groups) if per_image else groups[0]

    def chunk(self, setting: int) -> int:
        """Prompts per text-encoder call for a method's `text_chunk` setting (0: from the memory budget)."""
        return prompts_per_call(self.text, self.token_ids.shape[1], setting)
