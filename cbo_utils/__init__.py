"""cbo_utils — LLM block removal by constrained binary optimisation (arXiv 2602.00161), reproduced and extended.

The package reads along the pipeline (each layer imports only the ones above it in this list):

``core``         artifacts (atomic writes, provenance sidecars), tables (upsert, Markdown), profiles, imports (AST)
``calibration``  calibration and held-out text
``model``        load, tiny models and the hybrid stand-in, blocks (adapters, gates, removal, merging), loss
``gradients``    per-sample gate gradients, the Fisher and exact gate Hessians
``problem``      energies (a registry), the Ising problem, per-type budgets, certified bounds
``solvers``      the states table, exact enumeration, local search, annealing and tabu, by-type, the benchmark
``select``       Selection, baselines, SWM, the CBO variants, the method registry
``prune``        export and verification, checkpoint-file pruning, knowledge distillation
``evaluate``     perplexity, lm-eval, reasoning, efficiency, the one recipe that measures a selection
``experiments``  the notebook stages, the comparison, retraining, the hybrid experiment, the pipeline
``report``       tables, figures, the paper-item map
``cli``, ``notebooks``   the ``cbo`` command and the papermill runner

The public API (imported lazily, so ``import cbo_utils`` stays cheap)::

    import cbo_utils
    summary = cbo_utils.compress("smollm2", M=8, out="smollm2-M8")   # select, prune, verify, measure: one call

    from cbo_utils import load_model, select_blocks, save_pruned
    model, tok = load_model("smollm2")
    sel = select_blocks(model, tok, M=8)               # the default CBO variant; method="block_influence", ...
    small = sel.apply(model)                            # a pruned copy; model is unchanged
    save_pruned(model, tok, sel, "smollm2-pruned")      # save_pretrained folder, verified against model
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = {
    "load_model": "cbo_utils.model.load",
    "register_adapter": "cbo_utils.model.blocks",
    "select_blocks": "cbo_utils.select.api",
    "Selection": "cbo_utils.select.selection",
    "METHODS": "cbo_utils.select.methods",
    "register_method": "cbo_utils.select.methods",
    "ENERGIES": "cbo_utils.problem.energies",
    "register_energy": "cbo_utils.problem.energies",
    "BlockRemovalProblem": "cbo_utils.problem.ising",
    "solve": "cbo_utils.solvers.heuristics",
    "save_pruned": "cbo_utils.prune.export",
    "compress": "cbo_utils.experiments.compress",
}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'cbo_utils' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
