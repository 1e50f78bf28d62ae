"""Job configuration: one dataclass per job, loadable from YAML, overridable on the CLI.

Defaults live only in the dataclass fields. Precedence is field default < YAML
file given with ``--config`` < command-line flag. YAML keys mirror the flags
(``proxy-size`` or ``proxy_size`` both work), so a schedule can keep the same
options in a file that a person would type on the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml

from lga_dist.errors import UserError
from lga_dist.io.storage import open_file

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


def differing_fields(previous: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The dotted names ("requests.test") whose values differ between two run keys, so that a refusal to mix
    two runs' outputs says what changed."""

    def flat(key: dict[str, Any], prefix: str = "") -> dict[str, str]:
        out: dict[str, str] = {}
        for name, value in key.items():
            if isinstance(value, dict):
                out.update(flat(value, f"{prefix}{name}."))
            else:
                out[prefix + name] = json.dumps(value, sort_keys=True)
        return out

    return sorted({name for name, _ in flat(previous).items() ^ flat(current).items()})


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


def section(cls: type, title: str, **defaults: Any) -> Any:
    """A job Config field holding an option section (a dataclass shared by several jobs).

    Its fields become flat flags and YAML keys (``--actors``, ``actors:``), listed
    under ``title`` in ``--help``; ``defaults`` are this job's own defaults where they
    must differ from the section's (each job's output folder, for example).
    """
    return dataclasses.field(default_factory=lambda: cls(**defaults), metadata={"section": title})


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One flag: a field of the job Config or of one of its sections."""

    name: str
    field: dataclasses.Field
    annotation: Any
    default: Any
    section: str | None  # the job Config's field holding it, or None for a field of the job itself
    title: str | None


def _is_section(field: dataclasses.Field) -> bool:
    return "section" in field.metadata


def _default(field: dataclasses.Field) -> Any:
    return field.default if field.default is not dataclasses.MISSING else field.default_factory()


def leaves(cls: type) -> list[Leaf]:
    """Every option of ``cls``, sections flattened, with this job's defaults; names must not repeat."""
    found: list[Leaf] = []
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if _is_section(field):
            instance = _default(field)
            section_hints = typing.get_type_hints(type(instance))
            found += [Leaf(f.name, f, section_hints[f.name], getattr(instance, f.name), field.name,
                           field.metadata["section"]) for f in dataclasses.fields(instance) if f.init]
        elif field.init:
            found.append(Leaf(field.name, field, hints[field.name], _default(field), None, None))
    names = [leaf.name for leaf in found]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise TypeError(f"{cls.__name__}: options {repeated} are declared twice (in the job and a section)")
    return found


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one flag per option of ``cls`` (a group per section); flags default to 'not given' so YAML shows through."""
    groups: dict[str, Any] = {}
    for leaf in leaves(cls):
        meta = leaf.field.metadata
        if meta.get("help") is None:
            continue
        target = parser if leaf.title is None else groups.setdefault(leaf.title, parser.add_argument_group(leaf.title))
        scalar, is_list = _base_type(leaf.annotation)
        help_text = f"{meta['help']} (default: {leaf.default!r})"
        if meta.get("positional"):
            target.add_argument(leaf.name, nargs="*" if is_list else "?", default=argparse.SUPPRESS,
                                metavar=meta.get("metavar") or leaf.name.upper(), help=help_text)
            continue
        names = ["--" + leaf.name.replace("_", "-")] + ([meta["short"]] if meta.get("short") else [])
        kwargs: dict[str, Any] = {"dest": leaf.name, "default": argparse.SUPPRESS, "help": help_text}
        if meta.get("metavar"):
            kwargs["metavar"] = meta["metavar"]
        if scalar is bool and not is_list:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = _parse_bool if scalar is bool else scalar
            if meta.get("choices"):
                kwargs["choices"] = meta["choices"]
            if is_list:  # a repeated flag adds to the list (argparse's default would keep only the last one)
                kwargs["nargs"], kwargs["action"] = "+", "extend"
        target.add_argument(*names, **kwargs)


def _leaf_annotation(cls: type, key: str) -> Any:
    for leaf in leaves(cls):
        if leaf.name == key:
            return leaf.annotation
    raise ConfigError(f"{cls.__name__} has no option {key!r}")


def coerce(cls: type, key: str, value: Any) -> Any:
    """``value`` (text from YAML or a NAME=VALUE flag) as the type of option ``key`` of ``cls``."""
    scalar, is_list = _base_type(_leaf_annotation(cls, key))
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
    """Read a YAML mapping whose keys are option names or flag names of ``cls`` (flat, or nested by section)."""

    with open_file(str(path), "rb") as handle:
        raw = yaml.safe_load(handle) or {}
    return mapping_values(raw, cls, str(path))


def mapping_values(raw: Any, cls: type, where: str) -> dict[str, Any]:
    """Flat option values of ``cls`` from a mapping of option or flag names; a section's name may hold a mapping
    of its own options (``cluster: {actors: 2}``)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of option: value, got {type(raw).__name__}")
    known = {leaf.name for leaf in leaves(cls)}
    sections = {f.name for f in dataclasses.fields(cls) if _is_section(f)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        name = str(key).lstrip("-").replace("-", "_")
        if name in sections and name not in known and isinstance(value, dict):
            values.update(mapping_values(value, cls, f"{where}: {key}"))
            continue
        if name not in known:
            raise ConfigError(f"{where}: unknown option {key!r}; known: {', '.join(sorted(known))}")
        values[name] = coerce(cls, name, value)
    return values


def compose(cls: type[T], values: dict[str, Any]) -> T:
    """A ``cls`` from flat option values (sections filled from theirs), every section and the job validated."""
    by_section: dict[str | None, dict[str, Any]] = {}
    for leaf in leaves(cls):
        if leaf.name in values:
            by_section.setdefault(leaf.section, {})[leaf.name] = values[leaf.name]
    unknown = set(values) - {leaf.name for leaf in leaves(cls)}
    if unknown:
        raise ConfigError(f"unknown option(s) {sorted(unknown)}")
    fields = dict(by_section.get(None, {}))
    for field in dataclasses.fields(cls):
        if _is_section(field):
            fields[field.name] = dataclasses.replace(_default(field), **by_section.get(field.name, {}))
    config = cls(**fields)
    for part in [getattr(config, f.name) for f in dataclasses.fields(cls) if _is_section(f)] + [config]:
        validate = getattr(part, "validate", None)
        if callable(validate):
            validate()
    return config


def build_config(cls: type[T], namespace: argparse.Namespace) -> T:
    """Merge defaults, the ``--config`` YAML file and flags given on the command line."""
    names = {leaf.name for leaf in leaves(cls)}
    given = {k: v for k, v in vars(namespace).items() if k in names and v != []}
    values: dict[str, Any] = {}
    config_path = getattr(namespace, "config", None)
    if config_path:
        values.update(load_yaml(config_path, cls))
    values.update(given)
    return compose(cls, values)


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
    """A flat JSON-friendly dict of a configuration (sections flattened), for output metadata and summaries."""
    out = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if _is_section(field):
            out.update(to_dict(value))
        else:
            out[field.name] = str(value) if isinstance(value, Path) else dataclasses.asdict(value) \
                if dataclasses.is_dataclass(value) else value
    return out
