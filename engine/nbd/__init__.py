"""NBD capture: serve volumes over NBD and journal every write before acknowledging it.

``proto`` is the sans-IO protocol codec, ``server`` the asyncio adapter, ``backend``
the exports (``JournaledFileExport``) and ``images`` the disk-image header probing
that sizes growable images. See ``docs/NBD.md``.
"""

from __future__ import annotations

from replicator.engine.nbd.backend import Export, JournaledFileExport, NbdIOError
from replicator.engine.nbd.images import ImageError, ImageFormat, ImageInfo, probe_path
from replicator.engine.nbd.server import NbdServer

__all__ = [
    "Export",
    "ImageError",
    "ImageFormat",
    "ImageInfo",
    "JournaledFileExport",
    "NbdIOError",
    "NbdServer",
    "probe_path",
]
