"""Decode and prefill throughput, batch 1 by default: herd (fp32 / int8 / int4, eager and compiled) vs
Hugging Face transformers and llama.cpp (xllamacpp: F32, Q8_0, Q4_0), on the same random weights.

    python bench/decode.py                               # herd-100m, prompt 128, 64 new tokens, 5 rounds
    python bench/decode.py --variants herd-fp32-compiled,herd-int8-compiled,llamacpp-q8_0 --rounds 7
    python bench/decode.py --batch-size 8 --variants herd-fp32,herd-fp32-compiled,hf

How it measures (so a busy machine cannot produce impossible numbers):
- decode is timed per step: the time between consecutive tokens of one generation (herd: Engine.stream
  events; transformers: a streamer's put() calls; llama.cpp: its streamed chunks). Prefill is the
  time to the first token. Nothing is derived by subtracting two runs.
- every variant runs once per round and the rounds interleave the variants (A B C, A B C, ...), so a
  burst of outside load hits all of them alike. Reported: the median over rounds of each round's
  median step, and the spread (lowest..highest round median).
- the CPU (model, flags), the measured read bandwidth (before and after) and the load other
  processes put on the machine during each round (from /proc/stat, minus this process's own CPU
  time) are printed; rounds with more than a quarter core of outside load are flagged.
- bound: batch-1 decode reads every weight once per token, so weight bytes / read bandwidth is the
  ceiling; each variant's tokens/s is shown against it.
- compile: the compiled variants' first generation (which builds the decode step) is timed and shown
  as "setup"; it is not part of the rounds.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from herd.checkpoint import hf_config, to_hf_state_dict
from herd.configs import get_preset
from herd.inference import Engine, SamplingParams
from herd.model import Transformer
from herd.quant import QuantConfig, quantize_model, quantized_bytes

ALL = ("herd-fp32", "herd-fp32-compiled", "herd-int8", "herd-int8-compiled", "herd-int4", "herd-int4-compiled",
       "hf", "llamacpp-f32", "llamacpp-q8_0", "llamacpp-q4_0")
DEFAULT = ("herd-fp32", "herd-fp32-compiled", "herd-int8", "herd-int8-compiled", "herd-int4", "hf",
           "llamacpp-f32", "llamacpp-q8_0", "llamacpp-q4_0")


# ---------------------------------------------------------------------------------------------
# The machine


def cpu_description() -> str:
    """CPU model and the vector / matrix extensions that decide which kernels run."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown CPU"
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    wanted = ["avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16"]
    return f"{model}; {os.cpu_count()} cores; flags: {' '.join(f for f in wanted if f in flags) or 'none of interest'}"


def read_bandwidth(threads: int, mib: int = 1024) -> float:
    """Median GB/s of summing a `mib` MiB float32 array (larger than the caches), with `threads` threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    a = torch.ones(mib * 2**20 // 4)
    times = []
    for _ in range(7):
        t = time.perf_counter()
        a.sum()
        times.append(time.perf_counter() - t)
    torch.set_num_threads(before)
    return a.numel() * 4 / statistics.median(times[1:]) / 1e9


class LoadMeter:
    """CPU used by *other* processes over an interval: /proc/stat busy time minus this process's CPU time."""

    def __init__(self) -> None:
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def _busy(self) -> float | None:
        try:
            parts = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except (OSError, ValueError):
            return None
        idle = parts[3] + (parts[4] if len(parts) > 4 else 0)
        return (sum(parts) - idle) / self.tick

    def start(self) -> None:
        self.t0, self.busy0, self.own0 = time.perf_counter(), self._busy(), _own_cpu()

    def other_cores(self) -> float | None:
        busy = self._busy()
        if busy is None or self.busy0 is None:
            return None
        wall = time.perf_counter() - self.t0
        return max(0.0, (busy - self.busy0) - (_own_cpu() - self.own0)) / max(wall, 1e-9)


def _own_cpu() -> float:
    t = os.times()
    return t.user + t.system


# ---------------------------------------------------------------------------------------------
# Runners: each returns (prefill seconds, [seconds of each decode step])


@dataclass
class Runner:
    name: str
    weight_bytes: int
    setup_seconds: float = 0.0
    note: str = ""
    rounds: list[tuple[float, list[float]]] = field(default_factory=list)

    def run(self) -> tuple[float, list[float]]:
        raise NotImplementedError


class HerdRunner(Runner):
    def __init__(self, name: str, model: Transformer, prompts: list[list[int]], new_tokens: int, compile: bool):
        super().__init__(name, quantized_bytes(model))
        t = time.perf_counter()
        self.engine = Engine(model, max_batch_size=len(prompts), max_seq_len=len(prompts[0]) + new_tokens,
                             compile=compile)
        self.prompts, self.params = prompts, SamplingParams(temperature=0, max_new_tokens=new_tokens)
        self.engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=3))  # builds the compiled step
        self.setup_seconds = time.perf_counter() - t
        if compile and not self.engine.compiled:
            self.note = "compile failed: ran eager"

    def run(self) -> tuple[float, list[float]]:
        stamps = [time.perf_counter()]
        for _ in self.engine.stream(self.prompts, self.params):
            stamps.append(time.perf_counter())
        return stamps[1] - stamps[0], [b - a for a, b in zip(stamps[1:], stamps[2:])]


class HFRunner(Runner):
    def __init__(self, model: Transformer, prompts: list[list[int]], new_tokens: int):
        import transformers
        from transformers.generation.streamers import BaseStreamer

        transformers.logging.set_verbosity_error()
        args = model.args
        cfg = transformers.LlamaConfig.from_dict(hf_config(args))
        t = time.perf_counter()
        with torch.device("meta"):
            hf = transformers.LlamaForCausalLM(cfg)
        state = {k: v.detach() for k, v in to_hf_state_dict(model.state_dict(), args).items()}
        hf.load_state_dict(state, strict=False, assign=True)  # shares storage with herd except q/k
        if args.tie_embeddings:
            hf.tie_weights()
        hf.model.rotary_emb = type(hf.model.rotary_emb)(config=cfg)  # real inv_freq instead of meta
        hf.eval()
        hf.generation_config.eos_token_id = None
        hf.generation_config.pad_token_id = 0
        super().__init__("hf", quantized_bytes(model))
        self.hf, self.new_tokens = hf, new_tokens
        self.ids = torch.tensor(prompts)

        class Stamps(BaseStreamer):
            def __init__(self):
                self.t: list[float] = []

            def put(self, value):
                self.t.append(time.perf_counter())

            def end(self):
                pass

        self.streamer_cls = Stamps
        self.run()
        self.setup_seconds = time.perf_counter() - t

    def run(self) -> tuple[float, list[float]]:
        s = self.streamer_cls()
        with torch.inference_mode():
            t0 = time.perf_counter()
            self.hf.generate(self.ids, attention_mask=torch.ones_like(self.ids), do_sample=False,
                             max_new_tokens=self.new_tokens, min_new_tokens=self.new_tokens, streamer=s)
        stamps = [t0] + s.t[1:]  # put() #0 is the prompt itself
        return stamps[1] - stamps[0], [b - a for a, b in zip(stamps[1:], stamps[2:])]


class LlamaCppRunner(Runner):
    def __init__(self, qtype: str, model: Transformer, tokenizer_path: Path, prompt: list[int], new_tokens: int,
                 threads: int, folder: Path):
        import xllamacpp

        from herd.checkpoint.gguf import write_gguf
        from herd.tokenizer import Tokenizer

        t = time.perf_counter()
        path = folder / f"model-{qtype}.gguf"
        write_gguf(model, Tokenizer.from_file(tokenizer_path), path, qtype=qtype, progress=False)
        params = xllamacpp.CommonParams()
        params.model.path = str(path)
        params.n_ctx = len(prompt) + new_tokens + 8
        params.n_batch = params.n_ubatch = len(prompt)
        params.cpuparams.n_threads = params.cpuparams_batch.n_threads = threads
        params.warmup = True
        params.cache_prompt = False
        self.server = xllamacpp.Server(params)
        super().__init__(f"llamacpp-{qtype}", path.stat().st_size)
        self.prompt, self.new_tokens = prompt, new_tokens
        self.run()
        self.setup_seconds = time.perf_counter() - t

    def run(self) -> tuple[float, list[float]]:
        stamps = [time.perf_counter()]
        self.server.handle_completions({"prompt": self.prompt, "max_tokens": self.new_tokens, "temperature": 0,
                                        "ignore_eos": True, "stream": True},
                                       lambda chunk: stamps.append(time.perf_counter()))
        stamps = stamps[:self.new_tokens + 1]  # the last chunk only carries the finish reason
        return stamps[1] - stamps[0], [b - a for a, b in zip(stamps[1:], stamps[2:])]


def _tiny_tokenizer(folder: Path, vocab_size: int) -> Path:
    """A tokenizer.model for the GGUF files (llama.cpp needs a vocabulary): single bytes plus pairs,
    padded by the writer to the model's vocabulary; the bench feeds token ids, so its merges do not matter."""
    import base64

    tokens = [bytes([b]) for b in range(256)]
    for a in b"etaoinsrhl ":
        for b in b"etaoinsrhl ":
            tokens.append(bytes([a, b]))
    tokens = tokens[:max(256, vocab_size - 256)]
    path = folder / "tokenizer.model"
    path.write_text("".join(f"{base64.b64encode(t).decode()} {i}\n" for i, t in enumerate(tokens)))
    return path


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="herd-100m")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=1, help="rows per generation (llama.cpp runs batch 1 only)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--variants", default=",".join(DEFAULT), help=f"comma-separated, from: {', '.join(ALL)}")
    ns = ap.parse_args(argv)
    torch.set_num_threads(ns.threads)
    variants = [v for v in ns.variants.split(",") if v]
    unknown = [v for v in variants if v not in ALL]
    if unknown:
        ap.error(f"unknown variants {unknown}; choose from {', '.join(ALL)}")
    if ns.batch_size > 1:
        variants = [v for v in variants if not v.startswith("llamacpp")]
    P, N, B = ns.prompt_len, ns.new_tokens, ns.batch_size

    print(f"cpu: {cpu_description()}")
    bw0 = read_bandwidth(ns.threads)
    print(f"torch {torch.__version__}, {ns.threads} threads; read bandwidth {bw0:.1f} GB/s; "
          f"load average {os.getloadavg()[0]:.2f}")

    args = get_preset(ns.preset, max_seq_len=P + N + 8)
    torch.manual_seed(0)
    with torch.device("meta"):
        base = Transformer(args)
    base.to_empty(device="cpu")
    base.init_weights()
    base.eval()
    gen = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, args.vocab_size, (B, P), generator=gen).tolist()
    print(f"model: {ns.preset}, {base.num_params() / 1e6:.1f}M parameters; prompt {P} tokens, {N} new tokens, "
          f"batch {B}, greedy; {ns.rounds} interleaved rounds")

    models = {"fp32": base}
    runners: list[Runner] = []
    tmp = tempfile.TemporaryDirectory()
    for v in variants:
        print(f"  setting up {v} ...", end="", flush=True)
        if v.startswith("herd-"):
            kind = v.split("-")[1]
            if kind not in models:
                models[kind] = quantize_model(copy.deepcopy(base), QuantConfig(method=kind))
            r: Runner = HerdRunner(v, models[kind], prompts, N, compile=v.endswith("-compiled"))
        elif v == "hf":
            r = HFRunner(base, prompts, N)
        else:
            tok = _tiny_tokenizer(Path(tmp.name), args.vocab_size)
            r = LlamaCppRunner(v.split("-", 1)[1], base, tok, prompts[0], N, ns.threads, Path(tmp.name))
        print(f" {r.setup_seconds:.1f} s{' (' + r.note + ')' if r.note else ''}", flush=True)
        runners.append(r)

    meter = LoadMeter()
    flagged = []
    for i in range(ns.rounds):
        meter.start()
        for r in runners:
            r.rounds.append(r.run())
        other = meter.other_cores()
        if other is not None and other > 0.25:
            flagged.append(f"round {i + 1}: {other:.2f} cores of other load")
    bw1 = read_bandwidth(ns.threads)
    print(f"read bandwidth after the rounds {bw1:.1f} GB/s; load average {os.getloadavg()[0]:.2f}")
    print("LOADED rounds (numbers less trustworthy): " + "; ".join(flagged) if flagged else
          "no round saw more than a quarter core of other load")

    bw = max(bw0, bw1)
    results = {}
    print(f"\n{'variant':<22}{'decode tok/s':>14}{'spread':>16}{'prefill tok/s':>15}{'weights MB':>12}"
          f"{'bound tok/s':>13}{'of bound':>10}{'setup s':>9}")
    for r in runners:
        decode = [B / statistics.median(steps) for _, steps in r.rounds if steps]
        prefill = [B * P / pre for pre, _ in r.rounds]
        d, p = statistics.median(decode), statistics.median(prefill)
        bound = bw * 1e9 / r.weight_bytes
        results[r.name] = (d, p)
        print(f"{r.name:<22}{d:>14.1f}{f'{min(decode):.0f}..{max(decode):.0f}':>16}{p:>15.0f}"
              f"{r.weight_bytes / 1e6:>12.0f}{bound:>13.0f}{f'{d / bound:.0%}' if B == 1 else '-':>10}"
              f"{r.setup_seconds:>9.1f}")

    def ratio(a: str, b: str, what: str = "decode") -> None:
        if a in results and b in results:
            i = 0 if what == "decode" else 1
            print(f"RATIO {what} {a} / {b}: {results[a][i] / results[b][i]:.2f}x")

    print()
    for q in ("int8", "int4"):
        for mode in ("", "-compiled"):
            ratio(f"herd-{q}{mode}", "herd-fp32-compiled")
        ratio(f"herd-{q}", f"herd-{q}-compiled")
    ratio("herd-fp32", "herd-fp32-compiled")
    for mode in ("", "-compiled"):
        ratio(f"herd-int8{mode}", "llamacpp-q8_0")
        ratio(f"herd-int4{mode}", "llamacpp-q4_0")
        ratio(f"herd-fp32{mode}", "llamacpp-f32")
        ratio(f"herd-fp32{mode}", "hf")
    ratio("herd-int8", "herd-fp32", "prefill")
    ratio("herd-int4", "herd-fp32", "prefill")
    ratio("herd-fp32", "llamacpp-f32", "prefill")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
