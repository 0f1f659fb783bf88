"""`herd scaling sweep|fit|plot`: run an IsoFLOP grid, fit the scaling laws, draw them.

    herd scaling sweep --data runs/speedrun/data --out runs/scaling --budgets 1e11,3e11,1e12
    herd scaling fit runs/scaling --predict 1e13,1e14 [--task arc_easy]
    herd scaling plot runs/scaling [--out runs/scaling/scaling.png]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from herd.errors import HerdError
from herd.flags import HelpFormatter, add_bool_flag, add_dataclass_args, dataclass_from_args


def add_scaling_args(parser: argparse.ArgumentParser) -> None:
    from herd.eval.scaling.sweep import SweepConfig

    sub = parser.add_subparsers(dest="scaling_command", metavar="SUBCOMMAND", required=True)
    p = sub.add_parser("sweep", help="plan and pre-train an IsoFLOP grid (resumable run by run)",
                       formatter_class=HelpFormatter,
                       description="For each compute budget, pre-train several model sizes in Llama 3's "
                                   "proportions for tokens = C / FLOPs-per-token; a re-run resumes.")
    add_dataclass_args(p, SweepConfig)
    for name, help in (("fit", "fit IsoFLOP parabolas, the power laws and the downstream predictor"),
                       ("plot", "draw the IsoFLOP curves and fits as a PNG")):
        p = sub.add_parser(name, help=help, formatter_class=HelpFormatter)
        p.add_argument("runs", type=Path, help="a sweep folder, or a jsonl file of {budget, params, tokens, loss} runs")
        p.add_argument("--predict", default=None, help="budgets (FLOPs) to predict the optimum for, comma-separated")
        p.add_argument("--task", default=None, help="downstream task evaluated in the sweep (--eval-tasks) to fit; "
                                                    "default: the first one found")
        p.add_argument("--metric", default="acc", help="accuracy metric of that task")
        p.add_argument("--chance", type=float, default=0.25, help="accuracy floor of the sigmoid (1 / choices)")
        add_bool_flag(p, "--free-sigmoid", default=False,
                      help="fit the sigmoid's floor and ceiling too (needs 5+ evaluated runs)")
        p.add_argument("--out", type=Path, default=None,
                       help="output file (default: RUNS/fit.json or RUNS/scaling.png beside the sweep)")


def _budgets(text: str | None) -> list[float]:
    from herd.eval.scaling.sweep import _floats

    return _floats(text, "--predict") if text and text.strip() else []


def analyze(ns: argparse.Namespace) -> dict[str, Any]:
    """Runs -> IsoFLOP fit, predictions, downstream fit (when the runs carry evals)."""
    from herd.eval.scaling.fit import fit_downstream, fit_isoflops
    from herd.eval.scaling.sweep import read_runs

    runs = read_runs(ns.runs)
    fit = fit_isoflops(runs)
    predictions = []
    for budget in _budgets(ns.predict):
        if fit.params is None:
            raise HerdError("no power law to predict from: fewer than 2 budgets have a bracketed minimum.")
        predictions.append(fit.predict(budget))
    evaluated = [r for r in runs if r.get("eval")]
    task = ns.task or (next(iter(evaluated[0]["eval"])) if evaluated else "")
    downstream, points = None, []
    if task:
        for r in runs:
            scores = (r.get("eval") or {}).get(task)
            if scores is None:
                continue
            if ns.metric not in scores or "nll_per_char" not in scores:
                raise HerdError(f"the {task} results have no '{ns.metric}' and nll_per_char; pick --metric among "
                                f"{', '.join(k for k in scores if not k.endswith('_stderr'))}.")
            points.append((float(r["budget"]), float(scores["nll_per_char"]), float(scores[ns.metric]), r["loss"]))
        if not points:
            raise HerdError(f"no run was evaluated on '{task}'; sweep with --eval-tasks {task}.")
        best: dict[float, tuple] = {}
        for p in points:  # step 1 uses each budget's compute-optimal (lowest loss) model
            if p[0] not in best or p[3] < best[p[0]][3]:
                best[p[0]] = p
        lo, hi = (None, None) if ns.free_sigmoid else (ns.chance, 1.0)
        downstream = fit_downstream([p[0] for p in best.values()], [p[1] for p in best.values()],
                                    [p[1] for p in points], [p[2] for p in points], lo, hi)
        for pred in predictions:
            pred["nll_per_char"] = downstream.nll(pred["budget"])
            pred[ns.metric] = downstream.accuracy(pred["budget"])
    return {"runs": runs, "fit": fit, "predictions": predictions, "task": task, "downstream": downstream,
            "points": [p[:3] for p in points]}


def _print_fit(result: dict[str, Any], metric: str) -> None:
    fit = result["fit"]
    print("| budget (FLOPs) | runs | N* (params) | D* (tokens) | loss at N* | minimum bracketed |")
    print("|---|---|---|---|---|---|")
    for mn, md in zip(fit.minima_n, fit.minima_d):
        ok = mn.budget not in fit.excluded
        n_txt = f"{mn.opt:.3g} ± {math.log(10) * mn.opt * mn.log10_opt_stderr:.2g}" if ok else "-"
        print(f"| {mn.budget:.3g} | {mn.points} | {n_txt} | {md.opt:.3g} | {mn.loss_opt:.4f} | {'yes' if ok else 'no'} |")
    for name, law in (("N*(C) params", fit.params), ("D*(C) tokens", fit.tokens)):
        if law is None:
            print(f"{name}: not fitted (fewer than 2 budgets with a bracketed minimum)")
        else:
            print(f"{name} = {law.A:.4g} * C^{law.alpha:.4f}, alpha 95% CI [{law.alpha_ci95[0]:.3f}, "
                  f"{law.alpha_ci95[1]:.3f}] ({law.dof} degrees of freedom)")
    for p in result["predictions"]:
        line = f"at C = {p['budget']:.3g}: "
        if "params" in p:
            line += f"N* = {p['params']:.3g} [{p['params_ci95'][0]:.3g}, {p['params_ci95'][1]:.3g}]"
        if "tokens" in p:
            line += f", D* = {p['tokens']:.3g} [{p['tokens_ci95'][0]:.3g}, {p['tokens_ci95'][1]:.3g}]"
        if metric in p:
            line += f", predicted {result['task']} {metric} {p[metric]:.3f} (NLL/char {p['nll_per_char']:.3f})"
        print(line)
    ds = result["downstream"]
    if ds is not None:
        s = ds.sigmoid
        print(f"{result['task']}: NLL/char = {ds.intercept:.3f} + {ds.slope:.3f} log10 C; {metric} = {s.lo:.3f} + "
              f"({s.hi:.3f} - {s.lo:.3f}) / (1 + exp({s.k:.3f} (NLL - {s.x0:.3f}))) over {ds.points} runs")


def run_scaling(ns: argparse.Namespace) -> int:
    if ns.scaling_command == "sweep":
        from herd.eval.scaling.sweep import SweepConfig, run_sweep

        from herd.parallel import is_main

        cfg = dataclass_from_args(SweepConfig, ns)
        results = run_sweep(cfg)
        if is_main():
            print(f"{len(results)} runs finished; fit them with `herd scaling fit {cfg.out}`")
        return 0
    result = analyze(ns)
    folder = ns.runs if ns.runs.is_dir() else ns.runs.parent
    if ns.scaling_command == "fit":
        from herd.fileio import atomic_write

        _print_fit(result, ns.metric)
        out = ns.out or folder / "fit.json"
        payload = {"fit": result["fit"].to_dict(), "predictions": result["predictions"], "task": result["task"],
                   "downstream": result["downstream"].to_dict() if result["downstream"] else None}
        atomic_write(out, json.dumps(payload, indent=1, default=float) + "\n")
        print(f"fit: {out}")
        return 0
    from herd.eval.scaling.plot import plot_sweep

    out = ns.out or folder / "scaling.png"
    plot_sweep(result["runs"], result["fit"], out, result["downstream"], result["points"],
               [p["budget"] for p in result["predictions"]], title=str(ns.runs))
    print(f"plot: {out}")
    return 0
