"""Type-restricted block removal on hybrid models (cbo_utils.experiments.hybrid), each against an independent
computation: brute force over all states, physical removal, reload round trips, hand-built expectations."""

import copy
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import varied_calibration

from cbo_utils.calibration import CalibrationSet, _sample
from cbo_utils.evaluate import reasoning
from cbo_utils.evaluate.perplexity import perplexity
from cbo_utils.experiments import hybrid
from cbo_utils.experiments.hybrid import hybrid_settings, run_hybrid_experiment
from cbo_utils.model import standin as standin_module
from cbo_utils.model.blocks import RemovalError, block_types, check_removal, pattern_types, remove_blocks
from cbo_utils.model.standin import NANO_PATTERN, standin_nemotron_h
from cbo_utils.model.tiny import TINY_NEMOTRON_PATTERN, tiny_llama, tiny_nemotron_h
from cbo_utils.problem.budgets import budget_label, normalise_budget, parse_budget, type_budget_problem
from cbo_utils.prune.files import prune_checkpoint_files, remap_layer_references
from cbo_utils.solvers.by_type import exact_lowest_by_type

STANDIN_KW = dict(pattern=NANO_PATTERN, hidden=32, steps=6, seq_len=32, batch_size=2, lr=3e-3, seed=0,
                  progress=False)


# --------------------------------------------------------------------------------------------- pattern and types
def test_nano_pattern_counts():
    types = pattern_types(NANO_PATTERN)
    assert len(NANO_PATTERN) == 52
    assert types.count("mamba") == 23 and types.count("moe") == 23 and types.count("attention") == 6
    assert [i for i, t in enumerate(types) if t == "attention"] == [5, 12, 19, 26, 33, 42]
    with pytest.raises(ValueError, match="unknown letters"):
        pattern_types("MEX")


def test_tiny_builder_layer_types_and_last_attention_guard():
    model, _ = tiny_nemotron_h("M-E*E", hidden=32)  # every letter the builder knows: Mamba2, MLP, MoE, attention
    assert block_types(model) == ["mamba", "mlp", "moe", "attention", "moe"]
    assert model(torch.randint(3, 100, (1, 9))).logits.shape[-1] == model.config.vocab_size
    with pytest.raises(RemovalError, match="every attention block"):
        check_removal(model, [3])
    tiny, _ = tiny_nemotron_h(TINY_NEMOTRON_PATTERN)
    with pytest.raises(RemovalError, match="every attention block"):
        check_removal(tiny, [5, 10])
    assert check_removal(tiny, [10, 1]) == [1, 10]
    types = block_types(tiny)
    with pytest.raises(ValueError, match="at least one attention block must remain"):
        exact_lowest_by_type(np.eye(len(types)), types, {"attention": 2})


def test_budget_labels_round_trip_and_errors():
    assert budget_label({"moe": 1, "mamba": 1}) == "mamba:1+moe:1"
    assert parse_budget("moe:1+mamba:1") == {"mamba": 1, "moe": 1} == normalise_budget({"moe": 1, "mamba": 1})
    assert normalise_budget({"moe": 3, "attention": 0}) == {"moe": 3}
    for bad in ({}, {"moe": 0}, {"moe": -1}, {"moe": 1.5}, "moe", "moe:x"):
        with pytest.raises(ValueError):
            normalise_budget(bad)


# --------------------------------------------------------------------------------------------- exact solving
def _brute_force(Q, types, budget, keep=(), const=0.0):
    """Every C(N, M) state, kept when it removes exactly budget[t] blocks of each type t and none of keep."""
    N, M = Q.shape[0], sum(budget.values())
    rows = []
    for s in itertools.combinations(range(N), M):
        if set(s) & set(keep):
            continue
        counts = {}
        for b in s:
            counts[types[b]] = counts.get(types[b], 0) + 1
        if counts != budget:
            continue
        x = np.zeros(N)
        x[list(s)] = 1
        rows.append((float(x @ Q @ x) + const, " ".join(map(str, s))))
    return sorted(rows)


@pytest.mark.parametrize("seed", [0, 1])
def test_exact_lowest_by_type_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    N = 14
    types = [str(t) for t in rng.permutation(["mamba"] * 5 + ["moe"] * 6 + ["attention"] * 3)]
    A = rng.normal(size=(40, N))
    H = A.T @ A / 40  # a random PSD Fisher
    keep = (int(np.flatnonzero(np.array(types) == "moe")[-1]),)
    budgets = [{"moe": 2}, {"attention": 1}, {"moe": 1, "mamba": 1}, {"mamba": 2, "moe": 1, "attention": 1}]
    for budget in budgets:
        for kw in ({}, {"keep": keep, "const": 0.75}):
            ref = _brute_force(H, types, normalise_budget(budget), kw.get("keep", ()), kw.get("const", 0.0))
            for method in ("auto", "product"):
                for k in (5, len(ref) + 7):
                    df = exact_lowest_by_type(H, types, budget, k=k, method=method, **kw)
                    n = min(k, len(ref))
                    assert len(df) == n
                    assert list(df["removed_blocks"]) == [r[1] for r in ref[:n]]
                    np.testing.assert_allclose(df["energy"], [r[0] for r in ref[:n]], rtol=1e-12, atol=1e-12)
                    assert df["feasible"].all() and list(df["rank"]) == list(range(n))
                    assert df["energy"].dtype == np.float64 and (df["solver"] == "exact").all()
                    info = df.attrs["solver_info"]
                    assert info["budget"] == normalise_budget(budget) and info["n_states"] == len(ref)
                    assert info["budget_label"] == budget_label(budget)


def test_nano_type_problems_enumerate_paper_state_counts():
    types = pattern_types(NANO_PATTERN)
    rng = np.random.default_rng(3)
    A = rng.normal(size=(64, 52))
    H = A.T @ A / 64
    moe3 = exact_lowest_by_type(H, types, {"moe": 3}, k=5000)
    att2 = exact_lowest_by_type(H, types, {"attention": 2}, k=5000)
    mixed = exact_lowest_by_type(H, types, {"moe": 1, "mamba": 1}, k=5000)
    assert len(moe3) == moe3.attrs["solver_info"]["n_states"] == math.comb(23, 3) == 1771
    assert len(att2) == att2.attrs["solver_info"]["n_states"] == math.comb(6, 2) == 15
    assert len(mixed) == mixed.attrs["solver_info"]["n_states"] == 23 * 23
    assert len(set(moe3["removed_blocks"])) == 1771 and moe3["energy"].is_monotonic_increasing
    for df, want in ((moe3, "moe"), (att2, "attention")):
        assert all(types[b] == want for s in df["removed_blocks"] for b in map(int, s.split()))
    assert type_budget_problem(H, types, {"moe": 3, "mamba": 3}).n_states == 1771 ** 2
    with pytest.raises(ValueError, match="3,136,441 feasible states"):
        exact_lowest_by_type(H, types, {"moe": 3, "mamba": 3}, max_states=10 ** 6)
    with pytest.raises(ValueError, match="does not occur"):
        exact_lowest_by_type(H, types, {"mlp": 1})
    with pytest.raises(ValueError, match="only 6 are removable"):
        exact_lowest_by_type(H, types, {"attention": 7})


# --------------------------------------------------------------------------------------------- the stand-in
@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    torch.set_num_threads(1)
    model, tok, info = standin_nemotron_h(cache_root=root, **STANDIN_KW)
    return model, tok, info, root


def test_standin_trains_caches_and_reloads(standin, monkeypatch):
    from cbo_utils.model.tiny import build_tokenizer

    model, tok, info, root = standin
    assert info["stand_in"] is True and standin_module.NANO_MODEL_ID in info["note"] and not info["loaded_from_cache"]
    assert info["heldout_loss_trained"] < info["heldout_loss_untrained"] - 0.3  # it learned something
    assert info["loss_last"] < info["loss_first"]
    assert info["tokens_seen"] == 6 * 2 * 32
    assert "".join({"mamba": "M", "moe": "E", "attention": "*"}[t] for t in block_types(model)) == NANO_PATTERN
    folder = Path(info["path"])
    assert folder.parent == root and folder.name.startswith("standin-nemotron-h-")
    saved = json.loads((folder / "standin_info.json").read_text())
    assert saved["stand_in"] is True and saved["settings"]["steps"] == 6
    # second call: loaded from the cache (no training), same weights, same tokenizer
    monkeypatch.setattr(standin_module, "_lm_loss", lambda *a, **k: pytest.fail("trained again instead of loading"))
    model2, tok2, info2 = standin_nemotron_h(cache_root=root, **STANDIN_KW)
    assert info2["loaded_from_cache"] and info2["path"] == info["path"]
    text = "Water boils at one hundred degrees.\nAnswer: heat"
    assert tok2(text)["input_ids"] == tok(text)["input_ids"] == build_tokenizer()(text)["input_ids"]
    x = torch.tensor([tok(text)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(model2(x).logits, model(x).logits, rtol=0, atol=1e-6)
    # other settings → another cache folder name
    assert standin_module._settings_hash(standin_module.standin_settings(steps=7)) != standin_module._settings_hash(
        standin_module.standin_settings(steps=6))


def test_standin_interrupted_write_leaves_no_cache(tmp_path, monkeypatch):
    def boom(folder, info):
        raise KeyboardInterrupt("simulated interruption while writing the cache")

    monkeypatch.setattr(standin_module, "_write_info", boom)
    kw = dict(STANDIN_KW, pattern="MEM*E", steps=1, seq_len=16)
    with pytest.raises(KeyboardInterrupt):
        standin_nemotron_h(cache_root=tmp_path, **kw)
    assert list(tmp_path.iterdir()) == []  # neither a half cache nor a temporary folder
    with pytest.raises(ValueError, match="multiple of 4"):
        standin_nemotron_h(cache_root=tmp_path, **dict(kw, hidden=30))


def _windows(tok, n=3, seq_len=48):
    from cbo_utils.evaluate.perplexity import perplexity_windows

    return perplexity_windows(tok, standin_module.sciq_plain_texts("heldout")[:40], seq_len=seq_len, windows=n)


def test_gated_evaluation_equals_physical_removal_on_standin(standin):
    model, tok, _, _ = standin
    types = block_types(model)
    removed = [types.index("moe"), types.index("mamba") + 2, 12]  # a mixed removal: MoE, Mamba2, attention
    assert sorted(types[b] for b in removed) == ["attention", "mamba", "moe"]
    win = _windows(tok)
    pruned = remove_blocks(copy.deepcopy(model), removed)
    gated = perplexity(model, win, removed=removed, batch_size=2)
    physical = perplexity(pruned, win, batch_size=2)
    assert gated["accuracy"] == physical["accuracy"] and gated["tokens"] == physical["tokens"]
    assert math.isclose(gated["perplexity"], physical["perplexity"], rel_tol=1e-6)
    from cbo_utils.model.blocks import Gates

    with torch.no_grad(), Gates(model) as g, g.removed(removed):
        ref = model(win).logits
    with torch.no_grad():
        torch.testing.assert_close(pruned(win).logits, ref, rtol=0, atol=1e-5)
    # and the dense numbers agree with an independent computation (a hand-written NLL and accuracy)
    dense = perplexity(model, win)
    with torch.no_grad():
        logits = model(win).logits[:, :-1].double()
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), win[:, 1:])
    assert math.isclose(dense["perplexity"], math.exp(float(nll)), rel_tol=1e-6)
    assert dense["accuracy"] == pytest.approx(float((logits.argmax(-1) == win[:, 1:]).float().mean()))


def test_block_influence_by_type(standin):
    from cbo_utils.select.baselines import block_influence, block_statistics

    model, tok, _, _ = standin
    types = block_types(model)
    calib = varied_calibration(tok, n=3)
    scores = block_influence(model, calib, 2).scores  # ShortGPT BI of every block (the baselines' one-shot pass)
    sel = hybrid.block_influence_by_type(model, calib, {"moe": 2, "attention": 1})
    expect = []
    for t, c in (("moe", 2), ("attention", 1)):
        expect += sorted((i for i in range(len(types)) if types[i] == t), key=lambda i: (scores[i], i))[:c]
    assert sel.removed == sorted(expect) and sel.meta["budget"] == "attention:1+moe:2" and sel.M == 3
    it = hybrid.block_influence_by_type(model, calib, {"moe": 1, "mamba": 1}, iterative=True)
    assert sorted(types[b] for b in it.removed) == ["mamba", "moe"]
    first = min((i for i in range(len(types)) if types[i] in ("moe", "mamba")), key=lambda i: (scores[i], i))
    assert it.order[0] == first
    second_type = "mamba" if types[first] == "moe" else "moe"
    bi2 = block_statistics(model, calib, removed=[first])["bi"].tolist()
    assert it.order[1] == min((i for i in range(len(types)) if types[i] == second_type), key=lambda i: (bi2[i], i))
    assert it.relative == [first, it.order[1] - (first < it.order[1])]


def test_run_hybrid_experiment_end_to_end_and_resume(standin, tmp_path, monkeypatch):
    from cbo_utils.gradients import load_gradients

    model, tok, _, _ = standin
    g = torch.Generator().manual_seed(0)
    calib = CalibrationSet([_sample(torch.randint(3, len(tok), (24,), generator=g).tolist()) for _ in range(4)],
                           {"source": "random-test"})
    rerank = CalibrationSet([_sample(torch.randint(3, len(tok), (24,), generator=g).tolist()) for _ in range(2)],
                            {"source": "random-test-rerank"})
    win = _windows(tok, n=2, seq_len=32)
    budgets = [{"moe": 1}, {"attention": 1}, {"moe": 1, "mamba": 1}]
    kw = dict(out_dir=tmp_path, stand_in=True, k=2, model_name="standin-test", rerank_calibration=rerank,
              gradient_batch_size=4, eval_batch_size=2, bi_batch_size=4, eval_source="test windows", progress=False)
    res = run_hybrid_experiment(model, tok, calib, win, budgets, **kw)
    paths = res["paths"]
    for p in paths.values():
        assert p.is_file() and p.with_name(p.name + ".json").is_file()  # every artifact has a provenance sidecar
    assert paths["report"].read_text().splitlines()[0].startswith("**STAND-IN MODEL")
    ev, st = res["evaluations"], res["states"]
    assert st["stand_in"].all() and ev["stand_in"].astype(str).eq("True").all()
    assert set(st["budget"]) == {"moe:1", "attention:1", "mamba:1+moe:1"} and len(st) == 6
    assert ev["method"].value_counts().to_dict() == {"dense": 1, "cbo:0": 3, "cbo:1": 3, "block_influence": 3,
                                                     "block_influence_iterative": 3}
    # energies are xᵀHx of the saved Fisher; the evaluation rows are the gated model's numbers
    H = load_gradients(paths["gradients"]).H.numpy()
    for _, r in st.iterrows():
        x = np.zeros(H.shape[0])
        x[[int(b) for b in r["removed_blocks"].split()]] = 1
        assert r["energy"] == pytest.approx(x @ H @ x, rel=1e-12)
    dense = ev[ev["method"] == "dense"].iloc[0]
    row = ev[(ev["budget"] == "mamba:1+moe:1") & (ev["method"] == "cbo:0")].iloc[0]
    direct = perplexity(model, win, removed=[int(b) for b in row["removed_blocks"].split()])
    assert row["perplexity"] == pytest.approx(direct["perplexity"], rel=1e-9)
    assert row["ppl_retention"] == pytest.approx(dense["perplexity"] / row["perplexity"], rel=1e-9)
    assert row["accuracy_retention"] == pytest.approx(row["accuracy"] / dense["accuracy"], rel=1e-9)
    assert st[st["rerank_pick"]].groupby("budget").size().eq(1).all()
    # resume: nothing is measured again
    monkeypatch.setattr(hybrid, "perplexity", lambda *a, **k: pytest.fail("re-evaluated a finished row"))
    res2 = run_hybrid_experiment(model, tok, calib, win, budgets, **kw)
    assert len(res2["evaluations"]) == len(ev)


def test_hybrid_settings_defaults_and_validation():
    mini = hybrid_settings({"profile": "mini", "seed": 3})
    assert mini["k"] == 10 and mini["seed"] == 3 and mini["budgets"][0] == {"moe": 2} and len(mini["budgets"]) == 6
    assert mini["random_removal"] is None and mini["pattern"] == NANO_PATTERN
    tiny = hybrid_settings({"profile": "tiny", "hybrid": {"k": 4, "budgets": ["moe:1+mamba:1"],
                                                          "random_removal": [0, 2]}})
    assert tiny["k"] == 4 and tiny["budgets"] == [{"mamba": 1, "moe": 1}] and tiny["train_steps"] < mini["train_steps"]
    assert tiny["random_removal"] == [0, 2]
    paper = hybrid_settings({"profile": "paper"})
    assert paper["model"].startswith("nvidia/") and paper["budgets"] == [{"attention": 2}, {"moe": 2}, {"moe": 3}]
    assert paper["calibration"] == "openhermes" and paper["calibration_max_length"] == 6000 and paper["k"] == 20
    with pytest.raises(ValueError, match=r"unknown hybrid setting\(s\) \[.kk.\]; allowed"):
        hybrid_settings({"hybrid": {"kk": 1}})
    with pytest.raises(ValueError, match="eval_source"):
        hybrid_settings({"hybrid": {"eval_source": "wiki"}})


# --------------------------------------------------------------------------------------------- checkpoint files
def _save(model, tok, folder, shard=None):
    model.save_pretrained(folder, **({"max_shard_size": shard} if shard else {}))
    tok.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("shard", [None, "60KB"])
def test_prune_checkpoint_files_nemotron_equals_in_memory_removal(tmp_path, shard):
    from transformers import AutoModelForCausalLM

    from cbo_utils.prune.export import verify_export

    model, tok = tiny_nemotron_h(TINY_NEMOTRON_PATTERN)  # MEMEM*EMEM*EME
    src = _save(model, tok, tmp_path / "src", shard)
    if shard:
        assert (src / "model.safetensors.index.json").is_file()
    remove = [1, 2, 5, 12]  # MoE, Mamba2, attention, Mamba2
    out = prune_checkpoint_files(src, remove, tmp_path / "pruned", method="test")
    pruned = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()  # plain from_pretrained
    ref = remove_blocks(copy.deepcopy(model), remove)
    x = torch.randint(3, len(tok), (2, 21))
    with torch.no_grad():
        torch.testing.assert_close(pruned(x).logits, ref(x).logits, rtol=0, atol=1e-5)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["hybrid_override_pattern"] == "MEMEMEM*EE" == "".join(
        c for i, c in enumerate(TINY_NEMOTRON_PATTERN) if i not in remove)
    assert cfg["num_hidden_layers"] == 10 and len(cfg["layers_block_type"]) == 10
    assert cfg["cbo_removed_blocks"] == remove
    if shard:  # the index names exactly the tensors in the shards, and its total size is right
        from safetensors import safe_open

        idx = json.loads((out / "model.safetensors.index.json").read_text())
        seen, size = {}, 0
        for f in sorted(set(idx["weight_map"].values())):
            with safe_open(str(out / f), "pt") as fh:
                for name in fh.keys():
                    seen[name] = f
                    t = fh.get_tensor(name)
                    size += t.numel() * t.element_size()
        assert seen == idx["weight_map"] and idx["metadata"]["total_size"] == size
        assert not any(".layers.13." in n for n in seen)
    assert (out / "tokenizer.json").is_file() and (out / "chat_template.jinja").is_file()
    rec = json.loads((out / "removed_blocks.json").read_text())
    assert rec["removed_blocks"] == remove and rec["pruned_from_files"] and rec["provenance"]["kind"]
    assert verify_export(out, model, tok, write=False)["ok"]  # reload keys, indices, logits, cached generation


def test_prune_checkpoint_files_llama(tmp_path):
    from transformers import AutoModelForCausalLM

    model, tok = tiny_llama()
    src = _save(model, tok, tmp_path / "src", "40KB")
    out = prune_checkpoint_files(src, [1, 3], tmp_path / "pruned")
    pruned = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ref = remove_blocks(copy.deepcopy(model), [1, 3])
    x = torch.randint(3, len(tok), (1, 17))
    with torch.no_grad():
        torch.testing.assert_close(pruned(x).logits, ref(x).logits, rtol=0, atol=1e-5)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 4
    with pytest.raises(FileExistsError):
        prune_checkpoint_files(src, [1], out)


def test_quantization_metadata_follows_the_removal(tmp_path):
    model, tok = tiny_nemotron_h(TINY_NEMOTRON_PATTERN)
    src = _save(model, tok, tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {
        "quant_method": "fp8", "activation_scheme": "static",
        "ignore": ["lm_head", "backbone.layers.5.mixer.q_proj", "backbone.layers.6.mixer.gate",
                   "backbone.layers.10.mixer.o_proj", "model.layers.13.mixer.in_proj", "re:.*layers\\.7\\..*",
                   "mtp.layers.0.mixer.q_proj"],
        "modules_to_not_convert": ["backbone.layers.2.mixer.in_proj", "backbone.layers.3.mixer.out_proj"],
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": {"num_bits": 8}}},
        "per_module": {"backbone.layers.4.mixer.in_proj": {"scale": 1}, "backbone.layers.11.mixer.in_proj": {}},
    }
    (src / "config.json").write_text(json.dumps(cfg))
    exclude = ["lm_head", "backbone.layers.4.mixer.in_proj", "backbone.layers.5.mixer.k_proj",
               "backbone.layers.10.mixer.q_proj"]
    (src / "hf_quant_config.json").write_text(json.dumps({"quantization": {"quant_algo": "FP8",
                                                                           "exclude_modules": exclude}}))
    remove = [2, 4, 6]  # kept: 0 1 3 5 7 8 9 10 11 12 13 → new 0..10
    out = prune_checkpoint_files(src, remove, tmp_path / "pruned")
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert q["ignore"] == ["lm_head", "backbone.layers.3.mixer.q_proj", "backbone.layers.7.mixer.o_proj",
                           "model.layers.10.mixer.in_proj", "re:.*layers\\.4\\..*", "mtp.layers.0.mixer.q_proj"]
    assert q["modules_to_not_convert"] == ["backbone.layers.2.mixer.out_proj"]
    assert q["config_groups"] == cfg["quantization_config"]["config_groups"] and q["quant_method"] == "fp8"
    assert q["per_module"] == {"backbone.layers.8.mixer.in_proj": {}}
    hq = json.loads((out / "hf_quant_config.json").read_text())["quantization"]
    assert hq["exclude_modules"] == ["lm_head", "backbone.layers.3.mixer.k_proj", "backbone.layers.7.mixer.q_proj"]
    rec = json.loads((out / "removed_blocks.json").read_text())
    assert "backbone.layers.6.mixer.gate" in rec["config_rewrite"]["quantization_config"]["dropped"]
    assert remap_layer_references({"a": "layers.99.x"}, [0, 1], 2) == {"a": "layers.99.x"}  # not a block index


def test_prune_checkpoint_files_remote_code_layout_and_refusals(tmp_path):
    from safetensors.torch import load_file, save_file

    src = tmp_path / "remote"
    src.mkdir()
    pattern = "ME*M*E"
    tensors = {"backbone.embeddings.weight": torch.zeros(3, 2), "lm_head.weight": torch.ones(3, 2),
               "mtp.layers.0.mixer.weight": torch.full((2,), 7.0),  # numbered separately: left alone
               **{f"backbone.layers.{i}.mixer.weight": torch.full((2,), float(i)) for i in range(6)},
               **{f"backbone.layers.{i}.norm.weight": torch.full((1,), float(i)) for i in range(6)}}
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    (src / "config.json").write_text(json.dumps({
        "model_type": "nemotron_h", "architectures": ["NemotronHForCausalLM"], "hybrid_override_pattern": pattern,
        "num_hidden_layers": 6, "auto_map": {"AutoConfig": "configuration_nemotron_h.NemotronHConfig"}}))
    (src / "configuration_nemotron_h.py").write_text("# remote code stays with the checkpoint\n")
    out = prune_checkpoint_files(src, [0, 2], tmp_path / "pruned")
    got = load_file(str(out / "model.safetensors"))
    assert sorted(k for k in got if ".layers." in k and not k.startswith("mtp")) == sorted(
        f"backbone.layers.{i}.{p}.weight" for i in range(4) for p in ("mixer", "norm"))
    assert [float(got[f"backbone.layers.{i}.mixer.weight"][0]) for i in range(4)] == [1.0, 3.0, 4.0, 5.0]
    assert float(got["mtp.layers.0.mixer.weight"][0]) == 7.0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["hybrid_override_pattern"] == "EM*E" and cfg["num_hidden_layers"] == 4
    assert (out / "configuration_nemotron_h.py").is_file()
    with pytest.raises(RemovalError, match="every attention block"):
        prune_checkpoint_files(src, [2, 4], tmp_path / "x")
    with pytest.raises(RemovalError, match="out of range"):
        prune_checkpoint_files(src, [6], tmp_path / "x")
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "config.json").write_text(json.dumps({"num_hidden_layers": 2}))
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="never read"):
        prune_checkpoint_files(tmp_path / "pickled", [1], tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_command_line_runs_a_profile(tmp_path, monkeypatch, capsys):
    import yaml
    from transformers import AutoModelForCausalLM

    from cbo_utils.model.blocks import Gates

    monkeypatch.setenv("CBO_CACHE", str(tmp_path / "cache"))
    settings = {"pattern": "MEM*E*ME", "hidden": 32, "train_steps": 2, "train_seq_len": 32, "train_batch_size": 2}
    # the stand-in's own folder plays the second (e.g. FP8) checkpoint that gets pruned with the selections
    model, tok, info = standin_nemotron_h(**{k.removeprefix("train_"): v for k, v in settings.items()},
                                          lr=3e-3, seed=0, progress=False)
    profile = tmp_path / "p.yaml"
    profile.write_text(yaml.safe_dump({"profile": "tiny", "seed": 0, "hybrid": {
        **settings, "calibration_samples": 3, "calibration_max_tokens": 32, "rerank_samples": 2, "k": 2,
        "budgets": [{"moe": 1}, "attention:1+mamba:1"], "eval_windows": 2, "eval_seq_len": 32,
        "block_influence": ["one_shot"], "prune_checkpoint": info["path"]}}))
    assert hybrid.main(["--profile", str(profile), "--results", str(tmp_path / "res"), "--quiet"]) == 0
    out = tmp_path / "res" / "hybrid"
    assert (out / "hybrid.md").read_text().startswith("**STAND-IN MODEL")
    ev = hybrid._read_evaluations(out / "hybrid_evaluations.csv")
    assert set(ev["budget"]) == {"", "moe:1", "attention:1+mamba:1"} and ev["stand_in"].all()
    assert (ev["eval_source"].str.contains("SciQ held-out")).all()
    assert "CBO:0 (ground state)" in capsys.readouterr().out
    assert len(list((tmp_path / "cache").glob("standin-nemotron-h-*"))) == 1  # trained once, then loaded
    folders = sorted(p.name for p in (out / "pruned_checkpoints").iterdir())
    assert folders == ["attention-1_mamba-1__block_influence", "attention-1_mamba-1__cbo0", "moe-1__block_influence",
                       "moe-1__cbo0"]
    row = ev[(ev["budget"] == "attention:1+mamba:1") & (ev["method"] == "cbo:0")].iloc[0]
    removed = [int(b) for b in row["removed_blocks"].split()]
    pruned = AutoModelForCausalLM.from_pretrained(out / "pruned_checkpoints" / "attention-1_mamba-1__cbo0").eval()
    x = torch.tensor([tok("Plants make sugar from light.")["input_ids"]])
    with torch.no_grad(), Gates(model) as g, g.removed(removed):
        torch.testing.assert_close(pruned(x).logits, model(x).logits, rtol=0, atol=1e-5)


def test_reasoning_evaluation_of_pruned_checkpoints_retention_and_resume(tmp_path, monkeypatch):
    """The paper profile's path (FP8 checkpoint pruned by files, lm-eval, retention) run on a tiny checkpoint with
    an offline task; retention checked against the scores, and a second call measures nothing again."""
    import pandas as pd

    from cbo_utils.evaluate import lmeval

    model, tok = tiny_nemotron_h(TINY_NEMOTRON_PATTERN)
    src = _save(model, tok, tmp_path / "src")
    folders = {"moe-1__cbo0": prune_checkpoint_files(src, [1], tmp_path / "a"),
               "attention-1__cbo0": prune_checkpoint_files(src, [5], tmp_path / "b")}
    df = reasoning.evaluate_reasoning(folders, src, ["arc_easy"], tmp_path / "out", stand_in=True, source="offline",
                                   apply_chat_template=False, limit=4, dtype="float32", batch_size=4)
    assert set(df["label"]) == {"dense", "moe-1__cbo0", "attention-1__cbo0"}
    direct = lmeval.evaluate_checkpoint(folders["moe-1__cbo0"], ["arc_easy"], limit=4, batch_size=4)
    want = [r["value"] for r in direct if r["metric"] == "acc_norm"][0]
    row = df[df["label"] == "moe-1__cbo0"].iloc[0]
    dense = df[df["label"] == "dense"].iloc[0]
    assert row["metric"] == "acc_norm" and row["value"] == pytest.approx(want)
    assert dense["retention"] == pytest.approx(1.0) or dense["value"] == 0
    if dense["value"]:
        assert row["retention"] == pytest.approx(row["value"] / dense["value"])
    assert df["stand_in"].all()

    def boom(*a, **k):
        raise AssertionError("measured again")

    monkeypatch.setattr(reasoning, "evaluate_checkpoint", boom)
    again = reasoning.evaluate_reasoning(folders, src, ["arc_easy"], tmp_path / "out", stand_in=True,
                                      source="offline", apply_chat_template=False, limit=4)
    pd.testing.assert_frame_equal(again.reset_index(drop=True), df.reset_index(drop=True), check_dtype=False)
