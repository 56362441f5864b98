"""Benchmark: vectorised exact enumeration (``exact_lowest``) against the naive reference (``naive_exact_lowest``).

Builds a random PSD matrix ``H = AᵀA/m`` (fixed seed), times both on the ``C(N, M)`` feasible states of
``xᵀHx`` subject to ``Σx = M`` and checks that they agree. When the naive enumeration would take longer than
``--naive-limit`` states it is timed on the first ``--naive-limit`` combinations only and its rate extrapolated (the
output says so); the agreement check then compares the naive best on that subset with the best of ``exact_lowest``
restricted to the same subset (both found by brute force on the subset).

    python benchmarks/bench_enumeration.py --N 32 --M 8 --k 100
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cbo_utils.core.artifacts import format_blocks  # noqa: E402
from cbo_utils.problem.ising import BlockRemovalProblem  # noqa: E402
from cbo_utils.solvers.exact import exact_lowest, naive_exact_lowest  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--N", type=int, default=32, help="number of blocks")
    ap.add_argument("--M", type=int, default=8, help="number of blocks removed")
    ap.add_argument("--k", type=int, default=100, help="how many lowest states to keep")
    ap.add_argument("--naive-limit", type=int, default=2_000_000,
                    help="time the naive enumeration on at most this many states, extrapolating its rate beyond")
    ap.add_argument("--chunk-elems", type=int, default=2 ** 22, help="exact_lowest block size (matrix entries)")
    ap.add_argument("--repeats", type=int, default=3, help="time exact_lowest this many times, report the best")
    ap.add_argument("--device", default="cpu", help="torch device for exact_lowest (cpu, cuda, auto)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--instance", choices=["gaussian", "synthetic"], default="gaussian",
                    help="gaussian: H = AᵀA/m of a random normal A (4N × N); synthetic: the Fisher-like gradients of "
                         "cbo_utils.solvers.instances (2,048 × N, dominant blocks, correlated late blocks)")
    ap.add_argument("--unpruned", action="store_true",
                    help="also time exact_lowest(prune=False) once, side by side (the speed-up of the bounds)")
    args = ap.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    N, M, k = args.N, args.M, args.k
    rng = np.random.default_rng(args.seed)
    if args.instance == "synthetic":
        from cbo_utils.solvers.instances import synthetic_instance

        H = synthetic_instance(N, seed=args.seed).H
    else:
        A = rng.normal(size=(4 * N, N))
        H = A.T @ A / A.shape[0]
    problem = BlockRemovalProblem.from_hessian(H, M)
    total = math.comb(N, M)
    print(f"N={N} M={M} k={k}: C(N,M) = {total:,} states; torch {torch.__version__}, "
          f"threads={torch.get_num_threads()}, cpus={os.cpu_count()}, device={args.device}")

    exact_lowest(problem, k=min(k, 5), chunk_elems=args.chunk_elems, device=args.device, progress=False)  # warm-up
    times = []
    for _ in range(max(1, args.repeats)):
        t0 = time.perf_counter()
        fast = exact_lowest(problem, k=k, chunk_elems=args.chunk_elems, device=args.device, progress=False)
        times.append(time.perf_counter() - t0)
    t_fast = min(times)
    rate_fast = total / t_fast
    info = fast.attrs["solver_info"]
    print(f"exact_lowest : {total:,} states in {t_fast:.3f} s (best of {len(times)}; all: "
          f"{', '.join(f'{t:.3f}' for t in times)}) -> {rate_fast / 1e6:,.1f} M states/s "
          f"[split={info.get('split')}, complement={info.get('complement')}, blocks={info.get('n_blocks')}]")

    print(f"               pruned {info.get('pruned_fraction', 0.0):.1%} of the states by the certified bound "
          f"(root bound {info.get('root_bound', float('nan')):.10g}, optimum {fast['energy'].iloc[0]:.10g})")
    if args.unpruned:
        t0 = time.perf_counter()
        plain = exact_lowest(problem, k=k, chunk_elems=args.chunk_elems, device=args.device, progress=False,
                             prune=False)
        t_plain = time.perf_counter() - t0
        same = list(plain["removed_blocks"]) == list(fast["removed_blocks"]) and np.array_equal(
            plain["energy"].to_numpy(), fast["energy"].to_numpy())
        print(f"unpruned     : {t_plain:.3f} s -> {total / t_plain / 1e6:,.1f} M states/s; pruning speed-up "
              f"{t_plain / t_fast:.2f}x; same {k} lowest states and energies: {same}")
        if not same:
            return 1

    n_naive = min(total, args.naive_limit)
    complete = n_naive == total
    t0 = time.perf_counter()
    naive = naive_exact_lowest(problem, k=k, max_states=n_naive)
    t_naive = time.perf_counter() - t0
    rate_naive = n_naive / t_naive
    if complete:
        print(f"naive        : {total:,} states in {t_naive:.3f} s -> {rate_naive / 1e6:,.3f} M states/s (complete)")
    else:
        print(f"naive        : timed on the first {n_naive:,} of {total:,} combinations only: {t_naive:.3f} s -> "
              f"{rate_naive / 1e6:,.3f} M states/s; EXTRAPOLATED full run ≈ {total / rate_naive:,.1f} s")
    print(f"speed-up     : {rate_fast / rate_naive:,.1f}x (states/s exact_lowest / states/s naive)")

    ok = True
    if complete:
        same_e = np.allclose(fast["energy"].to_numpy(), naive["energy"].to_numpy(), rtol=1e-12, atol=1e-12)
        same_set = fast["removed_blocks"].iloc[0] == naive["removed_blocks"].iloc[0] or bool(fast["tie"].iloc[0])
        ok = same_e and same_set
        print(f"agreement    : ground state {fast['removed_blocks'].iloc[0]!r} E={fast['energy'].iloc[0]:.12g} vs "
              f"naive {naive['removed_blocks'].iloc[0]!r} E={naive['energy'].iloc[0]:.12g}; all {len(fast)} energies "
              f"equal: {same_e} -> {'OK' if ok else 'MISMATCH'}")
    else:
        # The naive run saw the first n_naive combinations (lexicographic order = tuple order). Its best must not
        # beat the global best; and if any of exact_lowest's k best lies in that subset, the subset's best is among
        # them (it is at least as good), so the lowest of those must equal the naive best.
        last = next(itertools.islice(itertools.combinations(range(N), M), n_naive - 1, None))
        sets = [tuple(int(b) for b in s.split()) for s in fast["removed_blocks"]]
        inside = [i for i, s in enumerate(sets) if s <= last]
        e_fast, e_naive = float(fast["energy"].iloc[0]), float(naive["energy"].iloc[0])
        ok = e_fast <= e_naive + 1e-12 * max(1.0, abs(e_naive))
        msg = f"none of the {len(fast)} best lies in the subset"
        if inside:
            e_in = float(fast["energy"].iloc[inside[0]])
            ok = ok and math.isclose(e_in, e_naive, rel_tol=1e-12, abs_tol=1e-12)
            msg = (f"best of exact_lowest inside the subset {fast['removed_blocks'].iloc[inside[0]]!r} "
                   f"E={e_in:.12g} (rank {inside[0]})")
        print(f"agreement    : common subset = first {n_naive:,} combinations (up to {format_blocks(last)!r}): naive "
              f"best {naive['removed_blocks'].iloc[0]!r} E={e_naive:.12g}; {msg}; global best "
              f"{fast['removed_blocks'].iloc[0]!r} E={e_fast:.12g} -> {'OK' if ok else 'MISMATCH'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
