"""The samplers for problems beyond enumeration — simulated annealing (``neal``) and tabu search
(``dwave-samplers``) on the penalty QUBO, each state repaired and polished — and :func:`solve`, the one entry point
that dispatches to any solver (exact above :data:`EXACT_LIMIT` states gives way to tabu in the stages).
"""

from __future__ import annotations

import math
import time

import numpy as np
import pandas as pd

from cbo_utils.problem.ising import BlockRemovalProblem
from cbo_utils.solvers.exact import brute_force_lowest, exact_lowest, naive_exact_lowest
from cbo_utils.solvers.local_search import polish_states, repair_states
from cbo_utils.solvers.states import check_k, results_frame

#: above this many states the exact solver gives way to tabu (e.g. M ≥ 16 of Llama-70B's 80 blocks)
EXACT_LIMIT = 5e9


def _sampler_frame(problem: BlockRemovalProblem, sampleset, solver: str, seed, k: int, polish: bool,
                   info: dict) -> pd.DataFrame:
    """Repair, polish, de-duplicate and tabulate the samples of a dimod sample set over the free blocks."""
    Qr, _, free, m = problem.reduced()
    t0 = time.perf_counter()
    pos = {v: i for i, v in enumerate(sampleset.variables)}
    cols = np.array([pos[int(v)] for v in free], dtype=np.int64)
    raw = np.asarray(sampleset.record.sample)[:, cols]
    occ = np.asarray(sampleset.record.num_occurrences, dtype=np.int64)
    Xr, bad = repair_states(Qr, m, raw)
    n_distinct_raw = int(np.unique(raw, axis=0).shape[0])
    improved = np.zeros(Xr.shape[0], dtype=bool)
    moves = 0
    pool = Xr
    if polish:
        Xu, inv = np.unique(Xr, axis=0, return_inverse=True)
        Xp, imp_u, moves = polish_states(Qr, Xu)
        improved = imp_u[inv.reshape(-1)]
        pool = np.concatenate([Xu, Xp])  # the k best come from every state seen, polished or not
    X = problem.expand(np.unique(pool, axis=0))
    n_distinct = int(X.shape[0])
    info = dict(info)
    info.update({
        "n_samples": int(occ.sum()), "n_records": int(raw.shape[0]), "n_infeasible": int(occ[bad].sum()),
        "n_repaired": int(occ[bad].sum()), "n_distinct_raw": n_distinct_raw, "n_distinct": n_distinct,
        "polish": bool(polish), "n_polish_improved": int(occ[improved].sum()), "n_polish_swaps": moves,
        "postprocess_time_s": time.perf_counter() - t0,
    })
    return results_frame(problem, X, solver, seed, k, info)


def _trivial_frame(problem: BlockRemovalProblem, solver: str, seed, k: int, info: dict) -> pd.DataFrame | None:
    """The single feasible state when nothing is left to choose (``M_free`` is 0 or every free block)."""
    n, m = len(problem.free), problem.M_free
    if m not in (0, n):
        return None
    X = problem.expand(np.full((1, n), 1 if m else 0, dtype=np.int8))
    info = dict(info, n_samples=0, n_infeasible=0, n_repaired=0, n_distinct=1, trivial=True)
    return results_frame(problem, X, solver, seed, k, info)


def _check_seed(seed) -> int:
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2 ** 32:
        raise ValueError(f"seed must be an integer in [0, 2^32), got {seed!r}")
    return int(seed)


def simulated_annealing(problem: BlockRemovalProblem, k: int = 20, num_reads: int = 1000, num_sweeps: int = 1000,
                        seed: int = 0, polish: bool = True, lam: float | None = None, **kw) -> pd.DataFrame:
    """Simulated annealing (``neal.SimulatedAnnealingSampler``) on the penalty QUBO of the reduced problem.

    Infeasible samples are repaired greedily (:func:`repair_states`) and, with ``polish=True``, every distinct state is
    improved by steepest-descent swaps (:func:`polish_states`); the ``k`` best distinct states among the repaired and
    the polished ones are returned (fewer when fewer distinct states were seen).

    ``attrs["solver_info"]`` counts ``n_samples``, ``n_infeasible`` (samples with ``Σx ≠ M``), ``n_repaired``,
    ``n_distinct_raw`` (distinct raw samples), ``n_distinct`` (distinct states in the final pool),
    ``n_polish_improved`` (samples whose state a swap improved) and ``n_polish_swaps``, plus ``penalty_lambda`` and
    timings. Extra
    keyword arguments go to the sampler (e.g. ``beta_range``). A fixed ``seed`` gives identical results.
    """
    import neal

    k, seed = check_k(k), _check_seed(seed)
    info = {"num_reads": int(num_reads), "num_sweeps": int(num_sweeps), "sampler_kwargs": dict(kw)}
    trivial = _trivial_frame(problem, "sa", seed, k, info)
    if trivial is not None:
        return trivial
    bqm = problem.to_bqm(penalty=True, lam=lam)
    lam_used = problem.penalty_lambda() if lam is None else float(lam)
    t0 = time.perf_counter()
    ss = neal.SimulatedAnnealingSampler().sample(bqm, num_reads=int(num_reads), num_sweeps=int(num_sweeps),
                                                 seed=seed, **kw)
    info.update({"penalty_lambda": lam_used, "sample_time_s": time.perf_counter() - t0})
    df = _sampler_frame(problem, ss, "sa", seed, k, polish, info)
    df.attrs["solver_info"]["time_s"] = time.perf_counter() - t0
    return df


def tabu(problem: BlockRemovalProblem, k: int = 20, num_reads: int = 20, timeout_ms: int | None = 200, seed: int = 0,
         polish: bool = True, lam: float | None = None, num_restarts: int | None = None, **kw) -> pd.DataFrame:
    """Multistart tabu search (``dwave.samplers.TabuSampler``) on the penalty QUBO, with the same repair/polish as
    :func:`simulated_annealing`.

    Reproducibility: with a ``timeout_ms`` the search length depends on the machine's speed, so a fixed seed gives
    the same result only up to timing. Pass ``timeout_ms=None`` (and e.g. ``num_restarts=10``; default then 10) for
    bit-reproducible runs bounded by work instead of time. Extra keyword arguments go to the sampler
    (``tenure``, ``lower_bound_z``, ``coefficient_z_first``, …).
    """
    from dwave.samplers import TabuSampler

    k, seed = check_k(k), _check_seed(seed)
    if timeout_ms is None and num_restarts is None:
        num_restarts = 10
    info = {"num_reads": int(num_reads), "timeout_ms": timeout_ms, "num_restarts": num_restarts,
            "sampler_kwargs": dict(kw)}
    trivial = _trivial_frame(problem, "tabu", seed, k, info)
    if trivial is not None:
        return trivial
    bqm = problem.to_bqm(penalty=True, lam=lam)
    lam_used = problem.penalty_lambda() if lam is None else float(lam)
    args = dict(kw)
    args["timeout"] = None if timeout_ms is None else int(timeout_ms)
    if num_restarts is not None:
        args["num_restarts"] = int(num_restarts)
    t0 = time.perf_counter()
    ss = TabuSampler().sample(bqm, num_reads=int(num_reads), seed=seed, **args)
    info.update({"penalty_lambda": lam_used, "sample_time_s": time.perf_counter() - t0})
    df = _sampler_frame(problem, ss, "tabu", seed, k, polish, info)
    df.attrs["solver_info"]["time_s"] = time.perf_counter() - t0
    return df


SOLVERS = {
    "exact": "exact_lowest", "naive": "naive_exact_lowest", "brute_force": "brute_force_lowest",
    "sa": "simulated_annealing", "tabu": "tabu",
}


_ALIASES = {"simulated_annealing": "sa", "neal": "sa", "enumeration": "exact", "bruteforce": "brute_force"}


def solve(problem: BlockRemovalProblem, solver: str = "exact", k: int = 20, seed: int = 0, **kw) -> pd.DataFrame:
    """Run ``solver`` (``"exact"``, ``"sa"``, ``"tabu"``, ``"auto"``, or the references ``"naive"``,
    ``"brute_force"``) and return the standard table. ``"auto"``: exact enumeration (quietly) while the problem has at
    most :data:`EXACT_LIMIT` feasible states, tabu beyond. ``seed`` is used by the samplers only; extra keywords go to
    the solver."""
    name = _ALIASES.get(str(solver).lower(), str(solver).lower())
    if name == "auto":
        name = "exact" if math.comb(len(problem.free), problem.M_free) <= EXACT_LIMIT else "tabu"
        if name == "exact":
            kw.setdefault("progress", False)
        else:
            kw.pop("progress", None)
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; known solvers: {', '.join(SOLVERS)} "
                         f"(aliases: {', '.join(_ALIASES)})")
    if name == "exact":
        return exact_lowest(problem, k=k, **kw)
    if name == "naive":
        return naive_exact_lowest(problem, k=k, **kw)
    if name == "brute_force":
        return brute_force_lowest(problem, k=k, **kw)
    if name == "sa":
        return simulated_annealing(problem, k=k, seed=seed, **kw)
    return tabu(problem, k=k, seed=seed, **kw)
