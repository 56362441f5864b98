"""Solvers at scale: enumeration pruned by certified bounds, resumable from its last saved chunk.

Every check compares against an independent computation: the full enumeration (``exact_lowest``, itself tested
against brute force in test_solvers.py) or an uninterrupted run.
"""

from __future__ import annotations

import numpy as np
import pytest

from cbo_utils.problem.ising import BlockRemovalProblem
from cbo_utils.solvers import exact as solvers
from cbo_utils.solvers.exact import exact_lowest


def _fisher(N: int, seed: int, samples: int = 256) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scale = np.exp(rng.normal(0.0, 1.0, N))
    scale[0] *= 8.0
    A = rng.standard_normal((samples, N)) * scale
    A[:, N // 2:] += rng.standard_normal((samples, 1)) * scale[N // 2:] * 0.7  # correlated late blocks
    return A.T @ A / samples


def _indefinite(N: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    B = rng.standard_normal((N, N))
    return (B + B.T) / 2


def _same(a, b):
    assert list(a["removed_blocks"]) == list(b["removed_blocks"])
    np.testing.assert_allclose(a["energy"].to_numpy(), b["energy"].to_numpy(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("N,M,seed,kind", [(22, 5, 0, "fisher"), (24, 8, 1, "fisher"), (20, 13, 2, "fisher"),
                                           (18, 6, 3, "indefinite"), (26, 4, 4, "fisher"), (30, 10, 5, "fisher")])
def test_pruned_enumeration_equals_full_enumeration(N, M, seed, kind):
    """Pruning by certified bounds skips states but never changes the k lowest (incl. the complement path, M > N/2,
    and an indefinite Q), and it does skip work on Fisher-like matrices."""
    H = _fisher(N, seed) if kind == "fisher" else _indefinite(N, seed)
    p = BlockRemovalProblem.from_hessian(H, M)
    ref = exact_lowest(p, k=25, progress=False, prune=False)
    for chunk in (2 ** 22, 512):
        got = exact_lowest(p, k=25, progress=False, chunk_elems=chunk)
        _same(got, ref)
        info = got.attrs["solver_info"]
        assert info["root_bound"] <= ref["energy"].iloc[0] + 1e-12 * abs(ref["energy"].iloc[0])
        assert info["warm_cutoff"] >= ref["energy"].iloc[-1] - 1e-12
    if kind == "fisher" and N >= 24:
        assert info["pruned_fraction"] > 0.1


def test_pruned_enumeration_with_constraints_and_taylor_energy():
    N = 22
    rng = np.random.default_rng(7)
    H = _fisher(N, 7)
    g = rng.normal(0, 0.5, N)
    p = BlockRemovalProblem.from_hessian(H, 7, g=g, energy="taylor", keep=(0, 19), remove=(5,))
    _same(exact_lowest(p, k=15, progress=False), exact_lowest(p, k=15, progress=False, prune=False))


def test_interrupted_enumeration_resumes_from_its_last_chunk(tmp_path, monkeypatch):
    p = BlockRemovalProblem.from_hessian(_fisher(28, 5), 6)
    ref = exact_lowest(p, k=30, chunk_elems=4096, progress=False, prune=False)
    ck = tmp_path / "enum.safetensors"
    calls = {"n": 0}
    original = solvers._Side.row_operand

    def flaky(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 40:
            raise KeyboardInterrupt
        return original(self, *a, **kw)

    monkeypatch.setattr(solvers._Side, "row_operand", flaky)
    with pytest.raises(KeyboardInterrupt):
        exact_lowest(p, k=30, chunk_elems=4096, checkpoint=ck, checkpoint_every_s=0.0, progress=False, prune=False)
    assert ck.is_file()
    monkeypatch.setattr(solvers._Side, "row_operand", original)
    got = exact_lowest(p, k=30, chunk_elems=4096, checkpoint=ck, progress=False, prune=False)
    assert got.attrs["solver_info"]["resumed_chunks"] == 39
    _same(got, ref)
    assert not ck.exists()
    # a checkpoint of another problem is refused, not silently mixed in
    monkeypatch.setattr(solvers._Side, "row_operand", flaky)
    calls["n"] = 0
    with pytest.raises(KeyboardInterrupt):
        exact_lowest(p, k=30, chunk_elems=4096, checkpoint=ck, checkpoint_every_s=0.0, progress=False, prune=False)
    monkeypatch.setattr(solvers._Side, "row_operand", original)
    other = BlockRemovalProblem.from_hessian(_fisher(28, 6), 6)
    with pytest.raises(ValueError, match="another problem"):
        exact_lowest(other, k=30, chunk_elems=4096, checkpoint=ck, progress=False, prune=False)


def test_one_sided_pairs_are_enumerated_by_splitting_again():
    """All M blocks in one half (a one-column product) are enumerated as a sub-problem, split again — here with a
    complement inside the sub-problem (9 of 14) — and the k lowest equal the naive enumeration's."""
    p = BlockRemovalProblem.from_hessian(_fisher(28, 8), 9)
    ref = solvers.naive_exact_lowest(p, k=30)
    for prune in (False, True):
        _same(exact_lowest(p, k=30, chunk_elems=256, progress=False, prune=prune), ref)
