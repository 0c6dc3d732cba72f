"""Recipes: complete, documented starting points (YAML) — listing and showing them (runs validate them)."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List

from cliptune.config.run import RECIPE_DIR, RunConfig, read_recipe, resolve_recipe_path


def recipe_paths() -> List[Path]:
    return sorted(RECIPE_DIR.glob("*.yaml"))


def describe(name_or_path: str) -> Dict[str, str]:
    """Name, domain, method, model and summary of a recipe, with `extends:` applied.

    Read, not validated (validating method options imports every method, and with them torch); a run
    from the recipe validates every key, naming file and line.
    """
    merged: Dict = {}
    for values, _path, _lines in read_recipe(name_or_path):
        merged.update(values)
    model_config = merged.get("model_config")
    model = merged.get("model") or (Path(model_config).stem if model_config else "(choose --model)")
    return {
        "name": merged.get("name", Path(name_or_path).stem),
        "domain": merged.get("domain", "method"),
        "method": merged.get("method", RunConfig.method),
        "model": model,
        "summary": merged.get("summary", ""),
    }


def show(name_or_path: str) -> str:
    """The recipe's YAML as written (its `extends:` parents are shown by `show` on their names)."""
    return resolve_recipe_path(name_or_path).read_text()
