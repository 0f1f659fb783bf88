"""Peak memory of loading a ~1B checkpoint, per format, as a multiple of the weights' bytes.

Reference: the weights themselves (1.0x is the floor for a model that ends up in memory; a naive
`torch.load` + `load_state_dict` into an already built model needs ~2x). The script writes a random
llama3.2-1b checkpoint in bf16 with `herd init` (~2.5 GB), converts it with `herd convert`, and
loads each format in a fresh process, reporting:

  peak RSS      ru_maxrss growth during the load, all resident pages (file-backed + anonymous)
  anon          RssAnon growth: memory that cannot be dropped (file-backed pages are the
                checkpoint's own pages, which the kernel can reclaim and re-read)
  after touch   the same after reading every weight once (a forward would), when the mapped
                pages have all become resident

The last row, `transformers`, is the named reference: LlamaForCausalLM.from_pretrained on the same
Hugging Face folder. Everything is deleted at the end. Run:  python bench/load_memory.py
(--preset herd-100m for a quick check; --keep to leave the files in place).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, sys, time, torch
from herd import ModelArgs, Transformer
from herd.checkpoint import load_checkpoint
from herd.checkpoint.common import meta_model, peak_memory

tiny = ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=32)
meta_model(tiny), Transformer(tiny)(torch.zeros(1, 4, dtype=torch.long))  # one-time torch set-up
if sys.argv[2] == "transformers":
    import transformers
base = peak_memory()
start = time.perf_counter()
if sys.argv[2] == "transformers":  # the reference: transformers' own loader on the same HF folder
    model = transformers.LlamaForCausalLM.from_pretrained(sys.argv[1], dtype="auto")
else:
    model = load_checkpoint(sys.argv[1])
seconds = time.perf_counter() - start
loaded = peak_memory()
with torch.no_grad():  # read every weight once, in small pieces so no big temporaries appear
    for p in model.parameters():
        for piece in p.detach().reshape(-1).split(1 << 20):
            piece.float().sum()
touched = peak_memory()
weights = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"weights": weights, "seconds": seconds, "base": base, "loaded": loaded, "touched": touched}))
"""


def herd_cmd(*argv: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from herd.cli import main; sys.exit(main())", *argv]


def measure(path: Path, loader: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), loader], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="llama3.2-1b", help="model preset to write (random weights)")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32", "fp16"])
    parser.add_argument("--formats", default="herd,hf,meta,transformers",
                        help="comma-separated formats to measure (transformers: its from_pretrained on the hf folder)")
    parser.add_argument("--dir", type=Path, default=None, help="scratch folder (default: a new one in /tmp)")
    parser.add_argument("--keep", action="store_true", help="do not delete the checkpoints afterwards")
    ns = parser.parse_args()

    root = ns.dir or Path(tempfile.mkdtemp(prefix="herd-load-memory-"))
    root.mkdir(parents=True, exist_ok=True)
    src = root / "herd"
    try:
        t0 = time.perf_counter()
        subprocess.run(herd_cmd("init", ns.preset, str(src), "--dtype", ns.dtype, "--overwrite"), check=True)
        print(f"wrote {src} in {time.perf_counter() - t0:.0f} s")
        gib = 2**30
        print(f"{'format':<12} {'weights':>9} {'load s':>7} {'peak RSS':>9} {'anon':>6} "
              f"{'peak RSS after touch':>21} {'anon after touch':>17}")
        for fmt in ns.formats.split(","):
            path = {"herd": src, "transformers": root / "hf"}.get(fmt, root / fmt)
            if not path.exists():
                subprocess.run(herd_cmd("convert", str(src), str(path), "--format", path.name),
                               check=True, capture_output=True)
            r = measure(path, fmt)
            w, b = r["weights"], r["base"]
            ratio = {k: (r[stage][key] - b[key]) / w for k, (stage, key) in {
                "peak": ("loaded", "maxrss"), "anon": ("loaded", "rss_anon"),
                "peak_touched": ("touched", "maxrss"), "anon_touched": ("touched", "rss_anon")}.items()}
            print(f"{fmt:<12} {w / gib:>7.2f}Gi {r['seconds']:>7.2f} {ratio['peak']:>8.2f}x {ratio['anon']:>5.2f}x "
                  f"{ratio['peak_touched']:>20.2f}x {ratio['anon_touched']:>16.2f}x", flush=True)
    finally:
        if not ns.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
