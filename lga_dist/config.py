"""Job configuration: one dataclass per job, loadable from YAML, overridable on the CLI.

Defaults live only in the dataclass fields. Precedence is field default < YAML
file given with ``--config`` < command-line flag. YAML keys mirror the flags
(``proxy-size`` or ``proxy_size`` both work), so a schedule can keep the same
options in a file that a person would type on the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml

from lga_dist.errors import UserError

T = TypeVar("T")


def option(default: Any, help: str, *, short: str | None = None, choices: Sequence[Any] | None = None,
           metavar: str | None = None, positional: bool = False) -> Any:
    """A dataclass field that also describes its command-line flag (or positional argument)."""
    meta = {"help": help, "short": short, "choices": choices, "metavar": metavar, "positional": positional}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


class ConfigError(UserError, ValueError):
    """A configuration value or file that cannot be used; the message says which."""


def _base_type(annotation: Any) -> tuple[type, bool]:
    """Return (scalar type, is_list) for a field annotation such as ``int | None`` or ``list[str]``."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _base_type(args[0])
    if origin in (list, tuple, Sequence):
        (inner, *_) = typing.get_args(annotation) or (str,)
        return _base_type(inner)[0], True
    return annotation, False


def _parse_bool(text: str) -> bool:
    lowered = str(text).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one flag per field of ``cls``; flags default to 'not given' so YAML values can show through."""
    hints = _field_types(cls)
    for field in dataclasses.fields(cls):
        if not field.init or field.metadata.get("help") is None:
            continue
        scalar, is_list = _base_type(hints[field.name])
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        help_text = f"{field.metadata['help']} (default: {default!r})"
        if field.metadata.get("positional"):
            parser.add_argument(field.name, nargs="*" if is_list else "?", default=argparse.SUPPRESS,
                                metavar=field.metadata.get("metavar") or field.name.upper(), help=help_text)
            continue
        flag = "--" + field.name.replace("_", "-")
        names = [flag] + ([field.metadata["short"]] if field.metadata.get("short") else [])
        kwargs: dict[str, Any] = {"dest": field.name, "default": argparse.SUPPRESS, "help": help_text}
        if field.metadata.get("metavar"):
            kwargs["metavar"] = field.metadata["metavar"]
        if scalar is bool and not is_list:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = _parse_bool if scalar is bool else scalar
            if field.metadata.get("choices"):
                kwargs["choices"] = field.metadata["choices"]
            if is_list:
                kwargs["nargs"] = "+"
        parser.add_argument(*names, **kwargs)


def coerce(cls: type, key: str, value: Any) -> Any:
    """``value`` (text from YAML or a NAME=VALUE flag) as the type of dataclass field ``key``."""
    scalar, is_list = _base_type(_field_types(cls)[key])
    if value is None:
        return None

    def one(v: Any) -> Any:
        if scalar is bool:
            return v if isinstance(v, bool) else _parse_bool(v)
        if scalar in (int, float, str, Path):
            try:
                return scalar(v)
            except (TypeError, ValueError) as err:
                raise ConfigError(f"{key}: cannot read {v!r} as {scalar.__name__}") from err
        return v

    if is_list:
        items = value if isinstance(value, (list, tuple)) else [value]
        return [one(v) for v in items]
    return one(value)


def load_yaml(path: str | Path, cls: type) -> dict[str, Any]:
    """Read a YAML mapping whose keys are field names or flag names of ``cls``."""
    from lga_dist.io.storage import open_file  # storage is optional for config users; import lazily

    with open_file(str(path), "rb") as handle:
        raw = yaml.safe_load(handle) or {}
    return mapping_values(raw, cls, str(path))


def mapping_values(raw: Any, cls: type, where: str) -> dict[str, Any]:
    """Field values of ``cls`` from a mapping whose keys are field or flag names (YAML-style values)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of option: value, got {type(raw).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        name = str(key).lstrip("-").replace("-", "_")
        if name not in known:
            raise ConfigError(f"{where}: unknown option {key!r}; known: {', '.join(sorted(known))}")
        values[name] = coerce(cls, name, value)
    return values


def build_config(cls: type[T], namespace: argparse.Namespace) -> T:
    """Merge defaults, the ``--config`` YAML file and flags given on the command line."""
    names = {f.name for f in dataclasses.fields(cls)}
    given = {k: v for k, v in vars(namespace).items() if k in names and v != []}
    values: dict[str, Any] = {}
    config_path = getattr(namespace, "config", None)
    if config_path:
        values.update(load_yaml(config_path, cls))
    values.update(given)
    config = cls(**values)
    validate = getattr(config, "validate", None)
    if callable(validate):
        validate()
    return config


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> argparse.ArgumentParser:
    """``--config FILE.yaml`` plus one flag per field of ``cls``."""
    parser.add_argument("--config", metavar="FILE.yaml",
                        help="YAML file whose keys mirror these flags; flags given here override it")
    add_dataclass_arguments(parser, cls)
    return parser


class JobArgumentParser(argparse.ArgumentParser):
    """An argument parser whose errors are ConfigErrors, so a job reports them like any other bad input
    (one ``error:`` line and the JSON summary line) instead of exiting from inside argparse."""

    def error(self, message: str):
        raise ConfigError(message)


def make_parser(cls: type, prog: str | None, description: str) -> argparse.ArgumentParser:
    parser = JobArgumentParser(prog=prog, description=description,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    return add_config_arguments(parser, cls)


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON-friendly dict of a configuration, for output metadata and summaries."""
    out = {}
    for key, value in dataclasses.asdict(config).items():
        out[key] = str(value) if isinstance(value, Path) else value
    return out
