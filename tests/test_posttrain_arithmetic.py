"""The verifiable arithmetic set: records read by herd's own SFT and preference parsers, the reward
checked by hand, distinct questions, the module's command line."""

from __future__ import annotations

import json

import pytest

from herd.errors import HerdError
from herd.posttrain import arithmetic
from herd.posttrain.preference import to_preference
from herd.posttrain.render import to_conversation


def test_reward_by_hand():
    q = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 23 + 58?"}]
    assert arithmetic.reward(q, "23 + 58 = 81.") == 1.0
    assert arithmetic.reward(q, "23 + 58 = 80.") == 0.0
    assert arithmetic.reward(q, "eighty-one") == 0.0  # no stated result
    assert arithmetic.reward("What is 90 - 7?", "90 - 7 = 83.") == 1.0
    assert arithmetic.reward("What is 90 - 7?", "= 83 wait, = 84") == 1.0  # the first stated result counts
    with pytest.raises(HerdError, match="no 'What is A \\+ B\\?' \\(or"):
        arithmetic.reward([{"role": "user", "content": "hello"}], "= 3")


def test_records_parse_and_are_right():
    sft = arithmetic.sft_records(300, seed=3)
    assert len({r["id"] for r in sft}) == 300
    for r in sft:
        conv = to_conversation(r)
        user, reply = conv.messages[0]["content"], conv.messages[1]["content"]
        a, op, b = arithmetic.parse_question(user)
        assert 0 <= a <= 99 and 0 <= b <= 99 and reply == f"{a} {op} {b} = {a + b if op == '+' else a - b}."
        assert arithmetic.reward(conv.messages[:1], reply) == 1.0 and (op == "+" or a >= b)
    pairs = arithmetic.preference_records(200, seed=4)
    for r in pairs:
        pref = to_preference(r)
        assert pref.names == ["chosen", "rejected"]
        chosen, rejected = (resp[0]["content"] for resp in pref.responses)
        assert arithmetic.reward(pref.prompt, chosen) == 1.0 and arithmetic.reward(pref.prompt, rejected) == 0.0
        assert 1 <= abs(arithmetic.stated_result(chosen) - arithmetic.stated_result(rejected)) <= 10
    prompts = arithmetic.prompt_records(50, seed=5)
    assert all(len(r["messages"]) == 1 and r["messages"][0]["role"] == "user" for r in prompts)
    assert arithmetic.sft_records(50, seed=5) != arithmetic.sft_records(50, seed=6)
    assert arithmetic.sft_records(50, seed=5) == arithmetic.sft_records(50, seed=5)


def test_command_line(tmp_path, capsys):
    out = tmp_path / "pairs.jsonl"
    assert arithmetic.main(["pairs", str(out), "--n", "40", "--max-operand", "20"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 40 and {"prompt", "chosen", "rejected", "id"} <= set(rows[0])
    assert arithmetic.main(["sft", str(tmp_path / "x.jsonl"), "--n", "1000", "--max-operand", "5"]) == 2
    assert "ask for at most" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        arithmetic.main(["--help"])


def test_reward_fn_loading_and_failures(tmp_path):
    from herd.posttrain.reward_fn import RewardFunction, load_reward_fn

    fn = load_reward_fn("herd.posttrain.arithmetic:reward")
    assert fn([{"role": "user", "content": "What is 2 + 2?"}], "2 + 2 = 4.") == 1.0
    path = tmp_path / "rewards.py"
    path.write_text("def length(prompt, reply):\n    return len(reply)\n"
                    "def picky(prompt, reply):\n    if reply == 'boom':\n        raise KeyError(reply)\n"
                    "    return None if reply == 'none' else float('nan') if reply == 'nan' else 1\n")
    assert load_reward_fn(f"{path}:length")([], "abc") == 3
    picky = RewardFunction(f"{path}:picky")
    assert [picky([], r) for r in ("ok", "boom", "none", "nan", "boom")] == [1.0, None, None, None, None]
    assert picky.errors == {"KeyError": 2, "not_a_number": 2} and "failed on 4 replies" in picky.report()
    assert RewardFunction(fn).report() == ""
    for bad, msg in [("nocolon", "not MODULE:FUNCTION"), (f"{tmp_path}/x.py:f", "does not exist"),
                     ("herd.no_such_module:f", "cannot import"), (f"{path}:missing", "has no function")]:
        with pytest.raises(HerdError, match=msg):
            load_reward_fn(bad)


def test_recipe_sets_are_disjoint(tmp_path, capsys):
    sets = arithmetic.recipe_sets((300, 200, 50, 40), seed=7)
    ids = [r["id"] for name in arithmetic.RECIPE_SPLITS for r in sets[name]]
    assert len(ids) == len(set(ids)) == 590
    assert arithmetic.main(["recipe", str(tmp_path / "r"), "--sizes", "30,20,5,4"]) == 0
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["pairs.jsonl", "prompts.jsonl", "sft.jsonl",
                                                                   "test.jsonl"]
    assert arithmetic.main(["recipe", str(tmp_path / "r"), "--sizes", "30,20"]) == 2
    assert "four counts" in capsys.readouterr().err


def test_larger_of_two_numbers():
    q = [{"role": "user", "content": "What is the larger of 37 and 52?"}]
    assert arithmetic.parse_question(q[0]["content"]) == (37, "max", 52)
    assert arithmetic.reward(q, "max(37, 52) = 52.") == 1.0 and arithmetic.reward(q, "max(37, 52) = 37.") == 0.0
    pairs = arithmetic.preference_records(100, seed=1, operators="max")
    for r in pairs:
        pref = to_preference(r)
        a, op, b = arithmetic.parse_question(pref.prompt[0]["content"])
        chosen, rejected = (resp[0]["content"] for resp in pref.responses)
        assert op == "max" and a != b
        assert arithmetic.stated_result(chosen) == max(a, b) and arithmetic.stated_result(rejected) == min(a, b)
    mixed = arithmetic.sft_records(300, seed=2, operators="+,-,max")
    assert {arithmetic.parse_question(r["messages"][0]["content"])[1] for r in mixed} == {"+", "-", "max"}
    with pytest.raises(HerdError, match="operators must be some of"):
        arithmetic.questions(5, operators="*")
