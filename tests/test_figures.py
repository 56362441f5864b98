"""Figures drawn from result files: the plotted data equals the inputs, the bytes are deterministic, missing columns
give clear errors, draw_all skips what is absent. Synthetic tables in tmp_path (small: the suite stays fast)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cbo_utils.core.artifacts import format_blocks, write_json
from cbo_utils.evaluate.lmeval import ZERO_SHOT_METRIC
from cbo_utils.report.figures import (
    draw_all,
    draw_energy_vs_perplexity,
    draw_energy_vs_zero_shot,
    draw_hybrid_retention,
    draw_method,
    draw_states_map,
)
from cbo_utils.select.cbo import spearman

N, M = 6, 2
ROOT = Path(__file__).resolve().parent.parent


def states_table(n=N, m=M, k=8, seed=0) -> pd.DataFrame:
    """The k lowest of the C(n, m) states of a random PSD energy, as the solvers write them."""
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(12, n))
    H = A.T @ A / 12
    rows = []
    for s in itertools.combinations(range(n), m):
        x = np.zeros(n)
        x[list(s)] = 1
        rows.append((float(x @ H @ x), format_blocks(s)))
    rows.sort()
    return pd.DataFrame({"rank": range(k), "energy": [e for e, _ in rows[:k]],
                         "removed_blocks": [b for _, b in rows[:k]], "solver": "exact", "seed": "",
                         "feasible": True, "tie": False})


def state_energies(zero_shot: bool = True, seed=1) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for variant, m in itertools.product(["cbo-paper", "cbo-sd"], [1, 2]):
        sets = [format_blocks(s) for s in itertools.combinations(range(N), m)]
        for j, b in enumerate(sets[:10]):
            kind = "lowest" if j < 5 else "random"
            rows.append({"model": "toy", "variant": variant, "M": m, "kind": kind, "rank": j if j < 5 else j - 5,
                         "removed_blocks": b, "energy": float(j + rng.random()),
                         "perplexity": float(np.exp(rng.normal(3, 1))),
                         "zero_shot_mean": float(rng.random()) if zero_shot and variant == "cbo-sd" else np.nan})
    return pd.DataFrame(rows)


def correlations(se: pd.DataFrame) -> pd.DataFrame:
    out = []
    for (v, m), g in se.groupby(["variant", "M"], sort=False):
        out.append({"model": "toy", "variant": v, "M": m, "states": len(g),
                    "spearman_all": spearman(g["energy"], np.log(g["perplexity"]))})
    return pd.DataFrame(out)


def evaluations(states: pd.DataFrame, ranks=(0, 3, 5)) -> pd.DataFrame:
    """Zero-shot and held-out rows for the given ranks (CBO:3 scores best on the zero-shot mean)."""
    rows = []
    score = {0: 0.40, 3: 0.60, 5: 0.50}
    for r in ranks:
        b = states.loc[states["rank"] == r, "removed_blocks"].iloc[0]
        base = {"model": "toy", "method": f"m{r}", "M": M, "state": "selected", "stderr": 0.01, "n": 50,
                "limit": 50, "retrained": False, "lm_eval_version": "x", "removed_blocks": b}
        rows.append({**base, "task": "heldout_ppl", "metric": "perplexity", "value": 100.0 + r, "limit": None})
        for t in ("arc_easy", "hellaswag", "winogrande"):
            rows.append({**base, "task": t, "metric": "acc", "value": score.get(r, 0.3) - 0.1})
            if t in ZERO_SHOT_METRIC:
                rows.append({**base, "task": t, "metric": "acc_norm", "value": score.get(r, 0.3)})
    # a retrained row and another model must be ignored
    rows.append({**rows[1], "retrained": True, "value": 0.99})
    rows.append({**rows[1], "model": "other", "value": 0.01})
    return pd.DataFrame(rows)


def hybrid_evaluations(stand_in=True) -> pd.DataFrame:
    rows = [{"model": "hyb", "stand_in": stand_in, "budget": "", "method": "dense", "rank": None,
             "removed_blocks": "", "ppl_retention": 1.0, "accuracy_retention": 1.0}]
    for b, budget in enumerate(["moe:2", "attention:1"]):
        for r in range(3):
            rows.append({"model": "hyb", "stand_in": stand_in, "budget": budget, "method": f"cbo:{r}", "rank": r,
                         "removed_blocks": f"{r} {r + 3}", "ppl_retention": 0.99 - 0.01 * r - 0.1 * b,
                         "accuracy_retention": 0.98 - 0.02 * r, "rerank_pick": r == 1})
        for method, val in (("block_influence", 0.9), ("block_influence_iterative", 0.91)):
            rows.append({"model": "hyb", "stand_in": stand_in, "budget": budget, "method": method, "rank": None,
                         "removed_blocks": "4 5", "ppl_retention": val - 0.1 * b, "accuracy_retention": val + 0.01,
                         "rerank_pick": None})
    return pd.DataFrame(rows)


def png(path: Path) -> bytes:
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return data


# ---------------------------------------------------------------------------------------------------- Fig. 1
def test_method_figure_shows_the_ground_state_and_is_deterministic(tmp_path):
    st = states_table()
    a = draw_method(st, tmp_path / "a", model="toy", n_blocks=N, block_types="MEM*EM")
    b = draw_method(st, tmp_path / "b", model="toy", n_blocks=N, block_types="MEM*EM")
    assert a.path.name == "method__toy__M2.png"
    data = png(a.path)
    assert data == png(b.path)  # same inputs → same bytes
    assert b"Software" not in data and b"tIME" not in data
    ground = [int(i) for i in st.loc[st["rank"] == 0, "removed_blocks"].iloc[0].split()]
    assert a.data["removed"] == ground and a.data["M"] == M and a.data["N"] == N
    assert sorted(a.data["kept"] + a.data["removed"]) == list(range(N))
    assert a.data["block_types"] == ["mamba", "moe", "mamba", "attention", "moe", "mamba"]
    assert a.data["energy"] == pytest.approx(st["energy"].iloc[0])
    with pytest.raises(ValueError, match="n_blocks"):
        draw_method(st, tmp_path, model="toy")
    with pytest.raises(ValueError, match="6 entries for N = 7"):
        draw_method(st, tmp_path, model="toy", n_blocks=7, block_types="MEM*EM")


# ---------------------------------------------------------------------------------------------------- Figs. 2-3
def test_energy_vs_perplexity_rho_is_spearman_of_the_plotted_points(tmp_path):
    se = state_energies()
    corr = correlations(se)
    (tmp_path / "in").mkdir()
    se.to_csv(tmp_path / "in" / "state_energies.csv", index=False)
    d = draw_energy_vs_perplexity(tmp_path / "in" / "state_energies.csv", tmp_path, correlations=corr)
    assert d.path.name == "energy_vs_perplexity__toy.png" and not d.notes
    rho = d.data["rho"].set_index(["variant", "M"])
    pts = d.data["points"]
    assert len(pts) == len(se) and len(rho) == 4
    for (v, m), g in se.groupby(["variant", "M"]):
        p = pts[(pts["variant"] == v) & (pts["M"] == m)]
        assert np.allclose(np.sort(p["score"]), np.sort(g["perplexity"]))
        want = spearman(g["energy"], g["perplexity"])
        assert rho.loc[(v, m), "rho"] == pytest.approx(want, abs=1e-12)
        assert rho.loc[(v, m), "rho_file"] == pytest.approx(want, abs=1e-12)  # log ppl: the same ranks
        low = g[g["kind"] == "lowest"]
        assert rho.loc[(v, m), "rho_lowest"] == pytest.approx(spearman(low["energy"], low["perplexity"]))
    bad = corr.assign(spearman_all=corr["spearman_all"] + 0.5)
    assert any("differs" in n for n in draw_energy_vs_perplexity(se, tmp_path, correlations=bad).notes)


def test_energy_vs_zero_shot_skips_empty_panels(tmp_path):
    d = draw_energy_vs_zero_shot(state_energies(), tmp_path)
    assert d.path.name == "energy_vs_zero_shot__toy.png"
    assert set(d.data["rho"]["variant"]) == {"cbo-sd"}  # cbo-paper has no zero-shot scores
    assert any("cbo-paper M=1" in n for n in d.notes)
    empty = draw_energy_vs_zero_shot(state_energies(zero_shot=False), tmp_path / "none")
    assert empty.path is None and "not drawn" in empty.notes[-1]
    assert not (tmp_path / "none").exists()


# ---------------------------------------------------------------------------------------------------- Fig. 4
def test_states_map_cells_are_the_removed_blocks_and_bars_compare_ground_with_best_excited(tmp_path):
    st = states_table()
    se = state_energies()
    ev = evaluations(st)
    d = draw_states_map(st, tmp_path, model="toy", n_blocks=N, evaluations=ev, state_energies=se,
                        tasks=["hellaswag", "arc_easy", "winogrande"])
    assert d.path.name == "states_map__toy__M2.png"
    mat = d.data["matrix"]
    assert mat.shape == (len(st), N)
    for r, blocks in zip(st["rank"], st["removed_blocks"]):
        assert np.flatnonzero(mat[r]).tolist() == [int(b) for b in blocks.split()]
    assert d.data["excited_rank"] == 3  # the highest zero-shot mean among the evaluated excited states
    cmp = d.data["comparison"].set_index("task")
    assert list(cmp.index) == ["hellaswag", "arc_easy", "winogrande", "mean"]
    assert cmp.loc["hellaswag", "CBO:0"] == pytest.approx(0.40)  # acc_norm for hellaswag
    assert cmp.loc["arc_easy", "CBO:0"] == pytest.approx(0.30)  # not the retrained row, not the other model's
    assert cmp.loc["arc_easy", "CBO:3"] == pytest.approx(0.50)  # acc otherwise
    assert cmp.loc["mean", "CBO:3"] == pytest.approx(np.mean([0.6, 0.5, 0.5]))
    se_m = se[(se["M"] == M)].drop_duplicates("removed_blocks").set_index("removed_blocks")["perplexity"]
    for r, p in d.data["perplexity"].items():
        assert p == pytest.approx(se_m[st.loc[st["rank"] == r, "removed_blocks"].iloc[0]])
    again = draw_states_map(st, tmp_path / "again", model="toy", n_blocks=N, evaluations=ev, state_energies=se,
                            tasks=["hellaswag", "arc_easy", "winogrande"])
    assert png(d.path) == png(again.path)


def test_states_map_without_excited_evaluations_is_map_only(tmp_path):
    st = states_table()
    d = draw_states_map(st, tmp_path, model="toy", variant="cbo-sd", evaluations=evaluations(st, ranks=(0,)))
    assert d.path.name == "states_map__toy__cbo-sd__M2.png"
    assert d.data["comparison"] is None and any("map only" in n for n in d.notes)
    assert any("assumed N" in n for n in d.notes)  # no sidecar and no n_blocks: N from the highest block
    ppl_only = evaluations(st, ranks=(0, 4))
    ppl_only = ppl_only[(ppl_only["task"] == "heldout_ppl") | (ppl_only["removed_blocks"] ==
                                                                st["removed_blocks"].iloc[0])]
    d = draw_states_map(st, tmp_path, model="toy", n_blocks=N, evaluations=ppl_only)
    assert d.data["excited_rank"] == 4 and list(d.data["comparison"]["task"]) == ["heldout_ppl"]
    with pytest.raises(ValueError, match="expected M = 3"):
        draw_states_map(st, tmp_path, model="toy", M=3)


# ---------------------------------------------------------------------------------------------------- Fig. 5
def test_hybrid_retention_points_are_the_csv_retentions(tmp_path):
    ev = hybrid_evaluations()
    path = tmp_path / "hybrid_evaluations.csv"
    ev.to_csv(path, index=False)
    d = draw_hybrid_retention(path, tmp_path)
    assert d.path.name == "hybrid_retention__hyb.png"
    assert "stand-in for nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B" in d.data["title"]
    assert d.data["budgets"] == ["moe:2", "attention:1"]
    pts = d.data["points"].set_index(["budget", "method"])
    want = ev[ev["budget"] != ""].set_index(["budget", "method"])
    assert sorted(pts.index) == sorted(want.index)
    for key in want.index:
        assert pts.loc[key, "ppl_retention"] == pytest.approx(want.loc[key, "ppl_retention"])
        assert pts.loc[key, "accuracy_retention"] == pytest.approx(want.loc[key, "accuracy_retention"])
    assert pts["rerank_pick"].sum() == 2
    real = draw_hybrid_retention(hybrid_evaluations(stand_in=False), tmp_path / "real")
    assert "stand-in" not in real.data["title"]


# ---------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("fn, table, column, stage", [
    (lambda t, o: draw_energy_vs_perplexity(t, o), state_energies(), "energy", "make compare"),
    (lambda t, o: draw_energy_vs_zero_shot(t, o), state_energies(), "zero_shot_mean", "make compare"),
    (lambda t, o: draw_states_map(t, o, model="toy"), states_table(), "removed_blocks", "make reproduce"),
    (lambda t, o: draw_method(t, o, model="toy", n_blocks=N), states_table(), "rank", "make reproduce"),
    (lambda t, o: draw_hybrid_retention(t, o), hybrid_evaluations(), "accuracy_retention", "make hybrid"),
])
def test_missing_columns_say_which_and_which_stage(tmp_path, fn, table, column, stage):
    with pytest.raises(ValueError, match=column) as err:
        fn(table.drop(columns=[column]), tmp_path)
    assert stage in str(err.value)


def test_evaluations_without_removed_blocks_are_rejected(tmp_path):
    st = states_table()
    with pytest.raises(ValueError, match=r"removed_blocks.*evaluate stage"):
        draw_states_map(st, tmp_path, model="toy", n_blocks=N, evaluations=evaluations(st).drop(
            columns=["removed_blocks"]))


# ---------------------------------------------------------------------------------------------------- draw_all
def test_draw_all_skips_what_is_absent(tmp_path, capsys):
    res = tmp_path / "results"
    res.mkdir()
    assert draw_all(res, tmp_path / "figs") == []
    manifest = json.loads((tmp_path / "figs" / "figures.json").read_text())
    assert manifest["figures"] == {} and len(manifest["skipped"]) >= 4
    assert manifest["results"] == str(res)                 # outside the repository: as given
    assert "skipped Fig. 5" in capsys.readouterr().out
    state_energies().to_csv(res / "state_energies.csv", index=False)
    made = draw_all(res, tmp_path / "figs")
    assert [p.name for p in made] == ["energy_vs_perplexity__toy.png", "energy_vs_zero_shot__toy.png"]


def test_draw_all_draws_every_figure_whose_inputs_exist(tmp_path):
    res = tmp_path / "results"
    (res / "toy" / "compare").mkdir(parents=True)
    (res / "hybrid").mkdir()
    st = states_table()
    st.to_csv(res / "toy" / "states_M2.csv", index=False)
    write_json(res / "toy" / "states_M2.csv.json", {"parameters": {"energy": "fisher"}, "solver_info": {"N": N}})
    st.to_csv(res / "toy" / "compare" / "states_cbo-sd_M2.csv", index=False)
    st.head(1).to_csv(res / "toy" / "compare" / "states_cbo-exactH_M2.csv", index=False)  # one state: skipped
    se = state_energies(zero_shot=False)
    se.to_csv(res / "state_energies.csv", index=False)
    correlations(se).to_csv(res / "correlations.csv", index=False)
    evaluations(st).to_csv(res / "evaluations.csv", index=False)
    hybrid_evaluations().to_csv(res / "hybrid" / "hybrid_evaluations.csv", index=False)
    hst = st.head(3).assign(model="hyb", stand_in=True, budget="moe:2")
    hst.to_csv(res / "hybrid" / "hybrid_states.csv", index=False)
    write_json(res / "hybrid" / "gradients.safetensors.json", {"block_types": ["mamba", "moe"] * 3})
    made = draw_all(res, tmp_path / "figs")
    assert [p.name for p in made] == [
        "energy_vs_perplexity__toy.png", "hybrid_retention__hyb.png", "method__hyb__moe2.png",
        "method__toy__M2.png", "states_map__toy__M2.png", "states_map__toy__cbo-sd__M2.png"]
    manifest = json.loads((tmp_path / "figs" / "figures.json").read_text())
    assert manifest["figures"]["energy_vs_perplexity__toy.png"]["paper_item"] == "Fig. 3"
    assert "state_energies.csv" in manifest["figures"]["energy_vs_perplexity__toy.png"]["inputs"]
    skipped = " ".join(s["figure"] for s in manifest["skipped"])
    assert "Fig. 2" in skipped and "cbo-exactH" in skipped
    first = {p.name: p.read_bytes() for p in made}
    draw_all(res, tmp_path / "figs")
    assert first == {p.name: p.read_bytes() for p in made}


def test_a_redraw_removes_the_figures_it_no_longer_makes_and_nothing_else(tmp_path, capsys):
    """A figure an earlier drawing made (recorded, unchanged) that this drawing does not make — here of a model whose
    states table is gone — is removed; a recorded figure that changed since, and a file cbo never wrote, stay."""
    res, figs = tmp_path / "results", tmp_path / "figs"
    for model in ("toy", "old"):
        (res / model).mkdir(parents=True)
        states_table().to_csv(res / model / "states_M2.csv", index=False)
        write_json(res / model / "states_M2.csv.json", {"parameters": {"energy": "fisher"}, "solver_info": {"N": N}})
    first = {p.name for p in draw_all(res, figs)}
    assert {"method__old__M2.png", "states_map__old__M2.png", "method__toy__M2.png"} <= first
    (figs / "states_map__old__M2.png").write_bytes(b"edited by hand")     # changed since cbo wrote it
    (figs / "mine.png").write_bytes(b"the user's")                         # never cbo's
    for f in (res / "old").iterdir():
        f.unlink()
    (res / "old").rmdir()
    second = {p.name for p in draw_all(res, figs)}
    assert second == first - {"method__old__M2.png", "states_map__old__M2.png"}
    assert not (figs / "method__old__M2.png").exists()                     # recorded, unchanged: removed
    assert (figs / "states_map__old__M2.png").read_bytes() == b"edited by hand"
    assert (figs / "mine.png").read_bytes() == b"the user's"
    assert all((figs / n).is_file() for n in second)
    assert "removed method__old__M2.png" in capsys.readouterr().out
    rec = json.loads((figs / ".cbo-manifest.json").read_text())["files"]
    assert "method__old__M2.png" not in rec and "method__toy__M2.png" in rec


def test_a_new_figure_is_one_registry_entry(tmp_path, monkeypatch):
    """register_figure: draw_all draws the new figure from its planner, records its paper item and inputs, and
    reports its skips; the registry is the only list of figures."""
    from cbo_utils.report import figures as fg

    monkeypatch.setattr(fg, "FIGURES", dict(fg.FIGURES))
    res = tmp_path / "results"
    res.mkdir()
    (res / "numbers.csv").write_text("x,y\n0,1\n1,3\n")

    def draw_line(path, out):
        df = pd.read_csv(path)
        fig = fg._new_figure(3, 2)
        fig.add_subplot().plot(df["x"], df["y"])
        return fg.Drawn(fg._save(fig, Path(out) / "line__numbers.png"), {"n": len(df)})

    @fg.register_figure("line", "Fig. 9")
    def plan(ctx):
        p = ctx.file("numbers.csv")
        yield fg.Job(lambda: draw_line(p, ctx.out), [p]) if p else fg.Skip("Fig. 9 line", "no numbers.csv")
        yield fg.Skip("Fig. 9 line (second panel)", "not measured here")

    made = fg.draw_all(res, tmp_path / "figs")
    assert "line__numbers.png" in [p.name for p in made]
    manifest = json.loads((tmp_path / "figs" / "figures.json").read_text())
    assert manifest["figures"]["line__numbers.png"]["paper_item"] == "Fig. 9"
    assert list(manifest["figures"]["line__numbers.png"]["inputs"]) == ["numbers.csv"]
    assert {"figure": "Fig. 9 line (second panel)", "reason": "not measured here"} in manifest["skipped"]
    assert fg.paper_items()["line"] == "Fig. 9"
    with pytest.raises(ValueError, match="already registered"):
        fg.register_figure("line", "Fig. 10")(plan)


@pytest.mark.skipif(not (ROOT / "results/mini/state_energies.csv").is_file()
                    or not (ROOT / "results/mini/correlations.csv").is_file(), reason="no mini results")
def test_mini_results_rho_matches_correlations_csv(tmp_path):
    """Smoke test on the committed mini results: ρ of Fig. 3 equals correlations.csv's spearman_all."""
    d = draw_energy_vs_perplexity(ROOT / "results/mini/state_energies.csv", tmp_path,
                                  correlations=ROOT / "results/mini/correlations.csv")
    rho = d.data["rho"]
    assert len(rho) and np.allclose(rho["rho"], rho["rho_file"], atol=1e-9)


def test_figures_json_ignores_timings_in_sidecars(tmp_path):
    from cbo_utils.report.figures import input_digest

    a, b, c = tmp_path / "a.csv.json", tmp_path / "b.csv.json", tmp_path / "c.csv.json"
    rec = {"kind": "states", "parameters": {"M": 4}, "solver_info": {"N": 30, "seconds": 1.5}, "created": "2026-01-01",
           "host": {"platform": "x"}, "seconds": 2.0}
    write = __import__("json").dumps
    a.write_text(write(rec))
    b.write_text(write({**rec, "created": "2027-02-02", "seconds": 9.0, "solver_info": {"N": 30, "seconds": 7.0}}))
    c.write_text(write({**rec, "solver_info": {"N": 31, "seconds": 1.5}}))   # what a figure reads changed
    assert input_digest(a) == input_digest(b) != input_digest(c)
    d = tmp_path / "t.csv"
    d.write_text("x\n1\n")
    e = tmp_path / "u.csv"
    e.write_text("x\n2\n")
    assert input_digest(d) != input_digest(e)


def test_figures_json_names_a_results_folder_in_the_repository_relatively(tmp_path, monkeypatch):
    """A committed figures.json names no machine's path: a results folder inside the checkout is recorded relative to
    it (core.artifacts.portable_path), whatever the current directory."""
    import shutil
    import tempfile

    from cbo_utils.core.artifacts import repo_root

    root = repo_root()
    if root is None:
        pytest.skip("an installed package: no repository to be relative to")
    res = Path(tempfile.mkdtemp(prefix=".test-figures-", dir=root))
    monkeypatch.chdir(tmp_path)                            # another current directory than the checkout
    try:
        draw_all(res, res / "figs")
        manifest = json.loads((res / "figs" / "figures.json").read_text())
        assert manifest["results"] == res.name and not Path(manifest["results"]).is_absolute()
    finally:
        shutil.rmtree(res)
