"""Shape rules of the library's code: short functions, and method knowledge only under `cliptune/methods/`."""

import ast
from pathlib import Path

import pytest

import cliptune
from cliptune.methods import METHODS

PACKAGE = Path(cliptune.__file__).parent
MAX_FUNCTION_LINES = 60


def _long_functions(source: str, limit: int = MAX_FUNCTION_LINES) -> list:
    return [(node.name, node.end_lineno - node.lineno + 1) for node in ast.walk(ast.parse(source))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > limit]


def _docstrings(tree: ast.AST) -> set:
    """The string constants that are docstrings (prose may name a paper's method; code may not)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                found.add(id(first.value))
    return found


def _method_mentions(source: str, names: set, classes: set) -> list:
    """Code (not prose) that names a method: a string equal to a registered method name, or a method class."""
    tree = ast.parse(source)
    docstrings = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings and node.value in names:
            found.append((node.lineno, repr(node.value)))
        elif isinstance(node, ast.Name) and node.id in classes:
            found.append((node.lineno, node.id))
        elif isinstance(node, ast.Attribute) and node.attr in classes:
            found.append((node.lineno, node.attr))
        elif isinstance(node, ast.alias) and node.name.rpartition(".")[2] in classes:
            found.append((getattr(node, "lineno", 0), node.name))
    return found


def _library_files(outside_methods: bool = False):
    for path in sorted(PACKAGE.rglob("*.py")):
        if outside_methods and "methods" in path.relative_to(PACKAGE).parts[:1]:
            continue
        yield path


def test_long_function_check_counts_whole_definitions():
    body = "\n".join(f"    x{i} = {i}" for i in range(60))
    assert _long_functions(f"def short():\n{body[:-10]}\n") == []
    assert _long_functions(f"def long():\n{body}\n") == [("long", 61)]


@pytest.mark.parametrize("path", list(_library_files()), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_function_is_longer_than_sixty_lines(path):
    assert _long_functions(path.read_text()) == []


def test_method_mention_check_finds_names_and_classes_but_not_prose():
    source = ('"""CoOp\'s prompts, as in coop."""\nfrom cliptune.methods.coop import CoOp\n'
              'def f(m):\n    """For coop."""\n    return m == "coop" or isinstance(m, CoOp)\n')
    assert sorted(what for _, what in _method_mentions(source, {"coop"}, {"CoOp"})) == ["'coop'", "CoOp", "CoOp"]


@pytest.mark.parametrize("path", list(_library_files(outside_methods=True)), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_outside_methods_names_a_method(path):
    # everything a method decides is a hook declared on Method; the registry names the defaults
    assert _method_mentions(path.read_text(), set(METHODS), {cls.__name__ for cls in METHODS.values()}) == []
