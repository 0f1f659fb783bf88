"""Command-line flags from flat dataclass configs, and the help format every `herd` command shares.

Each dataclass field becomes `--field-name`, with the string literal under the field (its
attribute docstring) as the help text and the field's default shown once. Defaults of the parsed
flags are None, so `dataclass_from_args` can tell a flag the user set from one left alone (a
resumed run keeps its saved values for the flags that were not given).

One boolean style everywhere: `--flag` alone means true, `--flag false` (or no/off/0) false.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from typing import Any

from herd.errors import HerdError


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default once: not when the help already states one, and not for None or store_true."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default:" in text or action.default in (None, False, argparse.SUPPRESS) or action.nargs == 0:
            return text
        return super()._get_help_string(action)


def parse_bool(text: str) -> bool:
    """'true'/'false' (and 1/0, yes/no, on/off) as a bool, for argparse."""
    low = str(text).lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got '{text}'")


def add_bool_flag(parser: argparse.ArgumentParser | Any, flag: str, help: str, default: bool | None = None) -> None:
    """A boolean flag in herd's one style: `--flag` is true, `--flag false` is false."""
    parser.add_argument(flag, nargs="?", const=True, default=default, type=parse_bool, metavar="BOOL", help=help)


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass: the string literal right after each field."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(scalar type, optional?) of an annotation like `int | None`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def field_default(f: dataclasses.Field) -> Any:
    """The default value of a dataclass field (calling its factory), or None when it has none."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, *, skip: tuple[str, ...] = (),
                       group: str | None = None) -> None:
    """Add one --flag per field of dataclass `cls`; defaults are None so unset flags are detectable."""
    target = parser.add_argument_group(group) if group else parser
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        tp, _ = _base_type(hints[f.name])
        default = field_default(f)
        shown = "''" if default == "" else default
        doc = docs.get(f.name, "")
        # the default once: not when the docstring already says it, and not for an unset (None) one
        said = "default:" in doc.lower() or default is None
        help_text = (doc if said else doc + f" (default: {shown})").strip()
        flag = "--" + f.name.replace("_", "-")
        if tp is bool:
            add_bool_flag(target, flag, help_text)
        elif tp in (int, float, str):
            target.add_argument(flag, type=tp, default=None, help=help_text)
        else:  # lists and other structures: comma-separated scalars
            target.add_argument(flag, type=str, default=None, help=help_text + " (comma-separated)")


def set_flags(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The fields of `cls` the user set on the command line, converted to the field types."""
    values: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        value = getattr(args, f.name, None)
        if value is None:
            continue
        tp, _ = _base_type(hints[f.name])
        if isinstance(value, str) and typing.get_origin(tp) in (list, tuple):
            (elem,) = typing.get_args(tp)[:1]
            try:
                value = [elem(v.strip()) for v in value.split(",") if v.strip()]
            except ValueError:
                flag = "--" + f.name.replace("_", "-")
                raise HerdError(f"{flag} takes comma-separated {elem.__name__} values, e.g. {flag} "
                                f"{'128001,128009' if elem is int else 'a,b'}; got '{value}'.") from None
        values[f.name] = value
    return values


def dataclass_from_args(cls: type, args: argparse.Namespace, base: Any | None = None, **extra: Any) -> Any:
    """Build `cls` from parsed flags: fields from `base` (or defaults), overridden by flags that were set."""
    values = dataclasses.asdict(base) if base is not None else {}
    values.update(set_flags(cls, args))
    values.update(extra)
    return cls(**values)
