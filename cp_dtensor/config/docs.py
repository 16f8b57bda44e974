"""Config documentation: ``--help`` text and the README's markdown reference, both from the field
docstrings of :mod:`cp_dtensor.config.schema`."""

import ast
import dataclasses
import functools
import inspect
import textwrap
import types
from collections.abc import Mapping

from cp_dtensor.config.fields import _field_types, _Range, _toml_value, _type_name
from cp_dtensor.config.schema import _section_types

__all__ = ["field_docs", "format_help", "format_markdown_reference"]


def field_docs(cls: type) -> Mapping[str, str]:
    """Attribute docstrings of a dataclass: the string literal right after each field.

    Args:
        cls: A dataclass defined in a source file (e.g. :class:`Training`).

    Returns:
        Read-only ``{field name: docstring}`` (cleaned with :func:`inspect.cleandoc`); fields without a
        docstring are missing. Empty if the source is unavailable. Computed once per class.
    """
    return _field_docs_cached(cls)


@functools.cache
def _field_docs_cached(cls: type) -> Mapping[str, str]:
    """Parse ``cls``'s source once; the result is immutable, so the memo holds no mutable state."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return types.MappingProxyType({})
    class_def = next(node for node in ast.parse(source).body if isinstance(node, ast.ClassDef))
    docs: dict[str, str] = {}
    for node, following in zip(class_def.body, class_def.body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = inspect.cleandoc(following.value.value)
    return types.MappingProxyType(docs)


def format_help(prog: str = "train.py") -> str:
    """Help text: every option as ``--section.key  (type, default X)  docstring``, grouped by section.

    Args:
        prog: Program name shown in the usage line.

    Returns:
        The help text.
    """
    lines = [
        f"usage: {prog} [--config PATH] [--section.key VALUE | --section.key=VALUE ...]",
        "",
        "Values come from the defaults, then the TOML file, then the command line (later wins).",
        "A bool option without a value means true (also true/false/1/0/yes/no); lists are comma-separated.",
        "",
        "  --config PATH  TOML job config file; without it, the defaults below",
        "  -h, --help     print this help and exit",
    ]
    for name, summary, rows in _option_rows():
        lines += ["", f"[{name}]  {summary}".rstrip()]
        # Align the columns within a section.
        width = max(len(option) for option, _, _ in rows)
        detail_width = max(len(details) for _, details, _ in rows) + 2
        lines += [
            f"  {option:<{width}}  {'(' + details + ')':<{detail_width}}  {doc}".rstrip()
            for option, details, doc in rows
        ]
    return "\n".join(lines)


def _option_rows() -> list[tuple[str, str, list[tuple[str, str, str]]]]:
    """Per section: (name, one-line summary, [(--section.key, "type, default X[, range]", docstring)])."""
    sections = []
    for name, cls in _section_types().items():
        summary = (inspect.getdoc(cls) or "").split("\n", 1)[0]
        docs, hints = field_docs(cls), _field_types(cls)
        rows: list[tuple[str, str, str]] = []
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            details = f"{_type_name(hints[f.name])}, default {_toml_value(default)}"
            bounds: _Range | None = f.metadata.get("range")
            if bounds is not None:
                details += f", {bounds.describe()}"
            rows.append((f"--{name}.{f.name}", details, " ".join(docs.get(f.name, "").split())))
        sections.append((name, summary, rows))
    return sections


def format_markdown_reference() -> str:
    """The config reference as a markdown table (the README embeds exactly this)."""
    lines = ["| option | type, default | meaning |", "|---|---|---|"]
    for _name, _summary, rows in _option_rows():
        for option, details, doc in rows:
            lines.append(f"| `{option[2:]}` | {details.replace('|', '/')} | {doc.replace('|', '/')} |")
    return "\n".join(lines)
