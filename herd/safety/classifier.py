"""GuardClassifier: any checkpoint herd loads, used as a Llama Guard classifier through the Engine.

Each conversation becomes its guard prompt (herd.safety.prompt); all of them go through one
continuous-batching Engine with greedy decoding, so prompts that share the task line and the
category block (every prompt of one role) reuse those keys and values from the prefix cache.
The guard's answer is parsed (herd.safety.verdict), and its score is the probability that the
first generated token is `unsafe` (the Llama Guard model cards' classifier score), read from the
first step's full distribution through the engine's watch_tokens: no second forward.

The score adds the probabilities of the first tokens of "unsafe" and " unsafe", so a guard that
writes a space after `[/INST]` (Llama Guard 2's prompt ends there) is scored as one that does not.
It is read where the answer starts: a guard that first writes whitespace (Llama Guard 3 1B's chat
template and llama-recipes' PROMPT_TEMPLATE_3 end without the blank line after the assistant header,
so a guard trained on them writes "\n\n" first) is scored at its first non-blank token; scoring
the blank would give p(unsafe) ~ 0 and pass everything.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from herd.errors import HerdError
from herd.inference.engine import Engine
from herd.inference.sampling import SamplingParams
from herd.model import Transformer
from herd.safety.prompt import GuardFormat, guard_turns
from herd.safety.verdict import GuardResult, parse_guard_output
from herd.tokenizer import Tokenizer

Conversation = Sequence[Mapping[str, Any]]


def unsafe_token_ids(tokenizer: Tokenizer) -> list[int]:
    """First tokens of "unsafe" and " unsafe" that do not also begin "safe" / " safe"."""
    safe_first = {tokenizer.encode(s)[0] for s in ("safe", " safe")}
    ids = [tokenizer.encode(s)[0] for s in ("unsafe", " unsafe")]
    return [i for i in dict.fromkeys(ids) if i not in safe_first]


class Answer:
    """A guard's answer as its tokens arrive: the ids, and the watched log-probs where the answer starts
    (the first step whose token is not blank)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.watched: list[float] | None = None
        self._started = False

    def push(self, token: int, watched: list[float] | None, stop: bool) -> None:
        if not self._started:
            blank = not stop and not self.tokenizer.decode([token]).strip()
            if not blank or self.watched is None:  # a blank first token: keep its values until a real one comes
                self.watched = watched
            self._started = not blank
        if not stop:
            self.ids.append(token)


class GuardClassifier:
    """Classify conversations with a guard model: verdict, categories and unsafe score per conversation.

    model, tokenizer: the guard (any herd Transformer with the tokenizer it was trained with).
    fmt: the prompt format (version, categories, descriptions).
    threshold: score at or above which a conversation is flagged (None: the generated verdict decides).
    engine: an Engine over `model` to reuse; by default one is built (greedy, prefix cache on).
    """

    def __init__(self, model: Transformer, tokenizer: Tokenizer, fmt: GuardFormat | None = None,
                 threshold: float | None = 0.5, max_batch_size: int = 16, max_seq_len: int | None = None,
                 engine: Engine | None = None):
        if threshold is not None and not 0.0 <= threshold <= 1.0:
            raise HerdError(f"the guard threshold must be between 0 and 1, got {threshold}.")
        if tokenizer.n_words > model.args.vocab_size:
            raise HerdError(f"the tokenizer has {tokenizer.n_words} tokens but the guard model only "
                            f"{model.args.vocab_size}; use the tokenizer the guard was trained with.")
        self.model, self.tokenizer = model, tokenizer
        self.fmt = fmt or GuardFormat()
        self.threshold = threshold
        self.unsafe_ids = unsafe_token_ids(tokenizer)
        # The longest well-formed answer names every category once: "unsafe\nS1,S2,...". One more
        # token shows whether the guard would have ended there (anything longer is unparseable anyway).
        longest = self.fmt.reply(self.fmt.codes)
        self.max_new_tokens = len(tokenizer.encode(longest)) + 1
        if engine is None:
            ctx = min(max_seq_len or model.args.max_seq_len, model.args.max_seq_len, 8192)
            # Guard prompts are a few hundred tokens: a pool of ~1K tokens per row holds a full batch of
            # them (a longer conversation still runs; the scheduler preempts if the pool runs out) instead
            # of batch x context, which for an 8B guard at 4K context would be 8.6 GB of cache.
            engine = Engine(model, max_batch_size=max_batch_size, max_seq_len=ctx,
                            cache_tokens=max(ctx, max_batch_size * 1024))
        self.engine = engine
        self.engine.vocab_limit = min(self.engine.vocab_limit, tokenizer.n_words)

    def params(self) -> SamplingParams:
        """Greedy decoding of a short answer, reporting log p(unsafe) at every step."""
        stops = sorted(set(self.tokenizer.stop_tokens) | {self.tokenizer.bos_id})
        return SamplingParams(temperature=0.0, max_new_tokens=self.max_new_tokens, stop_tokens=stops,
                              watch_tokens=self.unsafe_ids)

    def prompt(self, conversation: Conversation, role: str | None = None) -> tuple[list[int], str]:
        """(prompt ids, role checked); HerdError if the conversation cannot be checked or is too long."""
        role = self.fmt.role_for(guard_turns(conversation), role)
        ids = self.fmt.encode(self.tokenizer, conversation, role)
        room = self.engine.max_seq_len - self.max_new_tokens
        if len(ids) > room:
            raise HerdError(f"the guard prompt is {len(ids)} tokens, more than the {room} the guard's context of "
                            f"{self.engine.max_seq_len} leaves for its answer; shorten the conversation.")
        return ids, role

    def result(self, ids: list[int], watched: list[float] | None, role: str) -> GuardResult:
        """A GuardResult from the generated ids (no stop token) and the watched log-probs where the answer
        starts (Answer)."""
        text = self.tokenizer.decode([t for t in ids if not self.tokenizer.is_special(t)])
        parsed = parse_guard_output(text)
        score = None if watched is None else min(1.0, sum(math.exp(v) for v in watched))
        return GuardResult(parsed.verdict, parsed.categories, score, text, role)

    def classify(self, conversations: Iterable[Conversation], roles: Sequence[str | None] | None = None,
                 progress: bool = False) -> list[GuardResult]:
        """One GuardResult per conversation, in order (roles: each one's role to check, None = its last turn's).

        HerdError names the conversation (0-based index) that cannot be checked."""
        conversations = list(conversations)
        roles = list(roles) if roles is not None else [None] * len(conversations)
        prompts, checked = [], []
        for i, (conv, role) in enumerate(zip(conversations, roles)):
            try:
                ids, r = self.prompt(conv, role)
            except HerdError as e:
                raise HerdError(f"conversation {i}: {e}") from None
            prompts.append(ids)
            checked.append(r)
        return self.classify_prompts(prompts, checked, progress=progress)

    def classify_prompts(self, prompts: list[list[int]], roles: list[str], progress: bool = False,
                         chunk: int = 256) -> list[GuardResult]:
        """Classify already-encoded guard prompts (in chunks, so memory stays flat over large files)."""
        params = self.params()
        results: list[GuardResult] = []
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(prompts), unit="conv", desc="guard", file=sys.stderr, dynamic_ncols=True)
        for start in range(0, len(prompts), chunk):
            part = prompts[start:start + chunk]
            answers = [Answer(self.tokenizer) for _ in part]
            for events in self.engine.stream(part, params):
                for e in events:
                    answers[e.index].push(e.token, e.watched, e.finish_reason == "stop")
                    if e.finish_reason is not None and bar is not None:
                        bar.update(1)
            results += [self.result(a.ids, a.watched, roles[start + j]) for j, a in enumerate(answers)]
        if bar is not None:
            bar.close()
        return results
