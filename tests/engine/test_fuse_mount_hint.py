"""A refused FUSE mount names what to do: libfuse's own reason goes to stderr, outside the log."""

from __future__ import annotations

from pathlib import Path

from replicator.engine.fuse.capture import mount_failure_hint


def _device(tmp_path: Path) -> str:
    device = tmp_path / "fuse"
    device.write_bytes(b"")
    return str(device)


def test_a_device_this_user_cannot_open(tmp_path: Path) -> None:
    hint = mount_failure_hint(allow_other=True, device=str(tmp_path / "absent"), root=False)
    assert hint.startswith(f"this user cannot open {tmp_path / 'absent'}: run as root")


def test_allow_other_as_a_user_needs_user_allow_other(tmp_path: Path) -> None:
    conf = tmp_path / "fuse.conf"
    conf.write_text("# user_allow_other\nmount_max = 1000\n")
    for fuse_conf in (str(conf), str(tmp_path / "no-such.conf")):
        hint = mount_failure_hint(
            allow_other=True, device=_device(tmp_path), fuse_conf=fuse_conf, root=False
        )
        assert f"'user_allow_other' in {fuse_conf}; or run as root" in hint


def test_no_such_hint_where_it_would_not_help(tmp_path: Path) -> None:
    conf = tmp_path / "fuse.conf"
    conf.write_text("user_allow_other  # for the VM's user\n")
    generic = "check that fuse3 is installed (fusermount3) and the mount point is an empty folder"
    for allow_other, fuse_conf, root in (
        (True, str(conf), False),  # the line is there
        (False, str(tmp_path / "none"), False),  # no allow_other asked for
        (True, str(tmp_path / "none"), True),  # root may use allow_other anyway
    ):
        hint = mount_failure_hint(
            allow_other=allow_other, device=_device(tmp_path), fuse_conf=fuse_conf, root=root
        )
        assert hint == generic
