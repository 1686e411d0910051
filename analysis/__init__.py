"""Convergence analysis of a strategy sweep: pandas and matplotlib only, no Ray, no torch.

`analysis.convergence` computes steps-to-target, speedups, intervals and verdicts;
`analysis.plots` draws them. The `report` stage and `notebooks/convergence.ipynb` both use
these two modules, so the page, the JSON and the notebook show the same numbers.
"""
