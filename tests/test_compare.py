"""The comparison harness end to end on the tiny profile, checked against independent recomputation."""

import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cbo_utils.calibration import heldout_text, load_calibration
from cbo_utils.core.artifacts import parse_blocks
from cbo_utils.core.profiles import load_profile
from cbo_utils.evaluate.perplexity import perplexity, perplexity_windows
from cbo_utils.experiments import compare
from cbo_utils.model.loss import calibration_nll
from cbo_utils.model.tiny import build_tiny


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cmp")
    compare.run_compare("tiny", out, M_values=[2], progress=False)
    return out


def test_tables_have_every_method(run):
    sel = pd.read_csv(run / "selections.csv")
    s = compare.compare_settings(load_profile("tiny"))
    skipped = {n["method"]: n["reason"] for n in json.loads((run / "skipped.json").read_text())}
    assert set(skipped) == {"taylor_plus"} and "may only remove" in skipped["taylor_plus"]  # 6 blocks, 4 + 2 kept
    want = (set(s["baselines"]) | set(s["variants"]) | {"random"}) - set(skipped)
    assert set(sel["method"]) == want
    assert (sel["removed_blocks"].map(lambda b: len(parse_blocks(b))) == 2).all()
    assert (sel["selection_seconds"] >= 0).all()
    assert len(sel[sel["method"] == "random"]) == 2
    ev = pd.read_csv(run / "evaluations.csv")
    dev = json.loads((run / "development.json").read_text())
    finalists = set(dev["finalists"]["tiny-llama"]["2"])
    for method in want | {"dense"}:
        got = ev[(ev["method"] == method) & (ev["task"] != "efficiency")]
        assert {"heldout_ppl", "heldout_ppl_lambada", compare.dev_task(s)} <= set(got["task"]), method
        assert ({"arc_easy", "piqa"} <= set(got["task"])) == (method in finalists | {"dense"}), method
    acc = ev[(ev["task"] == "piqa") & (ev["metric"] == "acc")]
    assert acc["value"].between(0, 1).all() and (acc["limit"] == 4).all() and (acc["n"] == 4).all()
    report = (run / "comparison.md").read_text()
    assert "M = 2" in report and "cbo-sd-rerank" in report and "## Efficiency" in report
    assert "## Paired comparison with the best baseline" in report


def test_development_rule_picks_the_lowest_development_perplexity(run):
    """default: dev — the CBO variant of lowest mean log development perplexity (the development mixture),
    recomputed here from evaluations.csv; the finalists are the 2 baselines of lowest development perplexity and the
    default."""
    ev = pd.read_csv(run / "evaluations.csv")
    s = compare.compare_settings(load_profile("tiny"))
    assert compare.dev_task(s) == "dev_ppl_mix"
    dv = ev[ev["task"] == compare.dev_task(s)]
    score = {v: np.log(dv[dv["method"] == v]["value"]).mean() for v in s["variants"] if (dv["method"] == v).any()}
    dev = json.loads((run / "development.json").read_text())
    assert dev["default"]["tiny-llama"] == min(score, key=score.get)
    assert compare.default_variant(run, s, "tiny-llama") == min(score, key=score.get)
    base = dv[~dv["method"].str.startswith("cbo") & ~dv["method"].isin(["dense", "random"])]
    fin = dev["finalists"]["tiny-llama"]["2"]
    val = dict(zip(base["method"], base["value"]))
    assert fin[-1] == min(score, key=score.get) and len(fin) == 3   # ties between baselines may go either way
    assert sorted(val[m] for m in fin[:2]) == pytest.approx(sorted(val.values())[:2])


def test_paired_intervals_recomputed_from_the_window_table(run):
    from cbo_utils.evaluate.statistics import paired_log_ratio

    paired = pd.read_csv(run / "paired.csv")
    w = pd.read_csv(run / "window_nll.csv")
    assert set(paired["task"]) == {"heldout_ppl", "heldout_ppl_lambada"}
    for task, grp in paired.groupby("task"):
        best = grp["best_baseline"].iloc[0]
        tw = w[(w["task"] == task) & (w["M"] == 2)]
        ref = tw[(tw["method"] == best)].sort_values("window")
        assert grp[grp["method"] == best]["ratio"].iloc[0] == pytest.approx(1.0)
        r = grp.iloc[-1]
        mine = tw[(tw["method"] == r["method"]) & (tw["state"] == r["state"])].sort_values("window")
        got = paired_log_ratio(mine["nll"].to_numpy(), ref["nll"].to_numpy(), mine["tokens"].to_numpy())
        assert r["ratio"] == pytest.approx(got["ratio"], rel=1e-5)
        assert r["ratio_lo"] == pytest.approx(got["ratio_lo"], rel=1e-5)


def test_perplexity_rows_match_independent_computation(run):
    model, tok = build_tiny("tiny-llama")
    ev = pd.read_csv(run / "evaluations.csv")
    win = perplexity_windows(tok, heldout_text(), seq_len=64, windows=4)
    row = ev[(ev["method"] == "block_influence") & (ev["task"] == "heldout_ppl")].iloc[0]
    removed = parse_blocks(row["removed_blocks"])
    from cbo_utils.model.blocks import remove_blocks

    remove_blocks(model, removed)  # physical removal: must equal the gated evaluation the harness did
    assert perplexity(model, win)["perplexity"] == pytest.approx(row["value"], rel=1e-5)


def test_rerank_picks_lowest_heldout_loss(run):
    """The re-ranked variant's pick has the lowest held-out calibration loss among the K states it saw."""
    model, tok = build_tiny("tiny-llama")
    sel = pd.read_csv(run / "selections.csv")
    calib = load_calibration(load_profile("tiny")["calibration"], tok, samples=8, max_tokens=64)
    held = calib.samples[6:]
    states = pd.read_csv(run / "tiny-llama" / "compare" / "states_cbo-sd-rerank_M2.csv")
    scores = [calibration_nll(model, held, removed=parse_blocks(b)) for b in states["removed_blocks"].head(20)]
    picked = sel[(sel["method"] == "cbo-sd-rerank")]["removed_blocks"].iloc[0]
    assert states["removed_blocks"].iloc[int(np.argmin(scores))] == picked


def test_correlations_and_resume(run, capsys):
    corr = pd.read_csv(run / "correlations.csv")
    assert set(corr["variant"]) == {"cbo-paper", "cbo-sd", "cbo-pairs"}
    assert (corr["states"] == 10).all() and corr["spearman_all"].between(-1, 1).all()
    ppl = pd.read_csv(run / "state_perplexities.csv")
    assert (ppl["perplexity"] > 1).all() and not ppl["perplexity"].map(math.isnan).any()
    assert not ppl["removed_blocks"].duplicated().any()  # one measurement per state
    assert ppl["zero_shot_mean"].between(0, 1).all() and (ppl["zero_shot_limit"] == 2).all()
    en_all = pd.read_csv(run / "state_energies.csv")
    from cbo_utils.select.cbo import spearman

    for _, c in corr.iterrows():  # ρ recomputed from the per-state table (NaN when the accuracy is constant)
        e = en_all[(en_all["variant"] == c["variant"]) & (en_all["M"] == c["M"])]
        for col, y in (("spearman_all", np.log(e["perplexity"])), ("spearman_zero_shot", e["zero_shot_mean"])):
            want = spearman(e["energy"].to_numpy(), y.to_numpy())
            assert (math.isnan(want) and math.isnan(c[col])) or c[col] == pytest.approx(want)
    en = pd.read_csv(run / "state_energies.csv")
    rnd = en[en["kind"] == "random"]
    # the same random states for both variants, each with its own energy recomputed here independently
    a, b = (rnd[rnd["variant"] == v].sort_values("rank") for v in ("cbo-paper", "cbo-sd"))
    assert list(a["removed_blocks"]) == list(b["removed_blocks"]) and len(a) == 5
    from cbo_utils.gradients import load_gradients

    g = load_gradients(run / "tiny-llama" / "compare" / "gradients_dense_8.safetensors")
    H = g.H.numpy()
    for _, r in a.iterrows():
        idx = parse_blocks(r["removed_blocks"])
        assert r["energy"] == pytest.approx(H[np.ix_(idx, idx)].sum(), rel=1e-9)
    before = (run / "evaluations.csv").read_text()
    sel_before = pd.read_csv(run / "selections.csv")
    compare.run_compare("tiny", run, M_values=[2], progress=True, stages=("select", "evaluate", "correlate"))
    out = capsys.readouterr().out
    assert "select M=" not in out and "evaluated" not in out  # nothing reselected or re-evaluated
    assert (run / "evaluations.csv").read_text() == before
    pd.testing.assert_frame_equal(pd.read_csv(run / "selections.csv"), sel_before)


def test_efficiency_rows(run):
    ev = pd.read_csv(run / "evaluations.csv")
    eff = ev[ev["task"] == "efficiency"]
    dense = eff[(eff["method"] == "dense") & (eff["metric"] == "parameters")]["value"].iloc[0]
    default = compare.default_variant(run, compare.compare_settings(load_profile("tiny")), "tiny-llama")
    pruned = eff[(eff["method"] == default) & (eff["metric"] == "parameters")]["value"].iloc[0]
    assert pruned < dense
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(run / "tiny-llama" / "compare" / "pruned_M2")
    N = build_tiny("tiny-llama")[0].config.num_hidden_layers
    assert sum(p.numel() for p in m.parameters()) == pruned and m.config.num_hidden_layers == N - 2


def test_bad_settings():
    with pytest.raises(ValueError, match="unknown CBO variants"):
        compare.compare_settings({"compare": {"variants": ["nope"]}})
    with pytest.raises(ValueError, match="rerank_samples"):
        compare.compare_settings({"compare": {"samples": 4, "rerank_samples": 4}})


@pytest.mark.parametrize("section,bad,where", [
    ({"compare": {"sampels": 4}}, "sampels", "compare"),
    ({"compare": {"spearman": {"lowst": 3}}}, "lowst", "compare.spearman"),
    ({"compare": {"spearman": {"zero_shot": {"task": ["piqa"]}}}}, "task", "compare.spearman.zero_shot"),
])
def test_every_compare_section_refuses_unknown_keys_naming_the_allowed(section, bad, where):
    with pytest.raises(ValueError, match=rf"unknown {re.escape(where)} setting\(s\) \['{bad}'\]; allowed: \["):
        compare.compare_settings(section)


def test_profile_top_level_keys_are_checked(tmp_path):
    p = tmp_path / "mine.yaml"
    p.write_text((Path(compare.__file__).parents[1] / "configs" / "tiny.yaml").read_text() + "sovler: sa\n")
    with pytest.raises(ValueError, match=r"unknown profile \(mine.yaml\) setting\(s\) \['sovler'\]; allowed: "):
        load_profile(str(p))
    assert load_profile("tiny")["profile"] == "tiny"  # the packaged profiles pass


def test_a_perplexity_on_other_windows_is_measured_again(tmp_path):
    """Resuming never keeps a held-out perplexity measured on other window settings (the key has no window count)."""
    from cbo_utils.core.tables import add_evaluations
    from cbo_utils.evaluate.measure import missing_measurements

    s = {"ppl_texts": ["boolq", "lambada"], "ppl_windows": 32, "ppl_seq_len": 256, "tasks": [], "limit": 20}
    key = {"model": "m", "method": "sleb", "M": 8, "state": "selected"}
    row = {**key, "retrained": False, "metric": "perplexity", "value": 90.0, "stderr": None, "limit": None,
           "lm_eval_version": None}
    add_evaluations(tmp_path, [{**row, "task": "heldout_ppl", "n": 8 * 255},            # an older, smaller run
                               {**row, "task": "heldout_ppl_lambada", "n": 32 * 255}])
    assert missing_measurements(tmp_path, key, s, retrained=False) == (["boolq"], [])


def test_a_removal_measured_once_is_copied_to_methods_that_chose_the_same_blocks(tmp_path):
    from cbo_utils.core.tables import add_evaluations, upsert_rows
    from cbo_utils.evaluate.measure import WINDOW_COLUMNS, WINDOW_KEY, done_rows, reuse_measurements

    base = {"model": "m", "M": 2, "state": "selected", "retrained": False, "lm_eval_version": "x"}
    add_evaluations(tmp_path, [
        {**base, "method": "sleb", "removed_blocks": "1 3", "task": "heldout_ppl", "metric": "perplexity",
         "value": 12.5, "n": 100, "limit": None},
        {**base, "method": "sleb", "removed_blocks": "1 3", "task": "arc_easy", "metric": "acc", "value": 0.4,
         "stderr": 0.1, "n": 5, "limit": 5},
        {**base, "method": "sleb", "removed_blocks": "1 3", "task": "arc_easy", "metric": "acc_norm", "value": 0.6,
         "stderr": 0.1, "n": 5, "limit": 5},
        {**base, "method": "tail", "removed_blocks": "2 3", "task": "heldout_ppl", "metric": "perplexity",
         "value": 99.0, "n": 100, "limit": None}])
    upsert_rows(tmp_path / "window_nll.csv", [{**{k: base[k] for k in ("model", "M", "state", "retrained")},
                                               "method": "sleb", "task": "heldout_ppl", "window": w, "nll": 2.0 + w,
                                               "tokens": 50} for w in range(2)], WINDOW_COLUMNS, WINDOW_KEY)
    key = {"model": "m", "method": "cbo-pairs", "M": 2, "state": "selected"}
    # other limit: the zero-shot task is still to measure; the perplexity is copied with its windows
    assert reuse_measurements(tmp_path, key, "1 3", False, ["heldout_ppl", "arc_easy"], limit=10) == ["arc_easy"]
    assert reuse_measurements(tmp_path, key, "1 3", False, ["arc_easy"], limit=5) == []
    got = done_rows(tmp_path / "evaluations.csv", model="m", method="cbo-pairs", M=2)
    assert sorted(zip(got["task"], got["metric"], got["value"])) == [
        ("arc_easy", "acc", 0.4), ("arc_easy", "acc_norm", 0.6), ("heldout_ppl", "perplexity", 12.5)]
    assert set(got["detail"]) == {"same removal as sleb"}
    w = done_rows(tmp_path / "window_nll.csv", method="cbo-pairs")
    assert list(w["nll"]) == [2.0, 3.0]
    # different blocks, sliding-window merging (a merged model), a retrained model: nothing copied
    key2 = {**key, "method": "angular_distance"}
    assert reuse_measurements(tmp_path, key2, "1 2", False, ["heldout_ppl"]) == ["heldout_ppl"]
    assert reuse_measurements(tmp_path, {**key, "method": "sliding_window_merging"}, "1 3", False,
                              ["heldout_ppl"]) == ["heldout_ppl"]
    assert reuse_measurements(tmp_path, key2, "1 3", True, ["heldout_ppl"]) == ["heldout_ppl"]


def test_dev_test_agreement_against_a_table_built_by_hand(tmp_path):
    """ρ(dev, test) across methods per M: 1 when the development perplexity orders the methods as a test text does,
    −1 when reversed; a method above the development cut-off is left out; the report shows the table."""
    rows = []
    dev = {"a": 10.0, "b": 20.0, "c": 30.0, "d": 40.0, "broken": 5e3}
    for M, sign in ((2, 1), (3, -1)):
        for m, v in dev.items():
            test = v if sign > 0 else 100.0 - v
            test = 1.0 if m == "broken" else test    # would spoil ρ = ±1 if it were kept
            for task, val in (("dev_ppl_sciq", v), ("heldout_ppl", test), ("heldout_ppl_lambada", v * 2)):
                rows.append({"model": "x", "method": m, "M": M, "state": "selected", "task": task,
                             "metric": "perplexity", "value": val, "retrained": False})
    rows.append({"model": "x", "method": "dense", "M": 0, "state": "selected", "task": "dev_ppl_sciq",
                 "metric": "perplexity", "value": 1.0, "retrained": False})
    pd.DataFrame(rows).to_csv(tmp_path / "evaluations.csv", index=False)
    agree = compare.dev_test_agreement(tmp_path).set_index("M")
    assert agree.loc[2, "methods"] == 4 and agree.loc[2, "best_on_dev"] == "a"
    assert agree.loc[2, "rho_heldout_ppl"] == pytest.approx(1.0) and agree.loc[2, "best_on_heldout_ppl"] == "a"
    assert agree.loc[3, "rho_heldout_ppl"] == pytest.approx(-1.0) and agree.loc[3, "best_on_heldout_ppl"] == "d"
    assert agree.loc[3, "rho_heldout_ppl_lambada"] == pytest.approx(1.0)
    s = {**compare.compare_settings(load_profile("tiny")), "dev_source": "sciq"}
    assert "## Development vs test" in compare.write_report(tmp_path, "tiny", s).read_text()


def _dev_tables(tmp_path, nll: dict, tokens: int = 63):
    """selections.csv rows and development_windows.csv for variants with per-(M, window) NLL arrays."""
    sels, rows = [], []
    for v, arr in nll.items():
        for j, M in enumerate((2, 3)):
            blocks = f"{v}-{M}"   # any distinct key per selection
            sels.append({"model": "x", "method": v, "M": M, "removed_blocks": blocks})
            rows += [{"model": "x", "M": M, "removed_blocks": blocks, "task": "dev_ppl_mix", "window": w,
                      "nll": float(arr[w, j]), "tokens": tokens} for w in range(arr.shape[0])]
    pd.DataFrame(rows).to_csv(tmp_path / compare.DEVELOPMENT_WINDOWS, index=False)
    return pd.DataFrame(sels)


def test_development_rule_tie_goes_to_the_preferred_variant(tmp_path):
    """The vote: the lowest mean over M of log development perplexity, recomputed by hand; a lead over dev_prefer
    whose paired interval includes 0 is a tie (the preferred variant is taken), a lead far outside noise is real."""
    rng = np.random.default_rng(0)
    base = rng.uniform(150, 250, size=(32, 2))          # windows × M, shared difficulty
    noise = lambda: rng.normal(0, 3.0, size=(32, 2))    # noqa: E731
    s = {**compare.compare_settings(load_profile("tiny")), "variants": ["cbo-a", "cbo-b", "cbo-c"],
         "dev_prefer": "cbo-b", "default": "dev", "bootstrap": 500}
    nll = {"cbo-b": base + noise(), "cbo-c": base + 40.0}
    nll["cbo-a"] = nll["cbo-b"] - 0.05 + noise()
    sels = _dev_tables(tmp_path, nll)
    r = compare.development_rule(tmp_path, "x", sels, s)
    want = {v: float(np.mean([a[:, j].sum() / (63 * 32) for j in range(2)])) for v, a in nll.items()}
    assert r["scores"] == pytest.approx(want, rel=1e-12)
    assert r["best"] == min(want, key=want.get) == "cbo-a"   # a lead of 0.05 nats per window: within noise
    assert r["lead"]["lo"] <= 0 <= r["lead"]["hi"] and r["default"] == "cbo-b" and "tie" in r["reason"]
    nll["cbo-a"] = base - 30.0                          # a lead of ~0.15 nats per token on every window: real
    r = compare.development_rule(tmp_path, "x", _dev_tables(tmp_path, nll), s)
    assert r["best"] == r["default"] == "cbo-a" and r["lead"]["hi"] < 0 and "real" in r["reason"]
    r = compare.development_rule(tmp_path, "x", sels, {**s, "dev_prefer": None})
    assert r["default"] == r["best"]


def test_dev_settings_are_checked():
    cfg = load_profile("tiny")
    with pytest.raises(ValueError, match="dev_source"):
        compare.compare_settings({**cfg, "compare": {**cfg["compare"], "dev_source": "wiki"}})
    with pytest.raises(ValueError, match="dev_prefer"):
        compare.compare_settings({**cfg, "compare": {**cfg["compare"], "dev_prefer": "cbo-nope"}})
