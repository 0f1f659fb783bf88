"""Judges for pairwise comparison: how likely is the first of two replies the better one?

    class Judge:                      prob_first_better(prompts, firsts, seconds) -> [p, ...]
      LLMJudge                        a checkpoint asked "A or B?"; p = P(A) / (P(A) + P(B)) of its first
                                      answer token (read from the log-likelihoods, nothing sampled)
      RewardModelJudge                any reward function r(prompt, reply); p = sigmoid(r1 - r2)
                                      (Bradley-Terry, the reward model's own training objective)

An LLM judge is sensitive to the order of the replies (it tends to prefer one position); `herd
compare` asks it both ways and averages P(A better) = (p(A, B) + 1 - p(B, A)) / 2, which cancels a
constant position preference. A reward model scores each reply alone, so one order is enough
(`order_sensitive = False`).

New judges plug in through JUDGES: name -> factory(path, **options) -> Judge. "reward" wraps a
reward-model checkpoint (transformers' LlamaForSequenceClassification, as herd.posttrain.reward
saves them) in RewardModelJudge, with herd.posttrain's scorer as r; `judge_kind` tells the two kinds
of checkpoint apart.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

from herd.errors import HerdError

JUDGE_PROMPT = """Act as an impartial judge. Compare the two responses below to the user's request and decide which one is better: more helpful, correct, relevant and clear. Ignore the order in which the responses are shown and do not prefer a response because it is longer.

[User request]
{prompt}

[Response A]
{first}
[End of response A]

[Response B]
{second}
[End of response B]

Answer with a single letter: A if response A is better, B if response B is better."""
"""The question an LLM judge answers (its reply starts with the letter that is scored)."""


class Judge(ABC):
    """Says how likely the first of two replies to a prompt is the better one."""

    name: str = "judge"
    order_sensitive: bool = True
    """Whether the verdict can depend on which reply comes first (then both orders are asked)."""

    @abstractmethod
    def prob_first_better(self, prompts: Sequence[str], firsts: Sequence[str], seconds: Sequence[str]
                          ) -> list[float | None]:
        """P(first reply better) per pair, in [0, 1]; None for a pair the judge cannot read (too long)."""


class RewardModelJudge(Judge):
    """Bradley-Terry judge over a reward function: P(first better) = sigmoid(r(first) - r(second))."""

    name = "reward"
    order_sensitive = False

    def __init__(self, score: Callable[[Sequence[str], Sequence[str]], Sequence[float | None]]):
        """score(prompts, replies) -> one reward per reply (None when it cannot be scored)."""
        self.score = score

    def prob_first_better(self, prompts, firsts, seconds):
        r1 = list(self.score(prompts, firsts))
        r2 = list(self.score(prompts, seconds))
        return [None if a is None or b is None else 1.0 / (1.0 + math.exp(-(float(a) - float(b))))
                for a, b in zip(r1, r2)]


class LLMJudge(Judge):
    """A (chat) checkpoint asked which reply is better; scored by its answer-token probabilities."""

    name = "llm"

    def __init__(self, model: Any, tokenizer: Any, template: str = JUDGE_PROMPT, chat: bool = True,
                 scorer: Any = None):
        self.model, self.tokenizer, self.template, self.chat, self.scorer = model, tokenizer, template, chat, scorer
        ids = [tokenizer.encode(letter) for letter in ("A", "B")]
        if any(len(i) != 1 for i in ids):
            raise HerdError("the judge's tokenizer splits 'A' or 'B' into several tokens; use a Llama 3 tokenizer.")
        self.answer_ids = [i[0] for i in ids]

    def prompt_ids(self, prompt: str, first: str, second: str) -> list[int]:
        text = self.template.format(prompt=prompt, first=first, second=second)
        if not self.chat:
            return self.tokenizer.encode(text + "\nAnswer:", bos=True)
        from herd.tokenizer import ChatFormat

        return ChatFormat(self.tokenizer).encode_dialog_prompt([{"role": "user", "content": text}])

    def prob_first_better(self, prompts, firsts, seconds):
        from herd.eval.scorer import loglikelihoods

        max_len = self.model.args.max_seq_len
        contexts = [self.prompt_ids(p, a, b) for p, a, b in zip(prompts, firsts, seconds)]
        fits = [len(c) <= max_len for c in contexts]
        requests = [(c, [t]) for c, ok in zip(contexts, fits) if ok for t in self.answer_ids]
        lls = [ll for ll, _ in loglikelihoods(self.model, requests, self.scorer)]
        out: list[float | None] = []
        k = 0
        for ok in fits:
            if not ok:
                out.append(None)
                continue
            la, lb = lls[k], lls[k + 1]
            k += 2
            m = max(la, lb)
            out.append(math.exp(la - m) / (math.exp(la - m) + math.exp(lb - m)))
        return out


def _llm_judge(path: str, tokenizer: str | None = None, dtype: str | None = None, device: str | None = None,
               chat: bool = True, **_: Any) -> Judge:
    from herd.eval.loading import load_model_and_tokenizer

    model, tok, _info = load_model_and_tokenizer(path, tokenizer, dtype, device)
    return LLMJudge(model, tok, chat=chat)


def _reward_judge(path: str, dtype: str | None = None, device: str | None = None, **_: Any) -> Judge:
    from herd.eval.loading import pick_device
    from herd.posttrain.reward import load_reward_scorer

    return RewardModelJudge(load_reward_scorer(path, dtype=dtype, device=pick_device(device)))


JUDGES: dict[str, Callable[..., Judge]] = {"llm": _llm_judge, "reward": _reward_judge}
"""Judge kinds for `herd compare --judge-kind`: name -> factory(checkpoint path, **options)."""


def judge_kind(path: str) -> str:
    """'reward' for a reward-model checkpoint (a sequence-classification config), else 'llm'."""
    from herd.posttrain.reward import is_reward_model

    return "reward" if is_reward_model(path) else "llm"
