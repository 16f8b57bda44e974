"""Reading a job config: TOML files and ``--section.key VALUE`` overrides (:func:`load_config`), and writing
one back as TOML (:func:`dump_toml`). See Note [Config precedence] in :mod:`cp_dtensor.config`."""

import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cp_dtensor.config.docs import format_help
from cp_dtensor.config.fields import (
    ConfigError,
    _field_types,
    _parse_text,
    _toml_value,
    _unknown_key_error,
    _unknown_section_error,
)
from cp_dtensor.config.schema import JobConfig, _apply_mapping, _section_types

try:
    import tomli
except ModuleNotFoundError:  # the same parser ships with Python >= 3.11 as tomllib
    import tomllib as tomli

__all__ = ["dump_toml", "load_config"]

_HELP_FLAGS = frozenset({"-h", "--help"})


def _read_toml(path: str) -> dict[str, Any]:
    """Parse a TOML file.

    Raises:
        ConfigError: If the file is missing, unreadable or not valid TOML.
    """
    if not path:
        raise ConfigError(
            "--config: empty path; pass a TOML file, e.g. --config train_configs/debug_cpu.toml"
        )
    try:
        with Path(path).open("rb") as f:
            return tomli.load(f)
    except FileNotFoundError:
        raise ConfigError(
            f"--config: file {path!r} not found; pass an existing TOML file, e.g. train_configs/debug_cpu.toml"
        ) from None
    except OSError as e:
        raise ConfigError(
            f"--config: cannot read {path!r} ({e.strerror or e}); pass a readable TOML file"
        ) from None
    except tomli.TOMLDecodeError as e:
        raise ConfigError(f"--config: {path} is not valid TOML: {e}; fix the syntax there") from None


def _split_argv(argv: Sequence[str]) -> tuple[str | None, list[tuple[str, str | None]]]:
    """Split argv into the ``--config`` path and ``(option name, text or None)`` overrides, in order.

    An option takes the text after ``=``, else the next token unless that starts with ``--``; otherwise
    it has no value (None), which only a bool field accepts.
    """
    config_path: str | None = None
    overrides: list[tuple[str, str | None]] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--") or token == "--":
            raise ConfigError(
                f"unexpected argument {token!r}; use --config PATH and --section.key VALUE (see --help)"
            )
        name, has_eq, inline = token[2:].partition("=")
        value: str | None
        if has_eq:
            value, i = inline, i + 1
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            value, i = argv[i + 1], i + 2
        else:
            value, i = None, i + 1
        if name == "config":
            if value is None:
                raise ConfigError("--config needs a path: --config PATH or --config=PATH")
            config_path = value
        else:
            overrides.append((name, value))
    return config_path, overrides


def _parse_override(name: str, text: str | None) -> tuple[str, str, Any]:
    """Resolve ``--section.key`` and convert its text; returns ``(section, key, value)``."""
    section, dot, key = name.partition(".")
    sections = _section_types()
    if not dot or not key:
        owners = [s for s, cls in sections.items() if name in _field_types(cls)]
        fix = f"did you mean --{owners[0]}.{name}?" if owners else "options are --section.key (see --help)"
        raise ConfigError(f"unknown option --{name}; {fix}")
    if section not in sections:
        raise _unknown_section_error(sections, section, prefix="--", where=f"in option --{name}")
    hints = _field_types(sections[section])
    if key not in hints:
        raise _unknown_key_error(sections, section, key, prefix="--", where="on the command line")
    tp = hints[key]
    if text is None:
        if tp is not bool:
            raise ConfigError(f"--{name} needs a value: --{name} VALUE or --{name}=VALUE")
        return section, key, True
    return section, key, _parse_text(name, text, tp)


def load_config(argv: Sequence[str] | None = None) -> JobConfig:
    """Build the job config from defaults, an optional TOML file and command-line overrides.

    Precedence: command line > TOML > defaults (see Note [Config precedence]). A bool option without a
    value means true; list options take comma-separated values; ``-h``/``--help`` prints every option and
    exits.

    Args:
        argv: Arguments without the program name, e.g. ``["--config", "x.toml", "--training.steps=10"]``;
            None reads ``sys.argv[1:]``.

    Returns:
        The validated config.

    Raises:
        ConfigError: On a missing or invalid TOML file, an unknown section or key, a wrong type, a missing
            value, or a failed :meth:`JobConfig.validate`.
        SystemExit: With code 0 after printing help for ``-h``/``--help``.
    """
    if argv is None:
        argv = sys.argv[1:]
    if any(token in _HELP_FLAGS for token in argv):
        print(format_help())
        raise SystemExit(0)

    config_path, raw_overrides = _split_argv(argv)
    # Resolve the command line before reading the file, so a typo fails before any I/O.
    overrides = [_parse_override(name, text) for name, text in raw_overrides]

    config = JobConfig()
    if config_path is not None:
        _apply_mapping(config, _read_toml(config_path), source=f"config file {config_path}")
    for section, key, value in overrides:
        setattr(getattr(config, section), key, value)
    config.validate()
    return config


def dump_toml(config: JobConfig) -> str:
    """The config as TOML text that :func:`load_config` reads back to an equal config.

    Args:
        config: The config to write (usually the effective one, to save next to the run's outputs).

    Returns:
        TOML text with every section and key.
    """
    lines = ["# cp_dtensor job config"]
    for name in _section_types():
        section = getattr(config, name)
        lines += ["", f"[{name}]"]
        lines += [f"{f.name} = {_toml_value(getattr(section, f.name))}" for f in dataclasses.fields(section)]
    return "\n".join(lines) + "\n"
