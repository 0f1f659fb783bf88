"""One round of Llama 3-style post-training, end to end with herd's commands, on a verifiable task.

    python bench/post_round.py --base runs/speedrun/final          # the speedrun model (herd-1m)
    python bench/post_round.py --base runs/speedrun/final --quick  # fewer steps and samples (~minutes)

Llama 3's post-training round (arXiv:2407.21783, §4.1): SFT, a reward model on preference pairs,
rejection sampling (best of K replies by reward becomes SFT data), then DPO. This script runs that
round on the offline task of herd.posttrain.arithmetic (by default "What is the larger of 37 and 52?", the
right number chosen over the other; `--ops +,-` for sums, right result over one off by 1-10), each
stage as the shell command a user would type, printed before it runs:

    python -m herd.posttrain.arithmetic recipe OUT/data --ops max   # sft / pairs / prompts / test: disjoint
    herd sft  --init-from BASE        --data OUT/data/sft.jsonl   --out OUT/sft ...
    herd reward --init-from OUT/sft/final --data OUT/data/pairs.jsonl --out OUT/rm ...
    herd rejection-sample --policy OUT/sft/final --prompts OUT/data/prompts.jsonl --reward-model OUT/rm/final ...
    herd sft  --init-from OUT/sft/final --data OUT/data/rs.jsonl --out OUT/rs ...
    herd dpo  --init-from OUT/rs/final  --data OUT/data/pairs.jsonl --out OUT/dpo ...
    herd eval --checkpoint CKPT --tasks arithmetic:OUT/data/test.jsonl --chat-style meta   (after each stage)

and prints, for each stage's model, the share of right greedy answers on held-out questions, the
reward model's mean score of those answers (held-out reward), and the preference accuracy the
reward model and DPO report on their held-out pairs. A stage already done in OUT is reused, so an
interrupted round continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path


def run(cmd: list[str], log: Path) -> None:
    print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    t = time.perf_counter()
    with open(log, "a") as f:
        code = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT)
    if code:
        sys.exit(f"failed (exit {code}); see {log}")
    print(f"  done in {time.perf_counter() - t:.0f} s", flush=True)


def last_val(log_jsonl: Path) -> dict:
    rows = [json.loads(x) for x in log_jsonl.read_text().splitlines() if x.strip()]
    vals = [r for r in rows if r.get("event") == "val"]
    return vals[-1] if vals else {}


def held_out(stage: str, ckpt: Path, out: Path, data: Path, rm: Path | None, threads: str, log: Path) -> dict:
    """Share of right greedy answers on the test prompts, and the reward model's mean score of them."""
    eval_dir = out / "eval" / stage
    if not (eval_dir / "results.json").is_file():
        run(["herd", "eval", "--checkpoint", str(ckpt), "--tasks", f"arithmetic:{data / 'test.jsonl'}",
             "--chat-style", "meta", "--samples", "--out", str(eval_dir), "--threads", threads], log)
    res = json.loads((eval_dir / "results.json").read_text())
    metrics = next(iter(res["tasks"].values()))["metrics"]
    row = {"correct": metrics["correct"], "formatted": metrics["formatted"]}
    if rm is not None and (rm / "final").is_dir():
        from herd.posttrain.reward import load_reward_scorer

        samples = [json.loads(x) for x in next((eval_dir / "samples").iterdir()).read_text().splitlines()]
        scorer = load_reward_scorer(rm / "final")
        scorer.chat.style = "meta"
        rewards = scorer([s["prompt"] for s in samples], [s["completion"] for s in samples])
        scored = [r for r in rewards if r is not None]
        row["reward"] = sum(scored) / max(len(scored), 1)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="the pre-trained model to post-train (e.g. runs/speedrun/final)")
    ap.add_argument("--out", default="runs/post-round")
    ap.add_argument("--quick", action="store_true", help="fewer questions, steps and samples")
    ap.add_argument("--threads", default="0")
    ap.add_argument("--max-operand", default="99")
    ap.add_argument("--ops", default="max", help="question kinds for herd.posttrain.arithmetic (default max: "
                    "'What is the larger of A and B?', which a 1M-parameter model can learn; '+,-' needs a "
                    "bigger model: herd-1m answers every sum with one number)")
    ns = ap.parse_args(argv)
    out, base = Path(ns.out), Path(ns.base)
    if not base.exists():
        sys.exit(f"--base {base} does not exist; train one with `herd speedrun` first.")
    out.mkdir(parents=True, exist_ok=True)
    log = out / "commands.log"
    data = out / "data"
    q = ns.quick
    sizes = "1500,1500,120,200" if q else "4000,3000,400,300"
    sft_steps, rm_steps, rs_steps, dpo_steps = (300, 150, 60, 80) if q else (1200, 400, 150, 200)
    k = "8" if q else "16"
    common = ["--chat-style", "meta", "--max-seq-len", "64", "--threads", ns.threads, "--log-every", "50",
              "--tensorboard", "false"]
    if not (data / "test.jsonl").is_file():
        run([sys.executable, "-m", "herd.posttrain.arithmetic", "recipe", str(data), "--sizes", sizes,
             "--max-operand", ns.max_operand, "--ops", ns.ops], log)

    rows: dict[str, dict] = {}

    def stage(name: str, cmd: list[str]) -> Path:
        if not (out / name / "final").is_dir():
            run(cmd, log)
        return out / name / "final"

    sft = stage("sft", ["herd", "sft", "--init-from", str(base), "--data", str(data / "sft.jsonl"), "--out",
                        str(out / "sft"), "--steps", str(sft_steps), "--batch-size", "16", "--lr", "2e-3",
                        "--eval-every", str(sft_steps), "--sample-prompts", "2", *common])
    rm = out / "rm"
    stage("rm", ["herd", "reward", "--init-from", str(sft), "--data", str(data / "pairs.jsonl"), "--out", str(rm),
                 "--steps", str(rm_steps), "--batch-size", "16", "--lr", "1e-3", "--eval-every", str(rm_steps),
                 *common])
    rows["base"] = held_out("base", base, out, data, rm, ns.threads, log)  # never taught the chat format
    rows["sft"] = held_out("sft", sft, out, data, rm, ns.threads, log)
    rm_val = last_val(rm / "log.jsonl")
    rows["sft"]["pref_acc"] = rm_val.get("accuracy")
    rs_data = data / "rs.jsonl"
    if not Path(f"{rs_data}.stats.json").is_file():
        run(["herd", "rejection-sample", "--policy", str(sft), "--prompts", str(data / "prompts.jsonl"), "--out",
             str(rs_data), "--reward-model", str(rm / "final"), "--k", k, "--max-new-tokens", "16",
             "--chat-style", "meta", "--threads", ns.threads], log)
    rs = stage("rs", ["herd", "sft", "--init-from", str(sft), "--data", str(rs_data), "--out", str(out / "rs"),
                      "--steps", str(rs_steps), "--batch-size", "16", "--lr", "5e-4", "--eval-every", str(rs_steps),
                      "--sample-prompts", "0", *common])
    rows["rejection sampling"] = held_out("rs", rs, out, data, rm, ns.threads, log)
    dpo = stage("dpo", ["herd", "dpo", "--init-from", str(rs), "--data", str(data / "pairs.jsonl"), "--out",
                        str(out / "dpo"), "--steps", str(dpo_steps), "--batch-size", "16", "--lr", "5e-4",
                        "--eval-every", str(dpo_steps), "--sample-prompts", "0", *common])
    rows["dpo"] = held_out("dpo", dpo, out, data, rm, ns.threads, log)
    dpo_val = last_val(out / "dpo" / "log.jsonl")
    rows["dpo"]["pref_acc"] = dpo_val.get("accuracy")
    rows["dpo"]["logp_margin"] = dpo_val.get("logp_margin")

    print(f"\nheld-out: {sum(1 for _ in open(data / 'test.jsonl'))} questions never trained on "
          f"(greedy replies, chat style meta); preference accuracy on the held-out pairs of each trainer")
    print(f"{'stage':<20} {'right answers':>13} {'stated a result':>15} {'held-out reward':>15} {'pref. accuracy':>14}")
    for name, r in rows.items():
        rew = f"{r['reward']:+.3f}" if r.get("reward") is not None else "-"
        acc = f"{r['pref_acc']:.1%}" if r.get("pref_acc") is not None else "-"
        print(f"{name:<20} {r['correct']:>13.1%} {r['formatted']:>15.1%} {rew:>15} {acc:>14}")
    (out / "summary.json").write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
