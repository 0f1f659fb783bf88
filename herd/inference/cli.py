"""`herd generate` and `herd chat`: text in, streamed text out, on top of the token-id Engine.

Tokenizing, the Llama 3 chat format and streaming UTF-8 decode happen here; the engine sees ids.
Sampling flags (--temperature, --top-p, --top-k, --min-p, --seed, --max-new-tokens, --stop-tokens)
come from the SamplingParams dataclass. The tokenizer's stop tokens (end_of_text, eom, eot) always
end a reply.

Faster CPU decoding: --quantize int8|int4 replaces the model's linear layers (herd.quant), and
--draft CKPT decodes speculatively with a small model of the same tokenizer
(herd.inference.speculative; the acceptance rate is printed at the end).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from herd.flags import add_bool_flag, add_dataclass_args, dataclass_from_args
from herd.errors import HerdError
from herd.inference.engine import Engine
from herd.inference.sampling import SamplingParams
from herd.threads import add_threads_flag, apply_threads

_DTYPES = ["fp32", "bf16", "fp16"]


def _add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path, required=True,
                        help="checkpoint folder (herd, Hugging Face or Meta format) or a .gguf file")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="tokenizer.model (default: the one stored with the checkpoint)")
    parser.add_argument("--adapter", type=Path, default=None,
                        help="LoRA adapter folder (herd's or peft's) to apply on top of the checkpoint, unmerged")
    parser.add_argument("--dtype", choices=_DTYPES, default=None,
                        help="compute dtype (default: the checkpoint's)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    add_bool_flag(parser, "--compile", default=False, help="torch.compile the decode step (slow start, faster steps)")
    add_threads_flag(parser)
    parser.add_argument("--max-seq-len", type=int, default=None,
                        help="KV cache length: prompt + reply tokens (default: what is needed, at most the model's context)")
    add_quantize_flags(parser)
    parser.add_argument("--draft", type=Path, default=None,
                        help="checkpoint of a small model with the same tokenizer: speculative decoding, "
                             "same output distribution, fewer forwards of the big model")
    parser.add_argument("--draft-tokens", type=int, default=4, help="tokens the draft proposes per round (with --draft)")
    add_dataclass_args(parser, SamplingParams, skip=("logprobs", "top_logprobs", "prompt_logprobs", "watch_tokens"), group="sampling")


def add_quantize_flags(parser: argparse.ArgumentParser) -> None:
    """--quantize and --group-size (generate, chat and serve)."""
    parser.add_argument("--quantize", choices=["int8", "int4"], default=None,
                        help="weight-only quantization of the linear layers: int8 per channel or int4 per group "
                             "(faster CPU decoding, less memory; the embedding stays in float)")
    parser.add_argument("--group-size", type=int, default=128, help="int4 group size (32, 64, 128 or 256)")


def _load(ns: argparse.Namespace):
    """(model, tokenizer) from the flags, with one-sentence errors for the usual mistakes."""
    from herd.checkpoint import load_checkpoint

    if not ns.checkpoint.exists():
        raise HerdError(f"checkpoint {ns.checkpoint} does not exist; pass the folder `herd init` or `herd convert` wrote.")
    tokenizer = _tokenizer(ns.checkpoint, ns.tokenizer)
    device = ns.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError):
        raise HerdError(f"device '{device}' is not available here; use --device cpu.") from None
    apply_threads(ns.threads, device)
    model = load_checkpoint(ns.checkpoint, device=device, dtype=ns.dtype)
    if getattr(ns, "adapter", None) is not None:
        from herd.posttrain.adapter import load_adapter

        if getattr(ns, "quantize", None):
            raise HerdError("--quantize with --adapter is not supported yet; fold the adapter in with "
                            "`herd merge-lora` and quantize the merged checkpoint.")

        load_adapter(model, ns.adapter)
        model.requires_grad_(False)
    if tokenizer.n_words > model.args.vocab_size:
        raise HerdError(f"the tokenizer has {tokenizer.n_words} tokens but the model only {model.args.vocab_size}; "
                        "use the tokenizer the model was trained with.")
    if getattr(ns, "quantize", None):
        from herd.quant import QuantConfig, quantize_model

        if getattr(model, "quantization", None) is None:
            quantize_model(model, QuantConfig(method=ns.quantize, group_size=ns.group_size))
        elif model.quantization.method != ns.quantize:
            raise HerdError(f"{ns.checkpoint} is already quantized ({model.quantization.method}); drop --quantize "
                            "or load the float checkpoint.")
    return model, tokenizer


def _tokenizer(checkpoint: Path, explicit: Path | None):
    """The tokenizer from --tokenizer, else the one stored with the checkpoint (or inside a GGUF file)."""
    from herd.checkpoint import find_tokenizer
    from herd.tokenizer import Tokenizer

    if explicit is None and checkpoint.suffix.lower() == ".gguf" and checkpoint.is_file():
        from herd.checkpoint.gguf import read_tokenizer

        tok = read_tokenizer(checkpoint)  # a GGUF carries its vocabulary
        if tok is not None:
            return tok
    tok_path = explicit or find_tokenizer(checkpoint)
    if tok_path is None:
        raise HerdError(f"no tokenizer.model found with the checkpoint {checkpoint}; pass --tokenizer PATH.")
    if not Path(tok_path).exists():
        raise HerdError(f"tokenizer file {tok_path} does not exist; pass an existing tokenizer.model with --tokenizer.")
    return Tokenizer.from_file(tok_path)


def _engine(ns: argparse.Namespace, model, tokenizer, max_len: int):
    """The decoder the flags ask for: the batched Engine, or speculative decoding with --draft."""
    if ns.draft is None:
        return Engine(model, max_batch_size=1, max_seq_len=max_len, compile=ns.compile)
    from herd.checkpoint import find_tokenizer, load_checkpoint
    from herd.inference.speculative import SpeculativeDecoder

    if not ns.draft.exists():
        raise HerdError(f"draft checkpoint {ns.draft} does not exist; pass a small model trained with the same tokenizer.")
    if ns.draft_tokens < 1:
        raise HerdError(f"--draft-tokens must be at least 1, got {ns.draft_tokens}.")
    has_tok = find_tokenizer(ns.draft) is not None or ns.draft.suffix.lower() == ".gguf"
    if has_tok:
        if not _same_vocabulary(_tokenizer(ns.draft, None), tokenizer):
            raise HerdError(f"the draft model {ns.draft} comes with another tokenizer than the model; "
                            "speculative decoding needs a draft trained with the same tokenizer.")
    draft = load_checkpoint(ns.draft, device=model.tok_embeddings.weight.device, dtype=ns.dtype)
    if draft.args.vocab_size < tokenizer.n_words:
        raise HerdError(f"the draft model has {draft.args.vocab_size} vocabulary rows but the tokenizer "
                        f"{tokenizer.n_words} tokens; speculative decoding needs a draft with the same tokenizer.")
    return SpeculativeDecoder(model, draft, k=ns.draft_tokens, max_seq_len=max_len)


def _same_vocabulary(a, b) -> bool:
    """Whether two tokenizers map ids to the same bytes (by file hash when both came from files)."""
    if a.sha256 is not None and b.sha256 is not None:
        return a.sha256 == b.sha256
    return a.n_bpe == b.n_bpe and all(a.token_bytes(i) == b.token_bytes(i) for i in range(a.n_bpe))


def _draft_summary(engine) -> str:
    from herd.inference.speculative import SpeculativeDecoder

    if not isinstance(engine, SpeculativeDecoder) or not engine.stats.rounds:
        return ""
    stats = engine.stats
    return (f", draft acceptance {stats.acceptance_rate:.0%} ({stats.tokens_per_round:.2f} tokens per forward "
            "of the model)")


def _sampling(ns: argparse.Namespace, tokenizer) -> SamplingParams:
    params = dataclass_from_args(SamplingParams, ns)
    bad = [t for t in params.stop_tokens if not 0 <= t < tokenizer.n_words]
    if bad:
        raise HerdError(f"--stop-tokens {','.join(map(str, bad))} are not token ids of this tokenizer "
                        f"(0..{tokenizer.n_words - 1}); pass ids from `herd tokenizer encode`.")
    # <|begin_of_text|> never belongs inside generated text: a base model emits it only to start a
    # new document (after the one it was writing ended), so it ends the reply like the stop tokens
    params.stop_tokens = sorted(set(params.stop_tokens) | set(tokenizer.stop_tokens) | {tokenizer.bos_id})
    return params


def _context(ns: argparse.Namespace, model, need: int) -> int:
    """KV cache length: --max-seq-len (at most the model's context), else `need` capped at the context.

    The cache is allocated whole up front, so a length beyond what the model was trained for would
    cost memory for positions it cannot use well (100000 slots of a 512-context model: ~20 GB).
    """
    limit = model.args.max_seq_len
    if ns.max_seq_len is not None:
        if ns.max_seq_len < 2:
            raise HerdError(f"--max-seq-len must be at least 2, got {ns.max_seq_len}.")
        if ns.max_seq_len > limit:
            print(f"herd: note: --max-seq-len {ns.max_seq_len} is longer than the model's context of {limit} "
                  f"tokens; using {limit}.", file=sys.stderr)
            return limit
        return ns.max_seq_len
    return min(need, limit)


def _stream_reply(engine: Engine, prompt: list[int], params: SamplingParams, tokenizer, out,
                  stats: dict | None = None) -> tuple[list[int], float]:
    """Generate one reply, writing its text to `out` as it comes. Returns (ids without the stop token, seconds);
    `stats` gets the prompt tokens served from the prefix cache ("cached")."""
    decoder = tokenizer.stream_decoder()
    ids: list[int] = []
    start = time.perf_counter()
    for events in engine.stream([prompt], params):
        for e in events:
            if stats is not None and e.cached_tokens:
                stats["cached"] = e.cached_tokens
            if e.finish_reason == "stop":
                continue
            ids.append(e.token)
            text = decoder.push(e.token)
            if text:
                out.write(text)
                out.flush()
    out.write(decoder.flush())
    out.flush()
    return ids, time.perf_counter() - start


# ---------------------------------------------------------------------------------------------
# herd generate


def add_generate_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", required=True, help="the prompt text ('-' reads it from stdin)")
    add_bool_flag(parser, "--chat", default=False,
                  help="wrap the prompt as one user message in the Llama 3 chat format (for instruct models)")
    add_bool_flag(parser, "--no-bos", default=False, help="do not prepend <|begin_of_text|>")
    _add_common_args(parser)


def run_generate(ns: argparse.Namespace) -> int:
    text = sys.stdin.read() if ns.prompt == "-" else ns.prompt
    model, tokenizer = _load(ns)
    params = _sampling(ns, tokenizer)
    if ns.chat:
        from herd.tokenizer import ChatFormat

        prompt = ChatFormat(tokenizer).encode_dialog_prompt([{"role": "user", "content": text}])
    else:
        prompt = tokenizer.encode(text, bos=not ns.no_bos)
    engine = _engine(ns, model, tokenizer, _context(ns, model, len(prompt) + params.max_new_tokens))
    engine.check_request(prompt, params)
    ids, seconds = _stream_reply(engine, prompt, params, tokenizer, sys.stdout)
    sys.stdout.write("\n")
    print(f"[{len(prompt)} prompt tokens, {len(ids)} generated in {seconds:.2f} s, "
          f"{len(ids) / max(seconds, 1e-9):.1f} tokens/s{_draft_summary(engine)}]", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------
# herd chat

_CHAT_HELP = "commands: /reset (clear the history), /system TEXT (new system prompt, clears history), /exit"


def add_chat_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--system", default=None, help="system prompt")
    parser.add_argument("--chat-style", choices=["hf", "meta"], default="hf",
                        help="'hf': Llama 3.1 Instruct's template (date lines in the system header); "
                             "'meta': Meta's plain dialog format (for models trained from scratch)")
    _add_common_args(parser)


def _fit_history(chat, messages: list[dict], budget: int) -> list[int] | None:
    """Prompt ids of the dialog, dropping the oldest turns (never the system prompt) until it fits `budget`."""
    while True:
        ids = chat.encode_dialog_prompt(messages)
        if len(ids) <= budget:
            return ids
        first = 1 if messages and messages[0]["role"] == "system" else 0
        if len(messages) - first <= 1:  # only the new user message is left and it alone is too long
            return None
        del messages[first]


def run_chat(ns: argparse.Namespace) -> int:
    from herd.tokenizer import ChatFormat

    model, tokenizer = _load(ns)
    params = _sampling(ns, tokenizer)
    chat = ChatFormat(tokenizer, style=ns.chat_style)
    max_len = _context(ns, model, min(model.args.max_seq_len, 8192))
    if params.max_new_tokens >= max_len:
        raise HerdError(f"--max-new-tokens {params.max_new_tokens} leaves no room for the dialog in a context "
                        f"of {max_len}; lower it or raise --max-seq-len.")
    engine = _engine(ns, model, tokenizer, max_len)
    system = [{"role": "system", "content": ns.system}] if ns.system else []
    messages = list(system)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"herd chat ({_CHAT_HELP})", file=sys.stderr)
    while True:
        try:
            line = input(">>> " if interactive else "")
        except EOFError:
            break
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            cmd, _, rest = line.partition(" ")
            if cmd in ("/exit", "/quit"):
                break
            if cmd == "/reset":
                messages = list(system)
                print("[history cleared]", file=sys.stderr)
            elif cmd == "/system":
                system = [{"role": "system", "content": rest.strip()}] if rest.strip() else []
                messages = list(system)
                print("[system prompt set, history cleared]", file=sys.stderr)
            else:
                print(_CHAT_HELP, file=sys.stderr)
            continue
        messages.append({"role": "user", "content": line})
        prompt = _fit_history(chat, messages, max_len - params.max_new_tokens)
        if prompt is None:
            messages.pop()
            print(f"herd: error: that message is longer than the context of {max_len} tokens "
                  f"minus --max-new-tokens {params.max_new_tokens}; send a shorter one.", file=sys.stderr)
            continue
        stats = {"cached": 0}
        ids, seconds = _stream_reply(engine, prompt, params, tokenizer, sys.stdout, stats)
        sys.stdout.write("\n")
        sys.stdout.flush()
        # The engine keeps the KV cache of earlier turns: only the new part of the dialog is computed.
        print(f"[{len(ids)} tokens, {len(ids) / max(seconds, 1e-9):.1f} tokens/s; {stats['cached']} of {len(prompt)} "
              "prompt tokens from the prefix cache]", file=sys.stderr)
        messages.append({"role": "assistant", "content": tokenizer.decode(ids)})
    return 0
