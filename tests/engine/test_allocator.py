"""engine/allocator.py: glibc keeps freed bulk buffers (fewer page faults per buffer)."""

from __future__ import annotations

import os
import subprocess
import sys

PROBE = """
import sys
from replicator.engine.allocator import keep_freed_buffers
print(keep_freed_buffers())
"""


def _probe(env: dict[str, str]) -> str:
    res = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True
    )
    return res.stdout.strip()


def test_the_thresholds_are_set_on_glibc() -> None:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    assert _probe(env) == "True"  # mallopt accepted both values (it returns 0 on a bad one)


def test_an_operators_glibc_tunables_win() -> None:
    env = {**os.environ, "GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1048576"}
    assert _probe(env) == "False"
