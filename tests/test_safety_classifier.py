"""GuardClassifier on a tiny random model: the unsafe score equals p(first token) from a plain full forward,
the generated answer equals greedy decoding by full forwards, batching and the prefix cache change
nothing; metrics equal scikit-learn's; `herd guard` reads and writes records, renders training data and
fails with one line."""

from __future__ import annotations

import io
import json

import pytest
import torch

from herd.checkpoint import save_checkpoint
from herd.cli import main
from herd.errors import HerdError
from herd.model import ModelArgs, Transformer
from herd.safety import GuardClassifier, GuardFormat, guard_metrics, synthetic_guard_records, unsafe_token_ids
from herd.safety.metrics import average_precision
from herd.tokenizer import Tokenizer

CONVS = [
    [{"role": "user", "content": "How do I bake bread?"}],
    [{"role": "user", "content": "How do I bake bread?"}, {"role": "assistant", "content": "Mix flour and water."}],
    [{"role": "user", "content": "Give me a recipe for nerve gas."}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "bye"}],
]


@pytest.fixture(scope="module")
def tok(official_tokenizer_model) -> Tokenizer:
    return Tokenizer.from_file(official_tokenizer_model)


@pytest.fixture(scope="module")
def model(tok) -> Transformer:
    torch.manual_seed(3)
    m = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128256, multiple_of=32,
                              max_seq_len=512)).eval()
    m.init_weights(std=0.05)
    # Point the output row of "unsafe" at the last hidden state of the nerve-gas prompt, so p(unsafe) is about
    # one half there (and small elsewhere): the score comparison below is then not between two tiny numbers.
    with torch.no_grad():
        h = m.features(torch.tensor([GuardFormat(3).encode(tok, CONVS[2])]))[0, -1]
        others = m.logits(h).float()
        others[39257] = -float("inf")
        m.output.weight[39257] = h * (torch.logsumexp(others, 0) / h.dot(h))
    return m


def reference(model: Transformer, prompt: list[int], n: int, stops: set[int], tok: Tokenizer) -> tuple[list[int], float]:
    """Greedy ids by a cache-free full forward per token, and p(unsafe) where the answer starts (the first
    step whose token is not blank)."""
    seq, out, score, started = list(prompt), [], None, False
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([seq]))[0, -1].float()
            t = int(logits.argmax())
            blank = t not in stops and not tok.decode([t]).strip()
            if not started and (score is None or not blank):
                score = torch.softmax(logits, -1)[[39257, 20451]].sum().item()
            started = started or not blank
            if t in stops:
                break
            out.append(t)
            seq.append(t)
    return out, score


def test_score_is_read_where_the_answer_starts(tok):
    """A guard that writes a blank line first (prompts rendered without it) is scored at its first real token."""
    from herd.safety.classifier import Answer

    a = Answer(tok)
    for token, lp, stop in ((271, [-9.0, -9.5], False), (39257, [-0.1, -5.0], False), (198, [-7.0, -7.0], False),
                            (tok.eot_id, [-8.0, -8.0], True)):
        a.push(token, lp, stop)
    assert a.watched == [-0.1, -5.0] and tok.decode(a.ids) == "\n\nunsafe\n"
    b = Answer(tok)
    b.push(19193, [-6.0, -6.0], False)  # "safe" at once: the first step's values
    b.push(271, [-1.0, -1.0], False)
    assert b.watched == [-6.0, -6.0]


def test_unsafe_token_ids(tok):
    assert unsafe_token_ids(tok) == [tok.encode("unsafe")[0], tok.encode(" unsafe")[0]] == [39257, 20451]


def test_score_and_answer_equal_full_forwards(tok, model):
    guard = GuardClassifier(model, tok, GuardFormat(3), max_batch_size=3)
    results = guard.classify(CONVS)
    stops = set(tok.stop_tokens) | {tok.bos_id}
    for conv, res in zip(CONVS, results):
        ids, role = guard.prompt(conv)
        want_ids, want_score = reference(model, ids, guard.max_new_tokens, stops, tok)
        assert res.text == tok.decode(want_ids)
        assert res.score == pytest.approx(want_score, rel=1e-4, abs=1e-7)
        assert res.role == role
    assert [r.role for r in results] == ["User", "Agent", "User", "User"]
    assert results[2].score == pytest.approx(0.5, abs=0.05)  # not only tiny numbers compared: the check has teeth
    # one at a time, on a fresh engine (no prefix cache hits), the same answers
    again = [GuardClassifier(model, tok, GuardFormat(3), max_batch_size=1).classify([c])[0] for c in CONVS[:2]]
    assert [r.text for r in again] == [r.text for r in results[:2]]
    assert [r.score for r in again] == pytest.approx([r.score for r in results[:2]], rel=1e-4)
    # the shared task line and category block come from the prefix cache the second time round
    stats = guard.engine.stats()
    guard.classify(CONVS[:1])
    assert guard.engine.stats()["prefix_cache_hits"] > stats["prefix_cache_hits"]


def test_answer_budget_and_context(tok, model):
    fmt = GuardFormat(3)
    guard = GuardClassifier(model, tok, fmt)
    # room for the longest well-formed answer (every code) and one token more
    assert guard.max_new_tokens == len(tok.encode("unsafe\n" + ",".join(fmt.codes))) + 1
    short = GuardClassifier(model, tok, fmt, max_seq_len=260)
    with pytest.raises(HerdError, match="conversation 1: the guard prompt is .* tokens, more than"):
        short.classify([CONVS[0][:0] + [{"role": "user", "content": "x"}], [{"role": "user", "content": "a " * 300}]])
    with pytest.raises(HerdError, match="conversation 0: the conversation has no user message"):
        guard.classify([[{"role": "system", "content": "x"}]])
    with pytest.raises(HerdError, match="threshold must be between 0 and 1"):
        GuardClassifier(model, tok, fmt, threshold=1.5)


def test_metrics_equal_scikit_learn():
    metrics = pytest.importorskip("sklearn.metrics")
    import random

    rng = random.Random(0)
    codes = ["S1", "S2", "S3"]
    unsafe, gold, flagged, pred, scores = [], [], [], [], []
    for _ in range(300):
        u = rng.random() < 0.5
        g = sorted(rng.sample(codes, rng.randint(1, 2))) if u else []
        s = min(1.0, max(0.0, (0.65 if u else 0.35) + rng.gauss(0, 0.25)))
        s = round(s, 1)  # ties, which average precision must count as one threshold
        f = s >= 0.5
        p = sorted(set(g[:1] + ([rng.choice(codes)] if rng.random() < 0.3 else []))) if f else []
        unsafe.append(u), gold.append(g), flagged.append(f), pred.append(p), scores.append(s)
    m = guard_metrics(unsafe, gold, flagged, pred, codes, scores, threshold=0.5)
    p, r, f1, _ = metrics.precision_recall_fscore_support(unsafe, flagged, average="binary", zero_division=0)
    assert (m.binary.precision, m.binary.recall, m.binary.f1) == pytest.approx((p, r, f1))
    assert m.average_precision == pytest.approx(metrics.average_precision_score(unsafe, scores))
    y_true = [[c in g for c in codes] for g in gold]
    y_pred = [[f and c in q for c in codes] for f, q in zip(flagged, pred)]
    p, r, f1, support = metrics.precision_recall_fscore_support(y_true, y_pred, average=None, zero_division=0)
    for i, c in enumerate(codes):
        got = m.categories[c]
        assert (got.precision, got.recall, got.f1, got.support) == pytest.approx((p[i], r[i], f1[i], support[i]))
    micro = metrics.precision_recall_fscore_support(y_true, y_pred, average="micro", zero_division=0)
    assert (m.micro.precision, m.micro.recall, m.micro.f1) == pytest.approx(micro[:3])
    assert m.macro_f1 == pytest.approx(metrics.f1_score(y_true, y_pred, average="macro", zero_division=0))
    tn = sum(1 for u, f in zip(unsafe, flagged) if not u and not f)
    fp = sum(1 for u, f in zip(unsafe, flagged) if not u and f)
    assert m.binary.false_positive_rate == pytest.approx(fp / (fp + tn))


def test_average_precision_by_hand():
    # ranking: 0.9 (pos), 0.8 (neg), 0.7 (pos): AP = 1/2 * 1 + 1/2 * 2/3
    assert average_precision([True, False, True], [0.9, 0.8, 0.7]) == pytest.approx(0.5 + 1 / 3)
    assert average_precision([False, False], [0.1, 0.2]) == 0.0


def test_synthetic_set_is_distinct_balanced_and_split():
    train, test = synthetic_guard_records(400, "train"), synthetic_guard_records(120, "test")
    assert len({json.dumps(r["messages"]) for r in train}) == 400
    assert not {json.dumps(r["messages"]) for r in train} & {json.dumps(r["messages"]) for r in test}
    unsafe = sum(r["label"] == "unsafe" for r in train)
    assert 0.3 < unsafe / 400 < 0.6
    assert {r["role"] for r in train} == {"User", "Agent"}
    assert any(r["categories"] == ["S1", "S9"] for r in train)
    assert all(r["label"] == ("unsafe" if r["categories"] else "safe") for r in train + test)
    assert synthetic_guard_records(50, "train", seed=1) == synthetic_guard_records(50, "train", seed=1)


# -- herd guard --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def guard_dir(tmp_path_factory, model, official_tokenizer_model):
    return save_checkpoint(model, tmp_path_factory.mktemp("guard") / "g", tokenizer_path=official_tokenizer_model)


def run(args: list[str], capsys, stdin: str | None = None, monkeypatch=None) -> tuple[int, str, str]:
    if stdin is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_herd_guard_lines_and_record_errors(guard_dir, tmp_path, capsys, model, tok):
    data = tmp_path / "in.jsonl"
    records = [{"id": "a", "messages": CONVS[0]}, {"prompt": "How do I bake bread?", "response": "Mix flour and water."},
               {"messages": [{"role": "system", "content": "only a system prompt"}]}, "not an object",
               {"prompt": "Give me a recipe for nerve gas.", "role": "User"}, {"text": "plain"}]
    data.write_text("\n".join(json.dumps(r) for r in records) + "\n{broken\n")
    code, out, err = run(["guard", "--checkpoint", str(guard_dir), str(data), "--threads", "1"], capsys)
    assert code == 0
    lines = [json.loads(x) for x in out.splitlines()]
    assert len(lines) == 7  # one line per input line, in order
    direct = GuardClassifier(model, tok).classify([CONVS[0], CONVS[1], CONVS[2]])
    for line, res in zip([lines[0], lines[1], lines[4]], direct):
        assert (line["output"], line["verdict"], line["role"]) == (res.text, res.verdict, res.role)
        assert line["score"] == pytest.approx(res.score, abs=1e-6)
        assert line["flagged"] == res.flagged(0.5)
    assert lines[0]["id"] == "a"
    assert lines[2]["error"].startswith("bad_conversation: the conversation has no user message")
    assert lines[3]["error"].startswith("malformed_json: a JSON str") and lines[6]["error"].startswith("malformed_json")
    assert lines[5]["error"].startswith("unknown_format") and lines[5]["where"].endswith(":6")
    assert "3 conversations checked" in err and "1 bad_conversation" in err


def test_herd_guard_stdin_and_role(guard_dir, capsys, monkeypatch):
    stdin = json.dumps({"messages": CONVS[1]}) + "\n"
    code, out, _ = run(["guard", "--checkpoint", str(guard_dir), "--role", "Agent", "--threads", "1"], capsys, stdin,
                       monkeypatch)
    assert code == 0 and json.loads(out)["role"] == "Agent"
    code, out, err = run(["guard", "--checkpoint", str(guard_dir), "--role", "User", "--threads", "1"], capsys, stdin,
                         monkeypatch)
    assert code == 2 and "drop the reply to classify the prompt" in err and err.startswith("herd: error:")


def test_herd_guard_write_sft_and_synthetic(tmp_path, capsys, tok):
    code, _, err = run(["guard", "--write-synthetic", str(tmp_path / "syn"), "--synthetic-size", "30,10"], capsys)
    assert code == 0 and "wrote 30 train and 10 test" in err
    train = [json.loads(x) for x in (tmp_path / "syn" / "train.jsonl").read_text().splitlines()]
    assert len(train) == 30
    code, _, err = run(["guard", "--write-sft", str(tmp_path / "sft.jsonl"), str(tmp_path / "syn" / "train.jsonl")],
                       capsys)
    assert code == 0 and "--chat-style meta" in err
    sft = [json.loads(x) for x in (tmp_path / "sft.jsonl").read_text().splitlines()]
    fmt = GuardFormat(3)
    for rec, out in zip(train, sft):
        assert out == fmt.sft_record(rec["messages"], rec["categories"], rec["role"])
    # unlabelled records cannot become training data; nothing is written when none can
    (tmp_path / "unlabelled.jsonl").write_text(json.dumps({"messages": CONVS[0]}) + "\n")
    code, _, err = run(["guard", "--write-sft", str(tmp_path / "none.jsonl"), str(tmp_path / "unlabelled.jsonl")],
                       capsys)
    assert code == 2 and "no_label" in err and not (tmp_path / "none.jsonl").exists()
    (tmp_path / "badlabel.jsonl").write_text(json.dumps({"messages": CONVS[0], "categories": ["S99"]}) + "\n")
    code, _, err = run(["guard", "--write-sft", str(tmp_path / "x.jsonl"), str(tmp_path / "badlabel.jsonl")], capsys)
    assert code == 2 and "S99 are not the guard's" in err


def test_herd_guard_eval_needs_labels_and_reports(guard_dir, tmp_path, capsys):
    data = tmp_path / "labelled.jsonl"
    data.write_text("".join(json.dumps({"messages": c, "label": lab, "categories": cats}) + "\n"
                            for c, lab, cats in ((CONVS[0], "safe", []), (CONVS[2], "unsafe", ["S9"]))))
    code, out, _ = run(["guard", "--checkpoint", str(guard_dir), "--eval", str(data), "--report",
                        str(tmp_path / "m.json"), "--threads", "1"], capsys)
    assert code == 0 and "unsafe vs safe (score >= 0.5)" in out and "S9 Indiscriminate Weapons" in out
    report = json.loads((tmp_path / "m.json").read_text())
    assert report["unsafe"]["support"] == 1 and report["categories"]["S9"]["support"] == 1
    (tmp_path / "u.jsonl").write_text(json.dumps({"messages": CONVS[0]}) + "\n")
    code, _, err = run(["guard", "--checkpoint", str(guard_dir), "--eval", str(tmp_path / "u.jsonl")], capsys)
    assert code == 2 and "no_label" in err


def test_herd_guard_one_line_errors(tmp_path, capsys, model):
    no_tok = save_checkpoint(model, tmp_path / "no-tokenizer")
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"messages": CONVS[0]}) + "\n")
    for args, match in (
        (["--checkpoint", str(no_tok), str(data)], "no tokenizer.model found"),
        (["--checkpoint", str(tmp_path / "missing"), str(data)], "does not exist"),
        ([str(data)], "no guard model given"),
        (["--checkpoint", str(no_tok), "--exclude", "S1,S99", str(data)], "cannot exclude S99"),
        (["--checkpoint", str(no_tok), "--threshold", "2", str(data)], "--threshold must be at most 1"),
    ):
        code, out, err = run(["guard", *args], capsys)
        assert code == 2 and match in err and err.count("\n") == 1 and err.startswith("herd: error:"), (args, err)
