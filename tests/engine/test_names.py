from __future__ import annotations

import os
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
    volume_name_problem,
)
from replicator.engine.tree import walk


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
