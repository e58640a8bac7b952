"""Journal tests log through structlog's defaults, whatever an earlier CLI test configured.

``configure_logging`` binds the logger factory to the ``sys.stderr`` object of the moment;
under CliRunner that stream is closed once the invocation ends.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import structlog


@pytest.fixture(autouse=True)
def _default_structlog() -> Iterator[None]:
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()
