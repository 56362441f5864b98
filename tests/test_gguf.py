"""GGUF in, GGUF out: blocks removed from the embedded SmolLM2 GGUF (Q4_1) without loading the model."""

from __future__ import annotations

import pytest
import torch

from cbo_utils.cli import main
from cbo_utils.model.blocks import Gates, RemovalError
from cbo_utils.model.load import SMOLLM2_GGUF, smollm2_gguf
from cbo_utils.prune.files import gguf_layout, prune_gguf_file

gguf = pytest.importorskip("gguf")
SRC = smollm2_gguf()
PKG = SRC.parent
REMOVE = [3, 7, 12]


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf") / "pruned.gguf"
    return prune_gguf_file(SRC, REMOVE, out), out


def test_pruned_gguf_keeps_every_other_tensor_and_field_byte_for_byte(pruned):
    rep, out = pruned
    a, b = gguf.GGUFReader(str(SRC)), gguf.GGUFReader(str(out))
    assert gguf_layout(out)["block_count"] == 27 and rep["tensors"] == [272, 272 - 3 * 9]
    kept = [i for i in range(30) if i not in REMOVE]
    src_t = {t.name: t for t in a.tensors}
    for t in b.tensors:
        name = t.name
        if name.startswith("blk."):
            i, rest = name.split(".", 2)[1:]
            name = f"blk.{kept[int(i)]}.{rest}"
        s = src_t[name]
        assert t.tensor_type == s.tensor_type and bytes(t.data) == bytes(s.data), t.name
    for key, f in a.fields.items():
        if key in ("llama.block_count", "GGUF.tensor_count"):
            continue
        assert b.fields[key].contents() == f.contents(), key
    assert b.fields["llama.block_count"].contents() == 27


@pytest.mark.slow
def test_pruned_gguf_loads_in_transformers_and_equals_the_gated_original(pruned):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, out = pruned
    orig = AutoModelForCausalLM.from_pretrained(PKG, gguf_file=SMOLLM2_GGUF, dtype=torch.float32).eval()
    small = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(PKG, gguf_file=SMOLLM2_GGUF)
    x = tok("Water boils at a temperature of", return_tensors="pt")["input_ids"]
    with torch.no_grad(), Gates(orig) as g, g.removed(REMOVE):
        ref = orig(x).logits
        got = small(x).logits
    assert small.config.num_hidden_layers == 27
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)


def test_gguf_pruning_refuses_bad_requests_and_the_command_line_prints_no_traceback(tmp_path, capsys, pruned):
    _, out = pruned
    with pytest.raises(FileExistsError):
        prune_gguf_file(SRC, REMOVE, out)
    with pytest.raises(RemovalError, match="out of range"):
        prune_gguf_file(SRC, [30], tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()
    assert main(["prune-files", str(SRC), "--remove", "0,31", "--out", str(tmp_path / "y.gguf")]) == 2
    err = capsys.readouterr().err
    assert "out of range" in err and "Traceback" not in err
    assert main(["prune-files", str(SRC), "--remove", "5", "--out", str(tmp_path / "z.gguf")]) == 0
    assert gguf_layout(tmp_path / "z.gguf")["block_count"] == 29


@pytest.mark.slow
def test_compress_takes_a_gguf_and_writes_the_pruned_gguf(tmp_path):
    from transformers import AutoModelForCausalLM

    from cbo_utils.experiments.compress import CompressError, compress

    s = compress(str(SRC), 2, tmp_path / "c", method="block_influence", samples=4, max_tokens=32, gguf=True,
                 echo=lambda *_: None)
    small = AutoModelForCausalLM.from_pretrained(tmp_path / "c", gguf_file="model.gguf", dtype=torch.float32).eval()
    folder = AutoModelForCausalLM.from_pretrained(tmp_path / "c" / "model", dtype=torch.float32).eval()
    x = torch.tensor([[1, 504, 3458, 282, 4649, 314]])
    with torch.no_grad():   # the pruned GGUF and the pruned folder are the same model (both from the Q4_1 weights)
        torch.testing.assert_close(small(x).logits, folder(x).logits, rtol=0, atol=1e-4)
    assert gguf_layout(tmp_path / "c" / "model.gguf")["block_count"] == 28 and s["gguf"].endswith("model.gguf")
    with pytest.raises(CompressError, match="give the model as a .gguf"):
        compress("tiny-llama", 1, tmp_path / "d", gguf=True, echo=lambda *_: None)
