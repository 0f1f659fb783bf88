"""`herd serve` with a guard and Code Shield, through the official `openai` client.

The served model is a tiny byte-level chat model that gives known replies (tests/safety_fixtures.py); the
guard a tiny model taught which of those prompts and replies are unsafe. The reference for every
decision is the guard itself run directly (GuardClassifier on the same conversation, outside the server)
and the codeshield package's scanner: the server must refuse exactly what they flag, pass what they
clear, and never run the model for a refused prompt.
"""

from __future__ import annotations

import re

import httpx
import pytest
import torch

from herd.inference.server.runner import ServerConfig, ServerThread, build_app
from herd.safety import GuardClassifier, GuardFormat
from herd.safety.moderation import ModerationConfig, Moderator
from herd.tokenizer import Tokenizer
from tests.safety_fixtures import (BOMB, CATEGORIES, GETS, HELLO, PICKLE, STORY, trained_chat_model,
                                   trained_guard)

openai = pytest.importorskip("openai")
try:
    from herd.safety.codeshield import CodeShieldScanner

    CodeShieldScanner(check=False)
    HAVE_CODESHIELD = True
except Exception:  # the safety extra is not installed: the guard tests still run
    HAVE_CODESHIELD = False
needs_codeshield = pytest.mark.skipif(not HAVE_CODESHIELD, reason="the safety extra (codeshield) is not installed")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def models(official_tokenizer_model):
    tok = Tokenizer.from_file(official_tokenizer_model)
    guard = trained_guard(tok)
    chat_model, chat_tok = trained_chat_model()
    return guard, tok, chat_model, chat_tok


def start(models, **cfg) -> ServerThread:
    guard_model, tok, chat_model, chat_tok = models
    cfg = ModerationConfig(guard="tiny-guard", **cfg)
    guard = GuardClassifier(guard_model, tok, GuardFormat(3, CATEGORIES), max_batch_size=8, max_seq_len=512)
    scanner = CodeShieldScanner() if cfg.code_shield != "off" else None
    moderator = Moderator(cfg, guard, scanner, chat_tok)
    app = build_app(chat_model, chat_tok, ServerConfig(max_batch_size=4), model_name="chat", extensions=[moderator])
    srv = ServerThread(app).start()
    srv.client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    srv.guard = GuardClassifier(guard_model, tok, GuardFormat(3, CATEGORIES), max_batch_size=8, max_seq_len=512)
    srv.moderator, srv.chat_model, srv.chat_tok = moderator, chat_model, chat_tok
    return srv


@pytest.fixture(scope="module")
def warn_server(models):
    srv = start(models, code_shield="warn" if HAVE_CODESHIELD else "off")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def block_server(models):
    srv = start(models, guard_stream="buffer", code_shield="block" if HAVE_CODESHIELD else "off")
    yield srv
    srv.stop()


def ask(srv, prompt: str, **kw):
    return srv.client.chat.completions.create(model="chat", messages=[{"role": "user", "content": prompt}],
                                              temperature=0, max_tokens=120, **kw)


def metric(srv, name: str) -> float:
    text = httpx.get(srv.url + "/metrics").text
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def raw_reply(srv, prompt: str) -> str:
    """The served model's greedy reply on an engine of its own (no server, no moderation)."""
    from herd.inference import Engine, SamplingParams
    from herd.tokenizer import ChatFormat

    model, tok = srv.chat_model, srv.chat_tok
    ids = ChatFormat(tok).encode_dialog_prompt([{"role": "user", "content": prompt}])
    out = Engine(model, max_batch_size=1, max_seq_len=512).generate(
        [ids], SamplingParams(temperature=0, max_new_tokens=120, stop_tokens=tok.stop_tokens))[0]
    return tok.decode(out.tokens)


def direct(srv, prompt: str, reply: str | None = None):
    conv = [{"role": "user", "content": prompt}] + ([{"role": "assistant", "content": reply}] if reply else [])
    return srv.guard.classify([conv])[0]


def test_the_guard_reference_agrees_with_its_lessons(warn_server):
    assert direct(warn_server, BOMB).categories == ["S1"] and direct(warn_server, BOMB).flagged()
    assert direct(warn_server, *STORY).flagged() and not direct(warn_server, STORY[0]).flagged()
    assert not direct(warn_server, *HELLO).flagged()


def test_flagged_prompt_is_refused_before_generation(warn_server):
    generated = metric(warn_server, "herd_generation_tokens_total")
    r = ask(warn_server, BOMB, n=2)
    assert [c.finish_reason for c in r.choices] == ["content_filter", "content_filter"]
    msg = r.choices[0].message
    assert msg.content is None and msg.refusal == "This request was blocked by the moderation guard: S1 Weapons."
    mod = r.choices[0].model_extra["moderation"]
    assert mod["stage"] == "prompt" and mod["flagged"] and mod["categories"] == [{"code": "S1", "name": "Weapons"}]
    assert mod["score"] == pytest.approx(direct(warn_server, BOMB).score, abs=1e-4)
    assert metric(warn_server, "herd_generation_tokens_total") == generated  # the model never ran
    # streamed: one refusal chunk per choice, then [DONE]
    chunks = list(ask(warn_server, BOMB, stream=True))
    assert [c.choices[0].finish_reason for c in chunks] == ["content_filter"]
    assert chunks[0].choices[0].delta.refusal.endswith("S1 Weapons.") and chunks[0].choices[0].delta.content is None
    # text completions: the prompt as a user turn
    c = warn_server.client.completions.create(model="chat", prompt=BOMB, max_tokens=5)
    assert c.choices[0].finish_reason == "content_filter" and c.choices[0].text == ""
    assert metric(warn_server, "herd_generation_tokens_total") == generated


def test_safe_prompt_and_reply_pass(warn_server):
    r = ask(warn_server, HELLO[0])
    assert r.choices[0].message.content == HELLO[1] and r.choices[0].finish_reason == "stop"
    mod = r.choices[0].model_extra["moderation"]
    assert mod["stage"] == "response" and not mod["flagged"] and mod["verdict"] == "safe"
    assert mod["score"] == pytest.approx(direct(warn_server, *HELLO).score, abs=1e-4)
    assert "code_shield" not in r.choices[0].model_extra or r.choices[0].model_extra["code_shield"]["findings"] == []


def test_flagged_reply_is_replaced(warn_server):
    r = ask(warn_server, STORY[0])
    choice = r.choices[0]
    assert choice.finish_reason == "content_filter" and choice.message.content is None
    assert choice.message.refusal == "This reply was blocked by the moderation guard: S1 Weapons."
    assert choice.model_extra["moderation"]["stage"] == "response"
    # what the model wrote, outside the server, is the reply the guard flags
    assert raw_reply(warn_server, STORY[0]) == STORY[1] and direct(warn_server, *STORY).flagged()


def test_stream_end_policy_checks_the_finished_reply(warn_server):
    chunks = list(ask(warn_server, STORY[0], stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    last = chunks[-1].choices[0]
    assert last.finish_reason == "content_filter" and last.delta.refusal.endswith("S1 Weapons.")
    assert last.model_extra["moderation"]["flagged"]
    # "end": the text before the last chunk was already sent (the documented trade-off)
    assert text and STORY[1].startswith(text)
    ok = list(ask(warn_server, HELLO[0], stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in ok) == HELLO[1]
    assert ok[-1].choices[0].finish_reason == "stop" and not ok[-1].choices[0].model_extra["moderation"]["flagged"]


def test_stream_buffer_policy_sends_nothing_unsafe(block_server):
    chunks = list(ask(block_server, STORY[0], stream=True))
    assert all(not (c.choices[0].delta.content or "") for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "content_filter"
    assert chunks[-1].choices[0].delta.refusal.endswith("S1 Weapons.")
    ok = list(ask(block_server, HELLO[0], stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in ok if c.choices) == HELLO[1]
    assert ok[-1].usage is not None and ok[-1].usage.completion_tokens > 0


@needs_codeshield
def test_code_shield_warn_annotates(warn_server):
    r = ask(warn_server, PICKLE[0])
    choice = r.choices[0]
    assert choice.message.content == PICKLE[1] and choice.finish_reason == "stop"
    cs = choice.model_extra["code_shield"]
    assert cs["treatment"] == "warn" and [(f["cwe"], f["rule"], f["severity"], f["analyzer"]) for f in cs["findings"]] \
        == [("CWE-502", "unsafe-pickle-use", "warning", "semgrep")]
    # warn never refuses, even an error-severity finding
    r = ask(warn_server, GETS[0])
    assert r.choices[0].message.content == GETS[1] and r.choices[0].model_extra["code_shield"]["treatment"] == "block"


@needs_codeshield
def test_code_shield_block_refuses_error_findings(block_server):
    r = ask(block_server, GETS[0])
    choice = r.choices[0]
    assert choice.finish_reason == "content_filter" and choice.message.content is None
    assert choice.message.refusal == "This reply was blocked by Code Shield: insecure code (CWE-242 bugprone-gets)."
    assert choice.model_extra["code_shield"]["findings"][0]["severity"] == "error"
    assert not choice.model_extra["moderation"]["flagged"]  # the guard cleared it; Code Shield did not
    warned = ask(block_server, PICKLE[0]).choices[0]  # a warning-only finding passes, annotated
    assert warned.message.content == PICKLE[1] and warned.model_extra["code_shield"]["treatment"] == "warn"
    chunks = list(ask(block_server, GETS[0], stream=True))
    assert chunks[-1].choices[0].finish_reason == "content_filter"
    assert all(not (c.choices[0].delta.content or "") for c in chunks)


def test_a_request_the_guard_cannot_check_is_refused(warn_server):
    with pytest.raises(openai.BadRequestError) as e:
        warn_server.client.chat.completions.create(model="chat", messages=[{"role": "system", "content": "Hi"}])
    assert "moderation guard cannot check this request" in str(e.value) and "no user message" in str(e.value)
    with pytest.raises(openai.NotFoundError):  # the model name is checked before the guard runs
        warn_server.client.chat.completions.create(model="other", messages=[{"role": "user", "content": BOMB}])


def test_metrics_report_the_guard(warn_server):
    ask(warn_server, HELLO[0])
    text = httpx.get(warn_server.url + "/metrics").text
    for stage in ("prompt", "response"):
        count = metric(warn_server, f'herd_guard_seconds_count{{stage="{stage}"}}')
        assert count >= 1 and metric(warn_server, f'herd_guard_seconds_sum{{stage="{stage}"}}') > 0
        assert metric(warn_server, f'herd_guard_seconds_bucket{{stage="{stage}",le="+Inf"}}') == count
    assert metric(warn_server, 'herd_guard_flagged_total{stage="prompt",category="S1"}') >= 1
    assert metric(warn_server, 'herd_guard_checks_total{stage="response",result="passed"}') >= 1
    if HAVE_CODESHIELD:
        assert 'herd_code_shield_findings_total{cwe="CWE-502",severity="warning"}' in text
        assert metric(warn_server, "herd_code_shield_seconds_count") >= 1


def test_serve_moderation_flags_fail_in_one_line(tmp_path, capsys):
    from herd.cli import main

    for args, match in ((["--guard", str(tmp_path / "nope")], "--guard"),
                        (["--guard-check", "sometimes"], "unknown --guard-check 'sometimes'"),
                        (["--code-shield", "loud"], "unknown --code-shield 'loud'"),
                        (["--guard-exclude", "S1"], "need --guard GUARD_CHECKPOINT"),
                        (["--guard", str(tmp_path), "--guard-categories", str(tmp_path / "c.json")],
                         "--guard-categories")):
        code = main(["serve", str(tmp_path / "model"), "--port", "0", *args])
        err = capsys.readouterr().err
        assert code == 2 and match in err and err.startswith("herd: error:") and err.count("\n") == 1, err
