"""`herd-lm-eval`: lm-eval's own command line with herd registered as `--model herd`.

    herd-lm-eval --model herd --model_args checkpoint=ckpt/ --tasks arc_easy --limit 50

lm-eval 0.4 looks models up in its own table only (no package entry points), so this wrapper
imports herd's adapter (which registers "herd") and then hands the same arguments to lm-eval.
"""

from __future__ import annotations

import sys


def main() -> None:
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError:
        print("herd: error: herd-lm-eval needs lm-evaluation-harness; install it with "
              "`pip install \"herd[lm-eval]\"` (or `pip install lm-eval==0.4.13`).", file=sys.stderr)
        sys.exit(2)
    import herd.eval.lm_eval_adapter  # noqa: F401  (registers --model herd)
    from herd.errors import HerdError

    try:
        cli_evaluate()
    except HerdError as e:
        print(f"herd: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
