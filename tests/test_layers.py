"""The import graph runs one way: journal <- transport <- engine <- cli.

journal (formats, durability, the errors every layer raises) imports nothing of ours but
itself; transport may use the journal's record format; the engine anything below it; only
the command line imports the command line. A test, because one convenient import is all it
takes to tangle the layers again.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ALLOWED = {
    "journal": {"journal"},
    "transport": {"journal", "transport"},
    "engine": {"journal", "transport", "engine"},
    "cli": {"journal", "transport", "engine", "cli"},
}


def _imports(path: Path) -> set[str]:
    """Our layers that ``path`` imports (any ``replicator.X`` import, also inside functions)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "replicator" and len(parts) > 1:
                found.add(parts[1])
    return found


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layers_import_only_what_is_below_them(layer: str) -> None:
    wrong = {
        str(path.relative_to(ROOT)): sorted(_imports(path) - ALLOWED[layer])
        for path in sorted((ROOT / layer).rglob("*.py"))
    }
    assert {k: v for k, v in wrong.items() if v} == {}
