"""``cbo compress`` / ``cbo_utils.compress``: one call from a model to a verified smaller one, resumable, refusing
folders it did not write."""

from __future__ import annotations

import json

import pytest
import torch

from cbo_utils.cli import main
from cbo_utils.experiments.compress import CompressError, compress
from cbo_utils.model.blocks import Gates, num_blocks
from cbo_utils.model.load import load_model

KW = {"samples": 4, "max_tokens": 24}


def test_compress_prunes_verifies_measures_and_resumes(tmp_path):
    out = tmp_path / "small"
    s = compress("tiny-llama", 2, out, echo=lambda *_: None, **KW)
    assert s["method"] == "cbo-pairs-swap" and len(s["removed_blocks"]) == 2
    assert s["after"]["blocks"] == s["before"]["blocks"] - 2 and s["after"]["parameters"] < s["before"]["parameters"]
    assert json.loads((out / "model" / "verification.json").read_text())["ok"]
    # the saved model is the original without those blocks (an independent check: the gated original)
    small, tok = load_model(str(out / "model"))
    dense, _ = load_model("tiny-llama")
    x = torch.randint(3, len(tok), (1, 9))
    with torch.no_grad(), Gates(dense) as g, g.removed(s["removed_blocks"]):
        torch.testing.assert_close(small(x).logits, dense(x).logits, rtol=0, atol=1e-5)
    assert num_blocks(small) == num_blocks(dense) - 2
    assert "perplexity" in (out / "summary.md").read_text()
    # a rerun resumes: selection and pruning are not redone
    stamp = (out / "selection.json").stat().st_mtime_ns, (out / "model" / "config.json").stat().st_mtime_ns
    again = compress("tiny-llama", 2, out, echo=lambda *_: None, **KW)
    assert again["removed_blocks"] == s["removed_blocks"]
    assert stamp == ((out / "selection.json").stat().st_mtime_ns, (out / "model" / "config.json").stat().st_mtime_ns)


def test_compress_refuses_what_it_cannot_do_before_any_work(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(CompressError, match="not a folder cbo wrote"):
        compress("tiny-llama", 1, foreign, echo=lambda *_: None, **KW)
    assert (foreign / "notes.txt").read_text() == "keep me" and len(list(foreign.iterdir())) == 1
    with pytest.raises(CompressError, match="unknown method"):
        compress("tiny-llama", 1, tmp_path / "a", method="best", echo=lambda *_: None, **KW)
    with pytest.raises(CompressError, match="remove fewer"):
        compress("tiny-llama", 6, tmp_path / "b", echo=lambda *_: None, **KW)
    out = tmp_path / "c"
    compress("tiny-llama", 1, out, method="block_influence", echo=lambda *_: None, **KW)
    with pytest.raises(CompressError, match="other settings .*M"):
        compress("tiny-llama", 2, out, method="block_influence", echo=lambda *_: None, **KW)


def test_cbo_compress_command_line(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["compress", "--model", "tiny-llama", "-M", "1", "--out", str(out), "--method", "sleb",
                 "--samples", "4", "--max-tokens", "24"]) == 0
    printed = capsys.readouterr().out
    assert "removed 1 blocks" in printed and "generation tokens/s" in printed and (out / "model").is_dir()
    assert main(["compress", "--model", "tiny-llama", "-M", "9", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "remove fewer" in err and "Traceback" not in err
