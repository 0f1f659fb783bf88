"""herd.parallel: FSDP2 and tensor parallel on 2 (and 4) gloo CPU processes train exactly like one process.

The distributed runs are real torchrun launches of tests/parallel_worker.py; the reference is the
same training step run here, in one plain process, on the whole global batch, from weights
drawn by Transformer.init_weights. One launch serves several tests (a module fixture) because
starting processes is most of the cost.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import parallel_worker as pw
from herd.errors import HerdError
from herd.model import Transformer
from herd.parallel import (DistInfo, all_reduce_mean, build_mesh, build_model, clip_grad_norm_,
                           full_state_dict, init_distributed, is_main, parallelize)

WORKER = Path(__file__).with_name("parallel_worker.py")
TWO = ["fsdp", "tp", "fsdp_tied", "tp_tied", "fsdp_ac",  # must equal one process to float tolerance
       "fsdp_chunked", "tp_chunked", "tp_tied_logprobs"]
BF16 = "fsdp_bf16"  # bf16 compute: close to, not equal to, one fp32 process
FOUR = ["fsdp_tp_tied", "fsdp_tp_tied_chunked"]  # the hardest 2-D case: a tied weight sharded on both dims


def torchrun(nproc: int, args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def launch(tmp_path_factory, nproc: int, scenarios: list[str]) -> dict[str, dict]:
    out = tmp_path_factory.mktemp(f"parallel{nproc}")
    proc = torchrun(nproc, [str(WORKER), str(out), *scenarios])
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return {name: torch.load(out / f"{name}.pt") for name in scenarios}


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory):
    return launch(tmp_path_factory, 2, TWO + [BF16])


@pytest.fixture(scope="module")
def four_rank_runs(tmp_path_factory):
    return launch(tmp_path_factory, 4, FOUR)


def single_process(name: str) -> dict:
    """The scenario's training run in this process: no process group, the whole global batch.

    Activation checkpointing does not change the math, so the reference is the plain model."""
    return _single_process(pw.SCENARIOS[name][2].get("tied", False))


@functools.cache
def _single_process(tied: bool) -> dict:
    model = Transformer(pw.model_args(tied))
    torch.manual_seed(pw.SEED)
    model.init_weights()  # the reference init, drawn by the model itself
    init = full_state_dict(model)
    losses, norms = pw.train(model, pw.global_batches())
    return {"losses": losses, "grad_norms": norms, "init": init, "final": full_state_dict(model)}


def check_same_training(got: dict, name: str) -> None:
    ref = single_process(name)
    assert got["init"].keys() == ref["init"].keys()
    for k in ref["init"]:  # every layout starts from the very same weights, bit for bit
        assert torch.equal(got["init"][k], ref["init"][k]), f"{name}: initial {k} differs"
    assert got["roundtrip"], f"{name}: load_full_state_dict did not put back the full weights"
    assert len(set(round(x, 3) for x in ref["losses"])) > 1, "the reference loss must move for this test to mean anything"
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref["losses"]), rtol=0, atol=2e-5)
    torch.testing.assert_close(torch.tensor(got["grad_norms"]), torch.tensor(ref["grad_norms"]), rtol=1e-5, atol=0)
    for k in ref["final"]:  # weights moved by ~1e-2 over the steps; Adam amplifies rounding to ~1e-5
        torch.testing.assert_close(got["final"][k], ref["final"][k], rtol=0, atol=2e-4, msg=f"{name}: {k}")


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("name", TWO)
def test_two_ranks_train_like_one_process(two_rank_runs, name):
    """fsdp: dp=2 (FSDP2); tp: tp=2 (DTensor); the same tied to embeddings; FSDP + activation checkpointing;
    herd's chunked loss and per-token log-probs inside forward under FSDP and TP (vocabulary-parallel)."""
    assert two_rank_runs[name]["world_size"] == 2
    check_same_training(two_rank_runs[name], name)


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp_bf16_mixed_precision(two_rank_runs):
    """MixedPrecisionPolicy(bf16 params, fp32 reduce): fp32 master weights, bf16 compute."""
    got, ref = two_rank_runs[BF16], single_process(BF16)
    assert all(v.dtype == torch.float32 for v in got["final"].values())  # the sharded master copy stays fp32
    diff = (torch.tensor(got["losses"]) - torch.tensor(ref["losses"])).abs()
    assert diff.max() < 0.05, diff  # bf16 has ~3 significant digits
    assert diff.max() > 1e-6, "bf16 compute should not reproduce fp32 exactly; was the policy applied?"


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("name", FOUR)
def test_fsdp_times_tp_trains_like_one_process(four_rank_runs, name):
    """dp=2 x tp=2 on 4 ranks: FSDP shards the tensor-parallel shards (the strided 2-D layout),
    and the grad norm sums each gradient over exactly the mesh dimensions it is split on."""
    assert four_rank_runs[name]["world_size"] == 4
    check_same_training(four_rank_runs[name], name)


# ---- single process: the same interface with no process group ----

def test_single_process_info_and_mesh(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    info = init_distributed()
    assert (info.rank, info.world_size, info.local_rank, info.backend) == (0, 1, 0, None)
    assert not info.is_distributed and is_main()
    assert build_mesh(info, dp=1, tp=1) is None
    x = torch.tensor([3.0, 5.0])
    assert torch.equal(all_reduce_mean(x), x)
    with pytest.raises(HerdError, match="does not match"):
        build_mesh(info, dp=2, tp=1)
    with pytest.raises(HerdError, match="does not match"):
        build_mesh(DistInfo(world_size=8), dp=3, tp=2)


def test_partial_torchrun_environment_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for var in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(HerdError, match="torchrun"):
        init_distributed()


def test_parallelize_rejects_bad_options():
    model = Transformer(pw.model_args())
    with pytest.raises(HerdError, match="tensor parallel"):
        parallelize(model, None, tp=2)
    with pytest.raises(HerdError, match="mixed precision"):
        parallelize(model, None, mixed_precision="fp16")


@pytest.mark.parametrize("tied", [False, True])
def test_meta_build_equals_init_weights(tied):
    """build_model (meta device -> materialize) draws the weights init_weights draws after manual_seed."""
    got = build_model(pw.model_args(tied), None, "cpu", seed=7)
    ref = Transformer(pw.model_args(tied))
    torch.manual_seed(7)
    ref.init_weights()
    sd = ref.state_dict()
    assert got.state_dict().keys() == sd.keys()
    for k, v in got.state_dict().items():
        assert torch.equal(v, sd[k]), k
    assert got.rope_inv_freq.device.type == "cpu" and torch.equal(got.rope_inv_freq, ref.rope_inv_freq)


def test_activation_checkpointing_same_numbers_fewer_saved_tensors():
    args = pw.model_args()
    inputs, targets, docs = pw.global_batches()[0]

    def run(ac: bool):
        model = build_model(args, None, "cpu", seed=3, activation_checkpointing=ac)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            loss = F.cross_entropy(model(inputs, document_ids=docs).flatten(0, 1), targets.flatten())
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        return loss.item(), grads, sum(saved), [n for n, _ in model.named_parameters()]

    loss0, grads0, saved0, names0 = run(False)
    loss1, grads1, saved1, names1 = run(True)
    assert loss0 == loss1 and names0 == names1  # names unchanged: checkpoints stay portable
    for n in grads0:
        torch.testing.assert_close(grads1[n], grads0[n], rtol=1e-6, atol=1e-7)
    assert saved1 < saved0 / 2, (saved0, saved1)


def test_clip_grad_norm_matches_torch():
    model = Transformer(pw.model_args())
    inputs, targets, docs = pw.global_batches()[0]
    F.cross_entropy(model(inputs, document_ids=docs).flatten(0, 1), targets.flatten()).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    ref_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
    ref = [p.grad.clone() for p in model.parameters()]
    for p, g in zip(model.parameters(), grads):
        p.grad = g
    norm = clip_grad_norm_(model.parameters(), 0.1)
    assert ref_norm > 0.1  # it really clipped
    torch.testing.assert_close(norm, ref_norm, rtol=1e-5, atol=0)
    for a, b in zip(model.parameters(), ref):
        torch.testing.assert_close(a.grad, b, rtol=1e-5, atol=1e-8)


# ---- `herd pretrain` itself under torchrun ----

PRETRAIN_FLAGS = ["--steps", "5", "--batch-size", "4", "--seq-len", "32",
                  "--warmup-steps", "1", "--lr", "3e-3", "--eval-every", "0", "--eval-batches", "2",
                  "--tensorboard", "false", "--log-every", "1"]


def write_counting_shards(out: Path) -> Path:
    """A tiny learnable corpus (counting sequences) as a train/val shard directory of a 256-id vocabulary."""
    import numpy as np

    from herd.data.shards import ShardWriter

    info = {"path": "", "sha256": "", "n_words": 256, "bos_id": 254, "eos_id": 255}
    rng = np.random.default_rng(0)
    for split, n in (("train", 200), ("val", 20)):
        with ShardWriter(out, split, info) as w:
            for _ in range(n):
                start, stride, length = rng.integers(0, 250), rng.integers(1, 4), rng.integers(5, 60)
                w.add((start + stride * np.arange(length)) % 250)
    return out


def read_log(run: Path) -> tuple[list[dict], list[float]]:
    import json

    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return [r for r in rows if r["event"] == "train"], [r["loss"] for r in rows if r["event"] == "val"]


@pytest.mark.slow
@pytest.mark.distributed
def test_herd_pretrain_under_torchrun_matches_single_process(tmp_path):
    """`torchrun --nproc-per-node 2 herd pretrain` with --dp 2 (FSDP2) and with --tp 2, continuing from
    a Hugging Face checkpoint (--init-from), logs the losses of the one-process run, and its exported
    weights (gathered from the shards) equal the one-process export."""
    from safetensors.torch import load_file

    from herd.checkpoint import save_checkpoint
    from herd.cli import main

    data = write_counting_shards(tmp_path / "shards")
    start = Transformer(pw.model_args())
    start.init_weights()
    save_checkpoint(start, tmp_path / "hf", format="hf")
    flags = ["--init-from", str(tmp_path / "hf"), *PRETRAIN_FLAGS]
    assert main(["pretrain", "--data", str(data), "--out", str(tmp_path / "one"), *flags]) == 0
    one, one_val = read_log(tmp_path / "one")
    assert [r["step"] for r in one] == [1, 2, 3, 4, 5]
    assert one[-1]["loss"] < one[0]["loss"] - 0.1  # it trained
    w1 = load_file(str(tmp_path / "one" / "final" / "model.safetensors"))
    herd = Path(sys.executable).with_name("herd")  # the console script of this interpreter's install
    for layout in (["--dp", "2"], ["--tp", "2"]):
        out = tmp_path / layout[0].strip("-")
        proc = torchrun(2, ["--no-python", str(herd if herd.exists() else "herd"), "pretrain", "--data", str(data),
                            "--out", str(out), *layout, *flags])
        assert proc.returncode == 0, f"torchrun herd pretrain {layout} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        two, two_val = read_log(out)
        assert [r["step"] for r in two] == [1, 2, 3, 4, 5], layout
        for a, b in zip(one, two):
            assert a["loss"] == pytest.approx(b["loss"], abs=2e-5), layout
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4), layout
            assert a["lr"] == b["lr"]
        assert one_val and two_val and one_val[-1] == pytest.approx(two_val[-1], abs=2e-5), layout
        w2 = load_file(str(out / "final" / "model.safetensors"))
        assert w1.keys() == w2.keys()
        for k in w1:
            torch.testing.assert_close(w2[k], w1[k], rtol=0, atol=2e-4, msg=f"{layout}: {k}")


@pytest.mark.gpu
def test_compiled_checkpointed_blocks_match_eager_on_gpu():
    """torch.compile per block (+ activation checkpointing) trains like eager; names stay unchanged.
    (On 2 CPU cores inductor needs ~2 minutes for this, so it runs where a GPU is.)"""
    def run(**opts):
        model = build_model(pw.model_args(), None, "cuda", seed=pw.SEED, **opts)
        batches = [tuple(t.cuda() for t in b) for b in pw.global_batches()]
        return pw.train(model, batches)[0], [n for n, _ in model.named_parameters()]

    eager, names = run()
    compiled, names_c = run(compile=True, activation_checkpointing=True)
    assert names_c == names
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), rtol=0, atol=1e-3)
