"""`herd serve CHECKPOINT`: the OpenAI-compatible server on uvicorn.

Flags come from ServerConfig (herd.inference.server.runner) and, for moderation (--guard, a Llama
Guard model checking prompts and replies; --code-shield, Code Shield on code in replies), from
herd.safety.moderation.ModerationConfig; the model and tokenizer load as for `herd generate`. Ctrl-C or SIGTERM stops taking requests, lets in-flight ones finish for
--shutdown-timeout seconds, then cancels the rest.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from herd.errors import HerdError
from herd.flags import add_dataclass_args, dataclass_from_args
from herd.threads import add_threads_flag


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    from herd.inference.cli import _DTYPES, add_quantize_flags
    from herd.inference.server.runner import ServerConfig

    parser.add_argument("checkpoint", type=Path, help="checkpoint folder (herd, Hugging Face or Meta format)")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="tokenizer.model (default: the one stored with the checkpoint)")
    parser.add_argument("--adapter", type=Path, default=None,
                        help="LoRA adapter folder (herd's or peft's) to apply on top of the checkpoint, unmerged")
    parser.add_argument("--dtype", choices=_DTYPES, default=None, help="compute dtype (default: the checkpoint's)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    add_quantize_flags(parser)
    add_threads_flag(parser)
    add_dataclass_args(parser, ServerConfig, group="server")
    from herd.safety.moderation import ModerationConfig  # a plain dataclass: nothing heavy is imported

    add_dataclass_args(parser, ModerationConfig, group="moderation (Llama Guard, Code Shield)")


def run_serve(ns: argparse.Namespace) -> int:
    import uvicorn

    from herd.inference.cli import _load
    from herd.inference.server.runner import ServerConfig, build_app

    cfg = dataclass_from_args(ServerConfig, ns)
    cfg.api_key = cfg.api_key or os.environ.get("HERD_API_KEY", "")
    if cfg.chat_style not in ("hf", "meta"):
        raise HerdError(f"--chat-style must be 'hf' or 'meta', got '{cfg.chat_style}'.")
    if not 0 <= cfg.port <= 65535:
        raise HerdError(f"--port must be from 0 to 65535, got {cfg.port}.")
    _check_port(cfg.host, cfg.port)
    from herd.safety.moderation import ModerationConfig

    moderation = dataclass_from_args(ModerationConfig, ns)
    moderation.validate()  # before the model loads
    moderation.check_files()
    load_ns = argparse.Namespace(checkpoint=ns.checkpoint, tokenizer=ns.tokenizer, dtype=ns.dtype, device=ns.device,
                                 adapter=ns.adapter, threads=ns.threads, quantize=ns.quantize,
                                 group_size=ns.group_size)
    print(f"herd serve: loading {ns.checkpoint} ...", file=sys.stderr)
    model, tokenizer = _load(load_ns)
    name = cfg.served_model_name or ns.checkpoint.resolve().name
    extensions = []
    if moderation.enabled:
        from herd.safety.moderation import build_moderator

        print(f"herd serve: loading moderation ({'guard ' + moderation.guard if moderation.guard else 'no guard'}"
              f", Code Shield {moderation.code_shield}) ...", file=sys.stderr)
        extensions.append(build_moderator(moderation, tokenizer, threads=ns.threads, device=ns.device))
    app = build_app(model, tokenizer, cfg, model_name=name, extensions=extensions)
    engine = app.state.service.engine
    quant = f", {ns.quantize} weights" if ns.quantize else ""
    print(f"herd serve: model '{name}' ({model.num_params() / 1e6:.1f}M parameters{quant}), context {engine.max_seq_len}, "
          f"batch {engine.max_batch_size}, KV cache {engine.blocks.usable * engine.block_size} tokens "
          f"({engine.pool.nbytes() / 2**20:.0f} MiB)", file=sys.stderr)
    shown = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
    print(f"herd serve: chat page and OpenAI API at http://{shown}:{cfg.port}/ (base_url http://{shown}:{cfg.port}/v1)"
          + ("; API key required" if cfg.api_key else ""), file=sys.stderr)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="info", timeout_graceful_shutdown=cfg.shutdown_timeout)
    return 0


def _check_port(host: str, port: int) -> None:
    """Fail before loading the model if the address is taken (uvicorn would only log and exit)."""
    import socket

    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as e:
        raise HerdError(f"cannot listen on {host}:{port} ({e.strerror}); choose another --port or --host.") from None
