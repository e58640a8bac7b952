"""The journal's optional C part: checking a packed run of records' checksums, and
finding a run's record bounds.

``verified_prefix(buf) -> int`` (``_verify.c``) is the length of the longest prefix of
``buf`` made of whole version 2 records whose checksums match; ``decode_records`` decodes
that prefix without checking again and checks the rest itself, so every error is found
and named by the Python decoder as it is without this module. ``_verify`` is built by
``pip install`` when a compiler, Python's headers and ``xxhash.h`` are there (as ``make
install`` has them); without it, or with ``REPLICATOR_PURE_PYTHON=1`` in the environment
(for a comparison or a suspicion, as for the NBD shim's batch path), ``verified_prefix``
is None and the Python decoder checks every record.

``framed_run`` (same module) finds the longest run of whole, well-formed records from a
position without their checksums; ``journal/records.py``'s ``framed_run`` is its interface
and its pure-Python twin (None here: that twin does the walk).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Final

PURE_PYTHON_ENV: Final = "REPLICATOR_PURE_PYTHON"
"""Set (not "0"): every C fast path is left off (this one, ``engine/nbd/native.py``'s)."""


def pure_python() -> bool:
    """Whether ``PURE_PYTHON_ENV`` turns the C fast paths off."""
    return os.environ.get(PURE_PYTHON_ENV, "") not in ("", "0")


FramedRunC = Callable[
    [bytes | memoryview, int, int, int | None, int, int, int, bytes, bytes],
    tuple[int, int, int, int, int],
]


def _load() -> tuple[Callable[[bytes | bytearray | memoryview], int], FramedRunC] | None:
    if pure_python():
        return None
    try:
        from replicator.journal._verify import framed_run, verified_prefix
    except ImportError:  # optional: built by pip when it can be
        return None
    return verified_prefix, framed_run


_loaded = _load()
verified_prefix = _loaded[0] if _loaded is not None else None
framed_run = _loaded[1] if _loaded is not None else None
