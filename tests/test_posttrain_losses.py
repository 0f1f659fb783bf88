"""Each preference and RL loss against a hand computation on a toy batch (numbers written out here, not
taken from the code under test): Bradley-Terry with and without margin and with ranked triples, DPO with
every switch, the NLL term, the Llama 3 mask, PPO's clipped policy and value losses, GAE, the KL
estimators, PPO's per-token rewards and GRPO's group-normalized advantages."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from herd.errors import HerdError
from herd.posttrain import (DPOConfig, PreferenceDataset, bradley_terry_loss, collate_preferences, dpo_loss,
                            dpo_objective, gae, grpo_advantages, kl_penalty, ppo_policy_loss, ppo_value_loss,
                            token_rewards)
from herd.posttrain.losses import reward_pair_rewards
from herd.posttrain.preference import RenderedPreference
from herd.posttrain.rl import masked_whiten


def _sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _toy_dataset() -> PreferenceDataset:
    """Two examples: a pair, and a ranked triple; 9 is a formatting token."""
    return PreferenceDataset.from_examples([
        RenderedPreference([1, 2], [[3, 4, 9], [5, 9]], [[False, False, True], [False, True]], ["chosen", "rejected"], 0.5),
        RenderedPreference([1, 6, 7], [[8, 9], [3, 3, 9], [4, 9]], [[False, True], [False, False, True], [False, True]],
                           ["edited", "chosen", "rejected"], 1.0),
    ])


def test_bradley_terry_by_hand():
    rc, rr = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([1.0, 0.0, 0.5])
    want = [-math.log(_sig(1.0)), -math.log(_sig(-1.0)), math.log(2.0)]
    assert bradley_terry_loss(rc, rr).tolist() == pytest.approx(want, rel=1e-6)
    m = torch.tensor([0.5, 0.0, 1.0])
    want_m = [-math.log(_sig(0.5)), -math.log(_sig(-1.0)), -math.log(_sig(-1.0))]
    assert bradley_terry_loss(rc, rr, m).tolist() == pytest.approx(want_m, rel=1e-6)


def test_ranked_triple_gives_all_pairs_with_margin_only_on_chosen_rejected():
    batch = collate_preferences(_toy_dataset(), [0, 1])
    # responses: 0 chosen, 1 rejected | 2 edited, 3 chosen, 4 rejected
    assert list(zip(batch.chosen.tolist(), batch.rejected.tolist())) == [(0, 1), (2, 3), (2, 4), (3, 4)]
    assert batch.margin.tolist() == [0.5, 0.0, 0.0, 1.0]
    rewards = torch.tensor([1.0, 0.0, 3.0, 2.0, -1.0])
    rc, rr = reward_pair_rewards(rewards, batch)
    loss = bradley_terry_loss(rc, rr).mean().item()
    want = (-math.log(_sig(1.0)) - math.log(_sig(1.0)) - math.log(_sig(4.0)) - math.log(_sig(3.0))) / 4
    assert loss == pytest.approx(want, rel=1e-6)


def test_batch_index_maps_by_hand():
    """Concat rows: response token j is predicted from flat position row * S + P + j - 1."""
    batch = collate_preferences(_toy_dataset(), [0, 1], "concat", pad_id=0)
    S = batch.tokens.shape[1]
    assert S == 3 + 3 and batch.tokens[0].tolist() == [1, 2, 3, 4, 9, 0]
    assert batch.src[:3].tolist() == [1, 2, 3] and batch.targets[:3].tolist() == [3, 4, 9]
    assert batch.src[3:5].tolist() == [S + 1, S + 2] and batch.last[:2].tolist() == [4, S + 3]
    assert batch.content.tolist()[:5] == [True, True, False, True, False]
    shared = collate_preferences(_toy_dataset(), [0, 1], "shared", pad_id=0)
    S2 = shared.tokens.shape[1]
    assert shared.tokens[1].tolist()[:10] == [1, 6, 7, 8, 9, 3, 3, 9, 4, 9]
    assert shared.positions[1].tolist()[:10] == [0, 1, 2, 3, 4, 3, 4, 5, 3, 4]
    # the first token of every response of example 1 is predicted from the prompt's last position (2)
    first_src = [int(shared.src[(shared.owner == r).nonzero()[0]]) for r in (2, 3, 4)]
    assert first_src == [S2 + 2] * 3
    # response 3 (second of the triple) sees the prompt and itself, not response 2
    m = shared.mask[1, 0]
    assert m[5, :5].tolist() == [True, True, True, False, False] and m[6, 5] and not m[8, 6]
    for layout in ("concat", "shared"):  # token counts per response under each mask
        b = collate_preferences(_toy_dataset(), [0, 1], layout)
        assert b.token_counts("completion").tolist() == [3, 2, 2, 3, 2]
        assert b.token_counts("llama3").tolist() == [2, 1, 1, 2, 1]


def test_dpo_switches_by_hand():
    pc, pr = torch.tensor([-10.0, -4.0]), torch.tensor([-12.0, -3.0])
    rc, rr = torch.tensor([-11.0, -4.5]), torch.tensor([-11.5, -3.5])
    nc, nr = torch.tensor([4.0, 2.0]), torch.tensor([5.0, 1.0])
    beta = 0.1
    d = [(-10 + 11) - (-12 + 11.5), (-4 + 4.5) - (-3 + 3.5)]  # 1.5, 0.0
    sig, rew_c, rew_r = dpo_loss(pc, pr, rc, rr, beta)
    assert sig.tolist() == pytest.approx([-math.log(_sig(beta * x)) for x in d], rel=1e-6)
    assert rew_c.tolist() == pytest.approx([0.1, 0.05]) and rew_r.tolist() == pytest.approx([-0.05, 0.05])
    eps = 0.2
    smooth, _, _ = dpo_loss(pc, pr, rc, rr, beta, label_smoothing=eps)
    assert smooth.tolist() == pytest.approx(
        [-(1 - eps) * math.log(_sig(beta * x)) - eps * math.log(_sig(-beta * x)) for x in d], rel=1e-6)
    free, _, _ = dpo_loss(pc, pr, None, None, beta)
    assert free.tolist() == pytest.approx([-math.log(_sig(beta * 2.0)), -math.log(_sig(beta * -1.0))], rel=1e-6)
    norm, _, _ = dpo_loss(pc, pr, rc, rr, beta, chosen_tokens=nc, rejected_tokens=nr, length_normalize=True)
    dn = [1.0 / 4 - (-0.5) / 5, 0.5 / 2 - 0.5 / 1]
    assert norm.tolist() == pytest.approx([-math.log(_sig(beta * x)) for x in dn], rel=1e-6)
    ipo, _, _ = dpo_loss(pc, pr, rc, rr, beta, loss_type="ipo", chosen_tokens=nc, rejected_tokens=nr)
    assert ipo.tolist() == pytest.approx([(x - 1 / (2 * beta)) ** 2 for x in dn], rel=1e-6)
    same, _, _ = dpo_loss(pc, pr, pc, pr, beta)  # policy == reference: log 2
    assert same.tolist() == pytest.approx([math.log(2)] * 2)
    with pytest.raises(HerdError):
        dpo_loss(pc, pr, rc, rr, beta, loss_type="ipo")


def test_dpo_gradient_raises_chosen_lowers_rejected():
    pc, pr = torch.tensor([-5.0], requires_grad=True), torch.tensor([-5.0], requires_grad=True)
    loss, _, _ = dpo_loss(pc, pr, pc.detach(), pr.detach(), 0.1)
    loss.sum().backward()
    assert pc.grad.item() == pytest.approx(-0.05) and pr.grad.item() == pytest.approx(0.05)  # -beta * sigma(0)


def test_objective_nll_term_and_llama3_mask():
    batch = collate_preferences(_toy_dataset(), [0, 1])
    g = torch.Generator().manual_seed(0)
    token_lp = -torch.rand(batch.targets.shape[0], generator=g) * 3
    ref = -torch.rand(batch.n_responses, generator=g) * 5
    base, m0 = dpo_objective(token_lp, ref, batch, DPOConfig(nll_weight=0.0))
    with_nll, m1 = dpo_objective(token_lp, ref, batch, DPOConfig(nll_weight=0.2))
    # the NLL: preferred responses are 0 (pair), 2 and 3 (edited, chosen of the triple); content tokens only
    winners = torch.isin(batch.owner, torch.tensor([0, 2, 3])) & batch.content
    assert m1["nll_tokens"].item() == int(winners.sum()) == 2 + 1 + 2
    assert (with_nll - base).item() == pytest.approx(0.2 * float(-token_lp[winners].mean()), rel=1e-6)
    # the DPO part by hand
    sums = [float(token_lp[(batch.owner == r) & batch.content].sum()) for r in range(5)]
    pairs = [(0, 1), (2, 3), (2, 4), (3, 4)]
    want = sum(-math.log(_sig(0.1 * ((sums[a] - ref[a]) - (sums[b] - ref[b])))) for a, b in pairs) / 4
    assert base.item() == pytest.approx(want, rel=1e-5)
    # formatting tokens carry no weight under the Llama 3 mask, all tokens do under the completion mask
    bumped = token_lp.clone()
    bumped[~batch.content] -= 5.0
    assert dpo_objective(bumped, ref, batch, DPOConfig())[0].item() == pytest.approx(
        dpo_objective(token_lp, ref, batch, DPOConfig())[0].item(), rel=1e-7)
    assert dpo_objective(bumped, ref, batch, DPOConfig(mask="completion"))[0].item() != pytest.approx(
        dpo_objective(token_lp, ref, batch, DPOConfig(mask="completion"))[0].item(), rel=1e-4)
    content_bump = token_lp.clone()
    content_bump[batch.content & (batch.owner == 0)] += 1.0
    assert dpo_objective(content_bump, ref, batch, DPOConfig())[0].item() < base.item() + 0.2 * 10  # it moves
    assert dpo_objective(content_bump, ref, batch, DPOConfig(nll_weight=0))[0].item() < base.item()
    # global normalizers: halves of a batch summed equal the whole
    half, _ = dpo_objective(token_lp, ref, batch, DPOConfig(), pair_norm=8.0, token_norm=10.0)
    assert half.item() == pytest.approx(base.item() / 2 + 0.2 * m1["nll_sum"].item() / 10.0, rel=1e-6)


def test_dpo_config_validation():
    for bad in (dict(loss_type="hinge"), dict(mask="none"), dict(beta=0.0), dict(label_smoothing=0.6),
                dict(loss_type="ipo", label_smoothing=0.1), dict(nll_weight=-1)):
        with pytest.raises(HerdError):
            DPOConfig(**bad).validate()
    DPOConfig().validate()


# --- PPO / GRPO -----------------------------------------------------------------------------------


def test_kl_estimators_by_hand():
    logp, ref = torch.tensor([math.log(0.5), math.log(0.2)]), torch.tensor([math.log(0.25), math.log(0.4)])
    r = [0.25 / 0.5, 0.4 / 0.2]  # pi_ref / pi
    assert kl_penalty(logp, ref, "k1").tolist() == pytest.approx([-math.log(x) for x in r], rel=1e-6)
    assert kl_penalty(logp, ref, "k2").tolist() == pytest.approx([0.5 * math.log(x) ** 2 for x in r], rel=1e-6)
    assert kl_penalty(logp, ref, "k3").tolist() == pytest.approx([x - 1 - math.log(x) for x in r], rel=1e-6)
    # k1 and k3 are unbiased estimates of KL(pi || pi_ref) over samples of pi (exact expectation here)
    p, q = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.2, 0.5, 0.3])
    kl = float((p * (p / q).log()).sum())
    for est in ("k1", "k3"):
        assert float((p * kl_penalty(p.log(), q.log(), est)).sum()) == pytest.approx(kl, rel=1e-5)
    with pytest.raises(HerdError):
        kl_penalty(logp, ref, "k4")


def test_token_rewards_by_hand():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, 0.0]])
    ref = torch.tensor([[-1.5, -2.0, -1.0], [-0.5, -1.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    rewards, kl = token_rewards(torch.tensor([2.0, -1.0]), logp, ref, mask, kl_coef=0.1)
    assert kl.tolist() == [[0.5, 0.0, 0.5], [-0.5, 0.0, 0.0]]
    assert rewards[0].tolist() == pytest.approx([-0.05, 0.0, -0.05 + 2.0])
    assert rewards[1].tolist() == pytest.approx([0.05, -1.0, 0.0])  # the score sits on the last kept token


def test_gae_by_hand():
    gamma, lam = 0.9, 0.8
    r = torch.tensor([[1.0, 0.0, 2.0], [0.5, 1.0, 9.0]])
    v = torch.tensor([[0.5, 1.0, 1.5], [2.0, 1.0, 7.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    adv, ret = gae(r, v, mask, gamma, lam)
    # row 0: deltas with V after the end = 0
    d = [1 + gamma * 1.0 - 0.5, 0 + gamma * 1.5 - 1.0, 2 + 0 - 1.5]
    a0 = [d[0] + gamma * lam * d[1] + (gamma * lam) ** 2 * d[2], d[1] + gamma * lam * d[2], d[2]]
    # row 1 ends after two tokens: the masked third (reward 9, value 7) must not leak in
    e = [0.5 + gamma * 1.0 - 2.0, 1.0 + 0 - 1.0]
    a1 = [e[0] + gamma * lam * e[1], e[1], 0.0]
    assert adv.tolist() == [pytest.approx(a0, rel=1e-6), pytest.approx(a1, rel=1e-6, abs=1e-7)]
    assert ret.tolist() == [pytest.approx([a + b for a, b in zip(a0, [0.5, 1.0, 1.5])], rel=1e-6),
                            pytest.approx([a1[0] + 2.0, a1[1] + 1.0, 0.0], rel=1e-6)]
    # lambda = 1, gamma = 1: the advantage is the return-to-go minus the value
    adv1, _ = gae(r, v, mask, 1.0, 1.0)
    assert adv1[0].tolist() == pytest.approx([3 - 0.5, 2 - 1.0, 2 - 1.5])


def test_masked_whiten_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, 100.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    vals = np.array([1.0, 2.0, 3.0, 4.0])
    want = (vals - vals.mean()) / math.sqrt(vals.var(ddof=1) + 1e-8)
    out = masked_whiten(x, mask)
    assert out[mask].tolist() == pytest.approx(want.tolist(), rel=1e-6) and out[~mask].tolist() == [0.0, 0.0]


def test_ppo_policy_loss_by_hand():
    logp = torch.tensor([[math.log(1.5), math.log(0.5), 0.0], [math.log(1.1), 0.0, 0.0]])
    old = torch.zeros(2, 3)
    adv = torch.tensor([[1.0, 1.0, -1.0], [-2.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    loss, metrics = ppo_policy_loss(logp, old, adv, mask, clip=0.2)
    # per token max(-A r, -A clip(r)): r = 1.5 (A>0: clipped to 1.2 -> -1.2), r = 0.5 (A>0: -0.5),
    # r = 1 (A<0: 1.0), r = 1.1 (A<0: 2.2)
    terms = [-1.2, -0.5, 1.0, 2.2]
    assert loss.item() == pytest.approx(sum(terms) / 4, rel=1e-6)
    assert metrics["clipfrac"].item() == pytest.approx(2 / 4)
    seq, _ = ppo_policy_loss(logp, old, adv, mask, clip=0.2, aggregate="sequence")
    assert seq.item() == pytest.approx(((-1.2 - 0.5 + 1.0) / 3 + 2.2) / 2, rel=1e-6)
    # GRPO: one advantage per sequence, broadcast over its tokens
    grpo, _ = ppo_policy_loss(logp, old, torch.tensor([1.0, -2.0]), mask, clip=0.2)
    assert grpo.item() == pytest.approx((-1.2 - 0.5 - 1.0 + 2.2) / 4, rel=1e-6)


def test_ppo_value_loss_by_hand():
    values, old = torch.tensor([[1.0, 0.0, 0.95]]), torch.tensor([[0.5, -0.5, 1.0]])
    returns, mask = torch.tensor([[2.0, 1.0, 3.0]]), torch.tensor([[True, True, True]])
    loss, metrics = ppo_value_loss(values, old, returns, mask, clip=0.2)
    # token 0: (1-2)^2 = 1 vs clipped 0.5+0.2=0.7: 1.69 -> 1.69; token 1: (0-1)^2 = 1 vs clipped -0.3: 1.69;
    # token 2: inside the clip range, (0.95-3)^2 both ways
    assert loss.item() == pytest.approx(0.5 * (1.69 + 1.69 + 2.05 ** 2) / 3, rel=1e-6)
    assert metrics["vf_clipfrac"].item() == pytest.approx(2 / 3)


def test_grpo_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 3.0, 3.0, 5.0])
    adv = grpo_advantages(r, group_size=4, scale="group")
    for g in adv.view(2, 4):
        assert g.mean().item() == pytest.approx(0.0, abs=1e-6)
        assert g.std().item() == pytest.approx(1.0, abs=1e-3)  # unit std up to the 1e-4 in the denominator
    s = math.sqrt(1 / 3)  # unbiased std of (1, 0, 0, 1)
    assert adv[:4].tolist() == pytest.approx([x / (s + 1e-4) for x in (0.5, -0.5, -0.5, 0.5)], rel=1e-6)
    none = grpo_advantages(r, 4, "none")
    assert none.tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5, -0.5, -0.5, -0.5, 1.5])
    batch = grpo_advantages(r, 4, "batch")
    assert batch.tolist() == pytest.approx((none / (r.std() + 1e-4)).tolist(), rel=1e-6)
    same = grpo_advantages(torch.tensor([2.0, 2.0]), 2)  # equal rewards: no signal, no division by zero
    assert same.tolist() == [0.0, 0.0]
    with pytest.raises(HerdError):
        grpo_advantages(r, 3)
