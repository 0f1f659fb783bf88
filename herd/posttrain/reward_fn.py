"""Rewards written in Python: `--reward-fn module:function` or `--reward-fn path/to/file.py:function`.

A reward function is called as `fn(prompt_messages, reply_text) -> float`: the prompt as a list of
chat messages ({"role", "content"}) and the reply as text. It is the verifiable reward of rejection
sampling and PPO / GRPO (an exact-match checker, a format check, a unit test run), e.g.
`herd.posttrain.arithmetic:reward`.

`RewardFunction` wraps one so that a reply it cannot score never stops a long run: an exception or a
value that is not a finite number is counted by its type (`errors`) and the call returns None, which
the caller handles as its documented policy says (skip the sample, or score it as the worst).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import sys
from collections import Counter
from typing import Any, Callable

from herd.errors import HerdError

RewardFn = Callable[[list[dict[str, Any]], str], float]


def load_reward_fn(spec: str) -> RewardFn:
    """The function `spec` names: "package.module:function" or "path/to/file.py:function"."""
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name.isidentifier():
        raise HerdError(f"--reward-fn {spec!r} is not MODULE:FUNCTION or FILE.py:FUNCTION; "
                        "e.g. herd.posttrain.arithmetic:reward or rewards.py:exact_match.")
    if where.endswith(".py"):
        if not os.path.isfile(where):
            raise HerdError(f"--reward-fn: {where} does not exist; pass the path of the Python file.")
        mod_spec = importlib.util.spec_from_file_location(f"herd_reward_fn_{abs(hash(where))}", where)
        module = importlib.util.module_from_spec(mod_spec)
        # registered before it runs, as importlib's recipe does: a file defining a dataclass (or anything
        # that looks its module up in sys.modules) fails to import otherwise
        sys.modules[mod_spec.name] = module
        try:
            mod_spec.loader.exec_module(module)
        except Exception as e:
            sys.modules.pop(mod_spec.name, None)
            raise HerdError(f"--reward-fn: importing {where} failed ({type(e).__name__}: {e}); fix the file.") from e
    else:
        try:
            module = importlib.import_module(where)
        except Exception as e:
            raise HerdError(f"--reward-fn: cannot import {where} ({type(e).__name__}: {e}); "
                            "check the module name, or pass FILE.py:FUNCTION.") from e
    fn = getattr(module, name, None)
    if not callable(fn):
        raise HerdError(f"--reward-fn: {where} has no function {name}; name one defined there.")
    return fn


class RewardFunction:
    """A reward function that never raises: failures are counted and return None."""

    def __init__(self, fn: RewardFn | str):
        self.fn = load_reward_fn(fn) if isinstance(fn, str) else fn
        self.name = fn if isinstance(fn, str) else getattr(fn, "__qualname__", repr(fn))
        self.errors: Counter[str] = Counter()
        self.first_error: str | None = None

    def __call__(self, prompt: list[dict[str, Any]], reply: str) -> float | None:
        try:
            value = self.fn(prompt, reply)
            value = float(value)
            if not math.isfinite(value):
                raise ValueError(f"returned {value}")
        except Exception as e:  # a user's function: any failure is a counted, skipped reply
            kind = "not_a_number" if isinstance(e, (TypeError, ValueError)) else type(e).__name__
            self.errors[kind] += 1
            if self.first_error is None:
                self.first_error = f"{type(e).__name__}: {e}"
            return None
        return value

    def report(self) -> str:
        """One line for the end of a run (empty when every call succeeded)."""
        if not self.errors:
            return ""
        kinds = ", ".join(f"{k}={n}" for k, n in sorted(self.errors.items()))
        return f"reward function {self.name} failed on {sum(self.errors.values())} replies ({kinds}); " \
               f"first: {self.first_error}"
