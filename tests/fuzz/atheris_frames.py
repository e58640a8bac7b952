"""Coverage-guided fuzzing (atheris, i.e. libFuzzer for Python) of the frame decoder, a
ProtocolConnection in both roles, and the NBD codec, with the checks of the hypothesis
fuzzers in this package. Not collected by pytest; run it by hand::

    .venv/bin/pip install atheris      # a manylinux wheel: no compiler needed
    .venv/bin/python -m tests.fuzz.atheris_frames -runs=100000 [CORPUS_DIR ...] [-flags]

Input layout: byte 0 picks the target (0 decoder, 1 receiver, 2 sender, 3 NBD codec),
byte 1 seeds how the rest is split into reads (and which input path each read takes),
the rest is the byte stream. Without a corpus directory on the command line, a
temporary one is seeded with valid frames, sessions and NBD handshakes, so mutation
starts from inputs that get past the first checks. A failing check or any exception is
a crash: libFuzzer prints it and saves the input as ``crash-*``; replay it with
``python -m tests.fuzz.atheris_frames crash-...``.
"""

from __future__ import annotations

import importlib
import os
import struct
import sys
import tempfile
from typing import Any

# Imported by main() inside atheris.instrument_imports(), so that the replicator
# modules get coverage instrumentation (and nothing else pays for it).
T: Any = None


def load() -> Any:
    """The fuzz targets and their helpers (imports replicator)."""
    from replicator.transport import ManifestRequest
    from tests.fuzz import streams, test_frames_fuzz, test_nbd_fuzz
    from tests.transport import helpers

    class Targets:
        frames = test_frames_fuzz
        nbd = test_nbd_fuzz
        h = helpers
        receiver = streams.Session(True, (helpers.HELLO,), 4 << 20)
        sender = streams.Session(
            False,
            (helpers.welcome(1 << 20),),
            1 << 20,
            (ManifestRequest(1, "disk.img", 4096, False), ManifestRequest(2, "b", 512, True)),
        )

    return Targets


MAX_FRAME = 1 << 20


def test_one_input(data: bytes) -> None:
    if len(data) < 2:
        return
    target, seed, stream = data[0] % 4, data[1], data[2:]
    if target == 0:
        whole = T.frames.decode_at_once(stream, MAX_FRAME)
        assert T.frames.decode_in_pieces(stream, MAX_FRAME, seed) == whole, "split-dependent"
    elif target in (1, 2):
        session = T.receiver if target == 1 else T.sender
        whole = T.frames.conn_outcome(session, stream, MAX_FRAME, None)
        assert T.frames.conn_outcome(session, stream, MAX_FRAME, seed) == whole, "split-dependent"
    else:
        T.nbd.handshake_then_requests(stream, seed)


def seeds() -> list[bytes]:
    """Valid inputs for every target."""
    from replicator.transport import (
        Ack,
        Credit,
        Error,
        Goodbye,
        Manifest,
        ManifestRequest,
        Ping,
        Pong,
        Refuse,
    )

    h, frame = T.h, T.frames.frame_bytes
    records = h.pack_records(1, [b"a" * 100, bytes(3000)])
    control = [Ping(1, 2), Pong(1, 2), Goodbye("bye"), Error("internal", "x"), Refuse("busy", "")]
    receiver_side = [h.HELLO, records, ManifestRequest(1, "disk.img", 4096, False), Ping(3, 4)]
    sender_side = [
        h.welcome(1 << 20),
        Credit(5000),
        Ack(0, 0),
        Manifest(1, "disk.img", True, 8192, 4096, 0, bytes(32), True),
        Manifest(2, "b", False, 0, 512, 0, b"", True),
        Goodbye("done"),
    ]
    request = struct.Struct(">IHHQQI")
    option, go = T.nbd.option, T.nbd.go
    nbd = (
        struct.pack(">I", 3)
        + option(3)
        + go(7, b"rw", (3,))
        + request.pack(0x25609513, 1, 1, 7, 512, 4)
        + b"data"
        + request.pack(0x25609513, 0, 4, 8, 0, 4096)
        + request.pack(0x25609513, 0, 2, 9, 0, 0)
    )
    return [
        b"\0\0" + b"".join(frame(m) for m in [*control, records]),
        b"\1\5" + b"".join(frame(m) for m in receiver_side),
        b"\2\7" + b"".join(frame(m) for m in sender_side),
        b"\3\3" + nbd,
        b"\3\0" + struct.pack(">I", 1) + option(1, b"ro") + request.pack(0x25609513, 0, 0, 1, 0, 9),
    ]


def main() -> None:
    try:
        atheris: Any = importlib.import_module("atheris")
    except ImportError:
        sys.exit("atheris is not installed: .venv/bin/pip install atheris")
    global T
    with atheris.instrument_imports(include=["replicator"]):
        T = load()
    argv = list(sys.argv)
    if not any(os.path.isdir(arg) or os.path.isfile(arg) for arg in argv[1:]):
        corpus = tempfile.mkdtemp(prefix="replicator-fuzz-corpus-")
        for i, seed in enumerate(seeds()):
            with open(os.path.join(corpus, f"seed-{i}"), "wb") as f:
                f.write(seed)
        argv.append(corpus)
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
