"""The library's modules form no import cycle, counting imports inside functions too."""

import ast
from pathlib import Path

import cliptune

PACKAGE = Path(cliptune.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set) -> set:
    """cliptune modules this file imports anywhere (a package's __init__ runs before its submodules)."""
    own = _module_name(path)
    package = own if path.name == "__init__.py" else own.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if name in modules:
                targets.add(name)
                parts = name.split(".")
                for i in range(1, len(parts)):  # parent packages, unless the importer lives inside them
                    parent = ".".join(parts[:i])
                    if parent in modules and not own.startswith(parent + ".") and parent != own:
                        targets.add(parent)
    targets.discard(own)
    return targets


def import_graph() -> dict:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: _imports(path, set(files)) - {"cliptune"} for name, path in files.items()}


def find_cycle(graph: dict):
    """One cycle as a list of modules, or None (depth-first search with colours)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_find_cycle_detects_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_library_has_no_import_cycle():
    graph = import_graph()
    assert "cliptune.training.session" in graph and "cliptune.commands.api" in graph["cliptune.cli"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


# Packages in data-flow order: a package may import only packages of a lower layer, or modules of its own.
LAYERS = {"core": 0, "data": 1, "models": 2, "methods": 3, "config": 4, "training": 5, "continual": 6, "deploy": 6,
          "commands": 7}


def _package(module: str):
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def layer_violations(graph: dict) -> list:
    bad = []
    for module, targets in graph.items():
        own = _package(module)
        if own is None:
            continue  # cliptune/__init__, __main__ and cli sit above every package
        for target in targets:
            other = _package(target)
            if other is None:
                bad.append(f"{module} -> {target} (a module outside the layered packages)")
            elif other != own and LAYERS[other] >= LAYERS[own]:
                bad.append(f"{module} -> {target}")
    return sorted(bad)


def test_layer_check_detects_an_upward_import():
    assert layer_violations({"cliptune.data.folders": {"cliptune.training.engine"}}) == [
        "cliptune.data.folders -> cliptune.training.engine"]
    assert layer_violations({"cliptune.deploy.export": {"cliptune.continual.loop"}})  # same layer, other package
    assert layer_violations({"cliptune.training.engine": {"cliptune.core.errors", "cliptune.training.optim"}}) == []


def test_packages_import_only_lower_layers():
    graph = import_graph()
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert packages == set(LAYERS), "every package has a layer"
    assert layer_violations(graph) == []
