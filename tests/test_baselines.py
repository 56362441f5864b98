"""Baselines against independent computations (output_hidden_states, brute-force gated losses, autograd, the
stated merge formula) on the tiny models."""

import copy
import csv
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import varied_calibration

from cbo_utils.calibration import CalibrationSet, _sample
from cbo_utils.evaluate.perplexity import perplexity
from cbo_utils.gradients import sample_loss
from cbo_utils.model import loss
from cbo_utils.model.blocks import Gates, get_adapter, remove_blocks
from cbo_utils.model.tiny import build_tiny, tiny_llama
from cbo_utils.select import baselines as B
from cbo_utils.select import methods, selection, swm


def _with_final_norm_weights(model):
    """Random per-channel final-norm weights (freshly initialised ones are all 1, which leaves cosines unchanged, so
    hidden_states[-1] could not be told apart from the last block's output)."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        model.model.norm.weight.copy_(torch.rand(model.model.norm.weight.shape, generator=g) * 2 + 0.05)
    return model


@pytest.fixture(scope="module")
def llama():
    model, tok = build_tiny("tiny-llama")
    return _with_final_norm_weights(model), tok, varied_calibration(tok, n=4)


@pytest.fixture(scope="module")
def qwen3():
    model, tok = build_tiny("tiny-qwen3")
    return _with_final_norm_weights(model), tok, varied_calibration(tok, n=4)


@pytest.fixture(scope="module")
def nemotron():
    model, tok = build_tiny("tiny-nemotron-h")
    return model, tok, varied_calibration(tok, n=2)


def _n(model):
    return len(get_adapter(model).layers(model))


def _equal_length_calibration(tok, n=3, T=20, seed=1):
    g = torch.Generator().manual_seed(seed)
    return CalibrationSet([_sample(torch.randint(3, len(tok), (T,), generator=g).tolist()) for _ in range(n)],
                          {"source": "random-equal"})


# ------------------------------------------------------------------------------------------- hook statistics
@pytest.mark.parametrize("which", ["llama", "qwen3"])
def test_bi_and_norm_ratio_match_hidden_states_except_after_final_norm(which, request):
    model, _, calib = request.getfixturevalue(which)
    N = _n(model)
    cos_sum, ratio_sum, last_cos_sum, last_ratio_sum, tokens = torch.zeros(N), torch.zeros(N), 0.0, 0.0, 0
    with torch.no_grad():
        for s in calib:
            hs = model(s["input_ids"][None], output_hidden_states=True).hidden_states  # hs[i] = input of block i
            assert len(hs) == N + 1
            for i in range(N - 1):
                x, y = hs[i][0].double(), hs[i + 1][0].double()
                cos_sum[i] += F.cosine_similarity(x, y, dim=-1).sum()
                ratio_sum[i] += (y.norm(dim=-1) / x.norm(dim=-1)).sum()
            x, y = hs[N - 1][0].double(), hs[N][0].double()  # hs[N] = final norm(output of the last block)
            last_cos_sum += float(F.cosine_similarity(x, y, dim=-1).sum())
            last_ratio_sum += float((y.norm(dim=-1) / x.norm(dim=-1)).sum())
            tokens += s["input_ids"].numel()
    stats = B.block_statistics(model, calib)
    assert stats["tokens"] == tokens
    torch.testing.assert_close(stats["bi"][:N - 1].float(), (1 - cos_sum / tokens)[:N - 1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stats["norm_ratio"][:N - 1].float(), (ratio_sum / tokens)[:N - 1], atol=1e-5,
                               rtol=1e-5)
    # hidden_states[-1] is after the final norm: the hook score of the last block must differ from it
    assert abs(float(stats["bi"][N - 1]) - (1 - last_cos_sum / tokens)) > 1e-3
    assert abs(float(stats["norm_ratio"][N - 1]) - last_ratio_sum / tokens) > 1e-2
    sel = B.block_influence(model, calib, 2)
    assert sel.removed == sorted(torch.argsort(stats["bi"], stable=True)[:2].tolist())
    assert sel.scores == pytest.approx(stats["bi"].tolist())
    nr = B.norm_ratio(model, calib, 2)
    assert nr.removed == sorted(torch.argsort(stats["norm_ratio"], stable=True)[:2].tolist())
    assert sel.seconds > 0 and sel.calibration["sha256"] == calib.sha256


@pytest.mark.parametrize("which", ["llama", "qwen3"])
def test_padding_never_counts(which, request):
    model, _, calib = request.getfixturevalue(which)  # samples of lengths 12, 17, 22, 27: batches are padded
    one, padded = B.block_statistics(model, calib, batch_size=1), B.block_statistics(model, calib, batch_size=3)
    assert one["tokens"] == padded["tokens"] == calib.tokens
    for key in ("bi", "norm_ratio", "last_states"):
        torch.testing.assert_close(padded[key], one[key], atol=1e-5, rtol=1e-4)
    assert loss.calibration_nll(model, calib, [2], batch_size=4) == pytest.approx(
        loss.calibration_nll(model, calib, [2]), rel=1e-5)
    s1, s4 = B.sleb(model, calib, 1, batch_size=1), B.sleb(model, calib, 1, batch_size=4)
    assert s1.removed == s4.removed
    assert [x for x in s4.scores if x is not None] == pytest.approx([x for x in s1.scores if x is not None], rel=1e-5)


# ------------------------------------------------------------------------------------------------------ SLEB
def _gated_nll(model, calib, removed):
    """Independent token-weighted calibration NLL of the gated model (one sample at a time)."""
    total, count = 0.0, 0
    with torch.no_grad(), Gates(model) as g, g.removed(removed):
        for s in calib:
            ids = s["input_ids"][None]
            logits = model(ids).logits[0, :-1].double()
            total += float(F.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            count += ids.shape[1] - 1
    return total / count


def test_sleb_first_step_is_brute_force_and_prefix_cache_equals_plain(llama):
    model, _, calib = llama
    N = _n(model)
    brute = {i: _gated_nll(model, calib, [i]) for i in range(1, N - 1)}
    cached = B.sleb(model, calib, 3)
    plain = B.sleb(model, calib, 3, prefix_cache=False)
    assert cached.meta["prefix_cache"] == "on" and plain.meta["prefix_cache"] == "off (asked)"
    assert cached.scores[0] is None and cached.scores[-1] is None
    assert [cached.scores[i] for i in range(1, N - 1)] == pytest.approx([brute[i] for i in range(1, N - 1)],
                                                                         rel=1e-6)
    assert cached.order[0] == min(brute, key=lambda i: (brute[i], i))
    assert cached.order == plain.order and cached.removed == plain.removed
    assert cached.meta["step_nll"] == pytest.approx(plain.meta["step_nll"], rel=1e-6)
    assert cached.meta["block_calls"] < plain.meta["block_calls"]
    assert 0 not in cached.removed and N - 1 not in cached.removed and len(cached.removed) == 3
    # later steps are greedy on the gated model
    r1 = cached.order[0]
    step2 = {i: _gated_nll(model, calib, [r1, i]) for i in range(1, N - 1) if i != r1}
    assert cached.order[1] == min(step2, key=lambda i: (step2[i], i))
    assert cached.meta["step_nll"][1] == pytest.approx(step2[cached.order[1]], rel=1e-6)


def test_sleb_prefix_cache_on_hybrid_nemotron(nemotron):
    model, _, calib = nemotron
    cached, plain = B.sleb(model, calib, 2), B.sleb(model, calib, 2, prefix_cache=False)
    assert cached.meta["prefix_cache"] == "on"
    assert cached.order == plain.order
    assert cached.meta["step_nll"] == pytest.approx(plain.meta["step_nll"], rel=1e-5)


# --------------------------------------------------------------------------------------------- iterative BI
def test_iterative_bi_relative_indices_and_shrunken_model(llama):
    model, _, calib = llama
    N = _n(model)
    sel = B.block_influence(model, calib, 3, iterative=True)
    assert sel.method == "block_influence_iterative" and len(sel.relative) == 3
    kept, order = list(range(N)), []
    for r in sel.relative:  # relative indices map back to the original ones
        order.append(kept.pop(r))
    assert order == sel.order and sorted(order) == sel.removed
    # each step equals the lowest BI of the physically shrunken model
    shrunk = copy.deepcopy(model)
    for r in sel.relative:
        bi = B.block_statistics(shrunk, calib)["bi"]
        assert int(torch.argmin(bi)) == r
        remove_blocks(shrunk, [r])
    one_shot = B.block_influence(model, calib, 3)
    assert sel.scores == pytest.approx(one_shot.scores)


# ------------------------------------------------------------------------------------------ angular, tail, random
def test_angular_distance_equals_direct_computation(llama):
    model, _, calib = llama
    N, M = _n(model), 2
    states = []
    m = copy.deepcopy(model)
    m.model.norm = torch.nn.Identity()  # so that hidden_states[-1] is the last block's output
    with torch.no_grad():
        for s in calib:
            hs = m(s["input_ids"][None], output_hidden_states=True).hidden_states
            states.append(torch.stack([h[0, -1].double() for h in hs]))  # (N+1, H), last token
    X = torch.stack(states)
    D = [float(torch.mean(torch.arccos(F.cosine_similarity(X[:, lo], X[:, lo + M], dim=-1).clamp(-1, 1)) / math.pi))
         for lo in range(N - M + 1)]
    sel = B.angular_distance(model, calib, M)
    assert sel.scores == pytest.approx(D, abs=1e-5)
    start = min(range(len(D)), key=lambda i: (D[i], i))
    assert sel.removed == list(range(start, start + M))


def test_tail_and_random(llama):
    model, _, calib = llama
    N = _n(model)
    assert B.tail(model, calib, 2).removed == [N - 3, N - 2]
    a, b = B.random_selection(model, 3, seed=0), B.random_selection(model, 3, seed=0)
    assert a.removed == b.removed
    many = B.random_selections(30, 5, seeds=range(8))
    assert all(len(set(s.removed)) == 5 and all(0 <= x < 30 for x in s.removed) for s in many)
    assert len({tuple(s.removed) for s in many}) > 1
    assert B.random_selection(30, 5, seed=1).removed != B.random_selection(30, 5, seed=2).removed


def test_hybrid_never_loses_its_last_attention_block(nemotron):
    model, _, calib = nemotron
    N = _n(model)  # attention blocks at 5 and 10 (TINY_NEMOTRON_PATTERN)
    for seed in range(10):
        assert {5, 10} - set(B.random_selection(model, N - 2, seed).removed)
    assert {5, 10} - set(B.norm_ratio(model, calib, N - 2).removed)
    with pytest.raises(ValueError, match="hybrid"):
        swm.sliding_window_merging(model, calib, 2)


# ------------------------------------------------------------------------------------------- one-shot perplexity
def test_one_shot_perplexity_equals_gated_perplexity(llama):
    model, tok, _ = llama
    calib = _equal_length_calibration(tok)
    windows = torch.stack([s["input_ids"] for s in calib])
    N = _n(model)
    ref = [perplexity(model, windows, removed=[i])["perplexity"] for i in range(N)]
    sel = B.one_shot_perplexity(model, calib, 2)
    assert sel.scores == pytest.approx(ref, rel=1e-5)
    assert sel.removed == sorted(sorted(range(N), key=lambda i: (ref[i], i))[:2])
    assert sel.meta["prefix_cache"] == "on"


# --------------------------------------------------------------------------------------------------- Taylor+
def test_taylor_plus_equals_manual_computation():
    model, tok = tiny_llama(num_layers=10)
    calib = varied_calibration(tok, n=3)
    layers = get_adapter(model).layers(model)
    layers[2].mlp.up_proj.weight.requires_grad_(False)  # a mixed pattern that must come back as it was
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    sel = B.taylor_plus(model, calib, 2)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert all(p.grad is None for p in model.parameters())
    assert set(sel.removed) <= set(range(4, 8)) and len(sel.removed) == 2
    # manual: gradient of the mean per-sample loss w.r.t. block 5's matrices
    blk = 5
    mats = [p for p in layers[blk].parameters() if p.dim() == 2]
    loss = sum(sample_loss(model, s["input_ids"]) for s in calib).sum() / len(calib)
    grads = torch.autograd.grad(loss, mats)
    manual = sum(float((W.detach().double() * G.double()).sum(1).abs().sum()) for W, G in zip(mats, grads))
    assert sel.scores[blk] == pytest.approx(manual, rel=1e-5)
    eligible = range(4, 8)
    assert sel.removed == sorted(sorted(eligible, key=lambda i: (sel.scores[i], i))[:2])


# ------------------------------------------------------------------------------------------------------- SWM
@pytest.mark.parametrize("M", [2, 3])
def test_swm_reaches_M_and_builds_the_merged_model(llama, M):
    model, _, calib = llama
    N = _n(model)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    sel = swm.sliding_window_merging(model, calib, M)
    assert len(sel.removed) == M and sel.meta["reached_M"]
    windows = sel.meta["windows"]
    assert sorted(k for a, b in windows for k in range(a + 1, b + 1)) == sel.removed
    new = swm.build_swm_model(model, sel)
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())  # the source is untouched
    new_layers, old_layers = get_adapter(new).layers(new), get_adapter(model).layers(model)
    assert len(new_layers) == N - M and new.config.num_hidden_layers == N - M
    kept = [i for i in range(N) if i not in sel.removed]
    for a, b in windows:
        for name, p in new_layers[kept.index(a)].named_parameters():
            Wa = dict(old_layers[a].named_parameters())[name]
            expect = Wa + sum(dict(old_layers[k].named_parameters())[name] - Wa for k in range(a + 1, b + 1))
            torch.testing.assert_close(p, expect, atol=1e-6, rtol=1e-6)
    # the similarity SWM reports is the physically merged model's cos(final hidden, original) over all tokens
    total, tokens = 0.0, 0
    with torch.no_grad():
        for s in calib:
            ids = s["input_ids"][None]
            h_new = new(ids, output_hidden_states=True).hidden_states[-1]
            h_old = model(ids, output_hidden_states=True).hidden_states[-1]
            total += float(F.cosine_similarity(h_new, h_old, dim=-1).sum())
            tokens += ids.shape[1]
    assert sel.meta["similarity"] == pytest.approx(total / tokens, abs=1e-5)
    assert sel.meta["threshold"] < sel.meta["similarity"] or sel.meta["capped"]


def test_swm_shared_evaluator_gives_each_M_the_single_call_answer(llama):
    """swm_selections (one evaluator, one memo for several M) = one sliding_window_merging call per M: the same
    windows, thresholds and similarities; the shared run scores fewer merged models than the separate runs."""
    model, _, calib = llama
    shared = swm.swm_selections(model, calib, [1, 2, 3])
    separate = {M: swm.sliding_window_merging(model, calib, M) for M in (1, 2, 3)}
    for M, sel in separate.items():
        assert shared[M].removed == sel.removed and shared[M].meta["windows"] == sel.meta["windows"]
        assert shared[M].meta["threshold"] == sel.meta["threshold"]
        assert shared[M].meta["similarity"] == sel.meta["similarity"]
    assert sum(shared[M].meta["block_calls"] for M in shared) < sum(s.meta["block_calls"] for s in separate.values())


def test_swm_fixed_threshold_and_qwen3(qwen3):
    model, _, calib = qwen3
    sel = swm.sliding_window_merging(model, calib, 2)
    assert len(sel.removed) == 2
    new = swm.build_swm_model(model, sel)
    assert len(new.config.layer_types) == _n(model) - 2
    assert swm.sliding_window_merging(model, calib, 2, threshold=1.0).removed == []  # cos never exceeds 1


# ----------------------------------------------------------------------------------------- registry and table
def test_run_baseline_registry_and_rows(llama, tmp_path):
    model, _, calib = llama
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        methods.run_method("nope", model, calib, 2)
    with pytest.raises(ValueError, match="M must be"):
        methods.run_method("bi", model, calib, _n(model))
    sels = [methods.run_method(name, model, calib, 2) for name in ("bi", "bi-iterative", "tail", "random")]
    assert [s.method for s in sels] == ["block_influence", "block_influence_iterative", "tail", "random"]
    assert methods.run_method("random", model, calib, 2, seed=3).removed == B.random_selection(model, 2, 3).removed
    row = sels[1].to_row()
    assert row["removed"] == " ".join(map(str, sels[1].removed)) and row["relative"]
    assert row["calibration_sha256"] == calib.sha256 and row["meta_N"] == _n(model)
    path = selection.write_selections_csv(sels, tmp_path / "selections.csv")
    with open(path) as fh:
        rows = list(csv.DictReader(fh))
    assert [r["method"] for r in rows] == [s.method for s in sels]
    assert rows[2]["removed"] == f"{_n(model) - 3} {_n(model) - 2}"


def test_sleb_path_prefix_equals_a_run_for_the_smaller_M():
    """SLEB's greedy path for M = 4 contains its M = 2 and M = 3 answers (the comparison runs SLEB once)."""
    from cbo_utils.select.baselines import greedy_prefix, sleb

    model, tok = build_tiny("tiny-llama", num_layers=8)
    calib = varied_calibration(tok, n=3)
    path = sleb(model, calib, 4)
    assert len(path.meta["step_seconds"]) == 4 and path.meta["step_seconds"] == sorted(path.meta["step_seconds"])
    for M in (2, 3):
        direct, pre = sleb(model, calib, M), greedy_prefix(path, M)
        assert pre.removed == direct.removed and pre.order == direct.order and pre.M == M
        assert pre.seconds <= path.seconds and pre.meta["path_of"] == 4
    with pytest.raises(ValueError, match="cannot give M = 5"):
        greedy_prefix(path, 5)


@pytest.mark.parametrize("name", ["block_influence_iterative", "one_shot_perplexity"])
def test_every_path_method_of_the_comparison_contains_its_smaller_answers(name):
    """The comparison runs the methods of ``GREEDY_PATHS`` once, for the largest M, and reads the smaller M off."""
    from cbo_utils.experiments.compare import GREEDY_PATHS
    from cbo_utils.select.baselines import greedy_prefix
    from cbo_utils.select.methods import run_method

    assert name in GREEDY_PATHS
    model, tok = build_tiny("tiny-llama", num_layers=8)
    calib = varied_calibration(tok, n=3)
    path = run_method(name, model, calib, 5)
    for M in (1, 2, 4):
        direct, pre = run_method(name, model, calib, M), greedy_prefix(path, M)
        assert pre.removed == direct.removed and pre.order == direct.order and pre.relative == direct.relative


def test_progress_bars_of_the_long_baselines_change_nothing(llama, capsys):
    from cbo_utils.select.baselines import one_shot_perplexity, sleb

    model, tok, calib = llama
    quiet = sleb(model, calib, 2, progress=False)
    capsys.readouterr()
    loud = sleb(model, calib, 2, progress=True)
    assert loud.removed == quiet.removed and loud.meta["step_nll"] == quiet.meta["step_nll"]
    assert "SLEB (M = 2)" in capsys.readouterr().err
    assert one_shot_perplexity(model, calib, 2, progress=True).removed == one_shot_perplexity(model, calib, 2).removed
    assert "one-shot perplexity" in capsys.readouterr().err
