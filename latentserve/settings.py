"""The one configuration mechanism: typed, frozen dataclasses whose fields are the settings.

Every field of a ``Settings`` dataclass is a command-line flag ``--field-name`` and an
environment variable ``LATENTSERVE_FIELD_NAME``, both derived from the field (its name,
type, default and ``help``), so the three can never drift apart. A field may rename its
flag (``flag=``), add aliases (``aliases=``), or read further variables after its own
(``fallback_env=``, e.g. ``REDIS_URL``). A field whose type is another ``Settings`` class
(the queue settings inside the worker's) takes its fields from the same flags and env.

Precedence, highest first: ``overrides`` (typed values from code), flags, the field's
env var, its fallback env vars, the default. Values are parsed and validated once, at
start-up (``__post_init__`` of each class), and the object is passed down; nothing else
in latentserve reads a ``LATENTSERVE_*`` variable.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Self

from latentserve.errors import InvalidInput

ENV_PREFIX = "LATENTSERVE_"
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def setting(default: Any = dataclasses.MISSING, *, help: str,  # noqa: A002 - argparse's name
            default_factory: Callable[[], Any] | Any = dataclasses.MISSING,
            metavar: str | None = None, flag: str | None = None,
            aliases: tuple[str, ...] = (), fallback_env: tuple[str, ...] = (),
            parse: Callable[[str], Any] | None = None, cli: bool = True) -> Any:
    """A settings field. ``parse`` turns a flag's or env var's text into the value;
    ``cli=False`` keeps it off the command line (set from code or env only)."""
    meta = {"help": help, "metavar": metavar, "flag": flag, "aliases": aliases,
            "fallback_env": fallback_env, "parse": parse, "cli": cli}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


class Settings:
    """Mixin of the settings dataclasses: sources -> one validated, frozen object."""

    @classmethod
    def env_name(cls, name: str) -> str:
        """The environment variable of field ``name``."""
        return ENV_PREFIX + name.upper()

    @classmethod
    def flag_name(cls, name: str) -> str:
        """The command-line flag of field ``name``."""
        f = _field(cls, name)
        return f.metadata.get("flag") or "--" + name.replace("_", "-")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Self:
        """Defaults, then env vars, then ``overrides`` (typed values)."""
        return cls.from_sources(None, environ, **overrides)

    @classmethod
    def from_sources(cls, args: argparse.Namespace | None = None,
                     environ: Mapping[str, str] | None = None, *,
                     defaults: Mapping[str, Any] | None = None, **overrides: Any) -> Self:
        """Flags (added by ``add_arguments``) over env vars over ``defaults`` (a command's
        own, in place of the fields') over the fields' defaults; ``overrides`` win.
        Overrides naming a field of a nested settings class go to that class."""
        environ = os.environ if environ is None else environ
        hints = typing.get_type_hints(cls)
        values: dict[str, Any] = dict(defaults or {})
        mine = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = set(overrides) - mine - _nested_names(cls)
        if unknown:
            raise InvalidInput(f"unknown {cls.__name__} settings: {sorted(unknown)}")
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            kind = hints[f.name]
            if _is_settings(kind):
                if f.name in overrides:
                    values[f.name] = overrides[f.name]
                else:
                    nested = {k: v for k, v in overrides.items() if k in _names(kind)}
                    values[f.name] = kind.from_sources(args, environ, **nested)
                continue
            for env in (cls.env_name(f.name), *f.metadata.get("fallback_env", ())):
                if environ.get(env, "").strip():
                    values[f.name] = parse_value(f, kind, environ[env], source=env)
                    break
            if args is not None and f.name in vars(args):
                values[f.name] = getattr(args, f.name)
            if f.name in overrides:
                values[f.name] = overrides[f.name]
        return cls(**values)

    @classmethod
    def add_arguments(cls, parser: Any, *, only: Iterable[str] | None = None,
                      exclude: Iterable[str] = ()) -> None:
        """Add a flag for each field (nested settings' fields too); an absent flag leaves
        no attribute behind, so ``from_sources`` knows what was given."""
        hints = typing.get_type_hints(cls)
        wanted = set(only) if only is not None else None
        skip = set(exclude)
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            kind = hints[f.name]
            if _is_settings(kind):
                kind.add_arguments(parser, only=only, exclude=exclude)
                continue
            if (wanted is not None and f.name not in wanted) or f.name in skip \
                    or not f.metadata.get("cli", True):
                continue
            flag = cls.flag_name(f.name)
            envs = " or ".join([cls.env_name(f.name), *f.metadata.get("fallback_env", ())])
            default = f.default if f.default is not dataclasses.MISSING else None
            help_text = f"{f.metadata.get('help', '')} [env {envs}; default {_show(default)}]"
            names = [flag, *f.metadata.get("aliases", ())]
            parse = functools.partial(_parse_flag, f, kind, flag=flag)
            if _base_type(kind) is bool:
                parser.add_argument(*names, dest=f.name, default=argparse.SUPPRESS,
                                    nargs="?", const=True, type=parse, metavar="{true,false}",
                                    help=help_text)
                parser.add_argument("--no-" + flag[2:], dest=f.name, action="store_false",
                                    default=argparse.SUPPRESS, help=argparse.SUPPRESS)
                continue
            parser.add_argument(*names, dest=f.name, default=argparse.SUPPRESS,
                                help=help_text, type=parse,
                                metavar=f.metadata.get("metavar") or _metavar(kind))

    def replace(self, **changes: Any) -> Self:
        """A copy with ``changes``, validated again."""
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


def parse_value(f: dataclasses.Field[Any], kind: Any, text: str, *, source: str) -> Any:
    """Parse one setting's text (from a flag or env var) into the field's type."""
    text = text.strip()
    if _nullable(kind) and text.lower() in ("none", "off", ""):
        return None
    custom = f.metadata.get("parse")
    base = _base_type(kind)
    try:
        if custom is not None:
            return custom(text)
        if base is bool:
            if text.lower() in _TRUE:
                return True
            if text.lower() in _FALSE:
                return False
            raise ValueError(text)
        if base is int:
            return int(text.replace("_", ""))
        if base is float:
            return float(text)
        if base is Path:
            return Path(text).expanduser()
        if typing.get_origin(base) is tuple:
            return tuple(p.strip() for p in text.split(",") if p.strip())
        if typing.get_origin(base) is typing.Literal and text not in typing.get_args(base):
            raise ValueError(text)
        return text
    except InvalidInput as exc:
        raise InvalidInput(f"{source}={text!r}: {exc}") from None
    except ValueError:
        allowed = {bool: "true/false", int: "an integer", float: "a number"}.get(base, "text")
        if typing.get_origin(base) is typing.Literal:
            allowed = "one of " + ", ".join(map(str, typing.get_args(base)))
        if _nullable(kind):
            allowed += " or none"
        raise InvalidInput(f"{source}={text!r}: {f.name} must be {allowed}") from None


def check_range(name: str, value: Any, lo: float, hi: float | None = None, *,
                integer: bool = True) -> None:
    """InvalidInput unless ``lo <= value <= hi`` (and an int when ``integer``)."""
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise InvalidInput(f"{name} must be {'an integer' if integer else 'a number'}, "
                           f"got {value!r}")
    if not value >= lo or (hi is not None and value > hi):
        allowed = f">= {lo}" if hi is None else f"between {lo} and {hi}"
        raise InvalidInput(f"{name} must be {allowed}, got {value}")


def _field(cls: type, name: str) -> dataclasses.Field[Any]:
    return next(f for f in dataclasses.fields(cls) if f.name == name)


def _is_settings(kind: Any) -> bool:
    return isinstance(kind, type) and issubclass(kind, Settings)


def _names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)} | _nested_names(cls)


def _nested_names(cls: type) -> set[str]:
    hints = typing.get_type_hints(cls)
    out: set[str] = set()
    for f in dataclasses.fields(cls):
        if _is_settings(hints[f.name]):
            out |= _names(hints[f.name])
    return out


def _parse_flag(f: dataclasses.Field[Any], kind: Any, text: str, *, flag: str) -> Any:
    try:
        return parse_value(f, kind, text, source=flag)
    except InvalidInput as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _show(value: object) -> str:
    if value is None or value == "":
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "none"
    return str(value)


def _metavar(kind: Any) -> str:
    base = _base_type(kind)
    if typing.get_origin(base) is typing.Literal:
        return "{" + ",".join(map(str, typing.get_args(base))) + "}"
    if typing.get_origin(base) is tuple:
        return "A,B"
    return {int: "N", float: "X", Path: "PATH"}.get(base, "TEXT")


def _base_type(kind: Any) -> Any:
    """``int | None`` -> int; other types as they are."""
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        return _base_type(args[0])
    return kind


def _nullable(kind: Any) -> bool:
    return type(None) in typing.get_args(kind)
