"""The import graph runs one way: journal <- transport <- engine <- cli.

journal (formats, durability, the errors every layer raises) imports nothing of ours but
itself; transport may use the journal's record format; the engine anything below it; only
the command line imports the command line. A test, because one convenient import is all it
takes to tangle the layers again.
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
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


# The wire code (frames, the protocol state machine, sockets and TLS) and the sender.
_WIRE = (
    "replicator.transport.connection",
    "replicator.transport.frames",
    "replicator.transport.protocol",
    "replicator.engine.sender",
    "replicator.engine.connectors",
)


@pytest.mark.parametrize("command", ["status_cmd", "failover_cmd", "rate_cmd", "journal_cmd"])
def test_commands_that_never_connect_load_no_wire_code(command: str) -> None:
    """``status`` and ``failover`` are what an operator runs while things are on fire:
    they start without loading what only a connection needs (the transport package
    loads its names lazily, its error classes live apart in ``transport/errors.py``)."""
    code = (
        f"import sys, replicator.cli.{command}\n"
        f"print(' '.join(m for m in {_WIRE!r} if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.split() == []


def test_the_transport_package_names_load_from_their_modules() -> None:
    import replicator.transport as transport

    assert set(transport.__all__) == set(transport._HOME)
    for name in transport.__all__:
        assert getattr(transport, name) is getattr(
            importlib.import_module(f"replicator.transport.{transport._HOME[name]}"), name
        )
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        transport.nothing  # noqa: B018 - the lookup is the test
