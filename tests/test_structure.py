"""The package's shape (docs/architecture.md): commands on top of library modules, small units."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "p2ch"
DOCS = PACKAGE.parent / "docs" / "architecture.md"
COMMANDS = {
    "training", "prepcache", "evaluate", "predict", "synth", "seg_training", "nodule_analysis", "import_book_models",
}  # fmt: skip
MAX_CLASS_LINES = 250
MAX_FUNCTION_LINES = 60


def _modules() -> dict[str, ast.Module]:
    return {path.stem: ast.parse(path.read_text(encoding="utf-8")) for path in sorted(PACKAGE.glob("*.py"))}


def _imported_p2ch_modules(tree: ast.Module) -> set[str]:
    found = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        for name in names:
            parts = name.split(".")
            if len(parts) > 1 and parts[0] == "p2ch":
                found.add(parts[1])
    return found


def test_no_module_imports_a_command():
    modules = _modules()
    assert COMMANDS & set(modules) >= {"training", "prepcache", "evaluate", "predict", "synth"}
    offending = {
        name: sorted((_imported_p2ch_modules(tree) & COMMANDS) - {name})
        for name, tree in modules.items()
        if (_imported_p2ch_modules(tree) & COMMANDS) - {name}
    }
    assert offending == {}, f"these modules import a command (python -m p2ch.X): {offending}"


def test_classes_and_functions_stay_small():
    too_long = []
    for name, tree in _modules().items():
        for node in ast.walk(tree):
            lines = getattr(node, "end_lineno", 0) - getattr(node, "lineno", 0) + 1
            if isinstance(node, ast.ClassDef) and lines > MAX_CLASS_LINES:
                too_long.append(f"p2ch/{name}.py class {node.name}: {lines} lines")
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and lines > MAX_FUNCTION_LINES:
                too_long.append(f"p2ch/{name}.py def {node.name}: {lines} lines")
    assert too_long == []


def test_architecture_doc_lists_every_module():
    text = DOCS.read_text(encoding="utf-8")
    missing = [f"p2ch/{name}.py" for name in _modules() if name != "__init__" and f"p2ch/{name}.py" not in text]
    assert missing == [], f"docs/architecture.md does not mention {missing}"
    listed = {line.split("`p2ch/")[1].split(".py`")[0] for line in text.splitlines() if "`p2ch/" in line}
    assert listed <= set(_modules()), (
        f"docs/architecture.md names modules that do not exist: {listed - set(_modules())}"
    )
