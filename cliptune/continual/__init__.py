"""Continual learning over a sequence of tasks (`cliptune continual`): strategies that keep zero-shot
ability (ZSCL, LwF, WiSE, ...) around the shared training loop.

May import: everything below `training` and `training` itself (layer 6); not `deploy` or `commands`.
"""
