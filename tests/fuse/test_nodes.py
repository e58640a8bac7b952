from __future__ import annotations

from replicator.engine.fuse.nodes import ROOT_INO, NodeTable


def test_lookup_gives_one_node_per_path_and_counts() -> None:
    t = NodeTable()
    a = t.lookup("a")
    assert t.lookup("a") is a and a.lookups == 2
    assert a.ino != ROOT_INO
    t.forget(a.ino, 2)
    assert t.at("a") is None and len(t) == 1


def test_open_handle_keeps_a_forgotten_node() -> None:
    t = NodeTable()
    a = t.lookup("a")
    t.opened(a, 7)
    t.forget(a.ino, 1)
    assert t.get(a.ino) is a
    t.closed(a, 7)
    assert t.at("a") is None


def test_rename_moves_descendants_and_detaches_the_target() -> None:
    t = NodeTable()
    d, f, deep = t.lookup("d"), t.lookup("d/f"), t.lookup("d/e/g")
    other = t.lookup("x")
    t.opened(other, 3)
    t.moved("d", "x")
    assert (d.path, f.path, deep.path) == ("x", "x/f", "x/e/g")
    assert other.path is None  # replaced: writes through its handle are not journaled
    assert t.at("x") is d and t.at("d/f") is None
    assert t.get(other.ino) is other


def test_similar_prefix_is_not_a_descendant() -> None:
    t = NodeTable()
    ab = t.lookup("ab")
    t.lookup("a")
    t.moved("a", "c")
    assert ab.path == "ab"


def test_removed_detaches() -> None:
    t = NodeTable()
    f = t.lookup("d/f")
    t.removed("d/f")
    assert f.path is None and t.at("d/f") is None
    assert t.lookup("d/f") is not f
