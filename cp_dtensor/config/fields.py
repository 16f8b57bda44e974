"""Config fields: allowed ranges, type checks of TOML values, command-line text and TOML text conversions.

The leaf of :mod:`cp_dtensor.config`: the schema declares its fields with :func:`_bounded` and checks values
with :func:`_check_type`; the parser converts command-line text with :func:`_parse_text`; the TOML writer and
the help text print values with :func:`_toml_value`.
"""

import dataclasses
import difflib
import functools
import math
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

__all__ = ["ConfigError"]

_T = TypeVar("_T")

_TRUE_WORDS = frozenset({"true", "1", "yes"})
_FALSE_WORDS = frozenset({"false", "0", "no"})


class ConfigError(ValueError):
    """An invalid config key, value or combination; the one-line message names the key and the fix."""


# --------------------------------------------------------------------------------------------------------
# Field ranges
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Range:
    """Allowed numeric range of a field; ``sentinel`` is one extra allowed value (e.g. -1 = "inferred")."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    sentinel: int | None = None

    def contains(self, value: float) -> bool:
        """Whether ``value`` is allowed."""
        if self.sentinel is not None and value == self.sentinel:
            return True
        return (
            (self.ge is None or value >= self.ge)
            and (self.gt is None or value > self.gt)
            and (self.le is None or value <= self.le)
            and (self.lt is None or value < self.lt)
        )

    def describe(self) -> str:
        """Human-readable range, e.g. ``">= 1 or -1"`` or ``">= 0 and <= 1"``."""
        bounds = [
            f"{op} {bound:g}"
            for op, bound in ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt))
            if bound is not None
        ]
        text = " and ".join(bounds)
        return f"{text} or {self.sentinel}" if self.sentinel is not None else text


def _bounded(
    default: _T,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    sentinel: int | None = None,
) -> _T:
    """A dataclass field with a default and an allowed range, checked by :meth:`JobConfig.validate`."""
    return field(default=default, metadata={"range": _Range(ge=ge, gt=gt, le=le, lt=lt, sentinel=sentinel)})


@functools.cache
def _field_types(cls: type) -> Mapping[str, Any]:
    """Resolved field annotations of a dataclass (immutable memo)."""
    hints = typing.get_type_hints(cls)
    return types.MappingProxyType({f.name: hints[f.name] for f in dataclasses.fields(cls)})


# --------------------------------------------------------------------------------------------------------
# Types: checking TOML values, parsing command-line text
# --------------------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    """Short name of a field type for messages and help: ``int``, ``list[str]``, ``"a"|"b"``."""
    if typing.get_origin(tp) is Literal:
        return "|".join(f'"{choice}"' for choice in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    return getattr(tp, "__name__", repr(tp))


def _type_error(key: str, tp: Any, value: Any) -> ConfigError:
    """``training.steps: expected int, got 'abc' (str)`` plus a hint where the fix is not obvious."""
    message = f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})"
    name = key.split(".", 1)[1]
    if tp is str:
        message += f'; quote it in TOML: {name} = "{value}"'
    elif typing.get_origin(tp) is list and isinstance(value, str):
        message += f'; write a list in TOML: {name} = ["{value}"], or --{key} a,b on the command line'
    return ConfigError(message)


def _check_type(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against field type ``tp``; return it (ints for float fields become floats).

    Raises:
        ConfigError: Wrong type (bools are not ints), a value outside a Literal's choices, or a
            non-finite float.
    """
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, str) and value in choices:
            return value
        listed = ", ".join(f'"{choice}"' for choice in choices)
        raise ConfigError(f"{key}: {value!r} is not one of {listed}; pick one of these")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            try:
                as_float = float(value)
            except OverflowError:  # an int beyond the float range
                as_float = math.inf
            if not math.isfinite(as_float):
                raise ConfigError(f"{key}: expected a finite float, got {value!r}")
            return as_float
    elif tp is str:
        if isinstance(value, str):
            return value
    elif origin is list:
        if isinstance(value, list) and all(isinstance(item, str) for item in value):
            return list(value)
    else:
        raise TypeError(f"{key}: unsupported config field type {tp!r}")
    raise _type_error(key, tp, value)


def _parse_text(key: str, text: str, tp: Any) -> Any:
    """Convert command-line text to a value of field type ``tp`` and check it.

    Bools accept true/false/1/0/yes/no (any case); lists are comma-separated (blank items dropped).
    """
    if tp is bool:
        word = text.strip().lower()
        if word in _TRUE_WORDS:
            return True
        if word in _FALSE_WORDS:
            return False
        raise ConfigError(f"{key}: expected bool (true/false/1/0/yes/no), got {text!r} (str)")
    if tp is int or tp is float:
        try:
            value = tp(text)
        except ValueError:
            raise _type_error(key, tp, text) from None
        return _check_type(key, value, tp)
    if typing.get_origin(tp) is list:
        return _check_type(key, [item.strip() for item in text.split(",") if item.strip()], tp)
    return _check_type(key, text, tp)


_TOML_ESCAPES = types.MappingProxyType(
    {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}
)


def _toml_value(value: Any) -> str:
    """One config value as TOML text (bool, int, float, str, list of these)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        chars = (
            _TOML_ESCAPES.get(ch) or (f"\\u{ord(ch):04X}" if ord(ch) < 0x20 or ord(ch) == 0x7F else ch)
            for ch in value
        )
        return '"' + "".join(chars) + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise TypeError(f"cannot write {value!r} ({type(value).__name__}) as TOML")


# --------------------------------------------------------------------------------------------------------
# Unknown names
# --------------------------------------------------------------------------------------------------------


def _closest(name: str, candidates: Sequence[str]) -> str | None:
    """The closest candidate to ``name`` by :mod:`difflib`, or None."""
    matches = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    return matches[0] if matches else None


def _all_keys(sections: Mapping[str, type]) -> list[str]:
    """Every ``section.key``."""
    return [f"{name}.{key}" for name, cls in sections.items() for key in _field_types(cls)]


RENAMED: dict[str, str] = {
    "parallelism.context_parallel_a2a_degree": "parallelism.context_parallel_a2a_size",
    "comm.init_timeout_seconds": "timeouts.init_seconds",
    "comm.train_timeout_seconds": "timeouts.train_seconds",
}
"""Keys renamed since an earlier release (one name per concept): old name -> new name."""


def _unknown_section_error(sections: Mapping[str, type], name: str, prefix: str, where: str) -> ConfigError:
    """Error for an unknown section; suggests the closest section, or the section that owns a bare key."""
    if name == "comm":
        return ConfigError(
            f"config section {name!r} {where} was renamed to 'timeouts' (keys init_seconds, train_seconds)"
        )
    owners = [section for section, cls in sections.items() if name in _field_types(cls)]
    if owners:
        fix = f"{name} belongs in a section: use {prefix}{owners[0]}.{name}"
    else:
        close = _closest(name, list(sections))
        fix = f"did you mean {prefix}{close}?" if close else f"valid sections: {', '.join(sections)}"
    return ConfigError(f"unknown config section {name!r} {where}; {fix}")


def _unknown_key_error(
    sections: Mapping[str, type], section: str, key: str, prefix: str, where: str
) -> ConfigError:
    """Error for an unknown key, with a suggestion.

    Suggests, in order: the same key in another section, the closest key of this section, the closest
    ``section.key`` overall.
    """
    full = f"{section}.{key}"
    if full in RENAMED:
        return ConfigError(f"config key {prefix}{full} {where} was renamed to {prefix}{RENAMED[full]}")
    elsewhere = [k for k in _all_keys(sections) if k.endswith(f".{key}")]
    own = _closest(key, list(_field_types(sections[section])))
    close = elsewhere[0] if elsewhere else f"{section}.{own}" if own else _closest(full, _all_keys(sections))
    fix = f"did you mean {prefix}{close}?" if close else f"see --help for the keys of [{section}]"
    return ConfigError(f"unknown config key {prefix}{full} {where}; {fix}")


# --------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------
