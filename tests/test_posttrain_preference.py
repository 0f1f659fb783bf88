"""Preference data: every TRL format rendered to the same prompt / chosen / rejected ids as TRL 1.16's
DPOTrainer tokenizes them (its own dataset preparation, on the official tokenizer.json with TRL's Llama
3.1 template), the Llama 3 formatting mask against hand-written expectations, ranked triples, the
report's reasons, length handling, the validation split, storage, and one-line errors."""

from __future__ import annotations

import gzip
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest

from herd.errors import HerdError
from herd.posttrain import (PreferenceDataConfig, PreferenceDataset, build_preference_data, render_preference,
                            to_preference)
from herd.posttrain.preference import formatting_mask
from herd.posttrain.render import RecordError
from herd.tokenizer import ChatFormat, Tokenizer

transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

U = {"role": "user", "content": "What is 2+2?"}
C = {"role": "assistant", "content": "4"}
R = {"role": "assistant", "content": "5, I think."}

RECORDS = {
    "explicit": [{"prompt": [U], "chosen": [C], "rejected": [R]},
                 {"prompt": [{"role": "system", "content": "Be terse."}, U, C, {"role": "user", "content": "Times 3?"}],
                  "chosen": [{"role": "assistant", "content": "12"}], "rejected": [{"role": "assistant", "content": "7"}]}],
    "implicit": [{"chosen": [U, C], "rejected": [U, R]},
                 {"chosen": [U, C, {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "Yes."}],
                  "rejected": [U, C, {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "No."}]}],
    # UltraFeedback-style: a string prompt beside whole conversations (TRL's maybe_extract_prompt)
    "prompt_and_conversations": [{"prompt": "What is 2+2?", "chosen": [U, C], "rejected": [U, R]}],
    "strings_text": [{"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
                     {"prompt": "2+2=", "chosen": "4", "rejected": "22"}],
    "implicit_strings_text": [{"chosen": "The sky is blue.", "rejected": "The sky is green."}],
}


@pytest.fixture(scope="module")
def tok(official_tokenizer_model) -> Tokenizer:
    return Tokenizer.from_file(official_tokenizer_model)


@pytest.fixture(scope="module")
def trl_trainer(official_tokenizer_json):
    """A DPOTrainer on a tiny model, used only for its dataset preparation (tokenize_fn, extract_prompt, add_eos)."""
    from trl.chat_template_utils import llama3_1_chat_template

    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(official_tokenizer_json),
                                                  bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
                                                  pad_token="<|finetune_right_pad_id|>")
    hf_tok.backend_tokenizer.model.ignore_merges = True  # as Hugging Face publishes Llama 3
    hf_tok.chat_template = llama3_1_chat_template
    cfg = transformers.LlamaConfig(vocab_size=128256, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1)
    model = transformers.LlamaForCausalLM(cfg)
    args = trl.DPOConfig(output_dir=tempfile.mkdtemp(), report_to=[], use_cpu=True, max_length=None,
                         dataset_num_proc=None)
    ds = datasets.Dataset.from_list(RECORDS["explicit"])
    return trl.DPOTrainer(model=model, ref_model=transformers.LlamaForCausalLM(cfg), args=args, train_dataset=ds,
                          processing_class=hf_tok)


def _trl_ids(trainer, records):
    # DPOTrainer extracts implicit prompts only when no record has a "prompt"; TRL's maybe_extract_prompt
    # is its documented step for a string prompt beside whole conversations
    records = [trl.data_utils.maybe_extract_prompt(r) for r in records]
    prepared = trainer._prepare_dataset(datasets.Dataset.from_list(records), trainer.processing_class, trainer.args, "t")
    return [(ex["prompt_ids"], ex["chosen_ids"], ex["rejected_ids"]) for ex in prepared]


@pytest.mark.parametrize("name", list(RECORDS))
def test_rendering_equals_trl_dpo_tokenization(tok, trl_trainer, name):
    text_pairs = "text" if name.endswith("text") else "chat"
    want = _trl_ids(trl_trainer, RECORDS[name])
    chat = ChatFormat(tok)
    for record, (prompt, chosen, rejected) in zip(RECORDS[name], want):
        ex = render_preference(to_preference(record, text_pairs), chat)
        assert ex.names == ["chosen", "rejected"]
        assert ex.prompt == prompt
        assert ex.responses == [chosen, rejected]


def test_formatting_mask_is_headers_and_end_tokens(tok):
    """A response of several messages (a tool call, its result, the answer): the mask keeps exactly the
    text each message adds, not the headers, their blank line or the end-of-turn / end-of-message tokens."""
    call = {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 2}}}]}
    result = {"role": "ipython", "content": "4"}
    answer = {"role": "assistant", "content": "It is 4."}
    record = {"prompt": [U], "chosen": [call, result, answer], "rejected": [R]}
    for style in ("hf", "meta"):
        chat = ChatFormat(tok, style=style)
        ex = render_preference(to_preference(record), chat)
        ids, fmt = ex.responses[0], ex.formatting[0]
        kept = tok.decode([t for t, f in zip(ids, fmt) if not f])
        dropped = tok.decode([t for t, f in zip(ids, fmt) if f])
        assert kept == '{"name": "add", "parameters": {"a": 2}}' + '"4"' * (style == "hf") + "4" * (style == "meta") + "It is 4."
        assert dropped == ("<|eot_id|><|start_header_id|>ipython<|end_header_id|>\n\n<|eot_id|>"
                           "<|start_header_id|>assistant<|end_header_id|>\n\n<|eot_id|>")
        assert tok.decode([t for t, f in zip(ex.responses[1], ex.formatting[1]) if not f]) == "5, I think."
    # text in a message that spells a special token is content, not formatting
    fake = [tok.bos_id] + tok.encode("<|eot_id|> hi") + [tok.eot_id]
    assert formatting_mask(fake, ChatFormat(tok)) == [False] * (len(fake) - 1) + [True]


def test_ranked_triple_and_margin(tok):
    record = {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon.",
              "edited": "Paris is the capital.", "margin": 2.5}
    ex = render_preference(to_preference(record), ChatFormat(tok))
    assert ex.names == ["edited", "chosen", "rejected"] and ex.margin == 2.5
    assert [tok.decode(r) for r in ex.responses] == ["Paris is the capital.<|eot_id|>", "Paris.<|eot_id|>",
                                                     "Lyon.<|eot_id|>"]
    assert to_preference(record, use_edited=False).names == ["chosen", "rejected"]


@pytest.mark.parametrize("record,reason", [
    ({"messages": [U, C]}, "unknown_format"),
    ({"prompt": [U], "chosen": 3, "rejected": [R]}, "bad_messages"),
    ({"prompt": [U], "chosen": "a", "rejected": [R]}, "bad_messages"),
    ({"prompt": [{"role": "robot", "content": "x"}], "chosen": [C], "rejected": [R]}, "unknown_role"),
    ({"chosen": [U, C], "rejected": [{"role": "user", "content": "Other"}, R]}, "no_shared_prompt"),
    ({"prompt": [U], "chosen": [C], "rejected": [R], "margin": "big"}, "bad_messages"),
])
def test_bad_records(record, reason):
    with pytest.raises(RecordError) as e:
        to_preference(record)
    assert e.value.reason == reason


def _write(path: Path, records, gz: bool = False) -> Path:
    text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)
    if gz:
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        path.write_text(text)
    return path


def test_report_counts_every_reason(tmp_path, tok):
    records = [
        {"prompt": [U], "chosen": [C], "rejected": [R]},
        {"prompt": "x", "chosen": "same", "rejected": "same"},
        {"prompt": "x", "chosen": "   ", "rejected": "no"},
        {"prompt": "long " * 300, "chosen": "a", "rejected": "b"},
        {"prompt": "q", "chosen": "Paris.", "rejected": "Lyon.", "edited": "Paris."},  # edited repeats chosen
        {"prompt": "q", "chosen": "Paris.", "rejected": "Lyon.", "edited": "Paris, of course."},
        "not json",
        {"messages": [U, C]},
        {"chosen": [U, C], "rejected": [{"role": "user", "content": "Other"}, R]},
    ]
    cfg = PreferenceDataConfig(data=[str(_write(tmp_path / "p.jsonl.gz", records, gz=True))], max_seq_len=128,
                               val_fraction=0.0)
    data = build_preference_data(cfg, tok, progress=False)
    r = data.report
    assert (r.records, r.kept, r.train, r.val) == (9, 3, 3, 0)
    assert r.dropped == {"identical_responses": 1, "empty_response": 1, "prompt_too_long": 1, "malformed_json": 1,
                         "unknown_format": 1, "no_shared_prompt": 1}
    assert r.edited_dropped == 1 and r.ranked == 1 and r.pairs == 1 + 1 + 3
    assert data.train.n_pairs == 5 and data.train.n_responses == 7
    text = r.format()
    assert "giving 5 pairs (1 ranked triples)" in text and "and 1 edited responses" in text
    assert "prompt_too_long: 1 - the prompt alone fills max_seq_len tokens" in text


def test_overlong_truncate_or_drop(tmp_path, tok):
    long = {"prompt": "Say it", "chosen": "word " * 50, "rejected": "other " * 50}
    short = {"prompt": "Say it", "chosen": "yes", "rejected": "no"}
    path = _write(tmp_path / "p.jsonl", [long, short])
    cut = build_preference_data(PreferenceDataConfig(data=[str(path)], max_seq_len=48, val_fraction=0), tok, False)
    assert cut.report.truncated == 1 and cut.report.kept == 2
    assert max(len(cut.train.prompt(i)) + len(cut.train.response(j)[0])
               for i in range(2) for j in cut.train.responses(i)) == 48
    dropped = build_preference_data(PreferenceDataConfig(data=[str(path)], max_seq_len=48, overlong="drop",
                                                         val_fraction=0), tok, False)
    assert dropped.report.dropped == {"too_long": 1} and dropped.report.kept == 1
    # truncation that leaves chosen and rejected the same tokens drops the record
    same_start = {"prompt": "Say it", "chosen": "word " * 50 + "A", "rejected": "word " * 50 + "B"}
    path2 = _write(tmp_path / "q.jsonl", [same_start, short])
    d = build_preference_data(PreferenceDataConfig(data=[str(path2)], max_seq_len=48, val_fraction=0), tok, False)
    assert d.report.dropped == {"identical_responses": 1}


def test_validation_split_is_stable_and_storage_round_trips(tmp_path, tok):
    recs = [{"id": f"r{i}", "prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(60)]
    a = _write(tmp_path / "a.jsonl", recs[:30])
    b = _write(tmp_path / "b.jsonl", recs[30:])
    one = build_preference_data(PreferenceDataConfig(data=[str(a), str(b)], val_fraction=0.3, seed=3), tok, False)
    two = build_preference_data(PreferenceDataConfig(data=[str(b), str(a)], val_fraction=0.3, seed=3), tok, False)

    def val_prompts(d):
        return sorted(tok.decode(d.val.prompt(i)) for i in range(len(d.val)))

    assert 5 <= len(one.val) <= 30 and val_prompts(one) == val_prompts(two)
    one.train.save(tmp_path / "train.npz")
    back = PreferenceDataset.load(tmp_path / "train.npz")
    assert back.fingerprint() == one.train.fingerprint() and len(back) == len(one.train)
    assert np.array_equal(back.lengths(), one.train.lengths())


def test_parquet_and_folders(tmp_path, tok):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    folder = tmp_path / "prefs"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist(RECORDS["explicit"]), folder / "a.parquet")
    _write(folder / "b.jsonl", RECORDS["implicit"])
    (folder / "README.md").write_text("not data")
    d = build_preference_data(PreferenceDataConfig(data=[str(folder)], val_fraction=0), tok, False)
    assert d.report.kept == 4 and d.report.files == 2 and d.report.dropped == {"skipped_files": 1}


def test_nothing_usable_is_one_line(tmp_path, tok):
    path = _write(tmp_path / "p.jsonl", [{"messages": [U, C]}, {"prompt": "x", "chosen": "a", "rejected": "a"}])
    with pytest.raises(HerdError) as e:
        build_preference_data(PreferenceDataConfig(data=[str(path)]), tok, False)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("no usable preference pair in")
    assert "unknown_format" in msg and "identical_responses" in msg and "'chosen', 'rejected'" in msg
    with pytest.raises(HerdError, match="--overlong"):
        build_preference_data(PreferenceDataConfig(data=[str(path)], overlong="wrap"), tok, False)


def test_batch_loader_is_deterministic_resumable_and_split_over_ranks(tmp_path, tok):
    from herd.posttrain import PreferenceBatchLoader
    from herd.posttrain.pairs import eval_batches

    recs = [{"id": i, "prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(10)]
    d = build_preference_data(PreferenceDataConfig(data=[str(_write(tmp_path / "p.jsonl", recs))], val_fraction=0),
                              tok, False).train
    a = PreferenceBatchLoader(d, seed=4)
    seen = [a.global_indices(4) for _ in range(5)]  # 20 = two epochs of 10
    assert sorted(seen[0] + seen[1] + seen[2][:2]) == list(range(10)) and a.epoch == 2 and a.cursor == 0
    b = PreferenceBatchLoader(d, seed=4)
    b.global_indices(4)
    state = b.state_dict()
    c = PreferenceBatchLoader(d, seed=4)
    c.load_state_dict(state)
    assert [c.global_indices(4) for _ in range(4)] == seen[1:]
    with pytest.raises(HerdError):
        PreferenceBatchLoader(d, seed=5).load_state_dict(state)
    ranks = [PreferenceBatchLoader(d, seed=4, dp_rank=r, dp_size=2, layout="shared") for r in range(2)]
    parts = [r.next_batch(4) for r in ranks]
    assert sorted(parts[0].example.tolist() + parts[1].example.tolist()) == sorted(2 * seen[0])  # 2 responses each
    assert all(p.n_pairs == 2 and p.mask is not None for p in parts)
    with pytest.raises(HerdError, match="divisible"):
        ranks[0].next_batch(3)
    batches = eval_batches(d, 4)
    assert [b.n_pairs for b in batches] == [4, 4, 2]
