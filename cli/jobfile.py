"""Job files (``send --job-file``) and receive configs (``receive --config``): read, check,
and turn into the option values a command would get from its command line.

The keys a file may hold are not listed here: they are read from the click command's own
parameters (an option's long name without the dashes, dashes as underscores), so a new
option gets a key without any change to this module. Values are checked against TOML's
types strictly (a flag wants ``true``/``false``, a number a TOML number, a path a string),
then through the option's own conversion (choices, minimums), so a file cannot hold what
the command line would refuse. Paths are relative to the file's folder.

``tomllib`` gives line and column for syntax errors only; the lines of keys and tables come
from a small scan of the text (``key_lines``) that parses each header and each key with
``tomllib`` itself, so quoting and dotted keys are understood.

Schema: docs/JOBFILES.md (and docs/DISCOVERY.md, which writes send job files).
"""

from __future__ import annotations

import difflib
import inspect
import re
import tomllib
import types
import typing
from collections.abc import Set
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Literal

import typer
from typer.core import TyperArgument, TyperCommand, TyperOption

from replicator.engine.errors import ConfigError
from replicator.engine.names import check_job_name

Kind = Literal["send", "receive"]
JOBS = "jobs"
# send: `files` are more VOLUMEs (the configuration files), listed after `volumes`
SEND_ALIASES = {"files": "volumes"}
_SYNTAX_AT = re.compile(r"\s*\(at line (\d+), column (\d+)\)$|\s*\(at end of document\)$")
KeyPath = tuple[str, ...]


def located(path: Path, line: int | None, message: str, hint: str | None = None) -> ConfigError:
    """A ConfigError that starts with ``FILE:LINE:`` (or ``FILE:`` when the line is unknown)."""
    where = f"{path}:{line}" if line else str(path)
    return ConfigError(f"{where}: {message}", hint=hint)


@dataclass(frozen=True, slots=True)
class KeySpec:
    """One key a file may hold: the command's parameter it sets and what it accepts."""

    key: str
    param: TyperOption | TyperArgument
    annotation: Any  # the command function's type for it, ``X | None`` as ``X``

    @property
    def is_list(self) -> bool:
        return typing.get_origin(self.annotation) is list

    @property
    def element(self) -> Any:
        """The type of one value (a list's element type for a list)."""
        if self.is_list:
            (arg,) = typing.get_args(self.annotation) or (str,)
            return arg
        return self.annotation

    @property
    def is_path(self) -> bool:
        return isinstance(self.element, type) and issubclass(self.element, Path)

    @property
    def required(self) -> bool:
        return bool(self.param.required)

    @property
    def option(self) -> str:
        """How the command line spells it: --to, or VOLUMES for an argument."""
        if isinstance(self.param, TyperOption):
            return _long_opt(self.param)
        return (self.param.name or self.key).upper()

    def describe(self) -> str:
        """What TOML value the key wants, in words."""
        if self.is_list:
            return "an array of strings"
        element = self.element
        if element is bool:
            return "true or false"
        if element is int:
            return "an integer"
        if element is float:
            return "a number"
        if isinstance(element, type) and issubclass(element, Enum):
            return "one of " + ", ".join(repr(str(m.value)) for m in element)
        return "a string"


def _without_none(annotation: Any) -> Any:
    """``X`` for ``X | None`` (an option that may be left out), else ``annotation``."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        kinds = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if len(kinds) == 1:
            return kinds[0]
    return annotation


def _long_opt(param: TyperOption) -> str:
    longs = [o for o in param.opts if o.startswith("--")]
    return max(longs, key=len) if longs else param.opts[0]


def keys_of(command: TyperCommand, *, skip: set[str]) -> dict[str, KeySpec]:
    """The file keys of ``command``: one per option (long name, dashes as underscores) and
    argument (its name), except the parameters named in ``skip``."""
    keys: dict[str, KeySpec] = {}
    hints = typing.get_type_hints(inspect.unwrap(command.callback)) if command.callback else {}
    for param in command.params:
        if param.name is None or param.name in skip:
            continue
        if isinstance(param, TyperOption):
            key = _long_opt(param).lstrip("-").replace("-", "_")
        elif isinstance(param, TyperArgument):
            key = param.name
        else:  # pragma: no cover - typer builds only these two
            continue
        keys[key] = KeySpec(key, param, _without_none(hints.get(param.name, str)))
    return keys


def key_lines(text: str) -> dict[KeyPath, int]:
    """The line of each table header and ``key =`` in ``text``, by full key path.

    A heuristic scan, not a parser: it reads each line that looks like a header or a key
    with ``tomllib`` and skips what it cannot read (array items, multi-line strings).
    """
    lines: dict[KeyPath, int] = {}
    table: KeyPath = ()
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("["):
            header = _single_path(stripped)
            if header is not None:
                table = header
                lines.setdefault(table, number)
            continue
        before, sep, _ = line.partition("=")
        if not sep or not before.strip() or before.lstrip().startswith("#"):
            continue
        key = _single_path(f"{before.strip()} = 0")
        if key is not None:
            lines.setdefault((*table, *key), number)
    return lines


def first_line(lines: dict[KeyPath, int], prefix: KeyPath) -> int | None:
    """The first line of a key or table under ``prefix`` (``[jobs.a]`` for ``jobs``)."""
    found = [line for path, line in lines.items() if path[: len(prefix)] == prefix]
    return min(found) if found else None


def _single_path(document: str) -> KeyPath | None:
    """The key path of a one-line TOML document holding one header or one key."""
    try:
        value: Any = tomllib.loads(document)
    except tomllib.TOMLDecodeError:
        return None
    path: list[str] = []
    while isinstance(value, dict) and len(value) == 1:
        (name, value), *_ = value.items()
        path.append(name)
        if isinstance(value, list) and value and isinstance(value[-1], dict):
            value = value[-1]  # [[array.of.tables]]
    return tuple(path) or None


@dataclass(slots=True)
class Section:
    """One job of a send job file, or a whole receive config: option values keyed by the
    command's parameter names, as click's ``default_map`` takes them."""

    name: str
    line: int | None  # its table header's (None for a receive config's top level)
    values: dict[str, Any] = field(default_factory=dict)
    lines: dict[str, int | None] = field(default_factory=dict)  # parameter name -> key's line
    keys: dict[str, str] = field(default_factory=dict)  # parameter name -> key (`dir`)
    # (parameter name, item of its list) -> the key and line that gave it (`files`, 5)
    items: dict[tuple[str, str], tuple[str, int | None]] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"[jobs.{_toml_key(self.name)}]" if self.line is not None else "the top level"


@dataclass(slots=True)
class ConfigFile:
    path: Path
    kind: Kind
    sections: dict[str, Section]  # send: jobs in file order; receive: one, named ""


def _toml_key(name: str) -> str:
    return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else f'"{name}"'


def read_toml(path: Path) -> tuple[str, dict[str, Any]]:
    """The text and the TOML document of ``path``; ConfigError naming the file, the line
    and the column when it cannot be read or is not TOML."""
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist", hint="check the path") from None
    except IsADirectoryError:
        raise ConfigError(f"{path} is a folder, not a TOML file") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise located(path, line, "not UTF-8 text: TOML files are UTF-8") from None
    try:
        return text, tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        at = _SYNTAX_AT.search(message)
        if at is None or at.group(1) is None:
            raise located(path, None, f"not valid TOML: {_SYNTAX_AT.sub('', message)}") from None
        number, column = int(at.group(1)), int(at.group(2))
        source = text.splitlines()[number - 1] if number <= len(text.splitlines()) else ""
        raise ConfigError(
            f"{path}:{number}:{column}: not valid TOML: {message[: at.start()]}: "
            f"{source.strip()!r}",
            hint="see docs/JOBFILES.md for the format",
        ) from None


class _Reader:
    """Checks one file's sections against a command's keys."""

    def __init__(
        self,
        path: Path,
        text: str,
        command: TyperCommand,
        keys: dict[str, KeySpec],
        aliases: dict[str, str],
        what: str,
    ) -> None:
        self.path = path
        self.folder = path.absolute().parent
        self.lines = key_lines(text)
        self.command = command
        self.keys = keys
        self.aliases = aliases
        self.what = what  # "a `replicator send` option": what an unknown key is not
        self.context = typer.Context(command, info_name=command.name)

    def section(self, name: str, table: KeyPath, values: dict[str, Any]) -> Section:
        section = Section(name, self.lines.get(table) if table else None)
        for key, value in values.items():
            line = self.lines.get((*table, key), section.line)
            spec = self.keys.get(self.aliases.get(key, key))
            if spec is None:
                raise self.unknown(key, line, section)
            checked = self.value(spec, key, value, line, section)
            param_name = spec.param.name or key
            if spec.is_list:
                for item in checked:
                    section.items.setdefault((param_name, str(item)), (key, line))
            if key in self.aliases:  # `files` follow `volumes`
                section.values[param_name] = [*section.values.get(param_name, []), *checked]
            elif param_name in section.values:  # `files` came first
                section.values[param_name] = [*checked, *section.values[param_name]]
            else:
                section.values[param_name] = checked
            section.lines.setdefault(param_name, line)
            section.keys.setdefault(param_name, spec.key)
        return section

    def unknown(self, key: str, line: int | None, section: Section) -> ConfigError:
        valid = sorted([*self.keys, *self.aliases])
        normal = key.lower().replace("-", "_")
        by_name = {spec.param.name: k for k, spec in self.keys.items()}  # `directory`: `dir`
        close = (
            [normal]
            if normal in valid
            else [by_name[normal]]
            if normal in by_name
            # 0.75: a typo of a key (`intervall`, `capure`), not any word sharing letters
            # with one (difflib's default 0.6 offered 'burst' for 'bogus')
            else difflib.get_close_matches(normal, valid, n=1, cutoff=0.75)
        )
        hint = f"did you mean {close[0]!r}?" if close else "valid keys: " + ", ".join(valid)
        return located(
            self.path, line, f"unknown key {key!r} in {section.label}: not {self.what}", hint
        )

    def value(self, spec: KeySpec, key: str, value: Any, line: int | None, section: Section) -> Any:
        """``value`` checked for TOML type and by the option itself; paths made absolute."""
        items = value if spec.is_list else [value]
        if spec.is_list and not isinstance(value, list):
            items = None
        if items is None or not all(_fits(spec.element, item) for item in items):
            raise located(
                self.path,
                line,
                f"key {key!r} in {section.label} wants {spec.describe()}, "
                f"got {_toml_type(value)} {_short(value)}",
                hint=f"the same as {spec.option} on the command line",
            )
        if spec.is_path:
            # "~" is the home folder, as on a command line (an absolute path, so not
            # joined to the file's folder): "/etc/replicator/~/keys" was never meant
            items = [str(self.folder / Path(item).expanduser()) for item in items]
        result: Any = items if spec.is_list else items[0]
        try:
            if items:  # an empty list is checked with the whole section (`require`)
                spec.param.process_value(self.context, result)
        except typer.BadParameter as exc:
            message = str(exc.message).removeprefix("Value error, ")
            raise located(self.path, line, f"key {key!r} in {section.label}: {message}") from None
        return result

    def require(self, section: Section, given: Set[str] | None) -> None:
        """Every required option is in the section or in ``given`` (the command line;
        None: there is none, the file is checked alone, as check-config does)."""
        for spec in self.keys.values():
            name = spec.param.name or spec.key
            if (
                spec.required
                and section.values.get(name) in (None, [])
                and name not in (given or ())
            ):
                keys = " or ".join(
                    [repr(spec.key), *(repr(a) for a, t in self.aliases.items() if t == spec.key)]
                )
                if given is None:  # check-config has no --to to give
                    elsewhere = (
                        f"; check-config reads the file alone: the command that runs it can "
                        f"give {spec.option} on its command line instead"
                    )
                else:
                    elsewhere = f", or give {spec.option} on the command line"
                raise located(
                    self.path,
                    section.line,
                    f"{section.label} has no {keys}",
                    hint=f"add {spec.key} = ... ({spec.describe()}){elsewhere}",
                )


def _fits(expected: Any, value: Any) -> bool:
    if expected is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if expected is int:
        return isinstance(value, int)
    if expected is float:
        return isinstance(value, int | float)
    return isinstance(value, str)


def _toml_type(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
    names |= {list: "an array", dict: "a table"}
    return next((n for t, n in names.items() if isinstance(value, t)), "a date or time")


def _short(value: Any) -> str:
    if isinstance(value, dict):
        return ""
    text = str(value).lower() if isinstance(value, bool) else repr(value)
    return f"({text[:60]}{'...' if len(text) > 60 else ''})"


def _send_reader(path: Path, text: str, command: TyperCommand) -> _Reader:
    keys = keys_of(command, skip={"job_file", "job"})
    return _Reader(path, text, command, keys, SEND_ALIASES, "a `replicator send` option")


def load_send(path: Path, command: TyperCommand, given: Set[str] | None = None) -> ConfigFile:
    """A send job file, every job checked; ``given``: parameters the command line sets
    (None: the file alone, check-config)."""
    text, document = read_toml(path)
    reader = _send_reader(path, text, command)
    lines = reader.lines
    for key in document:
        if key != JOBS:
            raise located(
                path,
                first_line(lines, (key,)),
                f"unknown key {key!r} at the top level: a job file holds only [jobs.NAME] tables",
                hint="put each job's options under its own [jobs.NAME] header",
            )
    jobs = document.get(JOBS)
    if not isinstance(jobs, dict) or not jobs:
        raise located(
            path,
            first_line(lines, (JOBS,)),
            "no jobs: a job file holds one [jobs.NAME] table per job",
            hint="`replicator discover PATH --out FILE` writes one; see docs/JOBFILES.md",
        )
    sections: dict[str, Section] = {}
    for name, table in jobs.items():
        header = lines.get((JOBS, name))
        if not isinstance(table, dict):
            raise located(path, header, f"jobs.{_toml_key(name)} must be a table ([jobs.NAME])")
        try:
            check_job_name(name)
        except ConfigError as exc:
            raise located(path, header, exc.message, exc.hint) from None
        section = reader.section(name, (JOBS, name), table)
        reader.require(section, given)
        sections[name] = section
    return ConfigFile(path, "send", sections)


def load_receive(
    path: Path,
    command: TyperCommand,
    given: Set[str] | None = None,
) -> ConfigFile:
    """A receive config: the top level holds ``receive`` options (``given`` as for
    ``load_send``)."""
    text, document = read_toml(path)
    keys = keys_of(command, skip={"config_file"})
    reader = _Reader(path, text, command, keys, {}, "a `replicator receive` option")
    if JOBS in document:
        raise located(
            path,
            first_line(reader.lines, (JOBS,)),
            "this is a send job file ([jobs.NAME] tables), not a receive config",
            hint="give it to `replicator send --job-file`; a receive config holds "
            "`receive` options at the top level",
        )
    for key, value in document.items():  # `[job.web01]`: a typo of a send job file's tables
        if isinstance(value, dict) and difflib.get_close_matches(key.lower(), [JOBS], cutoff=0.7):
            raise located(
                path,
                first_line(reader.lines, (key,)),
                f"unknown table [{key}...]: did you mean [jobs.NAME]?",
                hint="a send job file holds one [jobs.NAME] table per job; a receive config "
                "holds `receive` options at the top level",
            )
    section = reader.section("", (), document)
    reader.require(section, given)
    return ConfigFile(path, "receive", {"": section})


def kind_of(path: Path) -> Kind:
    """``send`` when the file holds ``[jobs...]`` tables, else ``receive``."""
    _, document = read_toml(path)
    return "send" if JOBS in document else "receive"
