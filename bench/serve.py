"""Serving throughput: `herd serve` under 1, 4, 16 and 64 concurrent streaming clients vs the same
requests sent one at a time, on the same server, same weights, same run.

    python bench/serve.py                          # herd-100m, fp32, random weights, prompt 128, 32 new tokens
    python bench/serve.py --preset herd-1m --clients 1,4,16,64 --requests 64
    python bench/serve.py --checkpoint ckpt/my-model --compile

Every request is a /v1/completions call with a prompt of random token ids (so any vocabulary works),
greedy, streamed with usage, through the official wire format (httpx, one connection per client).
Reported per concurrency: output tokens/s over the wall time of the whole load, the ratio to the
one-at-a-time rate, and the median / 90th-percentile time to first token. The server runs in this
process on a background thread (uvicorn); the torch forward releases the GIL, so client threads do
not slow the engine down much, but on 2 cores they do share the CPU with it.

Where the `xllamacpp` package (a prebuilt llama.cpp server, in the test extra) is installed, the same
load runs against llama.cpp's server in process (continuous batching, one slot per client of the
largest level, prompt cache off) on the same weights written as GGUF F32 by herd's writer, and the
herd / llama.cpp ratio is printed per level: the CPU anchor. `--no-llamacpp` skips it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import torch

from herd.configs import get_preset
from herd.inference.server.runner import ServerConfig, ServerThread, build_app
from herd.model import Transformer
from herd.tokenizer import Tokenizer


def one_request(client: httpx.Client, url: str, prompt: list[int], max_tokens: int) -> tuple[int, float]:
    """(completion tokens, seconds to the first token) of one streamed greedy completion."""
    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first, tokens = None, 0
    with client.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.read()[:200]!r}")
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and first is None:
                first = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return tokens, first if first is not None else float("nan")


def run_load(url: str, prompts: list[list[int]], max_tokens: int, clients: int) -> dict[str, float]:
    """Send every prompt with `clients` concurrent connections (closed loop); tokens/s and TTFT."""
    lock = threading.Lock()
    todo = list(prompts)
    results: list[tuple[int, float]] = []

    def worker() -> None:
        with httpx.Client() as client:
            while True:
                with lock:
                    if not todo:
                        return
                    prompt = todo.pop()
                res = one_request(client, url, prompt, max_tokens)
                with lock:
                    results.append(res)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for f in [pool.submit(worker) for _ in range(clients)]:
            f.result()
    wall = time.perf_counter() - t0
    ttfts = sorted(r[1] for r in results)
    tokens = sum(r[0] for r in results)
    return {"tokens": tokens, "wall": wall, "tok_s": tokens / wall, "ttft_p50": statistics.median(ttfts),
            "ttft_p90": ttfts[min(len(ttfts) - 1, int(0.9 * len(ttfts)))]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="herd-100m")
    ap.add_argument("--checkpoint", default=None, help="serve these weights instead of a random preset")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--clients", default="1,4,16,64", help="comma-separated concurrency levels")
    ap.add_argument("--requests", type=int, default=0, help="requests per level (default: max(16, 2 x clients))")
    ap.add_argument("--sequential-requests", type=int, default=8, help="requests sent one at a time (the baseline)")
    ap.add_argument("--max-batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-llamacpp", action="store_true", help="skip the llama.cpp anchor")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.checkpoint:
        from herd.checkpoint import load_checkpoint

        model = load_checkpoint(args.checkpoint)
    else:
        model = Transformer(get_preset(args.preset))
        model.init_weights()
        model.eval()
    vocab = model.args.vocab_size
    tok = Tokenizer({bytes([i]): i for i in range(256)}, name="bytes")  # prompts are ids; any vocab >= 512 works
    levels = [int(c) for c in args.clients.split(",") if c]
    ctx = args.prompt_len + args.max_tokens
    cfg = ServerConfig(max_batch_size=args.max_batch_size, max_queue=4096, max_seq_len=ctx, compile=args.compile)
    app = build_app(model, tok, cfg, model_name="bench")
    g = torch.Generator().manual_seed(args.seed)

    def prompts(n: int) -> list[list[int]]:  # distinct prompts: the prefix cache must not help
        return [torch.randint(0, vocab, (args.prompt_len,), generator=g).tolist() for _ in range(n)]

    print(f"model {args.checkpoint or args.preset} ({model.num_params() / 1e6:.1f}M params, fp32), prompt "
          f"{args.prompt_len}, {args.max_tokens} new tokens, greedy, torch threads {torch.get_num_threads()}, "
          f"cpus {os.cpu_count()}, load {os.getloadavg()[0]:.1f}", flush=True)
    with ServerThread(app) as srv:
        run_load(srv.url, prompts(2), args.max_tokens, 2)  # warm up (and compile)
        base = run_load(srv.url, prompts(args.sequential_requests), args.max_tokens, 1)
        print(f"one at a time : {base['tok_s']:8.1f} tok/s   TTFT p50 {base['ttft_p50'] * 1e3:7.0f} ms", flush=True)
        print(f"{'clients':>8} {'requests':>8} {'tok/s':>9} {'x seq':>7} {'TTFT p50':>10} {'TTFT p90':>10}")
        herd_rows = {}
        for c in levels:
            n = args.requests or max(16, 2 * c)
            r = herd_rows[c] = run_load(srv.url, prompts(n), args.max_tokens, c)
            print(f"{c:>8} {n:>8} {r['tok_s']:9.1f} {r['tok_s'] / base['tok_s']:6.2f}x "
                  f"{r['ttft_p50'] * 1e3:8.0f}ms {r['ttft_p90'] * 1e3:8.0f}ms", flush=True)
        stats = app.state.service.engine.stats()
        print(f"preemptions {stats['preemptions']}, KV blocks {stats['kv_blocks_total']}", flush=True)
    if args.no_llamacpp:
        return 0
    try:
        import xllamacpp  # noqa: F401
    except ImportError as e:
        print(f"llama.cpp anchor skipped: {e} (pip install xllamacpp)")
        return 0
    llama_levels(model, args, levels, base["tok_s"], herd_rows, prompts)
    return 0


def llama_levels(model: Transformer, args: argparse.Namespace, levels: list[int], herd_seq: float,
                 herd_rows: dict[int, dict[str, float]], prompts) -> None:
    """The same load against llama.cpp's server (xllamacpp, in process) on the same weights as GGUF F32."""
    import tempfile
    from pathlib import Path

    import xllamacpp

    from decode import _tiny_tokenizer  # bench/decode.py: a vocabulary for a GGUF of random weights
    from herd.checkpoint.gguf import write_gguf

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        path = folder / "model-f32.gguf"
        write_gguf(model, Tokenizer.from_file(_tiny_tokenizer(folder, model.args.vocab_size)), path, qtype="f32",
                   progress=False)
        slots = max(levels)
        params = xllamacpp.CommonParams()
        params.model.path = str(path)
        params.n_parallel = slots
        params.n_ctx = slots * (args.prompt_len + args.max_tokens + 8)
        params.n_batch = params.n_ubatch = 512
        params.cpuparams.n_threads = params.cpuparams_batch.n_threads = torch.get_num_threads()
        params.cache_prompt = False
        params.warmup = True
        server = xllamacpp.Server(params)

        def one(prompt: list[int]) -> tuple[int, float]:
            t0 = time.perf_counter()
            first: list[float] = []
            count = [0]

            def on_chunk(chunk: dict) -> None:  # OpenAI-shaped chunks; the last one carries usage
                if chunk.get("usage"):
                    count[0] = chunk["usage"]["completion_tokens"]
                elif not first and chunk.get("choices"):
                    first.append(time.perf_counter() - t0)

            server.handle_completions({"prompt": prompt, "max_tokens": args.max_tokens, "temperature": 0,
                                       "ignore_eos": True, "stream": True}, on_chunk)
            return count[0], first[0] if first else float("nan")

        def load(ps: list[list[int]], clients: int) -> dict[str, float]:
            lock = threading.Lock()
            todo, results = list(ps), []

            def worker() -> None:
                while True:
                    with lock:
                        if not todo:
                            return
                        prompt = todo.pop()
                    r = one(prompt)
                    with lock:
                        results.append(r)

            t0 = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                for f in [pool.submit(worker) for _ in range(clients)]:
                    f.result()
            wall = time.perf_counter() - t0
            ttfts = sorted(r[1] for r in results)
            return {"tok_s": sum(r[0] for r in results) / wall, "ttft_p50": statistics.median(ttfts)}

        load(prompts(2), 2)
        seq = load(prompts(args.sequential_requests), 1)
        print(f"llama.cpp F32 (xllamacpp, {slots} slots, continuous batching, same weights, same prompts' shape)")
        print(f"one at a time : {seq['tok_s']:8.1f} tok/s   TTFT p50 {seq['ttft_p50'] * 1e3:7.0f} ms   "
              f"(herd / llama.cpp {herd_seq / seq['tok_s']:.2f}x)", flush=True)
        print(f"{'clients':>8} {'tok/s':>9} {'x seq':>7} {'TTFT p50':>10} {'herd/llama.cpp':>15}")
        for c in levels:
            n = args.requests or max(16, 2 * c)
            r = load(prompts(n), c)
            print(f"{c:>8} {r['tok_s']:9.1f} {r['tok_s'] / seq['tok_s']:6.2f}x {r['ttft_p50'] * 1e3:8.0f}ms "
                  f"{herd_rows[c]['tok_s'] / r['tok_s']:14.2f}x", flush=True)


if __name__ == "__main__":
    sys.exit(main())
