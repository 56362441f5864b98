"""Training-free repair of removed runs (cbo_utils.prune.repair), against independent computations: the ridge fit
against a direct solve of the normal equations, the fused model against the unfused one with the maps applied by
hooks, the error it reports against a recomputation."""

import numpy as np
import pytest
import torch

from cbo_utils.calibration import CalibrationSet, _sample
from cbo_utils.model.blocks import without_blocks
from cbo_utils.model.tiny import build_tiny
from cbo_utils.prune import repair as rp


def _calib(tok, n=8, T=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = [_sample(torch.randint(3, len(tok), (T - (i % 3),), generator=g).tolist(), [True] * (T - (i % 3)))
           for i in range(n)]
    return CalibrationSet(out, {"source": "random-test"})


def test_removed_runs_are_maximal_with_the_block_before():
    assert rp.removed_runs([5, 2, 3, 9], 10) == [(1, [2, 3]), (4, [5]), (8, [9])]
    assert rp.removed_runs([0, 1, 4], 6) == [(None, [0, 1]), (3, [4])]
    with pytest.raises(ValueError, match="out of range"):
        rp.removed_runs([6], 6)


@pytest.mark.parametrize("diagonal", [False, True])
def test_ridge_solve_matches_the_normal_equations(diagonal):
    g = np.random.default_rng(0)
    y, d = g.normal(size=(200, 6)), g.normal(size=(200, 6))
    lam = 0.1
    T = rp.solve_ridge(torch.tensor(y), torch.tensor(d), lam, diagonal=diagonal).numpy()
    G = y.T @ y
    L = lam * np.mean(np.diag(G))
    if diagonal:   # argmin over t of Σ_j ‖y_j t_j − d_j‖² + L (t_j − 1)²
        ref = ((y * d).sum(0) + L) / ((y * y).sum(0) + L)
    else:          # argmin over T of ‖y T − d‖² + L ‖T − I‖²: (G + L I) T = yᵀd + L I
        ref = np.linalg.solve(G + L * np.eye(6), y.T @ d + L * np.eye(6))
    np.testing.assert_allclose(T, ref, rtol=1e-10, atol=1e-12)
    big = rp.solve_ridge(torch.tensor(y), torch.tensor(d), 1e12, diagonal=diagonal).numpy()
    np.testing.assert_allclose(big, np.ones(6) if diagonal else np.eye(6), atol=1e-8)   # λ → ∞: plain removal


@pytest.mark.parametrize("fit", ["lstsq", "diag", "cosine", "kl"])
def test_fused_model_equals_the_hooked_unfused_one(fit):
    """The repaired checkpoint (maps fused into the down projections, blocks removed) computes what the plain
    pruned model computes with every map applied to its block's MLP output by a hook."""
    model, tok = build_tiny("tiny-llama", num_layers=8)
    calib = _calib(tok)
    removed = [2, 3, 6]
    opts = {"steps": 5 if fit == "kl" else 20} if fit in ("cosine", "kl") else None
    rep, records, maps = rp.repair(model, removed, calib, fit=fit, options=opts)
    assert [r.run for r in records] == [[2, 3], [6]] and all(r.repaired for r in records)
    assert sorted(maps) == [1, 5] and len(rep.model.layers) == 5
    ids = torch.randint(3, len(tok), (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = rep(input_ids=ids).logits
        with rp.mapped_branch(model, maps), without_blocks(model, removed):
            ref = model(input_ids=ids).logits
        plain = None
        with without_blocks(model, removed):
            plain = model(input_ids=ids).logits
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(got, plain, atol=1e-3)        # the repair changed something
    assert rep.config.cbo_removed_blocks == removed and rep.config.cbo_repair[0]["p"] == 1


def test_least_squares_never_increases_the_error_it_fits_and_reports_it_right():
    """At ridge 0 the fitted map's error on its own windows is at most the plain removal's (T = I is a candidate);
    the recorded errors equal a recomputation from fresh activations."""
    model, tok = build_tiny("tiny-llama", num_layers=6)
    calib = _calib(tok)
    rep, records, maps = rp.repair(model, [3], calib, heldout=0.0, options={"ridges": (0.0,)})
    r = records[0]
    assert r.mse_after <= r.mse_before * (1 + 1e-9) and r.tokens == sum(len(s["input_ids"]) for s in calib)
    from cbo_utils.model.loss import make_batches
    acts = rp.collect(model, model, 2, 3, make_batches(model, calib, 8), [])
    assert r.mse_before == pytest.approx(rp.mse(acts, None), rel=1e-9)
    assert r.mse_after == pytest.approx(rp.mse(acts, maps[2]), rel=1e-9)


def test_a_run_without_a_block_before_it_is_refused_with_its_reason():
    model, tok = build_tiny("tiny-llama", num_layers=6)
    calib = _calib(tok)
    rep, records, maps = rp.repair(model, [0, 1, 4], calib)
    assert [r.repaired for r in records] == [False, True] and "starts at block 0" in records[0].reason
    assert sorted(maps) == [3] and len(rep.model.layers) == 3
    with pytest.raises(rp.RepairError, match="starts at block 0"):
        rp.repair(model, [0, 1], calib, strict=True)


@pytest.mark.parametrize("name, what", [("tiny-gemma2", "ends in a norm"), ("tiny-mixtral", "mixture of experts")])
def test_a_branch_it_cannot_fuse_into_exactly_is_refused(name, what):
    model, tok = build_tiny(name)
    with pytest.raises(rp.RepairError, match=what):
        rp.repair(model, [3], _calib(tok), strict=True)
    rep, records, _ = rp.repair(model, [3], _calib(tok))
    assert not records[0].repaired and what in records[0].reason


def test_the_original_model_is_untouched():
    model, tok = build_tiny("tiny-llama", num_layers=6)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rp.repair(model, [2], _calib(tok))
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert len(model.model.layers) == 6


def test_the_output_fit_keeps_its_best_held_out_kl_and_reports_it_right():
    """fit = kl: the held-out KL it reports for its map is the KL(dense ‖ repaired) recomputed on the held-out windows
    from the saved model, and never above the least-squares start's."""
    from cbo_utils.model.loss import make_batches
    from cbo_utils.prune.distill import kd_loss

    model, tok = build_tiny("tiny-llama", num_layers=6)
    calib = _calib(tok, n=8)
    rep, records, _ = rp.repair(model, [3], calib, fit="kl", heldout=0.25, options={"steps": 10, "lr": 1e-2})
    info = records[0].info
    assert info["heldout_kl"] <= info["heldout_kl_start"] + 1e-12
    held = make_batches(model, CalibrationSet(list(calib)[6:], {}), 8)
    tot, n = 0.0, 0
    with torch.no_grad():
        for b in held:
            t = model(input_ids=b.ids, attention_mask=b.attention_mask).logits.half().float()
            s = rep(input_ids=b.ids, attention_mask=b.attention_mask).logits
            tot += float(kd_loss(s, t, b.valid, reduction="sum"))
            n += int(b.valid.sum())
    assert tot / n == pytest.approx(info["heldout_kl"], rel=1e-4, abs=1e-7)
