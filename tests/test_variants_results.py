"""CBO variants (energies, protection, re-ranking, iterative), Spearman, and the result tables."""

import copy

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import varied_calibration

from cbo_utils.core.tables import add_evaluations, add_selections
from cbo_utils.evaluate.efficiency import measure_checkpoint
from cbo_utils.gradients import collect_gate_gradients, sample_loss
from cbo_utils.model.blocks import remove_blocks
from cbo_utils.model.tiny import build_tiny
from cbo_utils.select.cbo import (
    calibration_scores,
    cbo_states,
    iterative_cbo,
    random_feasible_sets,
    rerank_states,
    spearman,
)
from cbo_utils.solvers.states import states_blocks


@pytest.fixture(scope="module")
def llama():
    model, tok = build_tiny("tiny-llama")
    calib = varied_calibration(tok, n=4)
    return model, tok, calib, collect_gate_gradients(model, calib, progress=False, exact_hessian_samples=1)


def test_energy_variants_and_protection(llama):
    model, tok, calib, grads = llama
    paper = cbo_states(grads, 2, k=5)
    taylor = cbo_states(grads, 2, k=5, energy="taylor")
    exact = cbo_states(grads, 2, k=5, hessian="exact")
    prot = cbo_states(grads, 2, k=15, protect_ends=True)
    assert paper.attrs["variant"] == "cbo-paper" and taylor.attrs["variant"] == "cbo-taylor"
    assert exact.attrs["variant"] == "cbo-paper-exactH" and prot.attrs["variant"] == "cbo-paper-protect"
    # the Taylor ground state really minimises −gᵀx + ½xᵀHx over all pairs
    g, H = grads.g.numpy(), grads.H.numpy()
    best = min(((i, j) for i in range(6) for j in range(i + 1, 6)),
               key=lambda s: -g[list(s)].sum() + 0.5 * H[np.ix_(s, s)].sum())
    assert states_blocks(taylor)[0] == list(best)
    assert all(0 not in s and 5 not in s for s in states_blocks(prot))
    with pytest.raises(ValueError, match="unknown energy"):
        cbo_states(grads, 2, energy="magic")


def test_calibration_scores_equal_direct_losses(llama):
    model, tok, calib, grads = llama
    sets = [[1], [2, 4]]
    ce = calibration_scores(model, sets, calib, "ce")
    for s, got in zip(sets, ce):
        pruned = remove_blocks(copy.deepcopy(model), s)
        with torch.no_grad():
            tot = sum(float(sample_loss(pruned, x["input_ids"])[0]) * (x["input_ids"].numel() - 1)
                      for x in calib)
        assert got == pytest.approx(tot / sum(x["input_ids"].numel() - 1 for x in calib), rel=1e-5)
    kl = calibration_scores(model, [[], [1]], calib, "kl")
    assert abs(kl[0]) < 1e-2 and kl[1] > kl[0]  # no removal → KL ≈ 0 (bf16 cache of the dense log-probs)


def test_rerank_picks_the_lowest_measured_loss(llama):
    model, tok, calib, grads = llama
    states = cbo_states(grads, 2, k=6)
    held = varied_calibration(tok, n=3, seed=7)
    rr = rerank_states(model, states, held, K=4, progress=False)
    assert len(rr.table) == 4 and list(rr.table["rank"]) == [0, 1, 2, 3]
    best_row = rr.table.loc[rr.table["score"].idxmin()]
    assert rr.best == [int(b) for b in best_row["removed_blocks"].split()]
    assert sorted(rr.table["rerank_position"]) == [0, 1, 2, 3]


def test_iterative_cbo_reaches_M_with_original_indices(llama):
    model, tok, calib, grads = llama
    res = iterative_cbo(model, calib, M=3, step=2)
    assert len(res.removed) == 3 and len(set(res.removed)) == 3 and len(res.steps) == 2
    assert set(res.steps[0]["added"]) <= set(res.removed)
    # step 1 equals the one-shot ground state for 2 blocks
    assert sorted(res.steps[0]["added"]) == states_blocks(cbo_states(grads, 2, k=1))[0]
    # the second step's gradients were taken on the shrunken model
    g2 = collect_gate_gradients(model, calib, removed=res.steps[0]["added"], progress=False)
    assert g2.meta["removed_blocks"] == sorted(res.steps[0]["added"])
    assert not torch.allclose(g2.A, grads.A)


def test_spearman_against_pandas_and_closed_forms():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=50), rng.normal(size=50)
    b[::5] = b[1]  # ties
    assert spearman(a, b) == pytest.approx(pd.Series(a).corr(pd.Series(b), method="spearman"), abs=1e-12)
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert np.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_random_feasible_sets():
    s = random_feasible_sets(10, 3, 50, seed=1, keep=[0, 9])
    assert len(s) == 50 and len({tuple(x) for x in s}) == 50
    assert all(len(x) == 3 and 0 not in x and 9 not in x for x in s)
    assert s == random_feasible_sets(10, 3, 50, seed=1, keep=[0, 9])
    assert len(random_feasible_sets(5, 2, 100)) == 10  # only C(5,2) exist


def test_result_tables_upsert(tmp_path):
    row = {"model": "m", "method": "bi", "M": 4, "removed_blocks": "1 2 3 4", "energy": None,
           "selection_seconds": 1.0, "calibration_tokens": 100, "seed": 0}
    add_selections(tmp_path, [row])
    df = add_selections(tmp_path, [{**row, "removed_blocks": "1 2 3 5"}, {**row, "method": "sleb"}])
    assert len(df) == 2 and df.loc[df.method == "bi", "removed_blocks"].item() == "1 2 3 5"
    ev = {"model": "m", "method": "bi", "M": 4, "state": 0, "task": "arc_easy", "metric": "acc", "value": 0.5,
          "stderr": 0.03, "n": 200, "limit": 200, "retrained": False, "lm_eval_version": "0.4.13"}
    add_evaluations(tmp_path, [ev, {**ev, "metric": "acc_norm"}])
    df = pd.read_csv(tmp_path / "evaluations.csv")
    assert len(df) == 2 and list(df.columns[:3]) == ["model", "method", "M"]
    with pytest.raises(ValueError, match="lack the columns"):
        add_evaluations(tmp_path, [{"model": "m"}])


def test_measure_checkpoint_in_a_fresh_process(tmp_path):
    model, tok = build_tiny("tiny-llama")
    model.save_pretrained(tmp_path / "dense")
    small = remove_blocks(copy.deepcopy(model), [1, 2, 3])
    small.save_pretrained(tmp_path / "small")
    ballast = np.ones(2**28)  # 2 GiB in THIS process: the fresh process must not report it
    d = measure_checkpoint(tmp_path / "dense", prompt_len=16, gen_len=4, threads=1)
    del ballast
    assert d["peak_rss_gb"] < 1.5
    s = measure_checkpoint(tmp_path / "small", prompt_len=16, gen_len=4, threads=1)
    assert d["parameters"] == sum(p.numel() for p in model.parameters())
    assert s["parameters"] < d["parameters"] and s["generate_tokens_per_s"] > 0 and s["peak_rss_gb"] > 0
