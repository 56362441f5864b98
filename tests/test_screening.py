"""The screened pair table: a partial measurement equals the full table on its measured pairs and holds the additive
estimate elsewhere (prefix cache and gated paths); the mask round-trips and old files load as full; the screening
rule's coverage loop (synthetic tables): with couplings ≥ 0 its ground state and k lowest states are brute force's on
the full table, with negative couplings every used state still lies in the candidates; extensions never measure a
pair again; the selection variants run with either table; the counts of the rule."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import cbo_utils.interactions as it
from cbo_utils.calibration import CalibrationSet
from cbo_utils.interactions import (
    PairTable,
    ScreenedTableFile,
    load_pair_table,
    measure_pair_table,
    prefix_cache_work,
    screen_candidates,
    screen_pairs,
    screened_sets,
)
from cbo_utils.model.tiny import build_tiny


def _calib(tok, n=5, T=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(3, len(tok), (T - (i % 3),), generator=g)
        out.append({"input_ids": ids, "loss_mask": torch.ones_like(ids, dtype=torch.bool)})
    return out


# ------------------------------------------------------------------------------------------ (a) partial tables
@pytest.fixture(scope="module", params=["tiny-llama", "tiny-nemotron-h"])
def setup(request):
    model, tok = build_tiny(request.param)
    return model, _calib(tok, n=4)


@pytest.mark.parametrize("prefix_cache", [True, False])
def test_partial_table_equals_full_on_measured_pairs_and_is_additive_elsewhere(setup, prefix_cache):
    model, calib = setup
    full = measure_pair_table(model, calib, batch_size=2, prefix_cache=prefix_cache, progress=False)
    N = full.N
    wanted = [(0, 3), (1, 2), (2, N - 1), (N - 2, 1)]   # (N−2, 1): the order of a pair does not matter
    part = measure_pair_table(model, calib, batch_size=2, prefix_cache=prefix_cache, progress=False, pairs=wanted)
    assert part.meta["prefix_cache"].startswith("on" if prefix_cache else "off")
    expect = np.eye(N, dtype=bool)
    for i, j in wanted:
        expect[i, j] = expect[j, i] = True
    np.testing.assert_array_equal(part.mask, expect)
    np.testing.assert_allclose(part.singles, full.singles, rtol=1e-12, atol=1e-14)
    assert part.base == full.base
    np.testing.assert_allclose(part.pairs[expect], full.pairs[expect], rtol=1e-12, atol=1e-14)
    for i, j in itertools.combinations(range(N), 2):
        if not expect[i, j]:   # the additive estimate, from the singles
            assert part.pairs[i, j] == pytest.approx(full.singles[i] + full.singles[j] - full.base, rel=1e-14)
            assert part.J[i, j] == 0.0
    assert part.meta["sets"] == N + len(wanted) and full.meta["sets"] == N + N * (N - 1) // 2
    batches = 2
    if prefix_cache:   # the counts are the counting function's, and the full table's are today's
        calls, heads = prefix_cache_work(N, wanted)
        assert (part.meta["block_calls"], part.meta["head_passes"]) == (batches * calls, batches * heads)
        assert full.meta["block_calls"] == batches * (N * (N - 1) // 2 + sum(j * (N - 1 - j) for j in range(N)))
    else:
        assert part.meta["block_calls"] == batches * N * (N + len(wanted))
    assert part.meta["head_passes"] == batches * (1 + N + len(wanted))
    assert part.meta["block_calls"] < full.meta["block_calls"]
    # and the measured couplings' sign statistic is over the measured pairs only
    iu = [(i, j) for i, j in itertools.combinations(range(N), 2) if expect[i, j]]
    assert part.meta["negative_couplings"] == pytest.approx(np.mean([full.J[p] < 0 for p in iu]))


def test_extension_measures_only_the_missing_pairs_and_equals_the_full_table(monkeypatch):
    model, tok = build_tiny("tiny-llama")
    calib = _calib(tok, n=4)
    full = measure_pair_table(model, calib, batch_size=2, progress=False)
    first = measure_pair_table(model, calib, batch_size=2, progress=False, pairs=[(0, 1), (2, 4)])
    heads = {"n": 0}
    real = it._Divergence.from_hidden

    def counting(self, hn, head):
        heads["n"] += 1
        return real(self, hn, head)

    monkeypatch.setattr(it._Divergence, "from_hidden", counting)
    ext = measure_pair_table(model, calib, batch_size=2, progress=False, pairs=[(0, 1), (2, 4), (1, 3), (3, 5)],
                             extend=first)
    assert heads["n"] == 2 * 2          # two new pairs × two batches: no single, no measured pair again
    assert ext.meta["runs"][-1]["sets"] == 2 and ext.meta["sets"] == full.N + 4
    assert ext.meta["block_calls"] == first.meta["block_calls"] + 2 * prefix_cache_work(6, [(1, 3), (3, 5)],
                                                                                        singles=False)[0]
    np.testing.assert_array_equal(ext.singles, first.singles)
    m = ext.mask
    np.testing.assert_allclose(ext.pairs[m], full.pairs[m], rtol=1e-12, atol=1e-14)
    heads["n"] = 0
    same = measure_pair_table(model, calib, batch_size=2, progress=False, pairs=[(1, 3)], extend=ext)
    assert heads["n"] == 0 and same.meta["runs"] == ext.meta["runs"]
    with pytest.raises(ValueError, match="another model, calibration or options"):
        measure_pair_table(model, calib[:3], batch_size=2, progress=False, pairs=[(0, 5)], extend=ext)
    with pytest.raises(ValueError, match="two different blocks"):
        measure_pair_table(model, calib, progress=False, pairs=[(2, 2)])


# ----------------------------------------------------------------------------------------- (b) save and load
def test_mask_round_trips_and_an_old_file_loads_as_full(tmp_path):
    rng = np.random.default_rng(0)
    N = 5
    singles = rng.random(N) + 1.0
    pairs = rng.random((N, N)) + 2.0
    pairs = pairs + pairs.T
    mask = np.eye(N, dtype=bool)
    mask[1, 3] = mask[3, 1] = True
    t = PairTable(0.5, singles, pairs, "kl", {"x": 1}, mask)
    assert t.pairs[0, 2] == singles[0] + singles[2] - 0.5 and t.pairs[1, 3] == pairs[1, 3]
    t.save(tmp_path / "t.safetensors")
    back = load_pair_table(tmp_path / "t.safetensors")
    np.testing.assert_array_equal(back.measured, mask)
    np.testing.assert_array_equal(back.pairs, t.pairs)
    assert back.sets == N + 1 and not back.full and back.meta == {"x": 1}
    # a file as written before partial tables: no mask
    np.fill_diagonal(pairs, singles)
    save_file({"singles": torch.from_numpy(singles), "pairs": torch.from_numpy(pairs),
               "base": torch.tensor([0.5], dtype=torch.float64)}, str(tmp_path / "old.safetensors"),
              metadata={"objective": "kl", "meta": "{}"})
    old = load_pair_table(tmp_path / "old.safetensors")
    assert old.measured is None and old.full and old.sets == N + N * (N - 1) // 2
    np.testing.assert_array_equal(old.pairs, pairs)


# --------------------------------------------------------------------------------------- (c) the coverage loop
def _synthetic(N, seed, negative=0.0):
    """A pair table of a known D: h ≥ 0, J ≥ 0, or a share ``negative`` of the couplings < 0."""
    rng = np.random.default_rng(seed)
    h = rng.gamma(2.0, 1.0, N)
    J = rng.gamma(1.0, 0.5, (N, N))
    J = np.triu(J, 1)
    if negative:
        J *= np.where(rng.random((N, N)) < negative, -1.0, 1.0)
    J = J + J.T
    base = 0.1
    pairs = base + h[:, None] + h[None, :] + J
    np.fill_diagonal(pairs, base + h)
    return PairTable(base, base + h, pairs, "kl", {})


class _Oracle:
    """``measure`` for :func:`screen_pairs` on a synthetic table; counts every pair it is asked for."""

    def __init__(self, full: PairTable):
        self.full, self.asked = full, []
        self.table = PairTable(full.base, full.singles.copy(), full.pairs.copy(), "kl", {}, np.eye(full.N, dtype=bool))

    def measure(self, pairs):
        self.asked += [tuple(p) for p in pairs]
        m = self.table.mask
        for i, j in pairs:
            m[i, j] = m[j, i] = True
        self.table = PairTable(self.full.base, self.full.singles.copy(), self.full.pairs.copy(), "kl", {}, m)
        return self.table


def _brute_force(table: PairTable, M, keep=()):
    """Every M-set of the free blocks with its pair energy, lowest first (ties: the lexicographic order)."""
    free = [i for i in range(table.N) if i not in keep]
    sets = list(itertools.combinations(free, M))
    e = [table.base + sum(table.h[i] for i in s) + sum(table.J[i, j] for i, j in itertools.combinations(s, 2))
         for s in sets]
    order = np.argsort(e, kind="stable")
    return [list(sets[i]) for i in order], np.array(e)[order]


def _lowest(k, M, keep=()):
    """``states_used``: the k lowest states of the view, by brute force."""
    def states_used(view):
        return _brute_force(view, M, keep)[0][:k]
    return states_used


@pytest.mark.parametrize("k", [1, 5])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_with_nonnegative_couplings_the_screened_states_are_the_full_tables(seed, k):
    N = 11
    full = _synthetic(N, seed)
    grew = 0
    for M in range(1, N):
        for margin in (0, 2):
            o = _Oracle(full)
            sc = screen_pairs(o.table, M, o.measure, _lowest(k, M), margin=margin)
            sets, e = _brute_force(full, M)
            assert sc.states[0] == sets[0], (M, margin)
            got = [full.base + sum(full.h[i] for i in s) + sum(full.J[i, j] for i, j in itertools.combinations(s, 2))
                   for s in sc.states]
            np.testing.assert_allclose(got, e[:len(got)], rtol=1e-12)   # the k lowest energies of the full table
            assert {b for s in sc.states for b in s} <= set(sc.candidates)
            assert sc.history[0] == sorted(np.argsort(full.singles, kind="stable")[:min(N, M + margin)].tolist())
            assert len(o.asked) == len(set(o.asked)) == len(sc.candidates) * (len(sc.candidates) - 1) // 2
            grew += sc.rounds > 1
    assert grew > 0   # the coverage extension was exercised


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_with_negative_couplings_every_used_state_lies_in_the_candidates_and_is_exact(seed):
    N, keep = 12, (0, 11)
    full = _synthetic(N, seed, negative=0.4)
    for M in (2, 4, 6, 8):
        o = _Oracle(full)
        sc = screen_pairs(o.table, M, o.measure, _lowest(6, M, keep), margin=1, keep=keep)
        C = set(sc.candidates)
        assert not C & set(keep)
        assert {b for s in sc.states for b in s} <= C
        Q, const = sc.table.quadratic_form()
        Qf, cf = full.quadratic_form()
        for s in sc.states:   # inside C the screened energy is the full table's
            x = np.zeros(N)
            x[s] = 1
            assert x @ Q @ x + const == pytest.approx(x @ Qf @ x + cf, rel=1e-12)
        assert len(o.asked) == len(set(o.asked))
        assert all(i in C and j in C for i, j in o.asked)


def test_screen_candidates_are_the_lowest_singles_outside_keep():
    singles = np.array([5.0, 1.0, 3.0, 0.5, 4.0, 2.0])
    assert screen_candidates(singles, 2, 1) == [1, 3, 5]
    assert screen_candidates(singles, 2, 1, keep=[3]) == [1, 2, 5]
    assert screen_candidates(singles, 4, 10) == list(range(6))
    with pytest.raises(ValueError, match="screen_margin"):
        screen_candidates(singles, 2, -1)
    with pytest.raises(ValueError, match="cannot be removed"):
        screen_candidates(singles, 6, 1, keep=[0])


# ------------------------------------------------------------------------------------------- (d) the cached file
def test_the_screened_file_extends_in_place_and_never_measures_a_pair_again(tmp_path, monkeypatch):
    model, tok = build_tiny("tiny-llama")
    calib = CalibrationSet(_calib(tok, n=4), {"source": "test"})
    path = tmp_path / "pairs_kl_4_screened.safetensors"
    real = it.measure_pair_table
    runs = []

    def counting(*a, **k):   # records each call's new measurement run (None: nothing measured)
        t = real(*a, **k)
        prev = len(k["extend"].meta.get("runs", [])) if k.get("extend") is not None else 0
        runs.append(t.meta["runs"][-1] if len(t.meta["runs"]) > prev else None)
        return t

    monkeypatch.setattr(it, "measure_pair_table", counting)
    f = ScreenedTableFile(model, calib, path, screen_margin=1, progress=False)
    assert runs[-1]["singles"] and runs[-1]["pairs"] == 0 and f.table.sets == 6
    f.measure([(0, 1), (1, 2)])
    assert runs[-1]["pairs"] == 2 and not runs[-1]["singles"]
    g = ScreenedTableFile(model, calib, path, screen_margin=1, progress=False)   # loaded, not measured
    assert len(runs) == 2 and g.measured_sets == 0 and g.table.sets == 8
    g.measure([(0, 1), (1, 2), (2, 3)])
    assert runs[-1]["pairs"] == 1 and g.measured_sets == 1
    n = len(runs)
    g.measure([(2, 3), (0, 1)])   # everything there: nothing measured
    assert runs[n:] == [None] and g.measured_sets == 1
    assert load_pair_table(path).meta["seconds"] == pytest.approx(sum(r["seconds"] for r in runs if r), abs=2e-3)
    full = real(model, calib, batch_size=8, progress=False)
    m = g.table.mask
    np.testing.assert_allclose(g.table.pairs[m], full.pairs[m], rtol=1e-12, atol=1e-14)
    h = ScreenedTableFile(model, calib, path, screen_margin=2, progress=False)   # other parameters: measured anew
    assert runs[-1]["singles"] and h.table.sets == 6


# ------------------------------------------------------------------------------------------ (e) the selections
def test_select_cbo_runs_with_either_table_and_refuses_a_bad_setting(tmp_path):
    from cbo_utils.select.cbo import get_variant, select_cbo, variant_quadratic_form

    model, tok = build_tiny("tiny-llama")
    calib = CalibrationSet(_calib(tok, n=6), {"source": "test"})
    kw = {"variant": "cbo-pairs-swap", "cache_dir": tmp_path, "rerank_samples": 2}
    scr = select_cbo(model, calib, 2, pair_table="screened", screen_margin=0, **kw)
    ful = select_cbo(model, calib, 2, pair_table="full", **kw)
    for sel in (scr, ful):
        assert sel.method == "cbo-pairs-swap" and len(sel.removed) == 2 and "moves" in sel.meta["detail"]
    assert scr.meta["gradients_file"] == "pairs_kl_4_screened.safetensors"
    assert ful.meta["gradients_file"] == "pairs_kl_4.safetensors"
    C = [int(b) for b in scr.meta["pair_candidates"].split()]
    ground = [int(b) for b in scr.states.iloc[0]["removed_blocks"].split()]
    assert set(ground) <= set(C) and scr.meta["pair_sets"] == 6 + len(C) * (len(C) - 1) // 2
    # the screened ground state's energy is the full table's energy of that state (exact inside C)
    Qf, cf = variant_quadratic_form(get_variant("cbo-pairs-swap"), tmp_path / ful.meta["gradients_file"])
    x = np.zeros(6)
    x[ground] = 1
    assert float(scr.states.iloc[0]["energy"]) == pytest.approx(x @ Qf @ x + cf, rel=1e-9)
    Qs, cs = variant_quadratic_form(get_variant("cbo-pairs-swap"), tmp_path / scr.meta["gradients_file"], M=2)
    assert x @ Qs @ x + cs == pytest.approx(x @ Qf @ x + cf, rel=1e-9)
    with pytest.raises(ValueError, match="pair_table must be 'screened' .* or 'full'.*got 'partial'"):
        select_cbo(model, calib, 2, pair_table="partial", **kw)
    with pytest.raises(ValueError, match="screen_margin must be a non-negative integer"):
        select_cbo(model, calib, 2, screen_margin=-1, **kw)


# ------------------------------------------------------------------------------------------------ (f) the counts
def test_screened_sets_counts():
    def formula(N, M, margin):
        K = min(N, M + margin)
        return N + K * (K - 1) // 2

    expected = {(30, 4): 58, (30, 8): 96, (30, 15): 201, (32, 4): 60, (32, 8): 98, (32, 12): 152,
                (80, 8): 146, (80, 16): 270, (80, 24): 458, (80, 32): 710}
    for (N, M), n in expected.items():
        assert screened_sets(N, M, 4) == n == formula(N, M, 4)
    assert screened_sets(80, 32, 4) / (80 + 80 * 79 // 2) <= 0.25
    assert screened_sets(10, 8, 4) == 10 + 45   # K capped at N: the full table
    assert screened_sets(30, 4, 0) == 30 + 6
    with pytest.raises(ValueError):
        screened_sets(30, 31, 4)


def test_prefix_cache_work_counts_the_full_and_partial_schedules():
    for N in (1, 2, 5, 30):
        calls, heads = prefix_cache_work(N)
        assert calls == sum(N - 1 - i for i in range(N)) + sum(N - 1 - j for i in range(N) for j in range(i + 1, N))
        assert heads == 1 + N + N * (N - 1) // 2
    assert prefix_cache_work(6, [(1, 4)], singles=False) == (4 - 1 - 1 + 6 - 1 - 4, 2)
    assert prefix_cache_work(6, [], singles=False) == (0, 1)
