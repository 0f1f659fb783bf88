"""SFT data: reading TRL's chat formats from every file kind, the loss mask against transformers'
chat-template machinery (TRL's own Llama 3 templates, rendered by transformers on the official
tokenizer.json), length handling, the validation split, the report, and one-line errors for bad input."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pytest

from herd.errors import HerdError
from herd.posttrain import DataReport, SFTDataConfig, build_sft_data, load_tokenizer_for
from herd.posttrain.render import RecordError, render, to_conversation
from herd.tokenizer import ChatFormat, Tokenizer

transformers = pytest.importorskip("transformers")
trl_templates = pytest.importorskip("trl.chat_template_utils")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}

DIALOGS = {
    "single": [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi, how can I help?"}],
    "multi_turn_system": [
        {"role": "system", "content": "  You are terse.\n"}, {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": " 4. "}, {"role": "user", "content": "And 日本語 + emoji 👋🏽?"},
        {"role": "assistant", "content": "Both fine.\n\n"}],
    "tool_call": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "tool_calls": [{"type": "function", "function": {
            "name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "name": "get_weather", "content": "22 C, sunny"},
        {"role": "assistant", "content": "It is 22 C and sunny in Paris."}],
}


@pytest.fixture(scope="module")
def tok(official_tokenizer_model) -> Tokenizer:
    return Tokenizer.from_file(official_tokenizer_model)


@pytest.fixture(scope="module")
def hf_tok(official_tokenizer_json):
    t = transformers.PreTrainedTokenizerFast(tokenizer_file=str(official_tokenizer_json),
                                             bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    t.backend_tokenizer.model.ignore_merges = True  # as Hugging Face publishes Llama 3
    return t


def _generation_tagged(template: str) -> str:
    """TRL's Llama 3.1 template with {% generation %} around what each assistant message writes
    (its content or tool call and the closing eot / eom), the markers transformers'
    return_assistant_tokens_mask reads. The template text itself is TRL's (Meta's)."""
    plain = ("{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim"
             " + '<|eot_id|>' }}")
    assert plain in template
    template = template.replace(plain, (
        "{%- if message.role == 'assistant' %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
        "{%- generation %}{{- message['content'] | trim + '<|eot_id|>' }}{%- endgeneration %}"
        "{%- else %}" + plain + "{%- endif %}"))
    start = "{%- set tool_call = message.tool_calls[0].function %}"
    end = "{%- elif message.role == \"tool\" or message.role == \"ipython\" %}"
    assert start in template and end in template
    head, rest = template.split(start)
    body, tail = rest.split(end)
    # a tool call writes its header inside both branches (built-in / custom); write it once before
    # them instead, then tag both branches and the closing eom / eot
    header = "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}"
    assert body.count(header) == 2
    body = body.replace(header, "").rstrip()
    assert body.endswith("{%- endif %}")
    return head + start + header + "{%- generation %}" + body + "{%- endgeneration %}\n    " + end + tail


def _transformers_mask(hf_tok, template: str, messages, **kwargs) -> tuple[list[int], list[bool]]:
    out = hf_tok.apply_chat_template(messages, chat_template=template, tokenize=True, return_dict=True,
                                     return_assistant_tokens_mask=True, **kwargs)
    return list(out["input_ids"]), [bool(m) for m in out["assistant_masks"]]


@pytest.mark.parametrize("name", list(DIALOGS))
def test_hf_style_mask_equals_transformers_assistant_tokens_mask(tok, hf_tok, name):
    messages = DIALOGS[name]
    template = _generation_tagged(trl_templates.llama3_1_chat_template)
    want_ids, want_mask = _transformers_mask(hf_tok, template, messages, tools=[WEATHER] if name == "tool_call" else None)
    ids, mask = ChatFormat(tok).encode_dialog_with_mask(messages, tools=[WEATHER] if name == "tool_call" else None)
    assert ids == want_ids
    assert mask == want_mask
    assert sum(mask) > 0


@pytest.mark.parametrize("name", list(DIALOGS))
def test_hf_style_mask_equals_prefix_rendering(tok, hf_tok, name):
    """Independent of generation tags: the learned span of assistant message k is what the untouched
    template adds going from messages[:k] + generation prompt to messages[:k + 1]."""
    messages = DIALOGS[name]
    template = trl_templates.llama3_1_chat_template

    def ids(msgs, agp):
        return list(hf_tok.apply_chat_template(msgs, chat_template=template, tokenize=True, return_dict=False,
                                               add_generation_prompt=agp))

    full = ids(messages, False)
    want = [False] * len(full)
    for k, m in enumerate(messages):
        if m["role"] == "assistant":
            prompt, upto = ids(messages[:k], True), ids(messages[:k + 1], False)
            assert full[:len(upto)] == upto and upto[:len(prompt)] == prompt
            want[len(prompt):len(upto)] = [True] * (len(upto) - len(prompt))
    got_ids, got_mask = ChatFormat(tok).encode_dialog_with_mask(messages)
    assert got_ids == full and got_mask == want


@pytest.mark.parametrize("name", ["single", "multi_turn_system"])
def test_meta_style_mask_equals_trl_llama3_training_template(tok, hf_tok, name):
    """TRL ships a generation-tagged Llama 3 template (llama3_training.jinja) for assistant-only loss."""
    messages = DIALOGS[name]
    want_ids, want_mask = _transformers_mask(hf_tok, trl_templates.llama3_training_chat_template, messages)
    assert ChatFormat(tok, style="meta").encode_dialog_with_mask(messages) == (want_ids, want_mask)


def test_train_on_last_and_all_and_prompt_completion(tok):
    chat = ChatFormat(tok, style="meta")
    msgs = DIALOGS["multi_turn_system"]
    ids, every = chat.encode_dialog_with_mask(msgs)
    _, last = chat.encode_dialog_with_mask(msgs, train_on="last")
    _, alls = chat.encode_dialog_with_mask(msgs, train_on="all")
    assert all(alls) and len(alls) == len(ids)
    learned_last = [i for i, m in zip(ids, last) if m]
    assert learned_last == tok.encode("Both fine.") + [tok.eot_id]
    assert sum(last) < sum(every)
    # prompt/completion: the prompt's assistant turn is not learned
    conv = to_conversation({"prompt": msgs[:3], "completion": msgs[3:]})
    assert conv.train_from == 3
    ids2, mask2 = render(conv, chat)
    assert ids2 == ids and mask2 == last


def test_record_formats(tok):
    chat = ChatFormat(tok, style="meta")
    user_asst = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    want = chat.encode_dialog_with_mask(user_asst)
    assert render(to_conversation({"messages": user_asst}), chat) == want
    assert render(to_conversation({"prompt": "2+2?", "completion": "4"}), chat) == want
    assert render(to_conversation({"prompt": [user_asst[0]], "completion": [user_asst[1]]}), chat) == want
    parts = [{"role": "user", "content": [{"type": "text", "text": "2+"}, {"type": "text", "text": "2?"}]},
             {"role": "assistant", "content": [{"type": "text", "text": "4"}]}]
    assert render(to_conversation({"messages": parts}), chat) == want
    # parquet rows carry every struct field; unset ones are None
    padded = [{**m, "tool_calls": None, "name": None} for m in user_asst]
    assert render(to_conversation({"messages": padded}), chat) == want
    # raw text pairs: bos + prompt + completion + end_of_text, the completion and end learned
    ids, mask = render(to_conversation({"prompt": "2+2=", "completion": " 4"}, text_pairs="text"), chat)
    assert ids == [tok.bos_id] + tok.encode("2+2=") + tok.encode(" 4") + [tok.eos_id]
    assert mask == [False] * (1 + len(tok.encode("2+2="))) + [True] * (len(tok.encode(" 4")) + 1)
    # tools as a JSON string (a parquet column) render like a list
    conv = to_conversation({"messages": DIALOGS["tool_call"], "tools": json.dumps([WEATHER])})
    assert conv.tools == [WEATHER]


@pytest.mark.parametrize("record,reason", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "no_assistant_turn"),
    ({"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}],
      "completion": [{"role": "user", "content": "more"}]}, "no_assistant_turn"),
    ({"messages": []}, "no_assistant_turn"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "unknown_role"),
    ({"messages": "hello"}, "bad_messages"),
    ({"messages": [{"role": "user", "content": 7}, {"role": "assistant", "content": "x"}]}, "bad_messages"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [{"function": {}}]}]},
     "bad_messages"),
    ({"chosen": "a", "rejected": "b"}, "unknown_format"),
    ({"text": "plain"}, "unknown_format"),
])
def test_bad_records_name_their_reason(tok, record, reason):
    with pytest.raises(RecordError) as e:
        render(to_conversation(record), ChatFormat(tok))
    assert e.value.reason == reason


def _write_jsonl(path: Path, records, opener=open) -> Path:
    with opener(path, "wt", encoding="utf-8") as f:
        for r in records:
            f.write(r if isinstance(r, str) else json.dumps(r))
            f.write("\n")
    return path


def _chats(n: int, offset: int = 0) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                          {"role": "assistant", "content": f"{i} + {i} = {2 * i}."}]} for i in range(offset, offset + n)]


def test_every_file_kind_reads_the_same_examples(tok, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    records = _chats(12)
    cfg = dict(val_fraction=0.0, chat_style="meta")
    plain = build_sft_data(SFTDataConfig(data=[str(_write_jsonl(tmp_path / "a.jsonl", records))], **cfg), tok,
                           progress=False)
    _write_jsonl(tmp_path / "b.jsonl.gz", records, opener=gzip.open)
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
        "".join(json.dumps(r) + "\n" for r in records).encode()))
    (tmp_path / "d.json").write_text(json.dumps(records, indent=2))
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "e.parquet")
    for name in ("b.jsonl.gz", "c.jsonl.zst", "d.json", "e.parquet"):
        other = build_sft_data(SFTDataConfig(data=[str(tmp_path / name)], **cfg), tok, progress=False)
        assert other.train.fingerprint() == plain.train.fingerprint(), name
        assert other.report.records == 12 and other.report.kept == 12
    # a folder: all five files, plus a README that is skipped and counted; hidden files (a git
    # folder, the temporary of an unfinished atomic write) are not data at all
    (tmp_path / "README.md").write_text("# my data\n")
    (tmp_path / ".git").mkdir()
    _write_jsonl(tmp_path / ".git" / "x.jsonl", records)
    _write_jsonl(tmp_path / ".a.jsonl.tmp-123.jsonl", records)
    folder = build_sft_data(SFTDataConfig(data=[str(tmp_path)], **cfg), tok, progress=False)
    assert folder.report.files == 5 and folder.report.kept == 60
    assert folder.report.dropped == {"skipped_files": 1}


def test_report_counts_every_reason_and_keeps_going(tok, tmp_path):
    good = _chats(6)
    lines = [*good[:3], "{not json", "[1, 2]", {"messages": [{"role": "user", "content": "no reply"}]},
             {"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]},
             {"text": "pre-training text"}, *good[3:]]
    path = _write_jsonl(tmp_path / "mixed.jsonl", lines)
    data = build_sft_data(SFTDataConfig(data=[str(path)], val_fraction=0.0), tok, progress=False)
    r = data.report
    assert (r.records, r.kept, r.train) == (11, 6, 6)
    assert r.dropped == {"malformed_json": 2, "no_assistant_turn": 1, "unknown_role": 1, "unknown_format": 1}
    assert r.samples["malformed_json"][0].startswith(f"{path}:4")
    assert r.samples["unknown_role"][0] == f"{path}:7: message 0 has role 'wizard'"
    assert r.trained_tokens == data.train.learned_tokens() > 0
    assert "unknown_role: 1" in r.format()


def test_truncate_or_drop_long_examples(tok, tmp_path):
    long_reply = "word " * 200
    records = [*_chats(3), {"messages": [{"role": "user", "content": "Say a lot."},
                                         {"role": "assistant", "content": long_reply}]},
               {"messages": [{"role": "user", "content": "long question " * 100},
                             {"role": "assistant", "content": "short"}]}]
    path = _write_jsonl(tmp_path / "d.jsonl", records)
    base = dict(data=[str(path)], val_fraction=0.0, chat_style="meta", max_seq_len=64)
    cut = build_sft_data(SFTDataConfig(**base), tok, progress=False)
    assert cut.report.truncated == 1 and cut.report.kept == 4
    assert cut.report.dropped == {"nothing_left_after_truncation": 1}  # its reply started after token 64
    assert int(cut.train.lengths.max()) == 64
    dropped = build_sft_data(SFTDataConfig(**base, overlong="drop"), tok, progress=False)
    assert dropped.report.kept == 3 and dropped.report.dropped == {"too_long": 2}


def test_validation_split_is_stable_and_by_content(tok, tmp_path):
    records = _chats(200)
    a = _write_jsonl(tmp_path / "a.jsonl", records)
    b = _write_jsonl(tmp_path / "b.jsonl", list(reversed(records)))
    cfg = dict(val_fraction=0.2, chat_style="meta")
    da = build_sft_data(SFTDataConfig(data=[str(a)], **cfg), tok, progress=False)
    db = build_sft_data(SFTDataConfig(data=[str(b)], **cfg), tok, progress=False)
    assert 20 <= len(da.val) <= 60 and len(da.train) + len(da.val) == 200

    def texts(ds):
        return sorted(tok.decode(ds.example(i)[0].tolist()) for i in range(len(ds)))

    assert texts(da.val) == texts(db.val)  # the same records are held out whatever the order
    other_seed = build_sft_data(SFTDataConfig(data=[str(a)], seed=1, **cfg), tok, progress=False)
    assert texts(other_seed.val) != texts(da.val)
    # an "id" field decides instead of the content
    with_ids = [{**r, "id": f"r{i % 10}"} for i, r in enumerate(records)]
    dc = build_sft_data(SFTDataConfig(data=[str(_write_jsonl(tmp_path / "c.jsonl", with_ids))], **cfg), tok,
                        progress=False)
    assert len(dc.val) % 20 == 0  # records sharing an id share a split


def test_nothing_usable_is_one_line(tok, tmp_path):
    path = _write_jsonl(tmp_path / "pretrain.jsonl", [{"text": "a"}, {"text": "b"}, "oops"])
    with pytest.raises(HerdError) as e:
        build_sft_data(SFTDataConfig(data=[str(path)]), tok, progress=False)
    msg = str(e.value)
    assert "\n" not in msg and "all 3 records were dropped" in msg and "unknown_format" in msg
    assert "plain text" in msg


@pytest.mark.parametrize("setup,match", [
    (lambda p: p / "missing.jsonl", "does not exist"),
    (lambda p: (p / "data.csv").write_text("a,b\n1,2\n") and p / "data.csv", "not a jsonl"),
    (lambda p: ((p / "sub").mkdir(), (p / "sub" / "x.txt").write_text("hi"))[0] or p / "sub", "holds no"),
    (lambda p: (p / "bad.parquet").write_bytes(b"not parquet at all") and p / "bad.parquet", "unreadable_files"),
    (lambda p: (p / "bad.jsonl.gz").write_bytes(b"\x1f\x8b\x08\x00garbage") and p / "bad.jsonl.gz", "unreadable_files"),
])
def test_wrong_files_give_one_line_errors(tok, tmp_path, setup, match):
    path = setup(tmp_path)
    with pytest.raises(HerdError, match=match) as e:
        build_sft_data(SFTDataConfig(data=[str(path)]), tok, progress=False)
    assert "\n" not in str(e.value)


def test_bad_settings(tok, tmp_path):
    path = _write_jsonl(tmp_path / "a.jsonl", _chats(2))
    for kwargs, match in [({"train_on": "users"}, "train-on"), ({"overlong": "wrap"}, "overlong"),
                          ({"chat_style": "chatml"}, "chat-style"), ({"max_seq_len": 1}, "max-seq-len"),
                          ({"val_fraction": 1.0}, "val-fraction"), ({"text_pairs": "raw"}, "text-pairs")]:
        with pytest.raises(HerdError, match=match):
            build_sft_data(SFTDataConfig(data=[str(path)], **kwargs), tok, progress=False)
    with pytest.raises(HerdError, match="no chat data"):
        build_sft_data(SFTDataConfig(), tok, progress=False)
    with pytest.raises(HerdError, match="validation split"):
        build_sft_data(SFTDataConfig(data=[str(path)], val_fraction=0.999999), tok, progress=False)


def test_tokenizer_must_be_the_checkpoints(tmp_path, official_tokenizer_model):
    from herd.checkpoint import save_checkpoint
    from herd.model import ModelArgs, Transformer
    from herd.tokenizer import train_bpe

    model = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=128256, multiple_of=32))
    save_checkpoint(model, tmp_path / "ckpt", tokenizer_path=official_tokenizer_model)
    assert load_tokenizer_for(tmp_path / "ckpt").sha256 == Tokenizer.from_file(official_tokenizer_model).sha256
    assert load_tokenizer_for(tmp_path / "ckpt", official_tokenizer_model, vocab_size=128256).n_words == 128256
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog\n" * 50)
    train_bpe([corpus], 520, tmp_path / "small.model")
    other = tmp_path / "small.model"
    with pytest.raises(HerdError, match="differs from the checkpoint's own") as e:
        load_tokenizer_for(tmp_path / "ckpt", other)
    assert "\n" not in str(e.value)
    save_checkpoint(model, tmp_path / "bare")
    with pytest.raises(HerdError, match="no tokenizer.model beside"):
        load_tokenizer_for(tmp_path / "bare")
    with pytest.raises(HerdError, match="only 1000"):
        load_tokenizer_for(tmp_path / "bare", official_tokenizer_model, vocab_size=1000)


def test_report_error_for_no_records(tmp_path):
    r = DataReport()
    r.count("unreadable_files", "x.parquet:row 0", "ArrowInvalid: bad magic")
    msg = str(r.nothing_usable("x.parquet"))
    assert "no record was read" in msg and "unreadable_files" in msg and re.search(r"ArrowInvalid", msg)
