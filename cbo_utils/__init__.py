"""cbo_utils — LLM block removal by constrained binary optimisation (arXiv 2602.00161), reproduced and extended.

Modules: ``blocks`` (architectures, gates, removal), ``calibration``, ``hessian`` (A, g, H), ``ising`` (energies,
QUBO/Ising forms), ``solvers`` (exact, simulated annealing, tabu), ``export`` (save and verify pruned models),
``evaluate`` (perplexity), ``models`` (loading), ``tiny`` (models built in code), ``artifacts``, ``cli``.
"""

__version__ = "0.1.0"
