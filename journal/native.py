"""The journal's optional C part: checking a packed run of records' checksums.

``verified_prefix(buf) -> int`` (``_verify.c``) is the length of the longest prefix of
``buf`` made of whole version 2 records whose checksums match; ``decode_records`` decodes
that prefix without checking again and checks the rest itself, so every error is found
and named by the Python decoder as it is without this module. ``_verify`` is built by
``pip install`` when a compiler, Python's headers and ``xxhash.h`` are there (as ``make
install`` has them); without it, or with ``REPLICATOR_PURE_PYTHON=1`` in the environment
(for a comparison or a suspicion, as for the NBD shim's batch path), ``verified_prefix``
is None and the Python decoder checks every record.
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


def _load() -> Callable[[bytes | bytearray | memoryview], int] | None:
    if pure_python():
        return None
    try:
        from replicator.journal._verify import verified_prefix
    except ImportError:  # optional: built by pip when it can be
        return None
    return verified_prefix


verified_prefix = _load()
