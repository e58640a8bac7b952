from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from replicator.engine.errors import ConfigError
from replicator.engine.names import (
    check_job_name,
    check_volume_name,
    path_problem,
    printable,
    shell_quote,
    volume_name_problem,
)
from replicator.engine.tree import walk
from replicator.transport.messages import TreeEntry, VolumeInfo


@pytest.mark.parametrize("job", ["vm1", "web-01", "db_2.prod", "A" * 64])
def test_valid_job_names(job: str) -> None:
    assert check_job_name(job) == job


@pytest.mark.parametrize(
    "job", ["", "..", "../etc", "a/b", ".hidden", "a..b", "x" * 65, "sp ace", "nul\0", "-lead"]
)
def test_invalid_job_names(job: str) -> None:
    with pytest.raises(ConfigError, match="invalid job name"):
        check_job_name(job)


@pytest.mark.parametrize("job", ["control.sock", "Control.Sock", "CONTROL.SOCK"])
def test_a_file_the_receiver_keeps_is_no_job_name_in_any_case(job: str) -> None:
    with pytest.raises(ConfigError, match="receiver keeps a file of that name"):
        check_job_name(job)


@pytest.mark.parametrize("name", ["", ".", "..", "../x", "a/b", ".lock", "a\\b", "x\0", "\n"])
def test_invalid_volume_names(name: str) -> None:
    assert volume_name_problem(name) is not None
    with pytest.raises(ConfigError):
        check_volume_name(name)


def test_a_backslash_is_named_as_such_not_as_an_absolute_path() -> None:
    """'a\\b.img' read "is not relative", which sent an operator looking for a slash."""
    assert path_problem("a\\b.img") == (
        "path 'a\\\\b.img' contains a backslash (a path separator on Windows hosts)"
    )
    assert path_problem("/a.img") == "path '/a.img' is not relative"


@given(st.text(min_size=1, max_size=80))
def test_accepted_volume_names_stay_inside_their_folder(name: str) -> None:
    if volume_name_problem(name) is None:
        assert "/" not in name and not name.startswith(".") and "\0" not in name


def test_names_that_are_not_utf8_are_refused_not_a_crash(tmp_path: Path) -> None:
    undecodable = os.fsdecode(b"disk\xff.img")  # how Python names such a file
    assert "not valid UTF-8" in (path_problem(undecodable) or "")
    assert "not valid UTF-8" in (volume_name_problem(undecodable) or "")
    (tmp_path / "vm").mkdir()
    with open(os.fsencode(tmp_path / "vm") + b"/disk\xff.img", "wb"):
        pass
    with pytest.raises(ConfigError, match="not valid UTF-8"):
        walk(tmp_path / "vm")


def test_a_name_that_is_not_utf8_is_shown_as_ls_b_shows_it() -> None:
    """Not as Python holds it ('\\udcff'): nobody can type that to rename the file."""
    undecodable = os.fsdecode(b"disk\xff.img")
    assert path_problem(undecodable) == "path 'disk\\xff.img' is not valid UTF-8"
    assert printable(undecodable) == "disk\\xff.img"
    assert printable("caf\u00e9") == "caf\u00e9"  # valid UTF-8 stays as it is
    assert printable("x\ud800") == "x\\ud800"  # a surrogate no file name decodes to


@given(st.text(min_size=1, max_size=80))
def test_every_name_accepted_is_one_the_protocol_carries(name: str) -> None:
    """A volume named 'vm\u00a0disk.img' (a no-break space, as a copy from a web page
    brings) passed the name check and stopped the sender at its handshake with exit 70,
    "a bug in replicator": the protocol refuses what str.isprintable refuses, ' ' aside."""
    if volume_name_problem(name) is None:
        VolumeInfo(name, 0, "disk")
    if path_problem(name) is None:
        TreeEntry(name, "f", 0o644, "")


@pytest.mark.parametrize(
    ("name", "shown"),
    [
        ("vm\u00a0disk.img", "U+00A0 (no-break space)"),
        ("zw\u200bsp.log", "U+200B (zero width space)"),
        ("csi\u009b31m.img", "U+009B (category Cc)"),
        ("del\x7f.img", "U+007F (category Cc)"),
        ("line\u2028sep.img", "U+2028 (line separator)"),
    ],
)
def test_an_invisible_character_is_refused_and_named(tmp_path: Path, name: str, shown: str) -> None:
    problem = volume_name_problem(name)
    assert problem is not None and shown in problem
    assert all(ch.isprintable() for ch in problem)  # safe to print on a terminal
    (tmp_path / "vm" / "sub").mkdir(parents=True)
    (tmp_path / "vm" / "sub" / name).write_bytes(b"x")
    with pytest.raises(ConfigError, match=re.escape(shown)):
        walk(tmp_path / "vm")  # a FUSE capture's folder: refused at start, named


@pytest.mark.parametrize(
    "name", ["vm disk.img", "-dash.img", "caf\u00e9 $x 'q'.qcow2", "\u4e2d.vhdx"]
)
def test_spaces_quotes_dollars_dashes_and_letters_of_any_script_stay_valid(name: str) -> None:
    assert volume_name_problem(name) is None


@pytest.mark.parametrize(
    "path",
    ["/vm/a b.xml", "/vm/it's $HOME.xml", "/r\x1b[7mI\nx/it's.xml", "/d\udcff/x", "/é/\\x"],
)
def test_a_path_in_a_command_to_copy_is_one_line_and_what_bash_reads_back(path: str) -> None:
    """failover's `next: virsh define PATH`: shlex.quote kept a newline or an escape
    sequence as it was, inside '...' (the line split, the terminal obeyed it)."""
    quoted = shell_quote(path)
    assert quoted.isprintable()
    out = subprocess.run(["bash", "-c", f"printf %s {quoted}"], capture_output=True, check=True)
    assert out.stdout == os.fsencode(path)
