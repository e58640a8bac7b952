"""The synthetic disk image ``replicator bench`` replicates, and the change it then makes.

Deterministic (seeded), so two runs of a benchmark replicate the same bytes. The image is
written in 1 MiB blocks of one kind each:

* ``text``: English-like words (lz4 compresses it about 2.5x);
* ``bin``: machine-code-like bytes: short tokens drawn (Zipf-like) from a vocabulary,
  with random bytes between them, tuned so that lz4 compresses it about 1.7x, as it does
  the executables in /usr/bin;
* ``zero``: zeros (unallocated space in a VM disk);
* ``rand``: random bytes (compressed or encrypted data: incompressible).

``mixed`` is a shuffled quarter of each, ``random``/``zeros``/``text`` all one kind.

The change rewrites whole 64 KiB extents chosen at random, each with new data of a kind the
mix draws (a zero extent is rewritten with mostly zeros and a stamp per 4 KiB, so every
chosen extent really changes).
"""

from __future__ import annotations

import itertools
import random
from enum import StrEnum
from pathlib import Path

import blake3

__all__ = ["BLOCK", "CHANGE_EXTENT", "Mix", "blake3_file", "change_image", "write_image"]

BLOCK = 1024 * 1024
CHANGE_EXTENT = 64 * 1024
_STAMP_EVERY = 4096
_HASH_CHUNK = 4 * 1024 * 1024
_WORDS = (
    b"the replica journal extent epoch barrier volume sector write order durable applied "
    b"receiver sender link window credit record manifest snapshot boot config disk image "
    b"guest kernel module service network storage backup restore failover primary standby"
).split()


class Mix(StrEnum):
    mixed = "mixed"
    random = "random"
    zeros = "zeros"
    text = "text"


_KINDS = {
    Mix.mixed: ("text", "bin", "zero", "rand"),
    Mix.random: ("rand",),
    Mix.zeros: ("zero",),
    Mix.text: ("text",),
}


class _Blocks:
    """Makes 1 MiB blocks of each kind from one seeded generator."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        words = rng.choices(_WORDS, k=BLOCK // 5)
        self.text = b" ".join(words)[:BLOCK].ljust(BLOCK, b".")
        vocabulary = [rng.randbytes(rng.randint(2, 24)) for _ in range(4096)]
        weights = list(itertools.accumulate(1.0 / (rank + 1) for rank in range(4096)))  # Zipf
        bases = []
        for _ in range(4):
            parts: list[bytes] = []
            size = 0
            while size < BLOCK:
                tokens = rng.choices(vocabulary, cum_weights=weights, k=16)
                part = b"".join(tokens) + rng.randbytes(32)
                parts.append(part)
                size += len(part)
            bases.append(b"".join(parts)[:BLOCK])
        self.bins = bases

    def block(self, kind: str, index: int) -> bytes:
        if kind == "zero":
            return bytes(BLOCK)
        if kind == "rand":
            return self.rng.randbytes(BLOCK)
        if kind == "text":
            shift = (index * 997) % BLOCK
            return self.text[shift:] + self.text[:shift]
        base = self.bins[index % len(self.bins)]
        shift = (index * 4099) % BLOCK
        return base[shift:] + base[:shift]


def write_image(path: Path, size: int, mix: Mix, seed: int = 7) -> None:
    """Write ``size`` bytes of ``mix`` data to ``path`` (replacing it)."""
    rng = random.Random(seed)
    blocks = _Blocks(rng)
    kinds = list(_KINDS[mix])
    count = -(-size // BLOCK)
    plan = (kinds * (count // len(kinds) + 1))[:count]
    rng.shuffle(plan)
    with path.open("wb") as f:
        for index, kind in enumerate(plan):
            block = blocks.block(kind, index)
            f.write(block[: min(BLOCK, size - index * BLOCK)])


def change_image(path: Path, fraction: float, mix: Mix, seed: int = 11) -> int:
    """Rewrite ``fraction`` of ``path`` in random 64 KiB extents; the bytes rewritten."""
    rng = random.Random(seed)
    blocks = _Blocks(rng)
    size = path.stat().st_size
    extents = max(1, size // CHANGE_EXTENT)
    count = min(extents, max(1, round(size * fraction / CHANGE_EXTENT)))
    chosen = sorted(rng.sample(range(extents), count))
    kinds = _KINDS[mix]
    written = 0
    with path.open("r+b") as f:
        for n, extent in enumerate(chosen):
            kind = rng.choice(kinds)
            offset = extent * CHANGE_EXTENT
            length = min(CHANGE_EXTENT, size - offset)
            start = rng.randrange(BLOCK - CHANGE_EXTENT)
            data = bytearray(blocks.block(kind, n)[start : start + length])
            for at in range(0, length, _STAMP_EVERY):  # a change even where data repeats
                stamp = f"bench:{seed}:{n}:{at}".encode()[: length - at]
                data[at : at + len(stamp)] = stamp
            f.seek(offset)
            f.write(data)
            written += length
    return written


def blake3_file(path: Path) -> str:
    """The blake3 hex digest of a file's contents."""
    hasher = blake3.blake3()
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            hasher.update(chunk)
    digest: str = hasher.hexdigest()
    return digest
