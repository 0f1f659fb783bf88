"""`herd serve` through the official `openai` client and raw HTTP, on loopback.

References: greedy outputs are compared with cache-free full forwards of the same model (and the
engine is itself checked against transformers in test_engine.py); echo log-probs with the model's
own forward and with transformers' LlamaForCausalLM on the same weights; tool calls with herd's
ChatFormat renderings of the Llama 3.1 template; JSON with Python's json module.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from herd.inference.server.runner import ServerConfig, ServerThread, build_app
from herd.tokenizer import ChatFormat, Tokenizer
from tests.server_fixtures import (HELLO_A, HELLO_Q, JSON_A, JSON_Q, TOOLS, WEATHER_Q, greedy_reference,
                                   tiny_model, trained_byte_model)

openai = pytest.importorskip("openai")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: a second thread only adds barrier waits on a busy machine
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def official(official_tokenizer_model):
    tok = Tokenizer.from_file(official_tokenizer_model)
    model = tiny_model(tok.n_words, seed=4, max_seq_len=256)
    app = build_app(model, tok, ServerConfig(max_batch_size=16, max_queue=256, block_size=16), model_name="tiny")
    with ServerThread(app) as srv:
        srv.model, srv.tok, srv.service = model, tok, app.state.service
        srv.client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        yield srv


@pytest.fixture(scope="module")
def trained():
    model, tok = trained_byte_model()
    app = build_app(model, tok, ServerConfig(max_batch_size=4), model_name="bytes")
    with ServerThread(app) as srv:
        srv.model, srv.tok = model, tok
        srv.client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        yield srv


def chat_ids(tok: Tokenizer, messages, **kw) -> list[int]:
    return ChatFormat(tok).encode_dialog_prompt(messages, **kw)


def expected_chat(srv, messages, n: int) -> tuple[str, str]:
    ids = greedy_reference(srv.model, chat_ids(srv.tok, messages), n, srv.tok.stop_tokens)
    return srv.tok.decode(ids), "stop" if len(ids) < n else "length"


def settle(srv) -> dict:
    """/health once the engine has nothing left (requests end on the engine thread just after the response)."""
    import time

    for _ in range(200):
        h = httpx.get(srv.url + "/health").json()
        if h["inflight"] == 0 and h["running"] == 0 and h["waiting"] == 0:
            return h
        time.sleep(0.02)
    return h


# -- the API surface ---------------------------------------------------------------------------


def test_models_health_and_tokenize(official):
    models = official.client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert httpx.get(official.url + "/health").json()["status"] == "ok"
    r = httpx.post(official.url + "/tokenize", json={"prompt": "Hello, world!", "add_special_tokens": False}).json()
    assert r["tokens"] == [9906, 11, 1917, 0] and r["count"] == 4  # the official tokenizer's ids
    assert httpx.post(official.url + "/detokenize", json={"tokens": [9906, 11, 1917, 0]}).json() == {
        "prompt": "Hello, world!"}
    info = httpx.get(official.url + "/tokenizer_info").json()
    assert info["bos_token"] == "<|begin_of_text|>" and info["eos_token"] == "<|end_of_text|>"


def test_chat_greedy_equals_full_forward_and_stream_equals_whole(official):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    want, reason = expected_chat(official, messages, 12)
    r = official.client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    assert r.choices[0].message.content == want and r.choices[0].finish_reason == reason
    assert r.usage.prompt_tokens == len(chat_ids(official.tok, messages)) and r.usage.completion_tokens == 12
    chunks = list(official.client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    # The second identical request found the prompt in the prefix cache.
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens >= 16


def test_completions_echo_logprobs_match_forward_and_transformers(official):
    """lm-eval's local-completions payload for log-likelihood: echo, logprobs=1, max_tokens=1, temperature 0."""
    tok, model = official.tok, official.model
    ctx, cont = "The capital of France is", " Paris"
    ids = tok.encode(ctx + cont, bos=True)
    r = official.client.completions.create(model="tiny", prompt=ids, max_tokens=1, temperature=0, logprobs=1,
                                           echo=True, seed=1234)
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == len(ids) + 1 and lp.token_logprobs[0] is None
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids]))[0], -1)  # [S, V]
    want = [ref[t - 1, ids[t]].item() for t in range(1, len(ids))]
    assert lp.token_logprobs[1:len(ids)] == pytest.approx(want, abs=1e-4)
    assert lp.token_logprobs[-1] == pytest.approx(ref[-1].max().item(), abs=1e-4)  # the greedy token
    # lm-eval's parse_logprobs: sum of token_logprobs[ctxlen:-1], greedy iff each equals its top alternative.
    ctxlen = len(tok.encode(ctx, bos=True))
    total = sum(lp.token_logprobs[ctxlen:-1])
    assert total == pytest.approx(sum(want[ctxlen - 1:]), abs=1e-4)
    greedy = all(t == max(top.values()) for t, top in zip(lp.token_logprobs[ctxlen:-1], lp.top_logprobs[ctxlen:-1]))
    assert greedy == all(ref[t - 1].argmax().item() == ids[t] for t in range(ctxlen, len(ids)))
    # The text echoes the prompt (special tokens are not text) and the offsets index into it.
    text = r.choices[0].text
    assert text.startswith(ctx + cont)
    assert [text[o:o + len(t)] for o, t in zip(lp.text_offset[1:], lp.tokens[1:len(ids)])] == lp.tokens[1:len(ids)]
    transformers = pytest.importorskip("transformers")
    from herd.checkpoint import hf_config, to_hf_state_dict

    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig.from_dict(hf_config(model.args))).eval()
    hf.load_state_dict(to_hf_state_dict(model.state_dict(), model.args), strict=False)
    with torch.no_grad():
        hf_lp = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)
    assert lp.token_logprobs[1:len(ids)] == pytest.approx([hf_lp[t - 1, ids[t]].item() for t in range(1, len(ids))],
                                                          abs=1e-4)


def test_completions_batch_of_prompts_n_and_seed(official):
    r = official.client.completions.create(model="tiny", prompt=["One", "Two"], max_tokens=5, temperature=1.0,
                                           n=3, seed=7)
    assert sorted(c.index for c in r.choices) == list(range(6))
    texts = [c.text for c in sorted(r.choices, key=lambda c: c.index)]
    assert len(set(texts[:3])) > 1  # the n samples of one prompt differ
    again = official.client.completions.create(model="tiny", prompt=["One", "Two"], max_tokens=5, temperature=1.0,
                                               n=3, seed=7)
    assert [c.text for c in sorted(again.choices, key=lambda c: c.index)] == texts  # seeded: reproducible
    assert r.usage.prompt_tokens == 4 and r.usage.completion_tokens == 30


def test_stop_strings_match_across_token_boundaries(official):
    tok = official.tok
    prompt = tok.encode("Once upon a time", bos=True)
    free = greedy_reference(official.model, prompt, 16, tok.stop_tokens)
    pieces = [tok.decode([t]) for t in free]
    # A stop string made of the end of one token and the start of the next.
    k = next(i for i in range(2, len(pieces) - 1) if len(pieces[i]) >= 2 and len(pieces[i + 1]) >= 2)
    stop = pieces[k][-2:] + pieces[k + 1][:2]
    full = "".join(pieces)
    want = full[:full.index(stop)]
    r = official.client.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0, stop=[stop])
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
    chunks = list(official.client.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0,
                                                     stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]


def test_chat_logprobs_and_top_logprobs_limits(official):
    msgs = [{"role": "user", "content": "Hi"}]
    r = official.client.chat.completions.create(model="tiny", messages=msgs, max_tokens=3, temperature=0,
                                                logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == 3 and all(len(c.top_logprobs) == 2 for c in content)
    assert all(c.logprob == pytest.approx(c.top_logprobs[0].logprob) for c in content)  # greedy = top-1
    with pytest.raises(openai.BadRequestError, match="top log-probs"):
        official.client.chat.completions.create(model="tiny", messages=msgs, max_tokens=3, logprobs=True,
                                                top_logprobs=21)
    assert official.client.models.list().data  # still serving


# -- tools, JSON mode (the trained byte-level model) -------------------------------------------


def test_tool_call_round_trip(trained):
    c = trained.client
    r = c.chat.completions.create(model="bytes", messages=WEATHER_Q, tools=TOOLS, temperature=0, max_tokens=100)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    # Streaming: the call arrives whole in one delta, then finish_reason tool_calls.
    chunks = list(c.chat.completions.create(model="bytes", messages=WEATHER_Q, tools=TOOLS, temperature=0,
                                            max_tokens=100, stream=True))
    deltas = [ch.choices[0].delta for ch in chunks if ch.choices and ch.choices[0].delta.tool_calls]
    assert len(deltas) == 1 and deltas[0].tool_calls[0].function.name == "get_weather"
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # The tool's result goes back as a `tool` message (rendered in the ipython role of Llama 3.1).
    history = WEATHER_Q + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                           {"role": "tool", "tool_call_id": call.id, "content": "18 C, sunny"}]
    r2 = c.chat.completions.create(model="bytes", messages=history, tools=TOOLS, temperature=0, max_tokens=5)
    want = ChatFormat(trained.tok).encode_dialog_prompt(
        WEATHER_Q + [{"role": "assistant", "tool_calls": [{"type": "function", "function": {
            "name": "get_weather", "arguments": {"city": "Paris"}}}]},
                     {"role": "tool", "content": "18 C, sunny"}], tools=TOOLS)
    assert r2.usage.prompt_tokens == len(want)
    # tool_choice none: the tools are not shown and nothing is parsed.
    r3 = c.chat.completions.create(model="bytes", messages=WEATHER_Q, tools=TOOLS, tool_choice="none",
                                   temperature=0, max_tokens=20)
    assert r3.choices[0].message.tool_calls is None


def test_named_tool_choice_forces_the_call(trained):
    r = trained.client.chat.completions.create(
        model="bytes", messages=JSON_Q, tools=TOOLS, temperature=0, max_tokens=120,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = r.choices[0]
    if choice.finish_reason == "tool_calls":  # the reply finished inside the budget: a parsed call
        assert choice.message.tool_calls[0].function.name == "get_weather"
        assert isinstance(json.loads(choice.message.tool_calls[0].function.arguments), dict)
    else:  # cut by max_tokens: still a prefix of the forced call
        assert choice.finish_reason == "length"


def test_json_mode(trained):
    c = trained.client
    r = c.chat.completions.create(model="bytes", messages=JSON_Q, temperature=0, max_tokens=100,
                                  response_format={"type": "json_object"})
    assert r.choices[0].message.content == JSON_A and json.loads(r.choices[0].message.content)["answer"] == 42
    # The greeting is not JSON: unconstrained it is plain text, in JSON mode it must start an object.
    free = c.chat.completions.create(model="bytes", messages=HELLO_Q, temperature=0, max_tokens=40)
    assert free.choices[0].message.content == HELLO_A
    forced = c.chat.completions.create(model="bytes", messages=HELLO_Q, temperature=0, max_tokens=40,
                                       response_format={"type": "json_object"})
    text = forced.choices[0].message.content
    assert text.lstrip().startswith("{")
    if forced.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


# -- many clients ------------------------------------------------------------------------------


def _request(url: str, i: int) -> tuple[str, str]:
    """A mixed request: chat or completion, streamed or not, different prompt and output lengths."""
    body = {"model": "tiny", "temperature": 0, "max_tokens": 3 + i % 9}
    if i % 2:
        body["messages"] = [{"role": "user", "content": "word " * (1 + i % 13)}]
        path = "/v1/chat/completions"
    else:
        body["prompt"] = "count " * (1 + (i * 7) % 40)
        path = "/v1/completions"
    if i % 3 == 0:
        body["stream"] = True
        text = ""
        with httpx.stream("POST", url + path, json=body, timeout=120) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    ch = json.loads(line[6:])
                    for c in ch["choices"]:
                        text += c.get("text") or (c.get("delta") or {}).get("content") or ""
        return text, "stream"
    r = httpx.post(url + path, json=body, timeout=120)
    assert r.status_code == 200, r.text
    c = r.json()["choices"][0]
    return c.get("text") if "text" in c else c["message"]["content"], "whole"


def test_64_concurrent_clients_get_what_they_get_alone(official):
    alone = [_request(official.url, i)[0] for i in range(64)]
    barrier = threading.Barrier(64)

    def client(i: int) -> str:
        barrier.wait()
        return _request(official.url, i)[0]

    with ThreadPoolExecutor(64) as pool:
        together = list(pool.map(client, range(64)))
    assert together == alone
    h = settle(official)
    assert h["kv_blocks_used"] == 0 and official.service.engine.blocks.leaked() == 0
    metrics = httpx.get(official.url + "/metrics").text
    assert "herd_time_to_first_token_seconds_count" in metrics and "herd_kv_cache_usage_ratio 0.0" in metrics


def test_client_disconnect_mid_stream_frees_its_slot(official):
    body = {"model": "tiny", "prompt": "never ending", "max_tokens": 200, "temperature": 0, "stream": True}
    with httpx.stream("POST", official.url + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        assert official.service.engine.stats()["running"] == 1
    h = settle(official)  # the connection is closed: the request is cancelled, its blocks returned
    assert h["running"] == 0 and h["kv_blocks_used"] == 0
    assert official.service.worker.metrics.finished.get("length", 0) >= 0


# -- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize("body,status,needle", [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "must be a JSON object"),
    (json.dumps({"model": "tiny", "prompt": "x", "temperature": "hot"}).encode(), 400, "'temperature' must be"),
    (json.dumps({"model": "tiny", "prompt": "x", "max_tokens": "5"}).encode(), 400, "'max_tokens' must be"),
    (json.dumps({"model": "gpt-9", "prompt": "x"}).encode(), 404, "does not exist"),
    (json.dumps({"model": "tiny", "prompt": "x", "n": 100}).encode(), 400, "'n' must be"),
    (json.dumps({"model": "tiny", "prompt": [1, 2, 10 ** 9]}).encode(), 400, "outside the model's vocabulary"),
    (json.dumps({"model": "tiny", "prompt": "x " * 300, "max_tokens": 10}).encode(), 400, "maximum context length is 256"),
    (json.dumps({"model": "tiny", "prompt": {"a": 1}}).encode(), 400, "'prompt' must be"),
    (json.dumps({"model": "tiny", "prompt": "x", "stream_options": {"include_usage": True}}).encode(), 400,
     "stream_options"),
])
def test_bad_completions_requests_get_4xx_in_openai_shape(official, body, status, needle):
    r = httpx.post(official.url + "/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle in err["message"] and set(err) == {"message", "type", "param", "code"}


def test_bad_chat_requests_and_unknown_routes(official):
    url = official.url
    for body, needle in [({"model": "tiny"}, "'messages' is required"),
                         ({"model": "tiny", "messages": []}, "at least one"),
                         ({"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}, "unknown role"),
                         ({"model": "tiny", "messages": [{"role": "user", "content": 5}]}, "content must be"),
                         ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "tool_choice": "required"},
                          "needs 'tools'")]:
        r = httpx.post(url + "/v1/chat/completions", json=body)
        assert r.status_code == 400 and needle in r.json()["error"]["message"], (body, r.text)
    r = httpx.get(url + "/v2/nothing")
    assert r.status_code == 404 and "error" in r.json()
    big = b'{"model": "tiny", "prompt": "' + b"x" * (5 << 20) + b'"}'
    r = httpx.post(url + "/v1/completions", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413
    with pytest.raises(openai.NotFoundError):
        official.client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])


def test_api_key_and_full_queue(official_tokenizer_model):
    tok = Tokenizer.from_file(official_tokenizer_model)
    model = tiny_model(tok.n_words, max_seq_len=256)
    app = build_app(model, tok, ServerConfig(api_key="sekret", max_batch_size=1, max_queue=0), model_name="m")
    with ServerThread(app) as srv:
        assert httpx.get(srv.url + "/v1/models").status_code == 401
        assert httpx.get(srv.url + "/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
        assert httpx.get(srv.url + "/health").status_code == 200  # open for load balancers
        ok = openai.OpenAI(base_url=srv.url + "/v1", api_key="sekret", max_retries=0)
        assert ok.models.list().data[0].id == "m"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0).models.list()
        # One slot, no queue: while a request runs, another is told to come back later. The engine thread
        # is held at its next step so the first request is certainly still running.
        engine, gate = app.state.service.engine, threading.Event()
        step = engine.step
        engine.step = lambda: (gate.wait(30), step())[1]
        headers = {"Authorization": "Bearer sekret"}
        body = {"model": "m", "prompt": "a", "max_tokens": 5, "temperature": 0}
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(httpx.post, srv.url + "/v1/completions", json=body, headers=headers, timeout=60)
            while app.state.service.worker.inflight == 0:
                threading.Event().wait(0.01)
            busy = httpx.post(srv.url + "/v1/completions", json=body, headers=headers)
            busy_stream = httpx.post(srv.url + "/v1/completions", json={**body, "stream": True}, headers=headers)
            gate.set()
            assert first.result().status_code == 200
        assert busy.status_code == 429 and busy.headers["retry-after"] == "1"
        assert busy.json()["error"]["type"] == "rate_limit_error"
        assert busy_stream.status_code == 429  # refused before the event stream starts


def _rss_mb() -> float:
    """This process's resident memory now (Linux /proc), in MiB."""
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_a_thousand_mixed_requests_leave_nothing_behind(official):
    import gc

    url = official.url
    good = {"model": "tiny", "prompt": "hi", "max_tokens": 2, "temperature": 0}
    bads = [b"{", json.dumps({**good, "top_p": 7}).encode(), json.dumps({**good, "model": "x"}).encode(),
            json.dumps({**good, "prompt": []}).encode()]
    with httpx.Client(timeout=60) as http:
        for _ in range(50):  # warm up allocator pools before taking the baseline
            assert http.post(url + "/v1/completions", json=good).status_code == 200
        settle(official)
        gc.collect()
        rss0 = _rss_mb()
        codes: dict[int, int] = {}
        for i in range(1000):
            if i % 4 == 3:
                r = http.post(url + "/v1/completions", content=bads[i % len(bads)],
                              headers={"content-type": "application/json"})
            elif i % 4 == 1:
                r = http.post(url + "/v1/chat/completions",
                              json={"model": "tiny", "messages": [{"role": "user", "content": str(i)}],
                                    "max_tokens": 2, "temperature": 0.7, "seed": i})
            else:
                r = http.post(url + "/v1/completions", json={**good, "prompt": f"hi {i}"})
            codes[r.status_code] = codes.get(r.status_code, 0) + 1
    assert set(codes) <= {200, 400, 404} and codes[200] == 750
    h = settle(official)
    assert h["status"] == "ok" and h["kv_blocks_used"] == 0 and not official.service.engine._seqs
    gc.collect()
    growth_mb = _rss_mb() - rss0
    assert growth_mb < 64, growth_mb  # back near the baseline: nothing kept per request


def test_graceful_shutdown_finishes_in_flight_requests(official_tokenizer_model):
    tok = Tokenizer.from_file(official_tokenizer_model)
    model = tiny_model(tok.n_words, max_seq_len=256)
    app = build_app(model, tok, ServerConfig(max_batch_size=2), model_name="m")
    srv = ServerThread(app, shutdown_timeout=20).start()
    body = {"model": "m", "prompt": "a", "max_tokens": 60, "temperature": 0, "stream": True}
    lines = []
    with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=60) as r:
        it = r.iter_lines()
        lines.append(next(it))
        stopper = threading.Thread(target=srv.stop)
        stopper.start()  # shutdown begins while the stream is running
        lines += list(it)
    stopper.join(30)
    assert lines[-1] == "data: [DONE]" or lines[-2] == "data: [DONE]"
    finishes = [json.loads(x[6:])["choices"][0]["finish_reason"] for x in lines
                if x.startswith("data: {") and json.loads(x[6:])["choices"]]
    assert finishes[-1] == "length"  # it ran to the end
    assert not srv.thread.is_alive() and not app.state.service.worker._thread.is_alive()


def test_lm_eval_local_completions_scores_like_the_model(official):
    """lm-eval's own client (local-completions, with the server's remote tokenizer) against full forwards."""
    pytest.importorskip("lm_eval")
    pytest.importorskip("tenacity")  # lm-eval[api]
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    lm = LocalCompletionsAPI(base_url=official.url + "/v1/completions", model="tiny", tokenizer_backend="remote",
                             max_length=256, num_concurrent=2, max_retries=1)
    pairs = [("The capital of France is", " Paris"), ("1, 2, 3,", " 4, 5"), ("Hello", " world!")]
    got = lm.loglikelihood([Instance("loglikelihood", doc={}, arguments=p, idx=i) for i, p in enumerate(pairs)],
                           disable_tqdm=True)
    tok, model = official.tok, official.model
    for (ctx, cont), (lp, greedy) in zip(pairs, got):
        a, b = tok.encode(ctx), tok.encode(cont)
        with torch.no_grad():
            ref = torch.log_softmax(model(torch.tensor([a + b]))[0], -1)
        rows = range(len(a) - 1, len(a) + len(b) - 1)
        assert lp == pytest.approx(sum(ref[r, t].item() for r, t in zip(rows, b)), abs=1e-3)
        assert greedy == all(int(ref[r].argmax()) == t for r, t in zip(rows, b))


def test_serve_command_errors_are_one_line(tmp_path, capsys):
    import socket

    from herd.cli import main

    assert main(["serve", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("herd: error: checkpoint") and "does not exist" in err
    with socket.socket() as s:  # a port that is taken: refused before the model loads
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert main(["serve", str(tmp_path), "--port", str(s.getsockname()[1])]) == 2
    assert "cannot listen on 127.0.0.1" in capsys.readouterr().err
    assert main(["serve", str(tmp_path), "--chat-style", "fancy"]) == 2
    assert "--chat-style must be" in capsys.readouterr().err


def test_serve_command_quantize_int8_answers_like_the_quantized_model(tmp_path, official_tokenizer_model):
    """`herd serve --quantize int8` (a real process): greedy completions equal a cache-free greedy decode of
    the same checkpoint quantized in this process with herd.quant."""
    import socket
    import subprocess
    import sys
    import time

    from herd.checkpoint import load_checkpoint, save_checkpoint
    from herd.quant import QuantConfig, quantize_model

    tok = Tokenizer.from_file(official_tokenizer_model)
    save_checkpoint(tiny_model(tok.n_words, seed=7, max_seq_len=128), tmp_path / "ckpt",
                    tokenizer_path=official_tokenizer_model)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = "import sys; from herd.cli import main; sys.exit(main())"
    proc = subprocess.Popen([sys.executable, "-c", code, "serve", str(tmp_path / "ckpt"), "--quantize", "int8",
                             "--port", str(port), "--threads", "1"], stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.1)
        prompt = tok.encode("The quick brown fox", bos=True)
        got = httpx.post(url + "/v1/completions", json={"model": "ckpt", "prompt": prompt, "max_tokens": 12,
                                                        "temperature": 0}, timeout=120).json()
    finally:
        proc.terminate()
        err = proc.communicate(timeout=60)[1]
    assert "int8 weights" in err
    model = quantize_model(load_checkpoint(tmp_path / "ckpt").eval(), QuantConfig(method="int8"))
    want = greedy_reference(model, prompt, 12, set())
    assert got["choices"][0]["text"] == tok.decode(want)
