"""DPO on a tiny model against references no one here wrote: with the Llama 3 extras off, herd's loss on a
batch equals TRL 1.16 DPOTrainer's (sigmoid, sigmoid + sft, ipo, sigmoid_norm) on the same weights, data
and beta; per-response log-probs equal transformers' LlamaForCausalLM on the converted weights in both
batch layouts (and their gradients agree); the Llama 3 loss (formatting mask + 0.2 NLL) equals a hand
computation from transformers' token log-probs."""

from __future__ import annotations

import tempfile

import pytest
import torch
import torch.nn.functional as F

from herd.checkpoint import hf_config, to_hf_state_dict
from herd.model import ModelArgs, Transformer
from herd.posttrain import (DPOConfig, PreferenceDataConfig, build_preference_data, collate_preferences,
                            dpo_objective, response_logprobs, sequence_sums)
from herd.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

ARGS = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128256, multiple_of=32, max_seq_len=256)
U = {"role": "user", "content": "What is 2+2?"}
RECORDS = [
    {"prompt": [U], "chosen": [{"role": "assistant", "content": "4"}],
     "rejected": [{"role": "assistant", "content": "5, I think."}]},
    {"prompt": [{"role": "system", "content": "Be terse."}, U, {"role": "assistant", "content": "4"},
                {"role": "user", "content": "And times three?"}],
     "chosen": [{"role": "assistant", "content": "Twelve."}], "rejected": [{"role": "assistant", "content": "Seven, or so."}]},
    {"prompt": [{"role": "user", "content": "Name a color."}], "chosen": [{"role": "assistant", "content": "Blue."}],
     "rejected": [{"role": "assistant", "content": "The number 12 is not a color but here you go."}]},
]
RANKED = RECORDS + [{"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon.",
                     "edited": "Paris is the capital of France."}]


def _model(seed: int) -> Transformer:
    torch.manual_seed(seed)
    m = Transformer(ARGS)
    m.init_weights(std=0.1)  # sharp distributions so mistakes in masks or positions show
    return m.eval()


def _hf(model: Transformer):
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_config(model.args))).eval()
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(dict(model.state_dict()), model.args), strict=False)
    assert not unexpected and all("rotary" in k for k in missing)
    return hf


@pytest.fixture(scope="module")
def tok(official_tokenizer_model) -> Tokenizer:
    return Tokenizer.from_file(official_tokenizer_model)


@pytest.fixture(scope="module")
def models():
    return _model(0), _model(1)  # policy, reference


def _data(tmp_path_factory, tok, records):
    import json

    path = tmp_path_factory.mktemp("prefs") / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return build_preference_data(PreferenceDataConfig(data=[str(path)], val_fraction=0.0), tok, progress=False).train


@pytest.fixture(scope="module")
def data(tmp_path_factory, tok):
    return _data(tmp_path_factory, tok, RECORDS)


@pytest.fixture(scope="module")
def ranked(tmp_path_factory, tok):
    return _data(tmp_path_factory, tok, RANKED)


@pytest.fixture(scope="module")
def trl_setup(official_tokenizer_json, models):
    from trl.chat_template_utils import llama3_1_chat_template

    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(official_tokenizer_json),
                                                  bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                                  pad_token="<|finetune_right_pad_id|>")
    hf_tok.backend_tokenizer.model.ignore_merges = True
    hf_tok.chat_template = llama3_1_chat_template
    policy, ref = (_hf(m) for m in models)
    # fp32 throughout (DPOConfig turns on bf16 autocast by default, which accelerate applies to the reference)
    args = trl.DPOConfig(output_dir=tempfile.mkdtemp(), beta=0.1, report_to=[], use_cpu=True, max_length=None,
                         bf16=False)
    trainer = trl.DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=datasets.Dataset.from_list(RECORDS),
                             processing_class=hf_tok)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(RECORDS))])
    return trainer, policy, batch


@pytest.fixture(scope="module")
def herd_logps(models, data):
    """Per layout: the batch, the policy's token log-probs and the reference's per-response sums per mask."""
    policy, ref = models
    out = {}
    for layout in ("concat", "shared"):
        batch = collate_preferences(data, list(range(len(data))), layout, pad_id=128004)
        with torch.no_grad():
            ref_lp = response_logprobs(ref, batch)
            out[layout] = (batch, response_logprobs(policy, batch),
                           {m: sequence_sums(ref_lp, batch, batch.keep(m)) for m in ("completion", "llama3")})
    return out


def _herd_loss(models, data, cfg: DPOConfig, layout: str = "concat", pad_id: int = 128004) -> tuple[torch.Tensor, dict]:
    policy, ref = models
    batch = collate_preferences(data, list(range(len(data))), layout, pad_id)
    with torch.no_grad():
        ref_sums = sequence_sums(response_logprobs(ref, batch), batch, batch.keep(cfg.mask))
    return dpo_objective(response_logprobs(policy, batch), ref_sums, batch, cfg)


@pytest.mark.parametrize("trl_losses,trl_weights,herd_cfg", [
    (["sigmoid"], [1.0], dict()),
    (["sigmoid", "sft"], [1.0, 0.2], dict(nll_weight=0.2)),
    (["ipo"], [1.0], dict(loss_type="ipo")),
    (["sigmoid_norm"], [1.0], dict(length_normalize=True)),
])
def test_loss_equals_trl_dpo_trainer(trl_setup, herd_logps, data, trl_losses, trl_weights, herd_cfg):
    trainer, policy, batch = trl_setup
    trainer.loss_types, trainer.loss_weights = trl_losses, trl_weights
    mode = "train" if trainer.model.training else "eval"
    trainer._metrics[mode].clear()
    with torch.no_grad():
        want = trainer.compute_loss(policy, dict(batch)).item()
    logged = trainer._metrics[mode]
    assert abs(want - 0.6931) > 1e-3  # policy and reference differ: a test that could fail
    cfg = DPOConfig(beta=0.1, mask="completion", **{"nll_weight": 0.0, **herd_cfg})
    n = len(data)
    for layout in ("concat", "shared"):
        hb, token_lp, ref_sums = herd_logps[layout]
        loss, metrics = dpo_objective(token_lp, ref_sums[cfg.mask], hb, cfg)
        assert loss.item() == pytest.approx(want, rel=1e-5, abs=1e-6), layout
        assert metrics["rewards_chosen"].item() / n == pytest.approx(logged["rewards/chosen"][-1], rel=1e-4, abs=1e-6)
        assert metrics["margin"].item() / n == pytest.approx(logged["rewards/margins"][-1], rel=1e-4, abs=1e-6)


def _transformers_token_logps(model: Transformer, data):
    """Per response: transformers' log p of each response token (full forward of prompt + response)."""
    hf = _hf(model)
    out = []
    for i in range(len(data)):
        p = data.prompt(i).tolist()
        for j in data.responses(i):
            r = data.response(j)[0].tolist()
            with torch.no_grad():
                logits = hf(torch.tensor([p + r])).logits[0].float()
            lp = F.log_softmax(logits[len(p) - 1:-1], -1).gather(1, torch.tensor(r)[:, None]).squeeze(1)
            out.append(lp)
    return out


@pytest.fixture(scope="module")
def hf_logps(models, ranked):
    """transformers' token log-probs of every ranked response under the policy and the reference."""
    return tuple(_transformers_token_logps(m, ranked) for m in models)


def test_sequence_logprobs_equal_transformers_in_both_layouts(models, ranked, hf_logps):
    policy, _ = models
    want = hf_logps[0]
    fmt = [torch.from_numpy(ranked.response(j)[1]) for i in range(len(ranked)) for j in ranked.responses(i)]
    grads = {}
    for layout in ("concat", "shared"):
        batch = collate_preferences(ranked, list(range(len(ranked))), layout, pad_id=128004)
        policy.zero_grad()
        lp = response_logprobs(policy, batch)
        full = sequence_sums(lp, batch)
        content = sequence_sums(lp, batch, batch.keep("llama3"))
        torch.testing.assert_close(full, torch.stack([w.sum() for w in want]), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(content, torch.stack([w[~f].sum() for w, f in zip(want, fmt)]), rtol=1e-5, atol=1e-4)
        (full * torch.linspace(-1, 1, full.numel())).sum().backward()
        grads[layout] = [p.grad.clone() for p in policy.parameters()]
    for a, b in zip(grads["concat"], grads["shared"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # the shared layout reads each prompt once: fewer positions than one row per response
    concat = collate_preferences(ranked, list(range(len(ranked))), "concat", 0)
    shared = collate_preferences(ranked, list(range(len(ranked))), "shared", 0)
    assert (shared.tokens != 0).sum() < (concat.tokens != 0).sum()


def test_llama3_dpo_equals_hand_computation(models, ranked, hf_logps):
    """Llama 3 recipe (formatting tokens masked in policy and reference, + 0.2 token-mean NLL of the
    preferred responses) from transformers' token log-probs, written out by hand; ranked triples give
    every (better, worse) pair."""
    pol, rf = hf_logps
    fmt = [torch.from_numpy(ranked.response(j)[1]) for i in range(len(ranked)) for j in ranked.responses(i)]
    pc = [w[~f].sum() for w, f in zip(pol, fmt)]
    rc = [w[~f].sum() for w, f in zip(rf, fmt)]
    pairs, winners, first = [], set(), 0
    for i in range(len(ranked)):
        k = len(ranked.responses(i))
        for a in range(k):
            for b in range(a + 1, k):
                pairs.append((first + a, first + b))
                winners.add(first + a)
        first += k
    assert len(pairs) == 3 + 3 and len(winners) == 3 + 2
    beta = 0.1
    dpo = torch.stack([-F.logsigmoid(beta * ((pc[a] - rc[a]) - (pc[b] - rc[b]))) for a, b in pairs]).mean()
    nll_tokens = torch.cat([-pol[w][~fmt[w]] for w in sorted(winners)])
    want = dpo + 0.2 * nll_tokens.mean()
    for layout in ("concat", "shared"):
        loss, metrics = _herd_loss(models, ranked, DPOConfig(), layout)
        assert loss.item() == pytest.approx(want.item(), rel=1e-5)
        assert metrics["nll_tokens"].item() == nll_tokens.numel()
    # the extras change the loss (the masked tokens and the NLL carry weight)
    plain, _ = _herd_loss(models, ranked, DPOConfig(mask="completion", nll_weight=0.0))
    assert abs(plain.item() - want.item()) > 1e-3


def test_dpo_step_raises_chosen_margin(models, data):
    """One gradient step of the DPO loss moves the policy's implicit reward margin up (sign check)."""
    policy = _model(0).train()
    _, ref = models
    opt = torch.optim.SGD(policy.parameters(), lr=0.5)
    cfg = DPOConfig(nll_weight=0.0)
    batch = collate_preferences(data, list(range(len(data))), "concat", 0)
    with torch.no_grad():
        ref_sums = sequence_sums(response_logprobs(ref, batch), batch, batch.keep(cfg.mask))
    margins = []
    for _ in range(2):
        loss, metrics = dpo_objective(response_logprobs(policy, batch), ref_sums, batch, cfg)
        margins.append(metrics["margin"].item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert margins[1] > margins[0]
