"""Run configuration as data: `RunConfig`, recipes (YAML with `extends:`) and the layering of
defaults < method defaults < recipe < CLI flags < `--set`.

May import: `cliptune.core`, `cliptune.data`, `cliptune.models`, `cliptune.methods` (layer 4; the method
registry validates method sections and supplies method defaults).
"""
