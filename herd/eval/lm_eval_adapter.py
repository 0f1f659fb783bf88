"""herd as an EleutherAI lm-evaluation-harness model: any lm-eval task runs on a herd checkpoint.

    herd-lm-eval --model herd --model_args checkpoint=ckpt/ --tasks arc_easy,hellaswag
    python -m herd.eval.lm_eval_cli --model herd --model_args checkpoint=ckpt/,dtype=bf16 --tasks mmlu

Both are lm-eval's own command line (same flags, same output) with the model registered first:
lm-eval 0.4 finds models only in its own table, not through package entry points, so plain `lm_eval`
cannot see herd. From Python, importing this module registers it:

    import lm_eval, herd.eval.lm_eval_adapter
    lm_eval.simple_evaluate(model="herd", model_args="checkpoint=ckpt/", tasks=["arc_easy"])

or pass an instance: `lm_eval.simple_evaluate(model=HerdLM(checkpoint="ckpt/"), ...)`.

model_args: checkpoint (required unless a model is passed in Python), tokenizer, dtype (fp32 / bf16 /
fp16), device, batch_rows (rows per forward, default 64), max_batch_tokens (default 8192), max_length,
max_gen_toks, add_bos_token (default true). lm-eval's own --batch_size is ignored: herd batches by
its token budget (lm-eval's CLI passes batch_size 1 by default, which would only slow herd down).

It implements lm-eval's three requests on herd's own machinery: `loglikelihood` on herd's scorer
(shared contexts computed once), `loglikelihood_rolling` as disjoint windows of the model's context,
and `generate_until` on herd's Engine with stop strings. Tokenization follows lm-eval's Hugging Face
backend with a Llama 3 tokenizer: begin_of_text first, special-token strings in the text recognised,
so `--model herd` and `--model hf` score the same requests. One deliberate difference: for rolling
log-likelihoods (perplexity tasks) the Hugging Face backend also scores the tokenizer's own
begin_of_text after its prefix token; herd scores the document's tokens only.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from herd.errors import HerdError
from herd.eval.scorer import ScorerConfig, loglikelihoods, rolling_windows

_BOOL = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _as_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in _BOOL:
        return _BOOL[str(value).lower()]
    raise HerdError(f"expected true or false, got '{value}'.")


@register_model("herd")
class HerdLM(TemplateLM):
    """lm-eval model over a herd Transformer and Tokenizer."""

    def __init__(self, checkpoint: str | None = None, tokenizer: str | None = None, dtype: str | None = None,
                 device: str | None = None, batch_rows: int = 64, max_batch_tokens: int = 8192,
                 max_length: int | None = None, max_gen_toks: int = 256, add_bos_token: bool | str = True,
                 model: Any = None, herd_tokenizer: Any = None, batch_size: Any = None, max_batch_size: Any = None,
                 **unknown: Any) -> None:
        super().__init__()
        if unknown:
            raise HerdError(f"unknown --model_args for herd: {', '.join(sorted(unknown))}; use checkpoint, tokenizer, "
                            "dtype, device, batch_rows, max_batch_tokens, max_length, max_gen_toks, add_bos_token.")
        if model is None:
            if not checkpoint:
                raise HerdError("the herd lm-eval model needs --model_args checkpoint=PATH.")
            from herd.eval.loading import load_model_and_tokenizer

            if device and str(device).startswith("cuda") and not torch.cuda.is_available():
                device = None  # lm-eval's default device is cuda; here there is none
            model, herd_tokenizer, _info = load_model_and_tokenizer(checkpoint, tokenizer, dtype, device)
        elif herd_tokenizer is None:
            raise HerdError("HerdLM(model=...) needs herd_tokenizer= too.")
        self.model = model.eval()
        self.tok = herd_tokenizer
        self._max_length = int(max_length or model.args.max_seq_len)
        rows = int(batch_rows)
        self.scorer = ScorerConfig(batch_size=rows, max_batch_tokens=int(max_batch_tokens))
        self.gen_batch_size = max(1, min(rows, 32))
        self._max_gen_toks = int(max_gen_toks)
        self.add_bos_token = _as_bool(add_bos_token)
        self._device = self.model.tok_embeddings.weight.device

    # -- what lm-eval asks of a model -----------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return f"herd-{(self.tok.sha256 or '')[:16]}"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """Like the Hugging Face backend with a Llama 3 tokenizer: begin_of_text first unless the
        string already starts with it, special-token strings parsed as special tokens."""
        bos_text = "<|begin_of_text|>"
        add = self.add_bos_token if add_special_tokens is None else add_special_tokens
        if add_special_tokens is None and string.startswith(bos_text):
            add = False
        ids = self.tok.encode(string, allowed_special="all")
        return ([self.tok.bos_id] + ids) if add else ids

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tok.decode(tokens)

    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str], list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        pairs = []
        for (_, context_enc, continuation_enc) in requests:
            if len(continuation_enc) > self.max_length:
                raise HerdError(f"a continuation of {len(continuation_enc)} tokens does not fit the context of "
                                f"{self.max_length}; raise max_length in --model_args if the model allows it.")
            keep = self.max_length + 1 - len(continuation_enc)  # left-truncate like lm-eval's HF backend
            pairs.append((list(context_enc)[-keep:], list(continuation_enc)))
        bar = tqdm(total=len(pairs), desc="herd loglikelihood", disable=disable_tqdm, file=sys.stderr)
        try:
            out = loglikelihoods(self.model, pairs, self.scorer, max_length=self.max_length, progress=bar.update)
        finally:
            bar.close()
        for ((context, continuation), _, _), result in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood", (context, continuation), result)
        return out

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        windows, owners = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for w in rolling_windows(self.tok_encode(string, add_special_tokens=False), self.prefix_token_id,
                                     self.max_length):
                windows.append(w)
                owners.append(i)
        bar = tqdm(total=len(windows), desc="herd loglikelihood_rolling", disable=disable_tqdm, file=sys.stderr)
        try:
            scores = loglikelihoods(self.model, windows, self.scorer, max_length=self.max_length, progress=bar.update)
        finally:
            bar.close()
        totals = [0.0] * len(requests)
        for owner, (ll, _) in zip(owners, scores):
            totals[owner] += ll
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        from herd.eval.generate import generate_until
        from herd.inference.engine import Engine
        from herd.inference.sampling import SamplingParams

        groups: dict[str, list[int]] = {}
        kwargs_of: list[dict] = []
        for i, req in enumerate(requests):
            kwargs = dict(req.args[1]) if len(req.args) > 1 and req.args[1] else {}
            kwargs_of.append(kwargs)
            groups.setdefault(repr(sorted((k, repr(v)) for k, v in kwargs.items() if k != "until")), []).append(i)
        out = [""] * len(requests)
        bar = tqdm(total=len(requests), desc="herd generate_until", disable=disable_tqdm, file=sys.stderr)
        try:
            for members in groups.values():
                kw = kwargs_of[members[0]]
                max_new = int(kw.get("max_gen_toks", self.max_gen_toks))
                if max_new >= self.max_length:
                    raise HerdError(f"max_gen_toks {max_new} leaves no room for a prompt in the context of "
                                    f"{self.max_length}.")
                temperature = float(kw.get("temperature", 0.0) or 0.0) if kw.get("do_sample", False) else 0.0
                params = SamplingParams(temperature=temperature, top_p=float(kw.get("top_p", 1.0) or 1.0),
                                        top_k=kw.get("top_k"), seed=kw.get("seed"))
                prompts, untils = [], []
                for i in members:
                    until = kwargs_of[i].get("until") or []
                    until = [until] if isinstance(until, str) else list(until)
                    ids = self.tok_encode(requests[i].args[0])[-(self.max_length - max_new):]
                    prompts.append(ids)
                    untils.append(until + [self.tok.decode([self.eot_token_id])])
                need = max(len(p) for p in prompts) + max_new
                engine = Engine(self.model, max_batch_size=min(self.gen_batch_size, len(members)), max_seq_len=need)
                texts = generate_until(engine, self.tok, prompts, untils, [max_new] * len(members), params,
                                       progress=bar.update)
                del engine
                for i, text in zip(members, texts):
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        finally:
            bar.close()
        return out

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        from herd.tokenizer import ChatFormat

        return ChatFormat(self.tok).render(chat_history, add_generation_prompt=add_generation_prompt)



if __name__ == "__main__":
    from herd.eval.lm_eval_cli import main

    main()
