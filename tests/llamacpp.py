"""Test helper: run a GGUF file in llama.cpp (the prebuilt `xllamacpp` package) and ask it for
next-token log-probabilities, greedy continuations, tokenization and chat-template rendering."""

from __future__ import annotations

import json
import math
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


class LlamaCpp:
    """A llama.cpp server on one GGUF file (in-process; its HTTP endpoint is used for /tokenize)."""

    def __init__(self, path: Path, n_ctx: int = 256, threads: int = 1):
        import xllamacpp

        params = xllamacpp.CommonParams()
        params.model.path = str(path)
        params.n_ctx = n_ctx
        params.cpuparams.n_threads = threads
        params.cpuparams_batch.n_threads = threads
        params.warmup = False
        params.cache_prompt = False  # every request evaluates its whole prompt
        self.server = xllamacpp.Server(params)
        self.base = self.server.listening_address

    def top_probs(self, ids: list[int], k: int = 10) -> dict[int, float]:
        """{token id: probability} of the k most likely next tokens after the token ids `ids`."""
        r = self.server.handle_completions({"prompt": ids, "max_tokens": 1, "temperature": 0, "n_probs": k,
                                            "logprobs": k})
        top = r["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
        return {t["id"]: math.exp(t["logprob"]) for t in top}

    def greedy(self, ids: list[int], n: int) -> list[int]:
        """n greedily decoded token ids after `ids` (the native /completion endpoint returns the ids
        themselves; the OpenAI one merges tokens that end inside a UTF-8 character)."""
        r = self._post("/completion", {"prompt": ids, "n_predict": n, "temperature": 0, "ignore_eos": True,
                                       "return_tokens": True, "cache_prompt": False})
        return r["tokens"]

    def completion(self, body: dict) -> dict:
        return self.server.handle_completions(body)

    def _post(self, path: str, body: dict) -> dict:
        req = urllib.request.Request(self.base + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as f:
            return json.loads(f.read())

    def tokenize(self, text: str, add_bos: bool = False, specials: bool = True) -> list[int]:
        return self._post("/tokenize", {"content": text, "add_special": add_bos, "parse_special": specials})["tokens"]

    def apply_template(self, messages: list[dict]) -> str:
        return self._post("/apply-template", {"messages": messages})["prompt"]


@contextmanager
def llamacpp(path: Path, **kw) -> Iterator[LlamaCpp]:
    server = LlamaCpp(path, **kw)
    try:
        yield server
    finally:
        del server.server
