"""Plots of a scaling sweep: IsoFLOP curves with their parabolas and minima, the optimal model size
and token count against compute with the fitted power laws, and (with downstream evals) the two
steps compute -> NLL -> accuracy. One PNG, written atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from herd.eval.scaling.fit import DownstreamFit, ScalingFit
from herd.fileio import atomic_path


def plot_sweep(runs: list[dict[str, Any]], fit: ScalingFit, path: str | Path, downstream: DownstreamFit | None = None,
               points: list[tuple[float, float, float]] | None = None, predict: list[float] | None = None,
               title: str = "") -> Path:
    """points: (budget, nll, acc) of the evaluated runs, for the downstream panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 + (2 if downstream is not None else 0)
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.2))
    budgets = sorted({float(r["budget"]) for r in runs})
    colors = plt.cm.viridis(np.linspace(0.1, 0.9, max(len(budgets), 2)))

    ax = axes[0]
    for color, budget, m in zip(colors, budgets, fit.minima_n):
        group = sorted((r for r in runs if float(r["budget"]) == budget and r.get("loss") is not None),
                       key=lambda r: r["params"])
        n = np.array([r["params"] for r in group], dtype=float)
        ax.scatter(n, [r["loss"] for r in group], color=color, s=18, label=f"{budget:.1e} FLOPs")
        u = np.linspace(np.log10(n.min()) - 0.1, np.log10(n.max()) + 0.1, 100)
        ax.plot(10 ** u, np.polyval(m.coef, u), color=color, lw=1)
        if m.bracketed:
            ax.scatter([m.opt], [m.loss_opt], color=color, marker="*", s=120, edgecolor="black", zorder=3)
    ax.set_xscale("log")
    ax.set_xlabel("model size N (non-embedding + output parameters)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("IsoFLOP curves (stars: fitted minima)")
    ax.legend(fontsize=7)

    ax = axes[1]
    extra = list(predict or [])
    c_all = np.array(budgets + extra, dtype=float)
    cs = np.logspace(np.log10(c_all.min()) - 0.2, np.log10(c_all.max()) + 0.2, 50)
    drawn = False
    for law, minima, label, color in ((fit.params, fit.minima_n, "N* params", "tab:blue"),
                                      (fit.tokens, fit.minima_d, "D* tokens", "tab:orange")):
        good = [m for m in minima if m.budget not in fit.excluded]
        drawn = drawn or bool(good)
        if not good:
            continue
        ax.scatter([m.budget for m in good], [m.opt for m in good], color=color, label=label)
        if law is not None:
            ys = [law.predict(c) for c in cs]
            ax.plot(cs, [y for y, _ in ys], color=color, lw=1,
                    label=f"{label.split()[0]} = {law.A:.3g} C^{law.alpha:.3f} "
                          f"[{law.alpha_ci95[0]:.2f}, {law.alpha_ci95[1]:.2f}]")
            ax.fill_between(cs, [ci[0] for _, ci in ys], [ci[1] for _, ci in ys], color=color, alpha=0.15)
            for c in extra:
                y, _ = law.predict(c)
                ax.scatter([c], [y], color=color, marker="x", s=60)
    ax.set_xlabel("compute C (training FLOPs)")
    ax.set_title("compute-optimal size and tokens (band: 95%)")
    if drawn:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no budget has a bracketed minimum:\ntrain sizes on both sides of the optimum",
                ha="center", va="center", transform=ax.transAxes)

    if downstream is not None and points:
        b, nll, acc = (np.array(x, dtype=float) for x in zip(*points))
        ax = axes[2]
        ax.scatter(b, nll, s=18, color="tab:green")
        cs = np.logspace(np.log10(b.min()) - 0.3, np.log10(b.max()) + 0.3, 50)
        ax.plot(cs, [downstream.nll(c) for c in cs], color="tab:green", lw=1)
        ax.set_xscale("log")
        ax.set_xlabel("compute C (training FLOPs)")
        ax.set_ylabel("NLL of the right answer per character")
        ax.set_title("step 1: compute -> NLL")
        ax = axes[3]
        ax.scatter(nll, acc, s=18, color="tab:red")
        xs = np.linspace(min(nll.min(), downstream.sigmoid.x0) - 0.5, max(nll.max(), downstream.sigmoid.x0) + 0.5, 100)
        ax.plot(xs, downstream.sigmoid(xs), color="tab:red", lw=1)
        ax.set_xlabel("NLL of the right answer per character")
        ax.set_ylabel("accuracy")
        ax.set_title("step 2: NLL -> accuracy (sigmoid)")
    if title:
        fig.suptitle(title)
    from matplotlib.ticker import NullFormatter

    for ax in axes:  # log axes spanning less than a decade label their minor ticks, which overlap
        if ax.get_xscale() == "log":
            ax.xaxis.set_minor_formatter(NullFormatter())
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path
