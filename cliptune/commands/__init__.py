"""What the CLI's commands do, as library functions: zero-shot, finetune and eval runs, `compare`,
`wise` sweeps. `cliptune/cli.py` only parses arguments and calls these.

May import: every other package (layer 7).
"""
