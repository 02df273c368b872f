"""A process's options, declared once: a frozen dataclass whose fields carry their flag (help,
parser, aliases). The command line's flags are generated from it (``add_flags``) and parse into
it (``from_args``); a value of it turns back into the flags that give it (``to_argv``), for a
launcher starting the process as a child; a value built in code is checked by the same parsers
(``check``). A parser is an argparse type: bad text raises ``argparse.ArgumentTypeError``, which
argparse reports as a usage error naming the flag (exit 2).
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import math
from collections.abc import Callable, Iterable
from typing import Any

from hybridiff.errors import InvalidArgument

_FLAG = "hybridiff.flag"


@dataclasses.dataclass(frozen=True)
class Flag:
    """How a field reads from and writes to the command line."""

    help: str
    parse: Callable[[str], Any] = str  # text -> value (an argparse type)
    text: Callable[[Any], str] = str  # value -> the text ``parse`` takes back
    names: tuple[str, ...] = ()  # the flag and its aliases (default: --field-name)
    choices: tuple[str, ...] | None = None
    metavar: str | None = None


class Options:
    """The base of an options dataclass: a value built in code is checked as its flags would be
    (``check``), so a launcher never starts a process with a value its command line refuses."""

    def __post_init__(self) -> None:
        check(self)


def option(
    default: Any,
    help: str,
    *,
    parse: Callable[[str], Any] = str,
    text: Callable[[Any], str] = str,
    names: tuple[str, ...] = (),
    choices: tuple[str, ...] | None = None,
    metavar: str | None = None,
) -> Any:
    """A dataclass field that is also a flag (see ``Flag``)."""
    flag = Flag(help, parse, text, names, choices, metavar)
    return dataclasses.field(default=default, metadata={_FLAG: flag})


def flag_names(f: dataclasses.Field) -> tuple[str, ...]:
    return f.metadata[_FLAG].names or ("--" + f.name.replace("_", "-"),)


def _fields(config_type: type, only: Iterable[str] | None = None) -> list[dataclasses.Field]:
    found = [f for f in dataclasses.fields(config_type) if _FLAG in f.metadata]
    if only is None:
        return found
    by_name = {f.name: f for f in found}
    return [by_name[name] for name in only]


def add_flags(parser: argparse.ArgumentParser, config_type: type, only: Iterable[str] | None = None) -> None:
    """The flags of ``config_type``'s fields (``only``: of these, in this order), in field order."""
    for f in _fields(config_type, only):
        flag: Flag = f.metadata[_FLAG]
        parser.add_argument(
            *flag_names(f),
            dest=f.name,
            default=f.default,
            type=flag.parse,
            choices=flag.choices,
            metavar=flag.metavar,
            help=flag.help,
        )


def from_args(config_type: type, args: argparse.Namespace, **replaced: Any) -> Any:
    """The ``config_type`` that parsed ``args`` hold (``replaced``: these fields instead)."""
    values = {f.name: getattr(args, f.name) for f in _fields(config_type)}
    return config_type(**(values | replaced))


def to_argv(config: Any) -> list[str]:
    """The flags that parse into ``config``: one for each field that differs from its default."""
    argv: list[str] = []
    for f in _fields(type(config)):
        value = getattr(config, f.name)
        if value == f.default:
            continue
        if value is None:
            raise InvalidArgument(f.name, "None has no flag: leave it out for the default")
        argv += [flag_names(f)[0], f.metadata[_FLAG].text(value)]
    return argv


def check(config: Any) -> None:
    """Each field's value as its flag would accept it (a config built in code, not parsed);
    ``InvalidArgument`` names the first that is not."""
    for f in _fields(type(config)):
        value, flag = getattr(config, f.name), f.metadata[_FLAG]
        if value is None or value == f.default:
            continue
        try:
            parsed = flag.parse(flag.text(value))
        except (argparse.ArgumentTypeError, ValueError, TypeError) as exc:
            raise InvalidArgument(flag_names(f)[0].lstrip("-"), str(exc)) from None
        if flag.choices is not None and parsed not in flag.choices:
            raise InvalidArgument(
                flag_names(f)[0].lstrip("-"), f"expected one of {flag.choices}, got {value!r}"
            )


# --- parsers: text -> value, a usage error for bad text ---------------------------------
def positive_seconds(text: str) -> float:
    """A finite number of seconds above 0 (0, -5 or nan is a usage error)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds above 0, not {text}")
    return value


def non_negative_int(text: str) -> int:
    """A whole number, 0 or more (-1 is a usage error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {text}")
    return value


def cidr_list(text: str) -> str:
    """Comma-separated networks (``10.0.0.0/8,fd00::/8``), kept as given; a bad entry is a usage
    error instead of a traceback when the process starts."""
    for entry in filter(None, (e.strip() for e in text.split(","))):
        try:
            ipaddress.ip_network(entry, strict=False)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a network (CIDR such as 10.0.0.0/8): {entry!r}") from None
    return text


def on_off(text: str) -> bool:
    """``on`` or ``off``, as a bool."""
    if text not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from 'on', 'off')")
    return text == "on"


def on_off_text(value: bool) -> str:
    return "on" if value else "off"


ON_OFF = dict(parse=on_off, text=on_off_text, metavar="{on,off}")
