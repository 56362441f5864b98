"""The optimisation problem: energies, the constrained binary (Ising) problem, per-type budgets, bounds."""
