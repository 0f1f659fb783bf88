"""The `herd` command: one subcommand per job, and the helpers every subcommand shares.

Subcommands live next to the code they drive and are imported only when used, so
`herd --help` and `herd tokenizer encode` stay fast. A target "pkg.module:name" means the
module defines `add_<name>_args(parser)` and `run_<name>(args) -> int | None`.

Errors: a HerdError (bad input) prints one line, `herd: error: <reason and fix>`, and exits 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any

from herd.errors import HerdError
from herd.flags import HelpFormatter

# name -> (target, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "speedrun": ("herd.train.speedrun:speedrun", "corpus -> data pipeline -> tokenizer -> pretrain -> sample, on this machine"),
    "init": ("herd.checkpoint.cli:init", "write a randomly initialized checkpoint of a preset (demos, tests, from-scratch runs)"),
    "info": ("herd.checkpoint.cli:info", "parameter count, memory per dtype and KV-cache size of a preset or checkpoint"),
    "convert": ("herd.checkpoint.cli:convert", "convert a checkpoint between herd, Hugging Face and Meta formats (reads GGUF too)"),
    "export": ("herd.checkpoint.export_cli:export", "write a checkpoint as a GGUF file for llama.cpp / Ollama (f16, q8_0, q4_0, ...)"),
    "generate": ("herd.inference.cli:generate", "generate text from a prompt (streams as it goes)"),
    "chat": ("herd.inference.cli:chat", "interactive chat in the Llama 3 chat format"),
    "serve": ("herd.inference.server.cli:serve", "OpenAI-compatible HTTP server with continuous batching and a chat page"),
    "tokenizer": ("herd.tokenizer.cli:tokenizer", "train, encode, decode and measure tokenizers"),
    "data": ("herd.data.cli:data", "the pre-training data pipeline: filter, dedup, mix, pack"),
    "pretrain": ("herd.train.cli:pretrain", "pre-train a Llama 3 model on packed token shards"),
    "sft": ("herd.posttrain.cli:sft", "supervised fine-tuning (full or LoRA) of a checkpoint on chat data"),
    "reward": ("herd.posttrain.reward_cli:reward", "train a reward model (Bradley-Terry on preference pairs, full or LoRA)"),
    "rejection-sample": ("herd.posttrain.reward_cli:rejection_sample",
                         "best of K sampled replies per prompt, by a reward model or function, as new SFT data"),
    "dpo": ("herd.posttrain.dpo_cli:dpo", "direct preference optimization (Llama 3's recipe; full or LoRA) on preference pairs"),
    "ppo": ("herd.posttrain.ppo_cli:ppo", "RL on prompts against a reward model or a Python reward: GRPO or PPO"),
    "merge-lora": ("herd.posttrain.cli:merge_lora", "fold a LoRA adapter (herd's or peft's) into its base model"),
    "average": ("herd.posttrain.cli:average", "average the weights of checkpoints (models, reward models or adapters)"),
    "score": ("herd.posttrain.score_cli:score", "rewards of conversations or preference pairs from a reward model"),
    "eval": ("herd.eval.cli:eval", "benchmark scores (MMLU, ARC, HellaSwag, GSM8K, ...), perplexity and bits per byte"),
    "compare": ("herd.eval.cli:compare", "two checkpoints side by side on prompts, judged by a model: win / tie / loss"),
    "scaling": ("herd.eval.scaling.cli:scaling", "IsoFLOP sweeps, scaling-law fits and downstream prediction, plots"),
    "guard": ("herd.safety.guard_cli:guard", "Llama Guard moderation: classify or evaluate conversations, make guard training data"),
    "codeshield": ("herd.safety.codeshield_cli:codeshield", "scan code for insecure patterns with Meta's Code Shield (CWE, severity)"),
}


def _load(target: str) -> tuple[Any, Any]:
    module_name, name = target.split(":")
    module = importlib.import_module(module_name)
    return getattr(module, f"add_{name}_args"), getattr(module, f"run_{name}")


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="herd",
        description="herd: the Llama 3 system end to end. Run `herd COMMAND --help` for a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n" + "\n".join(f"  {n:<16} {h}" for n, (_, h) in COMMANDS.items()),
    )
    parser.add_argument("command", nargs="?", choices=list(COMMANDS), metavar="COMMAND")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        top = _top_parser()
        args, _ = top.parse_known_args(argv)
        if args.version:
            from herd import __version__

            print(f"herd {__version__}")
            return 0
        top.print_help()
        return 0 if not argv else 2
    name, rest = argv[0], argv[1:]
    target, help_text = COMMANDS[name]
    try:
        add_args, run = _load(target)
    except ImportError as e:
        print(f"herd: error: `herd {name}` needs a module that failed to import ({e}); "
              "reinstall herd with `pip install -e .`.", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog=f"herd {name}", description=help_text,
                                     formatter_class=HelpFormatter)
    add_args(parser)
    args = parser.parse_args(rest)
    try:
        code = run(args)
    except HerdError as e:
        print(f"herd: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nherd: interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
