from __future__ import annotations

import pytest

from replicator.engine.units import human_size


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (None, "-"),
        (0, "0 B"),
        (406, "406 B"),
        (1023.6, "1024 B"),
        (1536, "1.5 KiB"),
        (1048576, "1.0 MiB"),
        (2 * 1024**4, "2.0 TiB"),
        (3 * 1024**6, "3072.0 PiB"),
    ],
)
def test_sizes_read_as_people_read_them(n: int | float | None, text: str) -> None:
    assert human_size(n) == text
