"""Pretrained CLIP models behind one `load_model()` entry point (open_clip names, hf-hub, local
checkpoints), the tower wrappers methods build on, zero-shot heads, frozen image features and
weight-space interpolation.

May import: `cliptune.core`, `cliptune.data` (layer 2).
"""
