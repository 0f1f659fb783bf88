"""Rules every `herd` command follows: each --help entry states its default once, every command
that computes takes --threads (0 = pick for the current load), and CPU MFU never exceeds 100%."""

from __future__ import annotations

import argparse
import re

import pytest
import torch

from herd import threads as herd_threads
from herd.cli import COMMANDS, _load
from herd.errors import HerdError
from herd.flags import HelpFormatter


def _parsers() -> list[tuple[str, argparse.ArgumentParser]]:
    """Every command's parser and every sub-command's (herd data run, herd tokenizer encode, ...)."""
    found = []
    for name, (target, help_text) in COMMANDS.items():
        parser = argparse.ArgumentParser(prog=f"herd {name}", formatter_class=HelpFormatter)
        add_args, _ = _load(target)
        add_args(parser)
        stack = [(f"herd {name}", parser)]
        while stack:
            prog, p = stack.pop()
            found.append((prog, p))
            for action in p._actions:
                if isinstance(action, argparse._SubParsersAction):
                    stack += [(f"{prog} {sub}", sp) for sub, sp in action.choices.items()]
    return found


def _entries(help_text: str) -> list[str]:
    """One string per option entry of a --help text (its continuation lines joined)."""
    entries: list[str] = []
    for line in help_text.splitlines():
        if re.match(r"^  -", line):
            entries.append(line.strip())
        elif entries and re.match(r"^\s{6,}\S", line):
            entries[-1] += " " + line.strip()
        else:
            entries.append("") if entries and entries[-1] else None
    return [e for e in entries if e]


def test_every_help_entry_states_its_default_once():
    parsers = _parsers()
    assert len(parsers) > 20  # every command and sub-command was reached
    twice = []
    for prog, parser in parsers:
        for entry in _entries(parser.format_help()):
            if len(re.findall(r"\bdefault\b", entry, flags=re.I)) > 1:
                twice.append(f"{prog}: {entry}")
    assert not twice, "\n".join(twice)


@pytest.mark.parametrize("command", ["pretrain", "speedrun", "generate", "chat"])
def test_commands_that_compute_take_threads(command):
    parser = dict(_parsers())[f"herd {command}"]
    action = next(a for a in parser._actions if "--threads" in a.option_strings)
    assert "0 = pick" in action.help


def test_threads_policy(monkeypatch):
    before = torch.get_num_threads()
    try:
        assert herd_threads.apply_threads(1) == 1 and torch.get_num_threads() == 1
        monkeypatch.setattr(herd_threads, "pick_cpu_threads", lambda: 1)
        torch.set_num_threads(2)
        assert herd_threads.apply_threads(0) == 1 and torch.get_num_threads() == 1  # not torch's all-cores default
        with pytest.raises(HerdError, match="--threads -1"):
            herd_threads.apply_threads(-1)
    finally:
        torch.set_num_threads(before)


def test_generate_default_threads_follow_the_policy(monkeypatch, tmp_path, official_tokenizer_model, capsys):
    from herd.checkpoint import save_checkpoint
    from herd.cli import main
    from herd.model import ModelArgs, Transformer

    args = ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=128256, multiple_of=32, max_seq_len=64)
    save_checkpoint(Transformer(args), tmp_path / "m", tokenizer_path=official_tokenizer_model)
    picked = []
    monkeypatch.setattr(herd_threads, "pick_cpu_threads", lambda: picked.append(1) or 1)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert main(["generate", "--checkpoint", str(tmp_path / "m"), "--prompt", "hi", "--max-new-tokens", "2"]) == 0
        assert picked == [1] and torch.get_num_threads() == 1
        assert main(["generate", "--checkpoint", str(tmp_path / "m"), "--prompt", "hi", "--max-new-tokens", "2",
                     "--threads", "2"]) == 0
        assert picked == [1] and torch.get_num_threads() == 2  # an explicit count is used as given
    finally:
        torch.set_num_threads(before)
    capsys.readouterr()


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_cpu_mfu_never_exceeds_100_percent(monkeypatch, tmp_path):
    """A peak measured while the cores were busy read 3x too low and MFU showed 306%."""
    from herd.train import metrics
    from herd.train.loop import pretrain
    from herd.train.metrics import read_log
    from helpers import config, make_shards

    monkeypatch.setattr(metrics, "measure_cpu_peak_flops", lambda: 1e6)  # far below any real rate
    out = tmp_path / "run"
    pretrain(config(make_shards(tmp_path / "d"), out, steps=3, peak_tflops=0.0, threads=1, eval_every=0))
    mfu = [r["mfu"] for r in read_log(out / "log.jsonl", "train")]
    assert len(mfu) == 3 and all(0 < m <= 1.0 for m in mfu), mfu
    assert "1 thread(s)" in read_log(out / "log.jsonl", "config")[0]["peak_source"]


def test_measured_peak_keeps_the_best_of_this_machine(monkeypatch, tmp_path):
    from herd.train import metrics

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = metrics.measure_cpu_peak_flops(n=128, seconds=0.05)
    cache = tmp_path / "herd" / "cpu_peak_flops.json"
    assert cache.is_file()
    import json

    key = next(iter(json.loads(cache.read_text())))
    cache.write_text(json.dumps({key: first * 100}))  # as if measured on a quiet moment
    assert metrics.measure_cpu_peak_flops(n=128, seconds=0.05) == first * 100
