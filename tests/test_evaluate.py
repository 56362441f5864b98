import copy

import pytest

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
