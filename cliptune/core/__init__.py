"""Foundations every other package may use: errors, typed options, progress/logging, timing, metrics,
atomic file writes (figures included), seeded random scopes, the run-folder layout, and the
one list of private APIs of other packages that cliptune relies on.

Owns nothing about CLIP, data or methods. May import: nothing else from cliptune (layer 0).
"""
