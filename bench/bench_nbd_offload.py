"""Would the NBD shim gain from writing the image on another thread? Measured without a journal.

At 4 KiB the image's ``pwrite`` is most of the loop thread's time in our NBD server (see
bench/RESULTS.md, "2026-12-02, evening"), and nbdkit makes the same call on 16 threads.
Taking it off the loop would leave the loop more time for the journal, if the hand-off cost
less than the write. This measures that on the server with no journal (``bench_nbd``'s
``PlainFileExport``), the most a journaling shim could gain: the same fio job against the
write made on the loop (as the shim does) and against the writes of each loop iteration
handed, as one batch, to one writer thread (FIFO, so they land in order), the request
answered when its batch is written. Rounds interleaved, the page cache dropped before each.

Run: ``.venv/bin/python bench/bench_nbd_offload.py [--runtime 10] [--size-mib 512]
[--repeat 3]``.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import os
import shutil
import statistics
import tempfile
from pathlib import Path

import uvloop
from bench_nbd import MiB, PlainFileExport, fio, plain_python, serving, settle

from replicator.engine.volumes import pwrite_all

JOB = ["--rw=randwrite", "--bs=4k", "--iodepth=16"]


class BatchedWriteExport(PlainFileExport):
    """``PlainFileExport`` whose writes go to one thread, a loop iteration's at a time."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._writer = concurrent.futures.ThreadPoolExecutor(1, "image-writer")
        self._batch: list[tuple[bytes | memoryview, int, asyncio.Future[None]]] = []

    async def write(self, offset: int, data: bytes | memoryview, *, fua: bool) -> None:
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        if not self._batch:
            loop.call_soon(self._hand_off)
        self._batch.append((data, offset, done))
        await done
        if fua:
            await self.flush()

    def _hand_off(self) -> None:
        batch, self._batch = self._batch, []
        fd = self._fd

        def write_all() -> None:
            for data, offset, _ in batch:
                pwrite_all(fd, data, offset)

        def wake(written: asyncio.Future[None]) -> None:
            error = written.exception()
            for _, _, done in batch:
                if error is None:
                    done.set_result(None)
                else:
                    done.set_exception(error)

        asyncio.get_running_loop().run_in_executor(self._writer, write_all).add_done_callback(wake)

    async def aclose(self) -> None:
        self._writer.shutdown(wait=True)
        await super().aclose()


def batched(image: Path, sock: str) -> contextlib.AbstractAsyncContextManager[str]:
    return serving(BatchedWriteExport(image), sock)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime", type=int, default=10, help="seconds per fio run")
    parser.add_argument("--size-mib", type=int, default=512, help="size of the test file")
    parser.add_argument("--repeat", type=int, default=3, help="rounds, interleaved")
    opts = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-nbd-offload-"))
    try:
        image = work / "disk.img"
        with image.open("wb") as f:  # fully allocated, as in bench_nbd
            block = os.urandom(MiB)
            for _ in range(opts.size_mib):
                f.write(block)
        sock = str(work / "nbd.sock")
        runs: dict[str, list[float]] = {"on the loop": [], "batches on a thread": []}
        for _ in range(opts.repeat):
            for name, serve in (("on the loop", plain_python), ("batches on a thread", batched)):
                await asyncio.to_thread(settle, image)
                async with serve(image, sock) as uri:
                    result = await fio(uri, JOB, opts.runtime, opts.size_mib * MiB)
                runs[name].append(result["iops"])
        loop_iops = statistics.median(runs["on the loop"])
        for name, values in runs.items():
            each = ", ".join(f"{v:,.0f}" for v in values)
            median = statistics.median(values)
            print(
                f"4 KiB random writes QD16, no journal, image write {name:<20}"
                f" {median:>9,.0f} IOPS (median; {each}) {median / loop_iops:.2f}x"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    uvloop.run(main())
