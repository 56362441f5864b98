"""Physical removal, export and verification; refusals; the remote-code layout."""

import copy
import json

import pytest
import torch
from torch import nn

from cbo_utils.model.blocks import Gates, RemovalError, block_types, check_removal, get_adapter, remove_blocks
from cbo_utils.model.tiny import build_tiny
from cbo_utils.prune.export import VerificationError, export_pruned, verify_export

REMOVALS = {"tiny-llama": [1, 3], "tiny-qwen3": [0, 4], "tiny-nemotron-h": [2, 5, 7]}


def test_export_reloads_and_verifies(tiny_name, tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tok = tiny
    original = copy.deepcopy(model)
    rm = REMOVALS[tiny_name]
    out = export_pruned(model, tok, rm, tmp_path / "pruned", method="test", energy=1.5, source=tiny_name)
    rep = verify_export(out, original, tok)
    assert rep["ok"], rep
    assert rep["checks"]["logits_vs_gated_alpha0"]["max_abs_diff"] <= 1e-5
    rec = json.loads((out / "removed_blocks.json").read_text())
    assert rec["removed_blocks"] == rm and rec["index_base"] == 0 and rec["energy"] == 1.5
    assert rec["num_blocks_pruned"] == rec["num_blocks_original"] - len(rm)
    assert (out / "README.md").read_text().count(" ".join(map(str, rm))) >= 1
    plain = AutoModelForCausalLM.from_pretrained(out)  # plain from_pretrained, no helper
    cfg = json.loads((out / "config.json").read_text())
    n_kept = rec["num_blocks_pruned"]
    if tiny_name == "tiny-nemotron-h":
        assert cfg["hybrid_override_pattern"] == "MEEMEEM*EME" and cfg["num_hidden_layers"] == n_kept
        assert len(cfg["layers_block_type"]) == n_kept
        assert [m.layer_idx for m in plain.model.layers] == list(range(n_kept))
    if tiny_name == "tiny-qwen3":  # full, full, full, sliding, sliding, sliding minus blocks 0 and 4
        assert cfg["layer_types"] == ["full_attention", "full_attention", "sliding_attention", "sliding_attention"]
        assert cfg["max_window_layers"] == 2
    assert cfg["num_hidden_layers"] == n_kept


def test_pruned_equals_gated_alpha0_in_place(tiny):
    model, tok = tiny
    x = torch.randint(3, len(tok), (2, 9))
    rm = [1, 2]
    with Gates(model) as g, g.removed(rm):
        ref = model(x).logits
    pruned = remove_blocks(copy.deepcopy(model), rm)
    torch.testing.assert_close(pruned(x).logits, ref, rtol=0, atol=1e-6)


def test_verification_catches_a_naive_removal(tmp_path):
    """Deleting layers without renumbering layer_idx (the classic bug) must fail verification."""
    model, tok = build_tiny("tiny-llama")
    original = copy.deepcopy(model)
    out = export_pruned(model, tok, [1], tmp_path / "ok")
    # now corrupt: reload, drop another block the naive way (no renumbering, stale config) and save over it
    bad = copy.deepcopy(original)
    bad.model.layers = nn.ModuleList([bl for i, bl in enumerate(bad.model.layers) if i != 1])
    bad.save_pretrained(out)  # config still says 6 layers, layer_idx stale
    with pytest.raises(VerificationError):
        verify_export(out, original, tok)
    rep = verify_export(out, original, tok, raise_on_fail=False)
    assert not rep["ok"]
    assert not rep["checks"]["reload_keys"]["ok"] or not rep["checks"]["depth_and_indices"]["ok"]


@pytest.mark.parametrize("bad, words", [
    ([0, 1, 2, 3, 4, 5], "leaves no model"),
    ([6], "out of range"),
    ([-1], "out of range"),
    ([2, 2], "more than once"),
    ([], "nothing to remove"),
])
def test_impossible_removals_are_refused(bad, words):
    model, _ = build_tiny("tiny-llama")
    with pytest.raises(RemovalError, match=words):
        check_removal(model, bad)


def test_removing_every_attention_block_of_a_hybrid_is_refused():
    model, _ = build_tiny("tiny-nemotron-h")
    att = [i for i, t in enumerate(block_types(model)) if t == "attention"]
    assert att == [5, 10]
    with pytest.raises(RemovalError, match="every attention block"):
        check_removal(model, att)
    check_removal(model, att[:1])  # one attention block may go


def test_successive_removals_record_original_indices():
    model, _ = build_tiny("tiny-llama")
    remove_blocks(model, [1])  # original 0 2 3 4 5 remain
    remove_blocks(model, [2])  # index 2 of the shrunk model = original 3
    assert model.config.cbo_removed_blocks == [1, 3]
    assert model.config.num_hidden_layers == 4


class _FakeRemoteBlock(nn.Module):
    def __init__(self, kind, idx):
        super().__init__()
        self.block_type = kind
        self.layer_idx = idx
        self.mixer = nn.Linear(4, 4)
        self.mixer.layer_idx = idx


class _FakeRemoteNemotron(nn.Module):
    """The remote-code layout: model.backbone.layers, config.hybrid_override_pattern, block_type names."""

    def __init__(self, pattern="MEM*EM"):
        super().__init__()
        names = {"M": "mamba", "E": "moe", "*": "attention", "-": "mlp"}
        self.config = type("Cfg", (), {"model_type": "nemotron_h", "hybrid_override_pattern": pattern,
                                       "num_hidden_layers": len(pattern)})()
        self.backbone = nn.Module()
        self.backbone.layers = nn.ModuleList([_FakeRemoteBlock(names[c], i) for i, c in enumerate(pattern)])

    def forward(self, x):
        for b in self.backbone.layers:
            x = x + b.mixer(x)
        return x


def test_remote_code_layout_gates_and_removal():
    model = _FakeRemoteNemotron()
    ad = get_adapter(model)
    assert ad.name == "nemotron_h-remote"
    assert block_types(model) == ["mamba", "moe", "mamba", "attention", "moe", "mamba"]
    x = torch.randn(2, 4)
    with Gates(model) as g, g.removed([1, 4]):
        ref = model(x)
    with pytest.raises(RemovalError, match="every attention block"):
        check_removal(model, [3])
    remove_blocks(model, [1, 4])
    assert model.config.hybrid_override_pattern == "MM*M" and model.config.num_hidden_layers == 4
    assert [b.layer_idx for b in model.backbone.layers] == [0, 1, 2, 3]
    assert [b.mixer.layer_idx for b in model.backbone.layers] == [0, 1, 2, 3]
    torch.testing.assert_close(model(x), ref)
    assert ad.config_json_extras(model.config) == {"hybrid_override_pattern": "MM*M", "num_hidden_layers": 4}


def test_exported_folder_is_readable_by_others(tmp_path):
    import stat

    from cbo_utils.model.tiny import build_tiny
    from cbo_utils.prune.export import export_pruned

    model, tok = build_tiny("tiny-llama")
    out = export_pruned(model, tok, [2], tmp_path / "p")
    assert stat.S_IMODE(out.stat().st_mode) == 0o755   # not mkdtemp's 0700


@pytest.mark.parametrize("name", ["tiny-qwen3", "tiny-nemotron-h"])
def test_config_rewrite_is_one_rule_for_memory_and_files(name):
    """remove_blocks (config object) and prune_config_dict (config.json dict) rewrite the per-layer fields alike,
    including a per-layer list the rule only knows by its name; both record the removal cumulatively."""
    from cbo_utils.prune.files import prune_config_dict

    model, _ = build_tiny(name)
    n = len(get_adapter(model).layers(model))
    model.config.custom_layer_kinds = [f"kind{i}" for i in range(n)]
    model.config.cbo_removed_blocks = [1]  # as if one block of an (n+1)-block model had gone already
    before = model.config.to_dict()
    remove = [2, 4] if name == "tiny-qwen3" else [0, 3, 7]
    kept = [i for i in range(n) if i not in remove]
    from_file, rec = prune_config_dict(before, kept, n, remove)
    remove_blocks(model, remove)
    in_memory = model.config.to_dict()
    for field in ("layer_types", "layers_block_type", "max_window_layers", "custom_layer_kinds",
                  "cbo_removed_blocks"):
        assert in_memory.get(field) == from_file.get(field), field
    assert from_file["custom_layer_kinds"] == [f"kind{i}" for i in kept]
    assert from_file["cbo_removed_blocks"] == sorted({1} | {i + (i >= 1) for i in remove})
    assert model.config.num_hidden_layers == from_file.get("num_hidden_layers", len(kept)) == len(kept)
    assert "custom_layer_kinds" in rec["fields"]


def test_model_card_front_matter_verification_and_licence(tmp_path):
    import yaml

    from cbo_utils.prune.export import write_model_card

    model, tok = build_tiny("tiny-llama")
    src = tmp_path / "src"
    model.save_pretrained(src)
    tok.save_pretrained(src)
    (src / "README.md").write_text("---\nlicense: apache-2.0\n---\n# the source model\n")
    out = export_pruned(copy.deepcopy(model), tok, [2, 3], tmp_path / "pruned", source=str(src),
                        calibration={"source": "embedded", "samples": 4, "tokens": 96, "sha256": "ab" * 32})
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "transformers" and front["pipeline_tag"] == "text-generation"
    assert {"pruned", "block-removal"} <= set(front["tags"]) and front["license"] == "apache-2.0"
    assert "base_model" not in front   # a local folder is not a Hub id
    assert "Not verified yet" in card and "4 samples, 96 tokens" in card and "`2 3`" in card
    verify_export(out, model, tok, max_new_tokens=3)
    card = (out / "README.md").read_text()
    assert "**Passed**" in card and "Not verified" not in card
    write_model_card(out, evaluation="| ppl | 1.0 |")
    assert "## Evaluation" in (out / "README.md").read_text()
    write_model_card(out)   # a rewrite keeps the evaluation
    assert "| ppl | 1.0 |" in (out / "README.md").read_text()
    hub = export_pruned(copy.deepcopy(model), tok, [1], tmp_path / "hub", source="HuggingFaceTB/SmolLM2-135M")
    assert yaml.safe_load((hub / "README.md").read_text().split("---")[1])["base_model"] == \
        "HuggingFaceTB/SmolLM2-135M"


@pytest.mark.parametrize("command", ["prune", "prune-files"])
def test_overwrite_never_deletes_what_cbo_did_not_write(command, tmp_path, monkeypatch, capsys):
    """Issue 16 item 1: `--out . --overwrite` in a folder with a user's file, or `--out` a user's folder, is refused
    and nothing is deleted; an output cbo wrote is replaced."""
    from cbo_utils.cli import main

    model, tok = build_tiny("tiny-llama")
    src = tmp_path / "src"
    model.save_pretrained(src)
    tok.save_pretrained(src)
    args = (["prune", "--model", "tiny-llama", "--remove", "1"] if command == "prune"
            else ["prune-files", str(src), "--remove", "1"])
    work = tmp_path / "work"
    work.mkdir()
    (work / "canary").write_text("mine")
    monkeypatch.chdir(work)
    assert main([*args, "--out", ".", "--overwrite"]) == 2
    assert (work / "canary").read_text() == "mine"
    assert "never replaces" in capsys.readouterr().err
    user = work / "results"
    user.mkdir()
    (user / "notes.txt").write_text("keep")
    assert main([*args, "--out", str(user), "--overwrite"]) == 2
    assert (user / "notes.txt").read_text() == "keep" and "not one" in capsys.readouterr().err
    assert main([*args, "--out", str(work / "pruned")]) == 0
    assert main([*args, "--out", str(work / "pruned")]) == 2          # exists: refused without --overwrite
    assert main([*args, "--out", str(work / "pruned"), "--overwrite"]) == 0   # its own output: replaced
    assert (work / "canary").read_text() == "mine"
