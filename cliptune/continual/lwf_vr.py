"""LwF with a virtual vocabulary ("Don't Stop Learning", Ding et al. 2022), as ZSCL's code runs it
(`mtil/src/models/helpers.py::virtual_vocab`, `lwf_vr.sh` with `--ref-sentences random`): `vocab_size` fixed random
token sequences of `vocab_length` tokens instead of the class prompts, all of them every step."""

from __future__ import annotations

import torch

from cliptune.continual.base import FeatureDistillation, encode_texts
from cliptune.core.errors import CliptuneError
from cliptune.models.towers import AnyTextTower


def virtual_vocabulary(text: AnyTextTower, size: int = 1000, length: int = 10, seed: int = 0) -> torch.Tensor:
    """(size, context) token ids of random "sentences": start token, `length` random tokens, end token, padding.

    ZSCL's `helpers.py::virtual_vocab(length=10, n_class=1000)`, seeded. Unlike the original the random
    tokens never are the start, end or pad token (the original draws from the whole vocabulary, so a
    drawn end token could end a sentence early).
    """
    layout = text.tokenize([""])[0].cpu()  # [start, end, pad, ...]
    start, end, pad = int(layout[0]), int(layout[1]), text.pad_id
    if length + 2 > text.context_length:
        raise CliptuneError(f"vocab_length {length} does not fit the text context of {text.context_length} tokens")
    special = torch.tensor(sorted({start, end, pad}))
    ordinary = torch.arange(text.vocab_size)
    ordinary = ordinary[~torch.isin(ordinary, special)]
    generator = torch.Generator().manual_seed(seed)
    drawn = ordinary[torch.randint(len(ordinary), (size, length), generator=generator)]
    tokens = torch.full((size, text.context_length), pad, dtype=torch.long)
    tokens[:, 0], tokens[:, 1 : length + 1], tokens[:, length + 1] = start, drawn, end
    return tokens.to(text.device)


class LwFVR(FeatureDistillation):
    name = "lwf-vr"
    summary = "LwF against a vocabulary of random token sequences instead of the class prompts"

    def distillation_inputs(self, teacher, data, templates):
        config = self.config
        vocabulary = virtual_vocabulary(teacher.text, config.vocab_size, config.vocab_length, config.seed)
        return data.split("train").files, encode_texts(teacher.text, vocabulary)
