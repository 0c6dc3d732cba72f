#!/usr/bin/env python
"""Rewrite cliptune/config/method_flags.json from the method registry (after adding or changing a method option):
the CLI builds method flags from that file so that `cliptune finetune --help` never imports torch.

    python scripts/write_method_flags.py
"""

import json

from cliptune.config.method_flags import TABLE_PATH
from cliptune.methods import flag_table

if __name__ == "__main__":
    TABLE_PATH.write_text(json.dumps(flag_table(), indent=1) + "\n")
    print(f"wrote {TABLE_PATH}")
