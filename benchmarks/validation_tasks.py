"""The settings benchmarks run on: the bundled digits with the demo recipe's CLIP, and each validation task written
by `scripts/make_validation_tasks.py` with its own CLIP."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Tuple

import cliptune


def task_settings(tasks: Optional[Path]) -> Dict[str, Tuple[Path, dict]]:
    """{name: (ImageFolder root, run values)}: "demo" (the demo recipe) first, then every task folder under `tasks`."""
    found = {"demo": (Path(cliptune.__file__).parent / "sample_data", {"recipe": "demo"})}
    for folder in sorted(tasks.iterdir()) if tasks else ():
        config = next(folder.glob("validation-*-clip.json"), None)
        if config is not None:
            found[folder.name] = (folder, {"model_config": str(config), "pretrained": str(config.with_suffix(".safetensors"))})
    return found
