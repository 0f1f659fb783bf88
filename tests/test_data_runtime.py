"""`herd data run` as a new user meets it: a folder of mixed files is read file by file, a failing
run writes its report before it stops, `herd data report` lists each stage once, datatrove's log
lines stay in a log file unless --verbose, and killing the command leaves no process behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from herd.cli import main
from herd.data.readers import AutoReader, iter_documents, make_reader

from conftest import official_tokenizer_dir

TOKENIZER = str(official_tokenizer_dir() / "tokenizer.model")
SENTENCES = ["The river runs past the old mill and into the valley below the town.",
             "Every morning the baker opens the shop before the sun comes up over the hills.",
             "A small boat drifted along the quiet shore while children played on the sand.",
             "The library keeps old maps of the region in a room at the back of the building."]


@pytest.fixture
def mixed(tmp_path) -> Path:
    """Two jsonl files and one README in one folder (the folder that broke `auto`)."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    for k in range(2):
        with open(folder / f"part{k}.jsonl", "w") as f:
            for i in range(6):
                text = " ".join(SENTENCES[(i + j) % 4] for j in range(4)) + f" Note {k}-{i}."
                f.write(json.dumps({"id": f"{k}-{i}", "text": text}) + "\n")
    (folder / "README.txt").write_text("These files hold made-up English sentences about a small town.\n")
    return folder


def test_mixed_folder_is_read_per_file(mixed):
    assert isinstance(make_reader(mixed), AutoReader)
    docs = list(iter_documents(mixed))
    ids = sorted(d.id for d in docs)
    assert ids == sorted(["README.txt"] + [f"{k}-{i}" for k in range(2) for i in range(6)])
    by_id = {d.id: d for d in docs}
    assert by_id["0-3"].text.endswith("Note 0-3.") and not by_id["0-3"].text.startswith("{")
    assert by_id["README.txt"].metadata["extension"] == "txt"


def _herd(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "herd", *argv], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_run_logs_quietly_and_report_lists_each_stage_once(mixed, tmp_path):
    out = tmp_path / "out"
    r = _herd("data", "run", "--input", str(mixed), "--output", str(out), "--tokenizer", TOKENIZER,
              "--tasks", "2", "--workers", "2", "--val-fraction", "0", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert " | INFO " not in r.stderr and " | SUCCESS " not in r.stderr  # datatrove's lines are in the file
    log = (out / "work" / "datatrove.log").read_text()
    assert log.count(" | INFO ") > 10 and "Processing done for rank=" in log
    assert "[5/5] pack finished" in r.stdout
    for report_dir, argv in ((out / "report", []), (tmp_path / "elsewhere", ["--output", str(tmp_path / "elsewhere")])):
        again = _herd("data", "report", str(out), *argv, cwd=tmp_path)
        assert again.returncode == 0, again.stderr
        stages = [line for line in (report_dir / "report.md").read_text().splitlines() if line.startswith("## Stage")]
        assert stages == [f"## Stage `0{i}-{n}`" for i, n in enumerate(["filter", "plan", "dedup", "tokenize", "pack"], 1)]
    loud = _herd("data", "run", "--input", str(mixed), "--output", str(tmp_path / "loud"), "--tasks", "1",
                 "--verbose", cwd=tmp_path)
    assert loud.returncode == 0 and " | INFO " in loud.stderr


def test_a_failing_run_writes_its_report_first(mixed, tmp_path, capsys):
    out = tmp_path / "out"
    # no document is in the language "xx": every one is dropped, so there is nothing to pack
    code = main(["data", "run", "--input", str(mixed), "--output", str(out), "--tokenizer", TOKENIZER,
                 "--tasks", "1", "--languages", "xx"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("herd:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "no documents survived" in lines[0] and str(out / "report" / "report.md") in lines[0]
    report = (out / "report" / "report.md").read_text()
    assert "## Stage `01-filter`" in report and "dropped:" in report  # what dropped them is in it


_WORKER_SCRIPT = """
import os, sys, time
from pathlib import Path
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.base import PipelineStep
from herd.data.runtime import executor_runtime

out = Path(sys.argv[1])

class Sleep(PipelineStep):
    name = "sleep"
    def run(self, data, rank=0, world_size=1):
        (out / f"worker-{rank}.pid").write_text(str(os.getpid()))
        time.sleep(120)
        return
        yield

with executor_runtime(out / "datatrove.log"):
    LocalPipelineExecutor([Sleep()], tasks=2, workers=2, logging_dir=str(out / "logs"), start_method="fork").run()
"""


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        children = task / "children"
        if children.is_file():
            found += [int(c) for c in children.read_text().split()]
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")
def test_killed_run_leaves_no_worker_behind(tmp_path):
    """SIGKILL the process that runs a local executor (2 workers busy in tasks): its pool workers and
    the executor's Manager process die with it instead of waiting forever as orphans."""
    script = tmp_path / "run.py"
    script.write_text(_WORKER_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path)], stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and len(list(tmp_path.glob("worker-*.pid"))) < 2:
        time.sleep(0.05)
    children = _children(proc.pid)
    assert len(children) >= 3, children  # two pool workers and the Manager
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 10
    alive = children
    while alive and time.time() < deadline:
        time.sleep(0.1)
        alive = [c for c in children if Path(f"/proc/{c}").exists()
                 and "Z" not in Path(f"/proc/{c}/stat").read_text().split()[2]]
    for pid in alive:  # never leave them running, even when the test fails
        os.kill(pid, signal.SIGKILL)
    assert not alive, f"orphaned processes {alive}"
