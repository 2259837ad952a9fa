"""The paper's claims reproduced at small scale: ``python -m benchmarks.claims [--quick]``.

Experiments (one module each): ``stability`` (ill-conditioned low-rank regression / completion, learning-rate
sweep: TDLRT against factorized LoRA gradient descent), ``approximation`` (distance to the full gradient flow
against the bound ``c1 ε + c2 λ + c3 τ/λ``), ``descent`` (fraction of steps that decrease the loss), ``network``
(the stability sweep on a digits MLP) and ``saturation`` (what happens when the rank reaches ``r_max``). The
figures (PNG), ``summary.md`` and ``results.json`` go to ``benchmarks/claims/results/`` by default.
"""
