"""The one training loop every method shares (on accelerate), its optimisers and schedules, checkpoints,
Ctrl-C handling, and the session that sets up model, data and templates for a command.

May import: `core`, `data`, `models`, `methods`, `config` (layer 5).
"""
