"""The machinery of the configuration schema (icl_scale/schema.py): how a setting is declared
(`setting`: type, default, allowed values, hashed or not, help) and what is derived from the
declarations (the flat list of settings, defaults, `--help` text, one-line checks of a value)."""

from __future__ import annotations

import copy
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from numbers import Integral, Real
from typing import Any


@dataclass(frozen=True)
class Spec:
    """What a setting may hold. `kind`: int, float (any real), bool, str, list or dict; `options`:
    the allowed values (or, with a kind, the allowed literals besides values of that kind)."""

    kind: type | None = None
    help: str = ""
    none_ok: bool = False
    lo: float | None = None
    options: tuple = ()
    hashed: bool = False


def setting(default: Any, kind: type | None, help: str, *, none_ok: bool = False, lo: float | None = None,
            options: tuple = (), hashed: bool = False) -> Any:
    """A dataclass field carrying its Spec (a list or dict default is copied per instance)."""
    spec = Spec(kind, help, none_ok or default is None, lo, tuple(options), hashed)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"spec": spec})
    return field(default=default, metadata={"spec": spec})


def section(cls: type, help: str = "") -> Any:
    return field(default_factory=cls, metadata={"help": help})


def specs(cls: type, prefix: str = "") -> dict[str, Spec]:
    """{dotted key: Spec} of every setting under `cls`."""
    out: dict[str, Spec] = {}
    for f in fields(cls):
        key = f"{prefix}{f.name}"
        if "spec" in f.metadata:
            out[key] = f.metadata["spec"]
        elif f.default_factory is not MISSING and is_dataclass(f.default_factory):
            out.update(specs(f.default_factory, key + "."))
    return out


def help_text(cls: type) -> str:
    """The settings, one line each with default and help, for `--help` (a `$` is doubled: Hydra's
    help template is a string.Template)."""
    values = defaults(cls)
    lines = []
    for key, spec in specs(cls).items():
        allowed = f" [{' | '.join(map(str, spec.options))}]" if spec.options and spec.kind is str else ""
        value = values.get(key)
        value = {None: "null", True: "true", False: "false"}.get(value, value) if _scalar(value) else value
        lines.append(f"  {key}={value}{allowed}\n      {spec.help}")
    return "\n".join(lines).replace("$", "$$")


def _scalar(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, float, str))


def defaults(cls: type, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in fields(cls):
        if "spec" in f.metadata:
            out[prefix + f.name] = f.default if f.default is not MISSING else f.default_factory()
        elif f.default_factory is not MISSING and is_dataclass(f.default_factory):
            out.update(defaults(f.default_factory, f"{prefix}{f.name}."))
    return out


class ConfigError(ValueError):
    """A setting is wrong; the message names it and the fix."""


def check_value(key: str, v: Any, spec: Spec) -> None:
    """One line naming the setting and the fix when `v` does not fit `spec`."""
    if v is None and spec.none_ok or v in spec.options and not isinstance(v, bool):
        return
    null = " or null" if spec.none_ok else ""
    if spec.kind is int and (isinstance(v, bool) or not isinstance(v, Integral)):
        alt = f"{' or '.join(map(str, spec.options))} or an integer" if spec.options else "a whole number"
        raise ConfigError(f"{key}={v!r} must be {alt}{null}, e.g. {key}={max(int(spec.lo or 0), 1)}")
    if spec.kind is float and (isinstance(v, bool) or not isinstance(v, Real)):
        raise ConfigError(f"{key}={v!r} must be a number{null}")
    if spec.kind is bool and not isinstance(v, bool):
        raise ConfigError(f"{key}={v!r} must be true or false")
    if spec.kind is str and spec.options:
        raise ConfigError(f"{key}={v!r} is not an option; use one of {', '.join(map(str, spec.options))}")
    if spec.kind in (list, dict) and not isinstance(v, spec.kind):
        raise ConfigError(f"{key}={v!r} must be a {'list, e.g. [a,b]' if spec.kind is list else 'mapping'}{null}")
    if spec.lo is not None and isinstance(v, Real) and v < spec.lo:
        raise ConfigError(f"{key}={v} must be >= {spec.lo:g}")
