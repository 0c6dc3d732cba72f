"""Foundations every other package may use: errors, typed options, progress/logging, timing, metrics,
atomic file writes and the run-folder layout.

Owns nothing about CLIP, data or methods. May import: nothing else from cliptune (layer 0).
"""
