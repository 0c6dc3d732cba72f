"""The methods' CLI flags as data (`method_flags.json`, written from the registry by scripts/write_method_flags.py
and checked against it by the tests), so that `--help` builds them without importing a method, and with it torch."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Dict, List

TABLE_PATH = Path(__file__).with_name("method_flags.json")


@lru_cache(maxsize=1)
def method_flags() -> Dict:
    """{method: {"export_formats": [...], "options": [{name, flag, type, help, default, choices}, ...]}}."""
    return json.loads(TABLE_PATH.read_text())


def methods_exporting_merged() -> List[str]:
    """The methods whose weights merge into CLIP (what continual learning can carry from task to task)."""
    return sorted(name for name, entry in method_flags().items() if "merged" in entry["export_formats"])
