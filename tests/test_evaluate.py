import copy

import pytest
import torch

from cbo_utils.evaluate.perplexity import perplexity, perplexity_windows
from cbo_utils.model.blocks import remove_blocks
from cbo_utils.model.tiny import build_tiny

TEXT = ["The heart pumps blood through the arteries and the veins."] * 60


def test_perplexity_policy_and_gated_equals_pruned():
    model, tok = build_tiny("tiny-qwen3")
    win = perplexity_windows(tok, TEXT, seq_len=32, windows=3)
    assert win.shape == (3, 32) and (win[:, 0] == tok.bos_token_id).all()
    gated = perplexity(model, win, removed=[2, 3])
    pruned = perplexity(remove_blocks(copy.deepcopy(model), [2, 3]), win)
    assert gated["perplexity"] == pytest.approx(pruned["perplexity"], rel=1e-6)
    assert gated["tokens"] == 3 * 31
    dense = perplexity(model, win)
    assert dense["perplexity"] != pytest.approx(gated["perplexity"])
    nobos = perplexity_windows(tok, TEXT, seq_len=32, windows=3, bos=False)
    assert (nobos[:, 0] != tok.bos_token_id).any()


def test_too_little_text_is_a_clear_error():
    _, tok = build_tiny("tiny-llama")
    with pytest.raises(ValueError, match="fewer windows"):
        perplexity_windows(tok, ["short"], seq_len=64, windows=4)


def test_paired_log_ratio_against_a_direct_computation():
    import math

    import numpy as np

    from cbo_utils.evaluate.statistics import mean_stderr, paired_log_ratio

    rng = np.random.default_rng(0)
    hard = rng.gamma(2.0, 50.0, size=40)            # window difficulty both models share
    a = hard * 1.05 + rng.normal(0, 1.0, 40)        # 5 % worse, small independent noise
    b = hard + rng.normal(0, 1.0, 40)
    r = paired_log_ratio(a, b, 255, n_boot=4000, seed=1)
    assert r["log_ratio"] == pytest.approx((a.sum() - b.sum()) / (255 * 40), rel=1e-12)
    assert r["separated"] and r["lo"] > 0 and r["lo"] < r["log_ratio"] < r["hi"]
    # brute-force percentile bootstrap with the same generator gives the same interval
    idx = np.random.default_rng(1).integers(0, 40, size=(4000, 40))
    boot = (a - b)[idx].sum(1) / (255 * 40)
    assert r["lo"] == pytest.approx(np.quantile(boot, 0.025)) and r["hi"] == pytest.approx(np.quantile(boot, 0.975))
    # pairing: far tighter than the unpaired interval of the two means
    unpaired = 1.96 * math.sqrt(np.var(a, ddof=1) / 40 + np.var(b, ddof=1) / 40) / 255
    assert (r["hi"] - r["lo"]) < 0.5 * 2 * unpaired
    same = paired_log_ratio(b, b, 255)
    assert same["ratio"] == 1.0 and not same["separated"]
    with pytest.raises(ValueError, match="paired windows"):
        paired_log_ratio(a, b[:5], 255)
    m, se = mean_stderr([0, 1, 1, 0])
    assert m == 0.5 and se == pytest.approx(np.std([0, 1, 1, 0], ddof=1) / 2)


def test_perplexity_window_nlls_sum_to_the_total():
    import math


    model, tok = build_tiny("tiny-llama")
    win = torch.randint(3, len(tok), (5, 9), generator=torch.Generator().manual_seed(0))
    p = perplexity(model, win, batch_size=2)
    assert len(p["window_nll"]) == 5 and p["window_tokens"] == 8
    assert math.exp(sum(p["window_nll"]) / (5 * 8)) == pytest.approx(p["perplexity"], rel=1e-12)


def test_lambada_text_is_fiction_disjoint_from_boolq():
    from cbo_utils.calibration import eval_text, heldout_text, lambada_text

    lam = lambada_text(max_passages=50)
    assert len(lam) == 50 and all(len(t) > 100 for t in lam)
    assert not set(lam) & set(heldout_text(max_passages=500))
    assert eval_text("lambada")[:3] == lambada_text()[:3]
    with pytest.raises(ValueError, match="unknown evaluation text"):
        eval_text("wiki")


@pytest.mark.parametrize("family", ["tiny-llama", "tiny-qwen3"])
def test_window_cache_equals_the_physically_pruned_model(family):
    """WindowCache (dense block inputs recorded once, each removal run from block min(R)) gives the perplexity,
    per-window NLLs and accuracy of the physically pruned model; another model, or the same model changed in
    place, is measured plainly; a cache over its memory limit stays off."""
    from cbo_utils.evaluate.perplexity import WindowCache

    model, tok = build_tiny(family)
    win = torch.randint(3, len(tok), (5, 17), generator=torch.Generator().manual_seed(1))
    cache = WindowCache(model, win, batch_size=2)
    for removed in ([2], [1, 3], [0, 2, 3], [3]):
        got = perplexity(model, cache, removed=removed)
        ref = perplexity(remove_blocks(copy.deepcopy(model), removed), win, batch_size=2)
        assert got["prefix_cache"] == "on"
        assert got["perplexity"] == pytest.approx(ref["perplexity"], rel=1e-6)
        assert got["window_nll"] == pytest.approx(ref["window_nll"], rel=1e-6)
        assert got["accuracy"] == ref["accuracy"] and got["tokens"] == ref["tokens"]
    assert perplexity(model, cache)["perplexity"] == pytest.approx(perplexity(model, win)["perplexity"], rel=1e-9)
    other = copy.deepcopy(model)
    assert not cache.usable(other)   # built from `model`: another model never reads its block inputs
    with torch.no_grad():
        next(model.parameters()).mul_(1.5)   # an in-place change: the cache is rebuilt before use
    got = perplexity(model, cache, removed=[2])
    ref = perplexity(remove_blocks(copy.deepcopy(model), [2]), win, batch_size=2)
    assert got["perplexity"] == pytest.approx(ref["perplexity"], rel=1e-6)
    small = WindowCache(model, win, max_bytes=1)
    assert perplexity(model, small, removed=[2])["perplexity"] == pytest.approx(ref["perplexity"], rel=1e-6)
    assert small.status.startswith("off") and "MiB" in small.status


def test_a_prefix_cache_that_replays_wrongly_turns_itself_off(caplog):
    """Both prefix caches check their replay against the plain forward (model.loss.replay_matches) before they are
    trusted: a change the parameter versions cannot see (the rotary frequencies, a buffer) makes the cached block
    arguments stale, and the cache must go off with a warning and still give the physically pruned model's answer."""
    from cbo_utils.evaluate.perplexity import WindowCache
    from cbo_utils.model.loss import replay_matches

    ref = torch.randn(2, 3, 5)
    assert replay_matches(ref + 1e-6, ref, "x", None)[0]
    assert not replay_matches(ref + 1.0, ref, "x", None)[0]
    assert not replay_matches(ref[:1], ref, "x", None)[0]                 # another shape never matches
    assert not replay_matches(ref * float("nan"), ref, "x", None)[0]      # NaNs never match

    model, tok = build_tiny("tiny-llama")
    win = torch.randint(3, len(tok), (4, 17), generator=torch.Generator().manual_seed(2))
    cache = WindowCache(model, win, batch_size=2)
    assert cache.usable(model) and cache.status == "unchecked"
    rotary = model.model.rotary_emb
    with torch.no_grad():
        rotary.inv_freq.mul_(3.0)            # a buffer: the cached position embeddings are now stale
    with caplog.at_level("WARNING"):
        got = perplexity(model, cache, removed=[1])
    assert cache.status.startswith("off: cached logits differ") and "differs from the plain forward" in caplog.text
    expect = perplexity(remove_blocks(copy.deepcopy(model), [1]), win, batch_size=2)
    assert got["prefix_cache"] != "on"
    assert got["perplexity"] == pytest.approx(expect["perplexity"], rel=1e-6)
