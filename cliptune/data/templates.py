"""Prompt templates for building zero-shot classifiers; each has one `{}` for the class name."""

from __future__ import annotations

from pathlib import Path
from typing import List, Sequence, Union

import yaml

from cliptune.core.errors import CliptuneError

# A short, general subset of the CLIP ImageNet ensemble; recipes override it per domain.
DEFAULT_TEMPLATES = [
    "a photo of a {}.",
    "a close-up photo of a {}.",
    "a photo of the {}.",
    "a good photo of a {}.",
    "a cropped photo of a {}.",
    "an image of a {}.",
]


def load_templates(source: Union[None, str, Sequence[str]]) -> List[str]:
    """Templates from a list, a YAML list file, or a text file with one template per line."""
    if source is None:
        return list(DEFAULT_TEMPLATES)
    if isinstance(source, str):
        path = Path(source)
        if not path.is_file():
            raise CliptuneError(f"templates file not found: {source}")
        text = path.read_text()
        try:
            loaded = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else None
        except yaml.YAMLError as exc:
            raise CliptuneError(f"templates file {source} is not valid YAML: {exc}") from None
        templates = loaded if loaded is not None else [line.strip() for line in text.splitlines() if line.strip()]
    else:
        templates = list(source)
    if not templates or not all(isinstance(t, str) and t.count("{}") == 1 for t in templates):
        raise CliptuneError("templates must be a non-empty list of strings, each with exactly one '{}'")
    return templates
