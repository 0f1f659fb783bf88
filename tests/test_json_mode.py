"""JSON mode: the prefix automaton against Python's json module, and constrained generation with the
official tokenizer on a random model (whose free output is never JSON)."""

from __future__ import annotations

import json
import random

import pytest
import torch

from herd.inference import Engine, SamplingParams
from herd.inference.json_mode import (START_OBJECT, START_VALUE, JsonConstraint, JsonVocab, feed, is_complete,
                                      is_prefix, tokens_text)
from herd.model import ModelArgs, Transformer
from herd.tokenizer import Tokenizer


def random_json(rng: random.Random, depth: int = 0):
    kind = rng.randrange(7 if depth < 3 else 4)
    if kind == 0:
        return rng.choice([True, False, None])
    if kind == 1:
        return rng.choice([0, -0.5, 12, 3.25e-7, -17, 1e21, 0.0])
    if kind in (2, 3):
        return "".join(rng.choice(['a', 'é', '"', '\\', '\n', '\u2603', ' ', '/', '\x01', '😀']) for _ in range(rng.randrange(6)))
    if kind in (4, 5):
        return {"k" + str(i) + rng.choice(["", '"', "ü"]): random_json(rng, depth + 1) for i in range(rng.randrange(4))}
    return [random_json(rng, depth + 1) for _ in range(rng.randrange(4))]


def test_every_prefix_of_valid_json_is_accepted():
    rng = random.Random(0)
    for _ in range(300):
        doc = random_json(rng)
        text = json.dumps(doc, ensure_ascii=rng.random() < 0.5, indent=rng.choice([None, 2])).encode()
        s = START_VALUE
        for i, b in enumerate(text):
            s = feed(s, bytes([b]))
            assert s is not None, (text, i)
        assert is_complete(s), text


def test_automaton_agrees_with_json_loads_on_mutations():
    rng = random.Random(1)
    alphabet = b'{}[]",:0123456789-+.eEtruefalsn \\/u\n'
    checked = 0
    for _ in range(3000):
        text = bytearray(json.dumps(random_json(rng)).encode())
        for _ in range(rng.randrange(1, 3)):  # insert, delete or replace a byte
            i = rng.randrange(len(text) + 1)
            op = rng.randrange(3)
            if op == 0:
                text.insert(i, rng.choice(alphabet))
            elif i < len(text):
                if op == 1:
                    del text[i]
                else:
                    text[i] = rng.choice(alphabet)
        try:
            json.loads(bytes(text))
            valid = True
        except ValueError:
            valid = False
        assert is_complete(feed(START_VALUE, bytes(text))) == valid, bytes(text)
        checked += valid
    assert checked > 100  # both outcomes were exercised


def test_object_mode_rejects_other_top_level_values():
    assert is_prefix(b'  {"a": [1, 2', START_OBJECT)
    assert not is_prefix(b"[1]", START_OBJECT) and not is_prefix(b'"x"', START_OBJECT)
    assert not is_prefix(b'{"a": 1}}', START_OBJECT)
    assert not is_prefix(b'{"a": 01}', START_OBJECT)
    assert is_complete(feed(START_OBJECT, b'{"a": {"b": null}, "c": "\\u00e9"}'))


@pytest.fixture(scope="module")
def setup(official_tokenizer_model):
    tok = Tokenizer.from_file(official_tokenizer_model)
    torch.manual_seed(3)
    args = ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=tok.n_words, multiple_of=32, max_seq_len=128,
                     tie_embeddings=True)
    model = Transformer(args).eval()
    model.init_weights(std=0.1)
    return tok, model, JsonVocab(tok)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_constrained_generation_stays_valid_json(setup, temperature):
    tok, model, vocab = setup
    engine = Engine(model, max_batch_size=2)
    prompt = tok.encode("Reply in JSON:", bos=True)
    stops = sorted(tok.stop_tokens)
    p = SamplingParams(temperature=temperature, top_p=1.0, seed=5, max_new_tokens=60, stop_tokens=stops)
    free = engine.generate([prompt], p)[0]
    assert not is_prefix(tokens_text(vocab, free.tokens), START_OBJECT)  # the random model alone: not JSON
    rid = engine.add_request(prompt, p, constraint=JsonConstraint(vocab, stops))
    ids, reason = [], None
    while engine.has_work():
        for e in engine.step():
            assert e.index == rid
            reason = e.finish_reason
            if reason != "stop":
                ids.append(e.token)
            assert is_prefix(tokens_text(vocab, ids), START_OBJECT)
    text = tokens_text(vocab, ids)
    assert text.lstrip().startswith(b"{")
    if reason == "stop":
        assert isinstance(json.loads(text), dict)
    else:
        assert reason == "length" and len(ids) == 60
