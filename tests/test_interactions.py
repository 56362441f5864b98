"""The measured pair table: the prefix-cache path equals gated forwards (α = 0 on the set), the energy equals the
measured D on every set of ≤ 2 blocks, KL(dense ‖ pruned) matches a hand computation, resume equals a full run."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cbo_utils.interactions import (
    divergence_of_sets,
    load_pair_table,
    measure_pair_table,
)
from cbo_utils.model.blocks import Gates
from cbo_utils.model.tiny import build_tiny
from cbo_utils.problem.ising import energies


def _calib(tok, n=5, T=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(3, len(tok), (T - (i % 3),), generator=g)
        out.append({"input_ids": ids, "loss_mask": torch.ones_like(ids, dtype=torch.bool)})
    return out


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-nemotron-h"])
def setup(request):
    model, tok = build_tiny(request.param)
    return model, _calib(tok)


@pytest.mark.parametrize("objective", ["kl", "ce"])
def test_prefix_cache_equals_gated_forwards(setup, objective):
    model, calib = setup
    fast = measure_pair_table(model, calib, objective=objective, batch_size=2, progress=False)
    slow = measure_pair_table(model, calib, objective=objective, batch_size=2, prefix_cache=False, progress=False)
    assert fast.meta["prefix_cache"] == "on" and slow.meta["prefix_cache"].startswith("off")
    np.testing.assert_allclose(fast.singles, slow.singles, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(fast.pairs, slow.pairs, rtol=1e-5, atol=1e-7)
    assert fast.meta["block_calls"] < slow.meta["block_calls"] / 2
    if objective == "kl":
        assert fast.base == 0.0 and (fast.singles > 0).all()


def test_energy_equals_measured_divergence_on_every_small_set(setup):
    model, calib = setup
    t = measure_pair_table(model, calib, batch_size=3, progress=False)
    Q, const = t.quadratic_form()
    N = t.N
    sets = [[i] for i in range(N)] + [list(p) for p in itertools.combinations(range(N), 2)]
    X = np.zeros((len(sets), N))
    for r, s in enumerate(sets):
        X[r, s] = 1
    np.testing.assert_allclose(energies(Q, X, const), [t.divergence(s) for s in sets], rtol=1e-12, atol=1e-14)
    # and an independent measurement of the same sets (gated forwards, other batching)
    np.testing.assert_allclose(divergence_of_sets(model, calib, sets, batch_size=5), [t.divergence(s) for s in sets],
                               rtol=1e-5, atol=1e-7)


def test_kl_matches_a_hand_computation():
    model, tok = build_tiny("tiny-llama")
    calib = _calib(tok, n=2, T=9)
    t = measure_pair_table(model, calib, batch_size=1, progress=False)
    tot, cnt = 0.0, 0
    with torch.no_grad(), Gates(model) as g:
        for s in calib:
            ids = s["input_ids"][None]
            p = F.log_softmax(model(ids).logits[0, :-1].double(), -1)
            with g.removed([1, 4]):
                q = F.log_softmax(model(ids).logits[0, :-1].double(), -1)
            tot += float((p.exp() * (p - q)).sum())
            cnt += ids.shape[1] - 1
    assert t.divergence([1, 4]) == pytest.approx(tot / cnt, abs=1e-6)   # float32 log-sum-exp: ~1e-7 per token


def test_interrupted_measurement_resumes_and_round_trips(tmp_path, monkeypatch):
    model, tok = build_tiny("tiny-llama")
    calib = _calib(tok, n=6)
    full = measure_pair_table(model, calib, batch_size=2, progress=False)
    ckpt = tmp_path / "pairs.partial"
    import cbo_utils.interactions as it

    real = it._pairs_from_cache
    calls = {"n": 0}

    def dies_on_third(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(it, "_pairs_from_cache", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        measure_pair_table(model, calib, batch_size=2, progress=False, checkpoint=ckpt)
    assert ckpt.is_file()
    monkeypatch.setattr(it, "_pairs_from_cache", real)
    resumed = measure_pair_table(model, calib, batch_size=2, progress=False, checkpoint=ckpt)
    assert resumed.meta["resumed_from_batch"] == 2 and not ckpt.exists()
    np.testing.assert_allclose(resumed.pairs, full.pairs, rtol=1e-12)
    resumed.save(tmp_path / "pairs.safetensors")
    back = load_pair_table(tmp_path / "pairs.safetensors")
    np.testing.assert_array_equal(back.pairs, resumed.pairs)
    assert back.objective == "kl" and back.meta["blocks"] == full.N


def test_pair_variants_return_selections_and_refit_measures_its_pick(tmp_path):
    """cbo-pairs: the ground state of the measured energy (exact on M ≤ 2, so it is the best pair by measured KL);
    cbo-pairs-refit: its pick is the lowest measured D among the sets it measured, each measured independently;
    cbo-pairs-rerank: the pick has the lowest held-out KL among the K lowest states."""
    import itertools

    from cbo_utils.calibration import CalibrationSet
    from cbo_utils.interactions import divergence_of_sets
    from cbo_utils.select.cbo import refit_pair_energy, select_cbo

    model, tok = build_tiny("tiny-llama")
    calib = CalibrationSet(_calib(tok, n=6), {"source": "test"})
    sel = select_cbo(model, calib, 2, variant="cbo-pairs", cache_dir=tmp_path, rerank_samples=2)
    pairs = [list(p) for p in itertools.combinations(range(6), 2)]
    fit = calib.samples[:4]   # every pair variant measures on the fit windows (the last rerank_samples held out)
    d = divergence_of_sets(model, fit, pairs)
    assert sel.removed == pairs[int(np.argmin(d))] and sel.method == "cbo-pairs"
    assert sel.energy == pytest.approx(d.min(), rel=1e-5)
    again = select_cbo(model, calib, 2, variant="cbo-pairs", cache_dir=tmp_path, rerank_samples=2)   # cached
    assert again.removed == sel.removed and list(tmp_path.glob("pairs_kl_4_screened.safetensors*"))   # the default
    from cbo_utils.interactions import measure_pair_table

    table = measure_pair_table(model, calib, progress=False)
    r = refit_pair_energy(model, calib, table, 3, rounds=2, per_round=4)
    assert len(r["measured"]) == 8 and r["best_divergence"] == min(r["measured"].values())
    check = divergence_of_sets(model, calib, [r["best"]])[0]
    assert check == pytest.approx(r["best_divergence"], rel=1e-9)
    rr = select_cbo(model, calib, 3, variant="cbo-pairs-rerank", cache_dir=tmp_path, rerank_samples=2)
    assert rr.method == "cbo-pairs-rerank" and len(rr.removed) == 3 and "picked energy rank" in rr.meta["detail"]


def test_the_pair_energy_is_refused_where_gradients_are_expected():
    from cbo_utils.problem.ising import BlockRemovalProblem

    with pytest.raises(ValueError, match="measured pair table"):
        BlockRemovalProblem.from_hessian(np.eye(4), 2, energy="pairs")


@pytest.mark.parametrize("bias", [False, True])
def test_head_logsumexp_and_nll_equal_the_full_logits(bias):
    from cbo_utils.model.loss import head_logsumexp, head_nll

    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(16, 5003, bias=bias)   # 5003: the last vocabulary chunk is a partial one
    hn = torch.randn(3, 7, 16, generator=g) * 3
    target = torch.randint(0, 5003, (3, 7), generator=g)
    with torch.no_grad():
        z = head(hn).double()
        lse = head_logsumexp(hn, head, chunk=1000)
        nll = head_nll(hn, head, target)
    torch.testing.assert_close(lse, torch.logsumexp(z, -1), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(nll, F.cross_entropy(z.transpose(1, 2), target, reduction="none"), rtol=1e-5,
                               atol=1e-5)


def test_swap_search_ends_in_a_measured_local_minimum():
    """With every swap measured per round, the swap search stops where no swap lowers the measured KL (checked by
    measuring every swap of its answer independently) and never ends above its start."""
    from cbo_utils.interactions import PairTable
    from cbo_utils.problem.ising import BlockRemovalProblem
    from cbo_utils.select.cbo import swap_search

    model, tok = build_tiny("tiny-llama")
    calib = _calib(tok, n=4)
    table = measure_pair_table(model, calib, progress=False)
    Q, const = PairTable(table.base, table.singles, table.pairs).quadratic_form()
    prob = BlockRemovalProblem(Q, 3, const=const, energy="pairs", keep=(0,))
    start = [3, 4, 5]
    r = swap_search(model, calib, prob, start, rounds=20, candidates=100)
    best = r["best"]
    assert 0 not in best and len(best) == 3
    d0 = divergence_of_sets(model, calib, [start])[0]
    assert r["best_divergence"] <= d0 + 1e-12
    swaps = [sorted([b for b in best if b != o] + [i]) for o in best for i in range(1, 6) if i not in best]
    d = divergence_of_sets(model, calib, swaps)
    assert d.min() >= r["best_divergence"] - 1e-12
    assert divergence_of_sets(model, calib, [best])[0] == pytest.approx(r["best_divergence"], rel=1e-9)


def test_measured_diagonal_variant_uses_the_fisher_couplings_and_measured_singles(tmp_path):
    from cbo_utils.calibration import CalibrationSet
    from cbo_utils.gradients import load_gradients
    from cbo_utils.select.cbo import get_variant, measured_diagonal_form, select_cbo, variant_quadratic_form

    model, tok = build_tiny("tiny-llama")
    calib = CalibrationSet(_calib(tok, n=6), {"source": "test"})
    sel = select_cbo(model, calib, 2, variant="cbo-sd-hdiag-rerank", cache_dir=tmp_path, rerank_samples=2)
    assert sel.method == "cbo-sd-hdiag-rerank" and len(sel.removed) == 2
    gfile, pfile = sel.meta["gradients_file"].split(" ")
    H, table = load_gradients(tmp_path / gfile).H.numpy(), load_pair_table(tmp_path / pfile)
    Q = measured_diagonal_form(H, table)
    np.testing.assert_allclose(np.diag(Q), table.singles - table.base, rtol=0, atol=0)
    off = ~np.eye(table.N, dtype=bool)
    np.testing.assert_allclose(Q[off], H[off] / 2, rtol=0, atol=0)
    Q2, _ = variant_quadratic_form(get_variant("cbo-sd-hdiag-rerank"), tmp_path / sel.meta["gradients_file"])
    np.testing.assert_array_equal(Q2, Q)
    sw = select_cbo(model, calib, 2, variant="cbo-pairs-swap", cache_dir=tmp_path, rerank_samples=2)
    assert sw.method == "cbo-pairs-swap" and "moves" in sw.meta["detail"]
