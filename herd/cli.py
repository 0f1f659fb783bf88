"""The `herd` command: one subcommand per job, and the helpers every subcommand shares.

Subcommands live next to the code they drive and are imported only when used, so
`herd --help` and `herd tokenizer encode` stay fast. A target "pkg.module:name" means the
module defines `add_<name>_args(parser)` and `run_<name>(args) -> int | None`.

Errors: a HerdError (bad input) prints one line, `herd: error: <reason and fix>`, and exits 2.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import inspect
import sys
import textwrap
import types
import typing
from typing import Any

from herd.errors import HerdError

# name -> (target, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "speedrun": ("herd.train.speedrun:speedrun", "corpus -> data pipeline -> tokenizer -> pretrain -> sample, on this machine"),
    "init": ("herd.checkpoint.cli:init", "write a randomly initialized checkpoint of a preset (demos, tests, from-scratch runs)"),
    "info": ("herd.checkpoint.cli:info", "parameter count, memory per dtype and KV-cache size of a preset or checkpoint"),
    "convert": ("herd.checkpoint.cli:convert", "convert a checkpoint between herd, Hugging Face and Meta formats"),
    "generate": ("herd.inference.cli:generate", "generate text from a prompt (streams as it goes)"),
    "chat": ("herd.inference.cli:chat", "interactive chat in the Llama 3 chat format"),
    "tokenizer": ("herd.tokenizer.cli:tokenizer", "train, encode, decode and measure tokenizers"),
    "data": ("herd.data.cli:data", "the pre-training data pipeline: filter, dedup, mix, pack"),
    "pretrain": ("herd.train.cli:pretrain", "pre-train a Llama 3 model on packed token shards"),
}


def _load(target: str) -> tuple[Any, Any]:
    module_name, name = target.split(":")
    module = importlib.import_module(module_name)
    return getattr(module, f"add_{name}_args"), getattr(module, f"run_{name}")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except where the help text already states one (dataclass flags do)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default:" in text or action.default is None:
            return text
        return super()._get_help_string(action)


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="herd",
        description="herd: the Llama 3 system end to end. Run `herd COMMAND --help` for a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n" + "\n".join(f"  {n:<11} {h}" for n, (_, h) in COMMANDS.items()),
    )
    parser.add_argument("command", nargs="?", choices=list(COMMANDS), metavar="COMMAND")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        top = _top_parser()
        args, _ = top.parse_known_args(argv)
        if args.version:
            from herd import __version__

            print(f"herd {__version__}")
            return 0
        top.print_help()
        return 0 if not argv else 2
    name, rest = argv[0], argv[1:]
    target, help_text = COMMANDS[name]
    try:
        add_args, run = _load(target)
    except ImportError as e:
        print(f"herd: error: `herd {name}` needs a module that failed to import ({e}); "
              "reinstall herd with `pip install -e .`.", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog=f"herd {name}", description=help_text,
                                     formatter_class=_HelpFormatter)
    add_args(parser)
    args = parser.parse_args(rest)
    try:
        code = run(args)
    except HerdError as e:
        print(f"herd: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nherd: interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


# ---------------------------------------------------------------------------------------------
# Dataclass configs -> command-line flags. Each field becomes --field-name with the field's
# docstring (the string literal under it) as help text.


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


def _base_type(tp: Any) -> tuple[type, bool]:
    """(scalar type, optional?) of an annotation like `int | None`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _parse_bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got '{text}'")


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, *, skip: tuple[str, ...] = (),
                       group: str | None = None) -> None:
    """Add one --flag per field of dataclass `cls`; defaults are None so unset flags are detectable."""
    target = parser.add_argument_group(group) if group else parser
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        tp, optional = _base_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        help_text = (docs.get(f.name, "") + f" (default: {default})").strip()
        flag = "--" + f.name.replace("_", "-")
        if tp is bool:
            target.add_argument(flag, type=_parse_bool, default=None, metavar="BOOL", help=help_text)
        elif tp in (int, float, str):
            target.add_argument(flag, type=tp, default=None, help=help_text)
        else:  # lists and other structures: comma-separated scalars
            target.add_argument(flag, type=str, default=None, help=help_text + " (comma-separated)")


def dataclass_from_args(cls: type, args: argparse.Namespace, base: Any | None = None, **extra: Any) -> Any:
    """Build `cls` from parsed flags: fields from `base` (or defaults), overridden by flags that were set."""
    values = dataclasses.asdict(base) if base is not None else {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        value = getattr(args, f.name, None)
        if value is None:
            continue
        tp, _ = _base_type(hints[f.name])
        if isinstance(value, str) and typing.get_origin(tp) in (list, tuple):
            (elem,) = typing.get_args(tp)[:1]
            value = [elem(v) for v in value.split(",") if v]
        values[f.name] = value
    values.update(extra)
    return cls(**values)


if __name__ == "__main__":
    sys.exit(main())
