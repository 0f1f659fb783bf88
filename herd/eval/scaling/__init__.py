"""Scaling laws (Llama 3 paper, section 3.2.1): model shapes and FLOPs, the IsoFLOP sweep, the fits
(IsoFLOP parabolas, power laws with confidence intervals, compute -> NLL -> accuracy) and plots.

- shapes.py  one rule for model shapes in Llama 3's proportions; N and tokens for a budget
- sweep.py   `herd scaling sweep`: plan the grid, pre-train each run, resumable
- fit.py     the fits
- plot.py    the figure
- cli.py     `herd scaling sweep|fit|plot`
"""
