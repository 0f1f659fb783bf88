"""Scaling-law fits recover known exponents and a known sigmoid from noisy synthetic data."""

from __future__ import annotations

import math

import numpy as np
import pytest

from herd.errors import HerdError
from herd.eval.scaling.fit import fit_downstream, fit_isoflops, fit_power_law, fit_sigmoid, isoflop_minimum
from herd.eval.scaling.shapes import flop_params, shape_for_depth, tokens_for_budget
from herd.train.metrics import flops_per_token

# Chinchilla's fitted loss L(N, D) = E + A / N^a + B / D^b (Hoffmann et al. 2022, approach 3). With
# C = 6 N D the compute-optimal N* grows as C^(b / (a + b)) and D* as C^(a / (a + b)).
E, A, a, B, b = 1.69, 406.4, 0.34, 410.7, 0.28
ALPHA_N, ALPHA_D = b / (a + b), a / (a + b)
G = (a * A / (b * B)) ** (1 / (a + b))  # N*(C) = G (C / 6)^(b / (a + b))


def synthetic_runs(seed: int, noise: float = 0.003, budgets: int = 7) -> list[dict]:
    """An IsoFLOP grid like Llama 3's (budgets 6e18 .. 1e22), 7 sizes per budget spanning 1.5 decades."""
    rng = np.random.default_rng(seed)
    runs = []
    for c in np.logspace(math.log10(6e18), 22, budgets):
        n_opt = G * (c / 6) ** ALPHA_N
        for f in np.linspace(-0.75, 0.75, 7):
            n = n_opt * 10 ** f
            d = c / (6 * n)
            loss = (E + A / n ** a + B / d ** b) * (1 + noise * rng.standard_normal())
            runs.append({"budget": c, "params": n, "tokens": d, "loss": loss})
    return runs


def test_parabola_vertex_by_hand():
    # loss = 2 (u - 3)^2 + 1 with u = log10 N: the vertex is N = 1000, loss 1
    sizes = [10, 100, 1000, 10000, 100000]
    m = isoflop_minimum(1e18, sizes, [2 * (math.log10(s) - 3) ** 2 + 1 for s in sizes])
    assert m.opt == pytest.approx(1000) and m.loss_opt == pytest.approx(1) and m.bracketed
    falling = isoflop_minimum(1e18, sizes, [5, 4, 3, 2, 1])  # no minimum inside the sizes
    assert not falling.bracketed


def test_noiseless_fit_is_exact():
    fit = fit_isoflops(synthetic_runs(0, noise=0.0))
    assert fit.params.alpha == pytest.approx(ALPHA_N, abs=1e-9)
    assert fit.tokens.alpha == pytest.approx(ALPHA_D, abs=1e-9)
    # A = G 6^-alpha up to the parabola's approximation of each IsoFLOP curve: the curves have the same
    # shape at every budget, so that error is one constant factor (alpha stays exact)
    assert fit.params.A * 6 ** ALPHA_N == pytest.approx(G, rel=0.05)


def test_noisy_fit_recovers_the_exponents_within_their_intervals():
    fit = fit_isoflops(synthetic_runs(0))
    for law, truth in ((fit.params, ALPHA_N), (fit.tokens, ALPHA_D)):
        lo, hi = law.alpha_ci95
        assert lo <= truth <= hi
        assert abs(law.alpha - truth) < 0.02
    # the 95% intervals hold the truth about 95% of the time
    covered = 0
    for seed in range(100):
        f = fit_isoflops(synthetic_runs(seed))
        covered += f.params.alpha_ci95[0] <= ALPHA_N <= f.params.alpha_ci95[1]
    assert covered >= 85


def test_llama3_law_reproduces_the_paper_extrapolation():
    # Figure 3's (alpha, A) = (0.537, 0.299): 3.8e25 FLOPs -> 16.55T training tokens (paper, section 3.2.1)
    budgets = np.logspace(18.8, 22, 6)
    law = fit_power_law(budgets, 0.299 * budgets ** 0.537)
    assert (law.alpha, law.A) == (pytest.approx(0.537), pytest.approx(0.299))
    assert law.predict(3.8e25)[0] == pytest.approx(16.55e12, rel=0.02)


def test_too_few_budgets_or_sizes_is_one_clear_error():
    with pytest.raises(HerdError, match="at least 3 different sizes"):
        isoflop_minimum(1e18, [1, 2], [3, 4])
    with pytest.raises(HerdError, match="2 or more budgets"):
        fit_power_law([1e18], [1e9])


def test_sigmoid_recovers_known_parameters():
    rng = np.random.default_rng(0)
    lo, hi, k, x0 = 0.25, 0.9, 6.0, 1.2
    nll = np.linspace(0.4, 2.0, 40)
    acc = lo + (hi - lo) / (1 + np.exp(k * (nll - x0))) + 0.01 * rng.standard_normal(40)
    free = fit_sigmoid(nll, acc, lo=None, hi=None)
    for name, truth in (("lo", lo), ("hi", hi), ("k", k), ("x0", x0)):
        value = getattr(free, name)
        assert abs(value - truth) <= max(3 * free.stderr[name], 0.02 * abs(truth)), name
    fixed = fit_sigmoid(nll, acc, lo=0.25, hi=0.9)
    assert fixed.k == pytest.approx(k, rel=0.1) and fixed.x0 == pytest.approx(x0, abs=0.02)


def test_two_step_downstream_prediction():
    # compute -> NLL is a line in log10 C; NLL -> accuracy a sigmoid; the composition predicts accuracy
    budgets = np.logspace(18, 22, 9)
    nll = 2.5 - 0.3 * (np.log10(budgets) - 18)
    acc = 0.25 + 0.75 / (1 + np.exp(5.0 * (nll - 1.6)))
    fit = fit_downstream(budgets, nll, nll, acc, lo=0.25, hi=1.0)
    assert fit.slope == pytest.approx(-0.3) and fit.nll(1e24) == pytest.approx(2.5 - 0.3 * 6)
    assert fit.accuracy(1e24) == pytest.approx(0.25 + 0.75 / (1 + math.exp(5.0 * (0.7 - 1.6))), abs=1e-4)


def test_shape_rule_keeps_llama3_proportions():
    args = shape_for_depth(4, vocab_size=4096, seq_len=256)
    assert (args.dim, args.n_heads, args.head_dim, args.n_kv_heads) == (256, 4, 64, 1)
    assert args.hidden_dim == 64 * math.ceil(int(1.3 * int(8 * 256 / 3)) / 64)
    big = shape_for_depth(32, vocab_size=128256, seq_len=8192, aspect=128)
    assert (big.dim, big.n_heads, big.n_kv_heads) == (4096, 64, 16)
    # N counts the weights that cost FLOPs (non-embedding + output layer), as flops_per_token's 6N term
    attention = 12 * args.n_layers * args.n_heads * args.head_dim * 256
    assert 6 * flop_params(args) + attention == pytest.approx(flops_per_token(args, 256))
    assert tokens_for_budget(args, 1e15, 256) == pytest.approx(1e15 / flops_per_token(args, 256))
