"""The job-file reader on its own (cli/jobfile.py): keys derived from the commands, lines
found for keys, TOML types checked strictly, paths relative to the file."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.core import TyperCommand

from replicator.cli.commands import load
from replicator.cli.common import parse_endpoint
from replicator.cli.jobfile import key_lines, keys_of, load_receive, load_send
from replicator.cli.jobfile_checks import check_values
from replicator.cli.shaping_opts import make_shaping
from replicator.engine.errors import ConfigError


def _command(name: str) -> TyperCommand:
    command = load(name)
    assert isinstance(command, TyperCommand)
    return command


SEND, RECEIVE = _command("send"), _command("receive")


def test_every_option_of_send_and_receive_has_a_key() -> None:
    send_keys = keys_of(SEND, skip={"job_file", "job"})
    options = {
        max(p.opts, key=len).lstrip("-").replace("-", "_")
        for p in SEND.params
        if p.name not in ("job_file", "job")
    }
    assert set(send_keys) == options  # new options get keys without touching jobfile.py
    assert {"to", "tls_dir", "insecure", "capture", "volumes", "json", "state_dir"} <= options
    assert send_keys["json"].param.name == "as_json"
    receive_keys = keys_of(RECEIVE, skip={"config_file"})
    assert {"listen", "dir", "allow", "tls_dir", "insecure"} <= set(receive_keys)
    assert receive_keys["dir"].param.name == "directory"


def test_key_lines_follow_headers_quoted_and_dotted_keys() -> None:
    text = (
        "# comment = not a key\n"  # 1
        "[jobs.web01]\n"  # 2
        'to = "a:1"  # x = y\n'  # 3
        "volumes = [\n"  # 4
        '    "/a=b",\n'  # 5
        "]\n"  # 6
        '[jobs."db.prod"]\n'  # 7
        "  'state_dir' = 'x'\n"  # 8
        "[jobs]\n"  # 9
        'other.to = "b:2"\n'  # 10
    )
    lines = key_lines(text)
    assert lines[("jobs", "web01")] == 2
    assert lines[("jobs", "web01", "to")] == 3
    assert lines[("jobs", "web01", "volumes")] == 4
    assert lines[("jobs", "db.prod")] == 7
    assert lines[("jobs", "db.prod", "state_dir")] == 8
    assert lines[("jobs", "other", "to")] == 10
    assert not any(path[-1] in ("comment", '"/a') for path in lines)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "conf" / "job.toml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    return path


def test_values_become_defaults_with_paths_relative_to_the_file(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        '[jobs.vm1]\nfiles = ["vm1.xml"]\nto = "h:1"\ninterval = 5\n'
        'volumes = ["d/a.img", "/abs.img"]\n'
        'state_dir = "../state"\npre_hook = "sync"\ncapture = "NBD"\n',
    )
    config = load_send(path, SEND)
    values = config.sections["vm1"].values
    folder = path.parent.absolute()
    assert values["volumes"] == [f"{folder}/d/a.img", "/abs.img", f"{folder}/vm1.xml"]
    assert values["state_dir"] == f"{folder}/../state"
    assert values["pre_hook"] == "sync"  # a command, not a path
    assert values["interval"] == 5 and values["capture"] == "NBD"
    assert config.sections["vm1"].lines["interval"] == 4


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ("interval = true", "wants a number, got a boolean"),
        ("nbd_size = 1.5", "wants an integer, got a number"),
        ("once = 1", "wants true or false, got an integer"),
        ('files = ["a", 2]', "key 'files' in [jobs.vm1] wants an array of strings"),
        ("to = 2025-01-01", "wants a string, got a date or time"),
        ("to = { host = 'a' }", "wants a string, got a table"),
        ("capture = 'tape'", "'tape' is not one of"),
        ("nbd_size = 0", "not in the range x>=1"),
        ("state-dir = 'x'", "did you mean 'state_dir'"),
        ("as_json = true", "did you mean 'json'"),
        ("capure = 'nbd'", "did you mean 'capture'"),
        ("bogus = 1", "not a `replicator send` option (valid keys: "),  # not 'burst'
        # nan passes click's minimum (every comparison with it is false): exit 70 later
        ("interval = nan", "nan is not a number of seconds"),
        ("interval = inf", "inf is not a number of seconds"),
        ("hook_timeout = nan", "nan is not a number of seconds"),
        ("witness_interval = nan", "nan is not a number of seconds"),
        ("fence_after = inf", "inf is not a number of seconds"),
        ("wait_for_receiver = nan", "nan is not a number of seconds"),
    ],
)
def test_wrong_values_name_the_line_and_key(tmp_path: Path, line: str, words: str) -> None:
    to = "" if line.startswith("to ") else 'to = "h:1"\n'  # the line under test replaces it
    path = _write(tmp_path, f'[jobs.vm1]\n{to}volumes = ["a"]\n{line}\n')
    with pytest.raises(ConfigError) as caught:
        load_send(path, SEND)
    message = str(caught.value)
    assert message.startswith(f"{path}:"), message
    assert words in message, message
    assert f":{path.read_text().splitlines().index(line) + 1}:" in message, message


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ("", None, "no jobs"),
        ('to = "h:1"\n', 1, "unknown key 'to' at the top level"),
        ("[jobs]\nvm1 = 3\n", 2, "must be a table"),
        ('[jobs."a/b"]\nto = "h:1"\nvolumes = ["x"]\n', 1, "invalid job name 'a/b'"),
        ('[jobs.vm1]\nto = "h:1"\nvolumes = []\nfiles = []\n', 1, "has no 'volumes' or 'files'"),
        ("[jobs.vm1]\nvolumes = ['x']\n", 1, "has no 'to'"),
        ('[jobs.vm1]\nto = "h:1\n', 2, "not valid TOML"),
    ],
)
def test_bad_job_files(tmp_path: Path, text: str, line: int | None, words: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_send(path, SEND)
    message = str(caught.value)
    assert message.startswith(f"{path}:{line}:" if line else f"{path}:"), message
    assert words in message, message


def test_the_command_line_fills_in_required_keys(tmp_path: Path) -> None:
    path = _write(tmp_path, "[jobs.vm1]\nvolumes = ['x']\n")
    assert load_send(path, SEND, given={"to"}).sections["vm1"].values == {
        "volumes": [f"{path.parent.absolute()}/x"]
    }


def test_a_receive_config_is_not_a_job_file(tmp_path: Path) -> None:
    path = _write(tmp_path, 'listen = "h:1"\ndir = "r"\nallow = ["a:*", "b:vm1"]\n')
    values = load_receive(path, RECEIVE).sections[""].values
    assert values == {
        "listen": "h:1",
        "directory": f"{path.parent.absolute()}/r",
        "allow": ["a:*", "b:vm1"],
    }
    with pytest.raises(ConfigError, match=r":1: this is a send job file"):
        load_receive(_write(tmp_path, "[jobs.vm1]\n"), RECEIVE)
    with pytest.raises(ConfigError, match=r":1: no jobs"):
        load_send(_write(tmp_path, "jobs = 3\n"), SEND)


def _examples() -> list[str]:
    text = (Path(__file__).resolve().parents[2] / "docs" / "JOBFILES.md").read_text()
    return re.findall(r"```toml\n(.*?)```", text, flags=re.S)


def test_the_examples_in_the_docs_are_valid(tmp_path: Path) -> None:
    send_example, receive_example = _examples()
    jobs = load_send(_write(tmp_path, send_example), SEND).sections
    assert list(jobs) == ["web01", "db01"]
    for job in jobs.values():  # the values the key checks cannot judge
        make_shaping(job.values.get("rate"), None, job.values.get("schedule"))
        parse_endpoint(job.values["to"], "to")
    assert jobs["db01"].values["capture"] == "nbd"
    config = load_receive(_write(tmp_path, receive_example), RECEIVE).sections[""]
    assert config.values["allow"] == ["sender:web01", "sender:db01"]


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ('to = "nowhere"', "key 'to': it wants HOST:PORT"),
        ('journal_max = "lots"', "key 'journal_max': journal_max wants a size"),
        ('schedule = "mon-fry 20Mbit"', "key 'schedule': "),
        ('metrics_listen = "9308"', "key 'metrics_listen': "),
    ],
)
def test_values_the_types_cannot_judge_are_checked_with_their_line(
    tmp_path: Path, line: str, words: str
) -> None:
    key = line.split()[0]
    to = "" if key == "to" else 'to = "h:1"\n'
    path = _write(tmp_path, f'[jobs.vm1]\nvolumes = ["a"]\n{to}{line}\n')
    config = load_send(path, SEND)
    check_values(config, config.sections["vm1"], skip={key})  # the command line gave it
    with pytest.raises(ConfigError) as caught:
        check_values(config, config.sections["vm1"])
    assert str(caught.value).startswith(f"{path}:{3 + (key != 'to')}: [jobs.vm1], {words}")
