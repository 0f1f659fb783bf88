"""The HTTP surface: a FastAPI app with OpenAI's routes and vLLM's extras, over herd's engine.

Routes: GET / (the chat page), GET /v1/models, POST /v1/chat/completions, POST /v1/completions,
POST /tokenize, POST /detokenize, GET /tokenizer_info (lm-eval's remote tokenizer reads these
three), GET /health, GET /metrics (Prometheus text).

Guards, in the order a request meets them: the body-size limit (413), the API key (401, when one
is set; /health and the chat page stay open), JSON parsing (400), field checks (400 naming the
field), the model name (404), the context check (400 with the numbers), the queue limit (429 with
Retry-After) and shutdown (503). Every error, even an unexpected one, is OpenAI's error object;
the server keeps running.

Optional checks plug in two ways. `request_hooks`: `async def hook(kind, body) -> None`, which may
raise APIError to refuse a request. `extensions` (ServerExtension, e.g. herd.safety.moderation's
Moderator): `before(kind, body)` runs after the model name is checked and may answer in place of
the model (a refusal); `after(kind, body, result)` sees every result (a response object, or the
stream of server-sent events) and returns it, changed or not; `metrics()` adds lines to /metrics;
`close()` runs at shutdown.
"""

from __future__ import annotations

import hmac
import json
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from herd.inference.server.generate import Service
from herd.inference.server.protocol import SSE_DONE, APIError, error_body, get, sse

RequestHook = Callable[[str, dict[str, Any]], Awaitable[None]]


class ServerExtension(Protocol):
    """A check around generation (see the module docstring). kind is "chat" or "completions"."""

    async def before(self, kind: str, body: dict[str, Any]) -> Any:
        """None to go on, or a reply (a response dict, or an async iterator of SSE bytes) that answers instead."""

    async def after(self, kind: str, body: dict[str, Any], result: Any) -> Any:
        """The result to send (the same shape it was given)."""

    def metrics(self) -> str:
        """Prometheus text lines to append to /metrics ('' for none)."""

    def close(self) -> None:
        """Release threads and models at shutdown."""
OPEN_PATHS = frozenset({"/", "/health", "/favicon.ico"})


def create_app(service: Service, api_key: str | None = None, max_body_bytes: int = 4 << 20,
               request_hooks: list[RequestHook] | None = None, shutdown_timeout: float = 30.0,
               extensions: list[ServerExtension] | None = None) -> FastAPI:
    """The app; the caller starts service.worker (the lifespan stops it: in-flight requests finish
    or are cancelled after shutdown_timeout seconds)."""
    hooks = list(request_hooks or [])
    exts = list(extensions or [])

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        service.worker.stop(timeout=shutdown_timeout)
        for ext in exts:
            ext.close()

    app = FastAPI(title="herd", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service

    def error(e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        return error(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(f"{request.method} {request.url.path}: {e.detail}", kind),
                            status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception) -> JSONResponse:
        traceback.print_exc()
        return JSONResponse(error_body(f"internal error: {type(e).__name__}: {e}", "server_error"), status_code=500)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > max_body_bytes):
            return error(APIError(413, f"The request body is larger than this server's limit of {max_body_bytes} "
                                       "bytes.", code="request_too_large"))
        if api_key and request.url.path not in OPEN_PATHS:
            auth = request.headers.get("authorization", "")
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
                return error(APIError(401, "Missing or wrong API key; send 'Authorization: Bearer <key>'.",
                                      code="invalid_api_key"))
        return await call_next(request)

    async def read_json(request: Request) -> dict[str, Any]:
        raw = bytearray()
        async for part in request.stream():  # also bounds bodies sent without a content-length
            raw += part
            if len(raw) > max_body_bytes:
                raise APIError(413, f"The request body is larger than this server's limit of {max_body_bytes} "
                                    "bytes.", code="request_too_large")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"The body is not valid JSON ({e}).") from None
        if not isinstance(body, dict):
            raise APIError(400, "The body must be a JSON object.")
        return body

    async def guarded(stream: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """Once streaming has begun the status is sent: a failure becomes an error event, then [DONE]."""
        try:
            async for part in stream:
                yield part
        except APIError as e:
            yield sse(e.body())
            yield SSE_DONE
        except Exception as e:  # never a reset connection: tell the client, keep serving
            traceback.print_exc()
            yield sse(error_body(f"internal error: {type(e).__name__}: {e}", "server_error"))
            yield SSE_DONE

    async def respond(result: Any) -> Response:
        if isinstance(result, dict):
            return JSONResponse(result)
        return StreamingResponse(guarded(result), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def generate(kind: str, request: Request) -> Response:
        body = await read_json(request)
        for hook in hooks:
            await hook(kind, body)
        if exts:
            service.check_model(body)  # a wrong model name is a 404 before any check runs
        for ext in exts:
            answer = await ext.before(kind, body)
            if answer is not None:
                return await respond(answer)
        run = service.chat_completions if kind == "chat" else service.completions
        result = await run(body, request)
        for ext in exts:
            result = await ext.after(kind, body, result)
        return await respond(result)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await generate("chat", request)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await generate("completions", request)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": service.model_name, "object": "model", "created": service.created,
                                            "owned_by": "herd", "max_model_len": service.engine.max_seq_len}]}

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        body = await read_json(request)
        service.check_model(body)
        if body.get("messages") is not None:
            from herd.inference.server.protocol import parse_messages

            ids = service.chat.encode_dialog_prompt(
                parse_messages(body), add_generation_prompt=get(body, "add_generation_prompt", bool, True))
        else:
            ids = service.tokenizer.encode(get(body, "prompt", str), bos=get(body, "add_special_tokens", bool, True))
        return {"tokens": ids, "count": len(ids), "max_model_len": service.engine.max_seq_len}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        body = await read_json(request)
        service.check_model(body)
        ids = get(body, "tokens", list)
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < service.tokenizer.n_words for t in ids):
            raise APIError(400, f"'tokens' must be token ids from 0 to {service.tokenizer.n_words - 1}.",
                           param="tokens")
        return {"prompt": service.tokenizer.decode(ids)}

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict[str, Any]:
        tok = service.tokenizer
        return {"tokenizer_class": "herd.Tokenizer", "vocab_size": tok.n_words,
                "bos_token": tok.decode([tok.bos_id]), "eos_token": tok.decode([tok.eos_id]), "pad_token": None,
                "max_model_len": service.engine.max_seq_len}

    @app.get("/health")
    async def health() -> Response:
        stats = service.engine.stats()
        body = {"status": "ok" if service.worker.error is None else "degraded", "running": stats["running"],
                "waiting": stats["waiting"], "inflight": service.worker.inflight,
                "kv_blocks_used": stats["kv_blocks_used"], "kv_blocks_total": stats["kv_blocks_total"],
                "last_error": service.worker.error}
        return JSONResponse(body)

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        text = prometheus_text(service) + "".join(ext.metrics() for ext in exts)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.get("/")
    async def page() -> HTMLResponse:
        html = resources.files("herd.inference.server").joinpath("static/chat.html").read_text(encoding="utf-8")
        return HTMLResponse(html.replace("{{MODEL}}", service.model_name))

    return app


def prometheus_text(service: Service) -> str:
    """The server's counters in Prometheus' text exposition format."""
    s, m = service.engine.stats(), service.worker.metrics
    lines: list[str] = []

    def metric(name: str, kind: str, help: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP {name} {help}")
        lines.append(f"# TYPE {name} {kind}")
        lines.extend(f"{name}{labels} {value}" for labels, value in samples)

    metric("herd_requests_running", "gauge", "Requests in the running batch.", [("", s["running"])])
    metric("herd_requests_waiting", "gauge", "Requests queued for the batch.", [("", s["waiting"])])
    metric("herd_requests_finished_total", "counter", "Finished engine requests by finish reason.",
           [(f'{{finish_reason="{k}"}}', v) for k, v in sorted(m.finished.items())] or [('{finish_reason="stop"}', 0)])
    metric("herd_prompt_tokens_total", "counter", "Prompt tokens received.", [("", m.prompt_tokens)])
    metric("herd_generation_tokens_total", "counter", "Tokens generated.", [("", m.generation_tokens)])
    metric("herd_generation_tokens_per_second", "gauge", "Tokens generated per second over the last 10 s.",
           [("", round(m.tokens_per_second(), 3))])
    metric("herd_kv_cache_usage_ratio", "gauge", "Share of KV blocks held by running requests.",
           [("", round(s["kv_cache_usage"], 6))])
    metric("herd_prefix_cache_queries_total", "counter", "Prompt tokens looked up in the prefix cache.",
           [("", s["prefix_cache_queries"])])
    metric("herd_prefix_cache_hits_total", "counter", "Prompt tokens served from the prefix cache.",
           [("", s["prefix_cache_hits"])])
    metric("herd_preemptions_total", "counter", "Requests preempted for lack of KV blocks.", [("", s["preemptions"])])
    buckets, acc = [], 0
    for bound, count in zip(list(m.TTFT_BUCKETS) + [float("inf")], m.ttft_counts):
        acc += count
        buckets.append((f'_bucket{{le="{"+Inf" if bound == float("inf") else bound}"}}', acc))
    lines.append("# HELP herd_time_to_first_token_seconds Time from a request's arrival to its first token.")
    lines.append("# TYPE herd_time_to_first_token_seconds histogram")
    lines.extend(f"herd_time_to_first_token_seconds{suffix} {v}" for suffix, v in buckets)
    lines.append(f"herd_time_to_first_token_seconds_sum {round(m.ttft_sum, 6)}")
    lines.append(f"herd_time_to_first_token_seconds_count {m.ttft_n}")
    return "\n".join(lines) + "\n"
