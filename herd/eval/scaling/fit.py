"""Scaling-law fits, as the Llama 3 paper makes them (section 3.2.1), with confidence intervals.

1. IsoFLOP minima: for each compute budget C, a second-degree polynomial of validation loss against
   log10 of the model size N (and, separately, of the training tokens D); its vertex is that budget's
   compute-optimal N*(C) (and D*(C)). The standard error of the vertex comes from the polynomial's
   covariance (delta method). A budget whose parabola opens downwards, or whose vertex lies outside
   the sizes that were trained, has no bracketed minimum and is left out of step 2.
2. Power laws N*(C) = A C^alpha and D*(C) = A C^alpha: least squares of log10 N* on log10 C, with the
   alpha interval from Student's t on n - 2 degrees of freedom (few budgets give wide intervals,
   honestly). The paper reports (alpha, A) = (0.53, 0.29) for tokens, i.e. D*(C); its Figure 3
   label (0.537, 0.299) is what reproduces the text's 16.55T tokens at 3.8e25 FLOPs.
3. Downstream prediction, in two steps: a line from log10 C to the normalized negative
   log-likelihood of the right answer (per character) of the compute-optimal models, then a sigmoid
   from that NLL to accuracy, acc = lo + (hi - lo) / (1 + exp(k (nll - x0))) (lo = chance and hi = 1
   unless there are enough points to fit them).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from herd.errors import HerdError


@dataclass
class IsoFLOPMinimum:
    """One budget's parabola in log10(x) and its vertex."""

    budget: float
    coef: list[float]
    """loss = coef[0] * u^2 + coef[1] * u + coef[2], u = log10(x)."""
    log10_opt: float
    log10_opt_stderr: float
    loss_opt: float
    bracketed: bool
    """Whether the parabola opens upwards and its vertex lies within the trained sizes."""
    points: int

    @property
    def opt(self) -> float:
        return 10 ** self.log10_opt


@dataclass
class PowerLaw:
    """y = A * C^alpha, fitted as log10 y = log10 A + alpha log10 C."""

    alpha: float
    log10_A: float
    alpha_ci95: tuple[float, float]
    alpha_stderr: float
    cov: list[list[float]]
    """Covariance of (log10 A, alpha)."""
    residual_std: float
    dof: int

    @property
    def A(self) -> float:
        return 10 ** self.log10_A

    def predict(self, budget: float) -> tuple[float, tuple[float, float]]:
        """y at `budget` and the 95% interval of the fitted line there (t on dof degrees of freedom)."""
        from scipy import stats

        x = np.array([1.0, math.log10(budget)])
        mean = float(x @ np.array([self.log10_A, self.alpha]))
        se = float(math.sqrt(max(x @ np.array(self.cov) @ x, 0.0)))
        t = float(stats.t.ppf(0.975, self.dof)) if self.dof > 0 else float("inf")
        return 10 ** mean, (10 ** (mean - t * se), 10 ** (mean + t * se))


def isoflop_minimum(budget: float, sizes: Sequence[float], losses: Sequence[float]) -> IsoFLOPMinimum:
    """Fit loss = a u^2 + b u + c with u = log10(size) and find the vertex u* = -b / (2a)."""
    u = np.log10(np.asarray(sizes, dtype=np.float64))
    y = np.asarray(losses, dtype=np.float64)
    if len(u) < 3 or len(set(u.tolist())) < 3:
        raise HerdError(f"budget {budget:.3g}: a parabola needs at least 3 different sizes, got {len(set(u.tolist()))}; "
                        "train more sizes at this budget.")
    if len(u) > 3:
        coef, cov = np.polyfit(u, y, 2, cov=True)
    else:  # exactly determined: no residuals, so no covariance estimate
        coef, cov = np.polyfit(u, y, 2), np.full((3, 3), np.nan)
    a, b, c = coef
    bracketed = bool(a > 0)
    vertex = -b / (2 * a) if a != 0 else float("nan")
    if bracketed and not (u.min() <= vertex <= u.max()):
        bracketed = False
    # delta method: d(vertex)/da = b / (2 a^2), d(vertex)/db = -1 / (2a)
    grad = np.array([b / (2 * a * a), -1 / (2 * a), 0.0]) if a != 0 else np.full(3, np.nan)
    se = float(math.sqrt(max(grad @ cov @ grad, 0.0))) if np.all(np.isfinite(cov)) else float("nan")
    loss_opt = float(np.polyval(coef, vertex)) if math.isfinite(vertex) else float("nan")
    return IsoFLOPMinimum(float(budget), [float(a), float(b), float(c)], float(vertex), se, loss_opt, bracketed, len(u))


def fit_power_law(budgets: Sequence[float], values: Sequence[float]) -> PowerLaw:
    """Least squares of log10(value) on log10(budget), with a Student-t interval for alpha."""
    from scipy import stats

    x = np.log10(np.asarray(budgets, dtype=np.float64))
    y = np.log10(np.asarray(values, dtype=np.float64))
    n = len(x)
    if n < 2 or len(set(x.tolist())) < 2:
        raise HerdError(f"a power law needs optimal points at 2 or more budgets, got {n}; sweep more budgets "
                        "(each with sizes on both sides of its optimum).")
    X = np.stack([np.ones(n), x], axis=1)
    beta, *_ = np.linalg.lstsq(X, y, rcond=None)
    resid = y - X @ beta
    dof = n - 2
    sigma2 = float(resid @ resid / dof) if dof > 0 else float("nan")
    cov = sigma2 * np.linalg.inv(X.T @ X) if dof > 0 else np.full((2, 2), np.nan)
    se = float(math.sqrt(cov[1, 1])) if dof > 0 else float("nan")
    t = float(stats.t.ppf(0.975, dof)) if dof > 0 else float("nan")
    alpha = float(beta[1])
    return PowerLaw(alpha, float(beta[0]), (alpha - t * se, alpha + t * se), se, cov.tolist(),
                    math.sqrt(sigma2) if dof > 0 else float("nan"), dof)


@dataclass
class ScalingFit:
    """The IsoFLOP minima and the power laws for the optimal model size and token count."""

    minima_n: list[IsoFLOPMinimum]
    minima_d: list[IsoFLOPMinimum]
    params: PowerLaw | None
    tokens: PowerLaw | None
    excluded: list[float] = field(default_factory=list)
    """Budgets left out because their minimum was not bracketed."""

    def predict(self, budget: float) -> dict[str, float | list[float]]:
        out: dict[str, float | list[float]] = {"budget": budget}
        for name, law in (("params", self.params), ("tokens", self.tokens)):
            if law is not None:
                value, ci = law.predict(budget)
                out[name], out[f"{name}_ci95"] = value, list(ci)
        return out

    def to_dict(self) -> dict:
        return {"minima_params": [asdict(m) for m in self.minima_n], "minima_tokens": [asdict(m) for m in self.minima_d],
                "params": asdict(self.params) if self.params else None,
                "tokens": asdict(self.tokens) if self.tokens else None, "excluded_budgets": self.excluded}


def fit_isoflops(runs: Sequence[dict]) -> ScalingFit:
    """runs: dicts with budget, params (N), tokens (D) and loss. Fits every budget's parabolas, then
    the power laws over the budgets whose minimum is bracketed in both N and D."""
    by_budget: dict[float, list[dict]] = {}
    for r in runs:
        if r.get("loss") is None or not math.isfinite(r["loss"]):
            continue
        by_budget.setdefault(float(r["budget"]), []).append(r)
    if not by_budget:
        raise HerdError("no finished runs with a validation loss to fit; run `herd scaling sweep` first.")
    minima_n, minima_d, excluded = [], [], []
    for budget in sorted(by_budget):
        group = by_budget[budget]
        mn = isoflop_minimum(budget, [r["params"] for r in group], [r["loss"] for r in group])
        md = isoflop_minimum(budget, [r["tokens"] for r in group], [r["loss"] for r in group])
        minima_n.append(mn)
        minima_d.append(md)
        if not (mn.bracketed and md.bracketed):
            excluded.append(budget)
    good = [(mn, md) for mn, md in zip(minima_n, minima_d) if mn.budget not in excluded]
    params = tokens = None
    if len(good) >= 2:
        params = fit_power_law([m.budget for m, _ in good], [m.opt for m, _ in good])
        tokens = fit_power_law([m.budget for _, m in good], [m.opt for _, m in good])
    return ScalingFit(minima_n, minima_d, params, tokens, excluded)


# ---------------------------------------------------------------------------------------------
# downstream: compute -> NLL -> accuracy


@dataclass
class Sigmoid:
    """acc = lo + (hi - lo) / (1 + exp(k (nll - x0)))."""

    lo: float
    hi: float
    k: float
    x0: float
    stderr: dict[str, float]
    fitted: tuple[str, ...]

    def __call__(self, nll: float | np.ndarray) -> float | np.ndarray:
        return self.lo + (self.hi - self.lo) / (1 + np.exp(self.k * (np.asarray(nll) - self.x0)))


def fit_sigmoid(nll: Sequence[float], acc: Sequence[float], lo: float | None = 0.25, hi: float | None = 1.0) -> Sigmoid:
    """Least-squares sigmoid of accuracy against NLL. lo / hi None: fitted too (needs >= 5 points),
    else fixed (chance and perfect accuracy)."""
    from scipy.optimize import curve_fit

    x, y = np.asarray(nll, dtype=np.float64), np.asarray(acc, dtype=np.float64)
    free = ("k", "x0") + (("lo",) if lo is None else ()) + (("hi",) if hi is None else ())
    if len(x) < len(free) + 1:
        raise HerdError(f"the accuracy sigmoid has {len(free)} free parameters and needs at least {len(free) + 1} "
                        f"evaluated runs, got {len(x)}; evaluate more sweep runs (--eval-tasks).")

    def f(v, k, x0, *rest):
        r = list(rest)
        lo_ = r.pop(0) if lo is None else lo
        hi_ = r.pop(0) if hi is None else hi
        return lo_ + (hi_ - lo_) / (1 + np.exp(np.clip(k * (v - x0), -60, 60)))

    p0 = [4.0 / max(float(np.std(x)), 1e-3), float(np.median(x))]
    bounds_lo, bounds_hi = [0.0, -np.inf], [np.inf, np.inf]
    if lo is None:
        p0.append(float(min(y)))
        bounds_lo.append(0.0)
        bounds_hi.append(1.0)
    if hi is None:
        p0.append(float(max(y)))
        bounds_lo.append(0.0)
        bounds_hi.append(1.0)
    try:
        popt, pcov = curve_fit(f, x, y, p0=p0, bounds=(bounds_lo, bounds_hi), maxfev=20000)
    except (RuntimeError, ValueError) as e:
        raise HerdError(f"the accuracy sigmoid did not converge ({e}); evaluate runs over a wider range of "
                        "compute so accuracy rises visibly above chance.") from None
    errs = np.sqrt(np.clip(np.diag(pcov), 0, None)) if np.all(np.isfinite(pcov)) else np.full(len(popt), np.nan)
    values = dict(zip(free, popt.tolist()))
    return Sigmoid(lo=values.get("lo", lo), hi=values.get("hi", hi), k=values["k"], x0=values["x0"],
                   stderr=dict(zip(free, errs.tolist())), fitted=free)


@dataclass
class DownstreamFit:
    """log10 C -> normalized NLL (a line), NLL -> accuracy (a sigmoid)."""

    slope: float
    intercept: float
    sigmoid: Sigmoid
    points: int

    def nll(self, budget: float) -> float:
        return self.intercept + self.slope * math.log10(budget)

    def accuracy(self, budget: float) -> float:
        return float(self.sigmoid(self.nll(budget)))

    def to_dict(self) -> dict:
        return {"nll_line": {"slope_per_decade": self.slope, "intercept": self.intercept}, "points": self.points,
                "sigmoid": asdict(self.sigmoid)}


def fit_downstream(budgets: Sequence[float], nlls: Sequence[float], all_nlls: Sequence[float],
                   all_accs: Sequence[float], lo: float | None = 0.25, hi: float | None = 1.0) -> DownstreamFit:
    """Step 1 on (budget, nll) of the compute-optimal models, step 2 on every evaluated (nll, acc)."""
    if len(set(budgets)) < 2:
        raise HerdError("the compute -> NLL line needs evaluated runs at 2 or more budgets.")
    slope, intercept = np.polyfit(np.log10(np.asarray(budgets, dtype=np.float64)), np.asarray(nlls), 1)
    return DownstreamFit(float(slope), float(intercept), fit_sigmoid(all_nlls, all_accs, lo, hi), len(all_nlls))
