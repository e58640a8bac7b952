"""Hypothesis strategies for the journal's tests (apart from ``helpers``, which the crash
test's child processes import: they need no hypothesis)."""

from __future__ import annotations

from hypothesis import strategies as st

from replicator.journal import Record

_VOLUMES = st.sampled_from(["d.img", "vm/disk.qcow2", "é.vhdx"])
_OFFSETS = st.integers(0, 2**40)
RECORDS = st.one_of(
    st.builds(Record.write, _VOLUMES, _OFFSETS, st.binary(min_size=1, max_size=9000)),
    st.builds(Record.zero, _VOLUMES, _OFFSETS, st.integers(1, 2**30)),
    st.builds(Record.trim, _VOLUMES, _OFFSETS, st.integers(1, 2**30)),
    st.builds(Record.resize, _VOLUMES, _OFFSETS),
    st.builds(Record.file, _VOLUMES, st.binary(max_size=300)),
    st.builds(Record.rename, _VOLUMES, _VOLUMES),
    st.just(Record.flush()),
)
"""Records of every kind that names a volume (or none), as a packed run may hold them."""
