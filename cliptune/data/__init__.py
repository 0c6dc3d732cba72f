"""Images and labels before any model sees them: ImageFolder splits and few-shot sampling, transforms,
the decoded-image cache and prompt templates.

May import: `cliptune.core` (layer 1).
"""
