"""Greedy generation until a stop string, on herd's Engine: what generation benchmarks, lm-eval's
`generate_until` and `herd compare` need.

The engine stops on token ids; benchmarks stop on strings ("Q:", "\\n\\n", ...) that may span
several tokens. So each row's text is decoded as it grows and the row is done at the first stop
string (the text is cut there, as lm-eval cuts it) or at an end-of-text token. Prompts are sorted by
length so a batch shares little left padding, and a batch ends as soon as all its rows are done.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

from herd.inference.engine import Engine
from herd.inference.sampling import SamplingParams


def cut_at_stop(text: str, until: Sequence[str]) -> tuple[str, bool]:
    """(text before the earliest stop string, whether one occurred)."""
    cut = min((text.find(s) for s in until if s and s in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def generate_until(engine: Engine, tokenizer, prompts: Sequence[Sequence[int]], until: Sequence[Sequence[str]],
                   max_tokens: Sequence[int], params: SamplingParams | None = None,
                   progress: Callable[[int], None] | None = None) -> list[str]:
    """Completion text of each prompt: greedy (or `params`' sampling), cut at its first stop string.

    prompts: token ids (with begin_of_text if wanted); until: stop strings per prompt;
    max_tokens: generation budget per prompt (prompt + budget must fit the engine's context).
    """
    n = len(prompts)
    out = [""] * n
    order = sorted(range(n), key=lambda i: len(prompts[i]))
    base = params or SamplingParams(temperature=0.0, top_p=1.0)
    stops = sorted(tokenizer.stop_tokens)
    for start in range(0, n, engine.max_batch_size):
        group = order[start:start + engine.max_batch_size]
        plist = [replace(base, max_new_tokens=int(max_tokens[i]), stop_tokens=sorted(set(base.stop_tokens) | set(stops)))
                 for i in group]
        ids: list[list[int]] = [[] for _ in group]
        done = [False] * len(group)
        for events in engine.stream([list(prompts[i]) for i in group], plist):
            for e in events:
                k = e.index
                if done[k]:
                    continue
                if e.finish_reason != "stop":
                    ids[k].append(e.token)
                text, stopped = cut_at_stop(tokenizer.decode(ids[k]), until[group[k]])
                if stopped or e.finish_reason is not None:
                    out[group[k]] = text
                    done[k] = True
                    if progress is not None:
                        progress(1)
            if all(done):
                break  # rows that hit a stop string need no more steps
    return out
