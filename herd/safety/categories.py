"""Llama Guard hazard categories: the published taxonomies, custom lists, exclusions, and category files.

A category is a code (`S1`), a short name and an optional description (the policy text that
`with_descriptions` writes under the name). Names are kept without their closing period; the
prompt format adds the punctuation each Llama Guard version was trained with.

The default lists are the short names Meta's own prompt renderers use, which differ from the
model cards' display names in three places (model card -> prompt): "Sex-Related Crimes" -> "Sex
Crimes", "Child Sexual Exploitation" -> "Child Exploitation", "Suicide & Self-Harm" -> "Self-Harm".
Sources: the chat templates of meta-llama/Meta-Llama-Guard-2-8B and meta-llama/Llama-Guard-3-8B
on Hugging Face, llama-recipes' `inference/prompt_format_utils.py` (LLAMA_GUARD_2_CATEGORY,
LLAMA_GUARD_3_CATEGORY) and llama-stack's Llama Guard shield (SAFETY_CATEGORIES_TO_CODE_MAP).
The model cards (PurpleLlama `Llama-Guard2/MODEL_CARD.md`, `Llama-Guard3/8B/MODEL_CARD.md`) give
the taxonomy itself: 11 MLCommons hazards for Guard 2, 13 + Code Interpreter Abuse (S14, 8B
model only) for Guard 3.

Excluding categories keeps the codes of the others (S1, S3, ... stay as the model learned them),
as llama-stack's `excluded_categories` and the Llama Guard 3 1B template's
`excluded_category_keys` do. A custom list is numbered S1..Sn in the order given, as
llama-recipes' `build_custom_prompt` numbers it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from herd.errors import HerdError

CODE_RE = re.compile(r"^[A-Z]{1,3}\d{1,3}$")
"""A category code: a letter prefix and a number (S1 in Llama Guard 2/3, O1 in Llama Guard 1)."""


@dataclass(frozen=True)
class Category:
    """One hazard category of a guard prompt."""

    code: str
    """The code the guard answers with, e.g. "S1"."""
    name: str
    """Short name without the closing period, e.g. "Violent Crimes"."""
    description: str = ""
    """Policy text shown under the name when the prompt is built with descriptions."""


def _numbered(names: Sequence[str]) -> tuple[Category, ...]:
    return tuple(Category(f"S{i}", name) for i, name in enumerate(names, 1))


LLAMA_GUARD_2_CATEGORIES: tuple[Category, ...] = _numbered([
    "Violent Crimes", "Non-Violent Crimes", "Sex Crimes", "Child Exploitation", "Specialized Advice", "Privacy",
    "Intellectual Property", "Indiscriminate Weapons", "Hate", "Self-Harm", "Sexual Content"])
"""Llama Guard 2's S1-S11 (MLCommons AI Safety v0.5 hazards) as its prompt names them."""

LLAMA_GUARD_3_CATEGORIES: tuple[Category, ...] = _numbered([
    "Violent Crimes", "Non-Violent Crimes", "Sex Crimes", "Child Exploitation", "Defamation", "Specialized Advice",
    "Privacy", "Intellectual Property", "Indiscriminate Weapons", "Hate", "Self-Harm", "Sexual Content", "Elections",
    "Code Interpreter Abuse"])
"""Llama Guard 3's S1-S14 as its prompt names them (the 1B model and llama-stack leave out S14)."""


def default_categories(version: int) -> tuple[Category, ...]:
    """The published category list of Llama Guard `version` (2 or 3)."""
    if version == 2:
        return LLAMA_GUARD_2_CATEGORIES
    if version == 3:
        return LLAMA_GUARD_3_CATEGORIES
    raise HerdError(f"unknown Llama Guard version {version}; use 2 ([INST] prompt, S1-S11) or 3 (Llama 3 chat "
                    "tokens, S1-S14).")


def check_categories(categories: Sequence[Category]) -> tuple[Category, ...]:
    """The list as a tuple, or HerdError: empty, a malformed code, a duplicate code or an empty name."""
    cats = tuple(categories)
    if not cats:
        raise HerdError("the guard has no categories left; keep at least one (check --exclude and the categories "
                        "file).")
    seen: dict[str, str] = {}
    for c in cats:
        if not isinstance(c.code, str) or not CODE_RE.match(c.code):
            raise HerdError(f"category code {c.code!r} is not a code like S1 (letters then a number); fix the "
                            "categories file.")
        if not isinstance(c.name, str) or not c.name.strip():
            raise HerdError(f"category {c.code} has no name; give every category a short name.")
        if c.code in seen:
            raise HerdError(f"category code {c.code} appears twice ({seen[c.code]!r} and {c.name!r}); every "
                            "category needs its own code.")
        seen[c.code] = c.name
    return cats


def exclude_categories(categories: Sequence[Category], codes: Iterable[str]) -> tuple[Category, ...]:
    """The categories without `codes` (the others keep their codes); HerdError for a code not in the list."""
    codes = [c.strip() for c in codes if c.strip()]
    known = {c.code for c in categories}
    unknown = [c for c in codes if c not in known]
    if unknown:
        raise HerdError(f"cannot exclude {', '.join(unknown)}: not among the guard's categories "
                        f"({', '.join(c.code for c in categories)}).")
    return check_categories([c for c in categories if c.code not in set(codes)])


def custom_categories(items: Sequence[Any]) -> tuple[Category, ...]:
    """Categories from names, (name, description) pairs or {"name", "description", "code"} dicts.

    Items without a code are numbered S1..Sn by position; given codes are kept (and checked).
    """
    out = []
    for i, item in enumerate(items, 1):
        if isinstance(item, Category):
            out.append(item)
        elif isinstance(item, str):
            out.append(Category(f"S{i}", item.strip()))
        elif isinstance(item, Mapping):
            extra = set(item) - {"code", "name", "description"}
            if extra or "name" not in item:
                raise HerdError(f"category {i} must be {{'name': ..., 'description': ..., 'code': ...}} "
                                f"(name required); got keys {sorted(map(str, item))}.")
            if not all(isinstance(item.get(k, ""), str) for k in ("code", "name", "description")):
                raise HerdError(f"category {i}: code, name and description must be strings.")
            out.append(Category(item.get("code") or f"S{i}", item["name"].strip(), item.get("description", "")))
        elif isinstance(item, (list, tuple)) and len(item) == 2 and all(isinstance(x, str) for x in item):
            out.append(Category(f"S{i}", item[0].strip(), item[1]))
        else:
            raise HerdError(f"category {i} is {type(item).__name__}; give a name, a (name, description) pair or "
                            "a {'name', 'description'} object.")
    return check_categories(out)


def load_categories(path: str | Path) -> tuple[Category, ...]:
    """A categories file: a JSON array of names or {"name", "description", "code"} objects."""
    path = Path(path)
    if not path.is_file():
        raise HerdError(f"categories file {path} does not exist; pass a JSON array of "
                        '{"name": ..., "description": ...} objects.')
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise HerdError(f"categories file {path} is not valid JSON ({e}); write a JSON array of "
                        '{"name": ..., "description": ...} objects.') from None
    if not isinstance(items, list):
        raise HerdError(f"categories file {path} holds a JSON {type(items).__name__}, not an array of categories.")
    return custom_categories(items)
