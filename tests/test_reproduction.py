"""The reproduction report (cbo_utils.report.reproduction): a run folder compared cell by cell with a reference, on
synthetic folders whose every difference is planted here (so the expected counts are known independently)."""

import csv
import json
import math

import pytest

from cbo_utils.core.artifacts import atomic_write_text, claim_folder, read_manifest, write_json
from cbo_utils.report.reproduction import compare_runs, infer_key, is_timing, main, render_markdown

SEL_COLS = ["model", "method", "M", "removed_blocks", "energy", "selection_seconds", "seed"]
SEL = [["toy", "cbo", "2", "3 5", "0.125", "1.5", "0"],
       ["toy", "cbo", "3", "1 3 5", "0.25", "2.5", "0"],
       ["toy", "random", "2", "0 4", "", "0.01", "0"],
       ["toy", "random", "2", "1 2", "", "0.02", "1"]]          # same model/method/M: told apart by seed
EV_COLS = ["model", "method", "M", "task", "value", "stderr", "tokens_per_s"]
EV = [["toy", "dense", "0", "ppl", "19.70016497241008", "0.5", "1000"],
      ["toy", "cbo", "2", "ppl", "28.961359257699364", "0.75", "900"],
      ["toy", "cbo", "3", "ppl", "41.5", "", "800"]]
HYB_COLS = ["model", "budget", "rank", "energy", "removed_blocks"]
HYB = [["h", "moe:2", "0", "2.1138017317508653e-05", "22 34"], ["h", "moe:2", "1", "2.4e-05", "22 51"]]
DEV = {"default": {"toy": "cbo"}, "dev_log_ppl": {"toy": {"cbo": 4.393592794181177, "sleb": 4.2}}}


def _csv(rows, cols):
    lines = [",".join(cols)] + [",".join(r) for r in rows]
    return "\n".join(lines) + "\n"


def _write(folder, sel=SEL, ev=EV, hyb=HYB, dev=DEV, skip=()):
    """A results folder cbo owns, holding the four tables (``skip``: names left out)."""
    claim_folder(folder, "results")
    for name, text in (("selections.csv", _csv(sel, SEL_COLS)), ("evaluations.csv", _csv(ev, EV_COLS)),
                       ("hybrid/hybrid_states.csv", _csv(hyb, HYB_COLS))):
        if name not in skip:
            atomic_write_text(folder / name, text)
    if "development.json" not in skip:
        write_json(folder / "development.json", dev)
    write_json(folder / "selections.csv.json", {"command": "a sidecar: never compared"})
    return folder


def _changed(rows, i, j, value):
    out = [list(r) for r in rows]
    out[i][j] = value
    return out


@pytest.fixture
def ref(tmp_path):
    return _write(tmp_path / "reference")


def _cells():
    """The non-key cells of the synthetic tables, counted here from their definitions: (values, timings)."""
    sel_values = len(SEL) * 2      # removed_blocks, energy (key: model, method, M, seed; timing: selection_seconds)
    ev_values = len(EV) * 2        # value, stderr (key: model, method, M, task; timing: tokens_per_s)
    hyb_values = len(HYB) * 2      # energy, removed_blocks (key: model, budget, rank)
    dev_values = 3                 # the JSON leaves (keyed by path)
    return sel_values + ev_values + hyb_values + dev_values, len(SEL) + len(EV)


def test_identical_tables_are_identical(tmp_path, ref):
    run = _write(tmp_path / "run")
    rep = compare_runs(run, ref)
    values, timings = _cells()
    t = rep["totals"]
    assert rep["verdict"] == "identical"
    assert (t["identical"], t["within tolerance"], t["differs"], t["timing"]) == (values, 0, 0, timings)
    assert t["tables_compared"] == 4 and t["rows_compared"] == len(SEL) + len(EV) + len(HYB) + 3
    assert sorted(rep["tables"]) == ["development.json", "evaluations.csv", "hybrid/hybrid_states.csv",
                                     "selections.csv"]       # recursive; the sidecar is not a table
    assert rep["tables"]["selections.csv"]["key"] == ["model", "method", "M", "seed"]
    assert rep["tables"]["hybrid/hybrid_states.csv"]["key"] == ["model", "budget", "rank"]
    assert rep["tables"]["selections.csv"]["timing"]["median_ratio"] == 1.0


def test_a_float_changed_by_1e_9_is_within_tolerance(tmp_path, ref):
    v = float(EV[1][4])
    run = _write(tmp_path / "run", ev=_changed(EV, 1, 4, repr(v * (1 + 1e-9))))
    rep = compare_runs(run, ref)
    t = rep["tables"]["evaluations.csv"]
    assert rep["verdict"] == "within tolerance" and t["cells"]["within tolerance"] == 1
    assert t["cells"]["differs"] == 0 and rep["totals"]["differs"] == 0
    assert t["max_rel_within"] == pytest.approx(1e-9, rel=1e-3)
    # with a tighter tolerance the same cell differs
    assert compare_runs(run, ref, rtol=1e-12)["totals"]["differs"] == 1


def test_a_float_changed_by_1e_3_differs_with_its_magnitude(tmp_path, ref):
    v = float(EV[1][4])
    new = v * (1 + 1e-3)
    run = _write(tmp_path / "run", ev=_changed(EV, 1, 4, repr(new)))
    rep = compare_runs(run, ref)
    t = rep["tables"]["evaluations.csv"]
    assert rep["verdict"] == "differs" and t["cells"]["differs"] == 1 and rep["totals"]["differs"] == 1
    col = t["differs"]["columns"]["value"]
    assert col["cells"] == 1
    assert col["max_abs"] == pytest.approx(abs(new - v), rel=1e-9)
    assert col["max_rel"] == pytest.approx(abs(new - v) / max(abs(new), abs(v)), rel=1e-9)
    [ex] = t["differs"]["examples"]
    assert ex["row"] == "model=toy, method=cbo, M=2, task=ppl" and ex["column"] == "value"
    assert float(ex["run"]) == new and float(ex["reference"]) == v
    md = render_markdown(rep)
    assert "### `evaluations.csv`" in md and "model=toy, method=cbo, M=2, task=ppl" in md


def test_a_doubled_timing_is_a_ratio_not_a_difference(tmp_path, ref):
    sel = [r[:5] + [repr(2 * float(r[5]))] + r[6:] for r in SEL]
    ev = [r[:6] + [str(2 * int(r[6]))] for r in EV]
    rep = compare_runs(_write(tmp_path / "run", sel=sel, ev=ev), ref)
    assert rep["verdict"] == "identical" and rep["totals"]["differs"] == 0
    for name, col in (("selections.csv", "selection_seconds"), ("evaluations.csv", "tokens_per_s")):
        t = rep["tables"][name]
        assert t["timing"]["median_ratio"] == 2.0 and t["timing"]["columns"][col] == 2.0
        assert t["timing"]["cells"] == (len(SEL) if name == "selections.csv" else len(EV))
    assert "timing, ratio 2" in render_markdown(rep)


def test_a_changed_selection_differs_and_is_listed(tmp_path, ref):
    run = _write(tmp_path / "run", sel=_changed(SEL, 0, 3, "3 6"))
    rep = compare_runs(run, ref)
    t = rep["tables"]["selections.csv"]
    assert rep["verdict"] == "differs" and t["cells"]["differs"] == 1
    assert t["rows_only_reference"]["count"] == 0 and t["rows_only_run"]["count"] == 0   # a value, not a key
    [ex] = t["differs"]["examples"]
    assert (ex["row"], ex["column"], ex["run"], ex["reference"]) == ("model=toy, method=cbo, M=2, seed=0",
                                                                     "removed_blocks", "3 6", "3 5")
    assert "3 6" in render_markdown(rep)


def test_missing_and_extra_rows_and_tables_are_listed(tmp_path, ref):
    ev = EV[:2] + [["toy", "cbo", "4", "ppl", "50.0", "", "700"]]       # M=3 missing, M=4 extra
    run = _write(tmp_path / "run", ev=ev, skip=("hybrid/hybrid_states.csv",))
    rep = compare_runs(run, ref)
    t = rep["tables"]["evaluations.csv"]
    assert t["rows_only_reference"] == {"count": 1, "rows": ["model=toy, method=cbo, M=3, task=ppl"]}
    assert t["rows_only_run"] == {"count": 1, "rows": ["model=toy, method=cbo, M=4, task=ppl"]}
    assert t["rows_compared"] == 2 and t["cells"]["differs"] == 0
    assert rep["tables_missing"] == ["hybrid/hybrid_states.csv"] and rep["verdict"] == "differs"
    md = render_markdown(rep)
    assert "M=3, task=ppl" in md and "M=4, task=ppl" in md and "`hybrid/hybrid_states.csv`" in md


def test_a_json_leaf_is_compared_by_its_path(tmp_path, ref):
    dev = json.loads(json.dumps(DEV))
    dev["dev_log_ppl"]["toy"]["sleb"] = 4.3
    rep = compare_runs(_write(tmp_path / "run", dev=dev), ref)
    [ex] = rep["tables"]["development.json"]["differs"]["examples"]
    assert ex["row"] == "path=dev_log_ppl/toy/sleb" and ex["abs"] == pytest.approx(0.1)


def test_key_inference_and_timing_names():
    rows = [dict(zip(["model", "M", "removed_blocks", "perplexity", "seconds"], r))
            for r in (["a", "4", "1 2", "3.5", "1"], ["a", "4", "1 3", "3.7", "2"], ["a", "8", "1 2", "9.1", "3"])]
    # removed_blocks names the state here: a key because model and M do not tell the rows apart
    assert infer_key(list(rows[0]), rows) == ["model", "M", "removed_blocks"]
    assert all(is_timing(c) for c in ("seconds", "selection_seconds", "wall_s", "tokens_per_s", "peak_rss_mb",
                                      "time"))
    assert not any(is_timing(c) for c in ("tokens", "state", "stand_in", "steps", "energy", "removed_blocks"))


def test_cli_writes_the_report_into_the_claimed_run_folder(tmp_path, ref, capsys):
    run = _write(tmp_path / "run", ev=_changed(EV, 2, 4, "41.6"))
    assert main(["--run", str(run), "--reference", str(ref)]) == 0
    out = capsys.readouterr().out
    assert "differs" in out and "1 differ" in out
    rep = json.loads((run / "reproduction.json").read_text())
    assert rep["totals"]["differs"] == 1 and rep["tables"]["evaluations.csv"]["differs"]["columns"]["value"][
        "max_abs"] == pytest.approx(0.1)
    md = (run / "reproduction.md").read_text()
    assert md.startswith("# Reproduction") and "## Totals" in md and "Rule:" in md and "## Per table" in md
    recorded = read_manifest(run)["files"]
    assert {"reproduction.md", "reproduction.json"} <= set(recorded)   # provenance: written by cbo, recorded
    # the report of a run never counts as one of its tables (the run compared with itself: identical)
    assert main(["--run", str(run), "--reference", str(run)]) == 0
    assert json.loads((run / "reproduction.json").read_text())["verdict"] == "identical"


def test_cli_bad_input_says_what_to_do(tmp_path, ref, capsys):
    assert main(["--run", str(tmp_path / "nowhere"), "--reference", str(ref)]) == 2
    assert "make reproduce" in capsys.readouterr().err
    run = _write(tmp_path / "run")
    assert main(["--run", str(run), "--reference", str(tmp_path / "no-ref")]) == 2
    assert "--reference" in capsys.readouterr().err
    assert main(["--run", str(run), "--reference", str(ref), "--rtol", "-1"]) == 2
    assert "tolerance" in capsys.readouterr().err
    mine = tmp_path / "mine"                                  # a folder of the user's: refused, left alone
    mine.mkdir()
    (mine / "notes.csv").write_text(_csv(EV, EV_COLS))
    (mine / "evaluations.csv").write_text(_csv(EV, EV_COLS))
    assert main(["--run", str(mine), "--reference", str(ref)]) == 2
    assert "not a folder cbo wrote" in capsys.readouterr().err and not (mine / "reproduction.md").exists()


def test_csv_quoting_and_empty_cells(tmp_path):
    """Quoted cells with commas (a JSON detail) and empty cells: read as CSV, not split on commas."""
    cols = ["model", "method", "M", "value", "detail"]
    rows = [["toy", "cbo", "2", "1.0", json.dumps({"threshold": 0.5, "path_of": 15})]]
    for name, detail in (("ref", 0.5), ("run", 0.5 * (1 + 1e-9))):
        claim_folder(tmp_path / name, "results")
        with open(tmp_path / name / "t.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(cols)
            w.writerow(rows[0][:4] + [json.dumps({"threshold": detail, "path_of": 15})])
            w.writerow(["toy", "dense", "0", "", ""])
    rep = compare_runs(tmp_path / "run", tmp_path / "ref")
    t = rep["tables"]["t.csv"]
    assert t["key"] == ["model", "method", "M"] and t["cells"]["within tolerance"] == 1
    assert t["cells"]["identical"] == 3 and not math.isnan(rep["rtol"])


def test_promote_replaces_exactly_the_reference_tables(tmp_path):
    """make reference: the run's tables and reports and the small tables its figures are drawn from become the
    reference; models, gradients, Ising files, pair tables and the reproduction report stay out; the old
    reference's recorded files go; a file of the user's in the reference refuses it all."""
    from cbo_utils.notebooks import promote_run

    run, ref = tmp_path / "runs" / "mini", tmp_path / "results" / "mini"
    claim_folder(run, "results")
    for rel, text in (("selections.csv", "a,b\n1,2\n"), ("comparison.md", "# c\n"), ("hybrid/hybrid.md", "h\n"),
                      ("smollm2/gradients.safetensors", "x"), ("smollm2/gradients.safetensors.json", "{}"),
                      ("smollm2/states_M4.csv", "rank\n0\n"), ("smollm2/ising_M4.json", "{}"),
                      ("smollm2/compare/states_cbo-pairs_M4.csv", "rank\n0\n"),
                      ("smollm2/compare/pairs_kl_6_screened.safetensors", "x"),
                      ("reproduction.md", "r\n"), ("graph.mk", "g\n")):
        atomic_write_text(run / rel, text)
    claim_folder(ref, "results")
    atomic_write_text(ref / "old.csv", "old\n")
    user = ref / "notes.txt"
    user.write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt"):
        promote_run(run, "mini", reference=ref)
    assert (ref / "old.csv").is_file()
    user.unlink()
    written = promote_run(run, "mini", reference=ref)
    assert sorted(p.relative_to(ref).as_posix() for p in written) == [
        "comparison.md", "hybrid/hybrid.md", "selections.csv", "smollm2/compare/states_cbo-pairs_M4.csv",
        "smollm2/gradients.safetensors.json", "smollm2/states_M4.csv"]   # what the figures are drawn from
    assert not (ref / "old.csv").exists() and not (ref / "reproduction.md").exists()
    assert not (ref / "smollm2" / "gradients.safetensors").exists() and not (ref / "smollm2" / "ising_M4.json").exists()
    assert not (ref / "smollm2" / "compare" / "pairs_kl_6_screened.safetensors").exists()
    assert (ref / "selections.csv").read_bytes() == (run / "selections.csv").read_bytes()
    assert set(read_manifest(ref)["files"]) >= {"selections.csv", "comparison.md", "hybrid/hybrid.md"}
    with pytest.raises(ValueError, match="already the reference"):
        promote_run(ref, "mini", reference=ref)
