from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.tools import ReceiverProc, receiver_fixture


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[ReceiverProc]:
    """A real `replicator receive` process on a free loopback port."""
    yield from receiver_fixture(tmp_path)
