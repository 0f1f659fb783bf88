"""ServerConfig (the flags of `herd serve`), build_app() from a model and tokenizer, and ServerThread,
which runs uvicorn on a background thread (tests, benchmarks, notebooks)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import uvicorn
from fastapi import FastAPI

from herd.errors import HerdError
from herd.inference.engine import Engine
from herd.inference.server.app import RequestHook, ServerExtension, create_app
from herd.inference.server.generate import Service
from herd.inference.server.protocol import Limits
from herd.inference.server.worker import EngineWorker
from herd.model import Transformer
from herd.tokenizer import Tokenizer


@dataclass
class ServerConfig:
    """How `herd serve` runs: network, batching, cache and limits."""

    host: str = "127.0.0.1"
    """Address to listen on (127.0.0.1: this machine only; 0.0.0.0: every interface)."""
    port: int = 8000
    """TCP port (0 picks a free one)."""
    served_model_name: str = ""
    """The model id clients send (default: the checkpoint folder's name)."""
    api_key: str = ""
    """Require `Authorization: Bearer <key>` on the API (default: the HERD_API_KEY variable, else open)."""
    max_batch_size: int = 32
    """Most requests decoding at once; more wait in the queue."""
    max_queue: int = 256
    """Most requests waiting beyond the batch; more get 429 with Retry-After."""
    max_seq_len: int = 0
    """Longest request, prompt + reply (0: the model's context, at most 8192)."""
    cache_tokens: int = 0
    """KV cache size in tokens (0: max_batch_size * max_seq_len, at most 131072; smaller pools preempt)."""
    block_size: int = 16
    """Tokens per KV block (the unit of allocation and of prefix sharing)."""
    prefill_chunk: int = 512
    """Most prompt tokens computed per step, so long prompts do not stall decoding."""
    prefix_cache: bool = True
    """Reuse the KV cache of earlier requests that start with the same tokens."""
    max_n: int = 8
    """Largest `n` (choices per request)."""
    max_body_mb: float = 4.0
    """Largest request body in MiB (larger: 413)."""
    shutdown_timeout: float = 30.0
    """On Ctrl-C / SIGTERM, seconds in-flight requests get to finish before they are cancelled."""
    chat_style: str = "hf"
    """'hf' (Llama 3.1 Instruct's template) or 'meta' (Meta's plain dialog format, for models trained from scratch)."""
    compile: bool = False
    """torch.compile the decode step (slow start, faster steps)."""


def build_service(model: Transformer, tokenizer: Tokenizer, cfg: ServerConfig, model_name: str,
                  model_transforms: list[Callable[[Transformer], Transformer]] | None = None) -> Service:
    """Engine + worker thread (started) + Service. model_transforms run on the model first (the place for
    weight quantization)."""
    for transform in model_transforms or []:
        model = transform(model)
    if tokenizer.n_words > model.args.vocab_size:
        raise HerdError(f"the tokenizer has {tokenizer.n_words} tokens but the model only {model.args.vocab_size}; "
                        "use the tokenizer the model was trained with.")
    max_len = cfg.max_seq_len or min(model.args.max_seq_len, 8192)
    if max_len < 2:
        raise HerdError(f"--max-seq-len must be at least 2, got {max_len}.")
    if cfg.max_batch_size < 1 or cfg.max_queue < 0 or cfg.max_n < 1:
        raise HerdError("--max-batch-size and --max-n must be at least 1 and --max-queue at least 0.")
    cache = cfg.cache_tokens or max(max_len, min(cfg.max_batch_size * max_len, 131072))
    engine = Engine(model, max_batch_size=cfg.max_batch_size, max_seq_len=max_len, compile=cfg.compile,
                    block_size=cfg.block_size, cache_tokens=cache, prefill_chunk=cfg.prefill_chunk,
                    prefix_cache=cfg.prefix_cache)
    engine.vocab_limit = tokenizer.n_words  # rows past the tokenizer's ids are padding: never sample them
    worker = EngineWorker(engine)
    worker.start()
    return Service(engine, worker, tokenizer, model_name, Limits(max_n=cfg.max_n), max_queue=cfg.max_queue,
                   chat_style=cfg.chat_style)


def build_app(model: Transformer, tokenizer: Tokenizer, cfg: ServerConfig | None = None, model_name: str = "herd",
              request_hooks: list[RequestHook] | None = None,
              model_transforms: list[Callable[[Transformer], Transformer]] | None = None,
              extensions: list[ServerExtension] | None = None) -> FastAPI:
    cfg = cfg or ServerConfig()
    service = build_service(model, tokenizer, cfg, cfg.served_model_name or model_name, model_transforms)
    return create_app(service, api_key=cfg.api_key or None, max_body_bytes=int(cfg.max_body_mb * 2**20),
                      request_hooks=request_hooks, shutdown_timeout=cfg.shutdown_timeout, extensions=extensions)


class ServerThread:
    """uvicorn serving `app` on a background thread; `url` is its base address once start() returns."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, shutdown_timeout: float = 5.0):
        self.config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                                     timeout_graceful_shutdown=shutdown_timeout, lifespan="on")
        self.server = uvicorn.Server(self.config)
        self.thread = threading.Thread(target=self.server.run, name="herd-http", daemon=True)
        self.app = app

    def start(self, timeout: float = 30.0) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}"
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
