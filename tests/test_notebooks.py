"""The notebooks: hygiene (no outputs, one parameters cell, thin), every profile key received by a notebook, each
notebook executed by papermill on the tiny profile with assertions on what it wrote, and the Make graph."""

import ast
import json
import subprocess
from pathlib import Path

import nbformat
import pandas as pd
import pytest
import yaml

from cbo_utils.notebooks import (
    NOTEBOOK_DIR,
    NOTEBOOKS,
    RUNNER_KEYS,
    make_graph,
    outputs,
    parameters_for,
    run_notebook,
)

ROOT = Path(__file__).resolve().parent.parent
PROFILES = ["tiny", "mini", "paper"]


def _nb(name):
    return nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", as_version=4)


def _parameters(name) -> dict:
    cell = [c for c in _nb(name).cells if "parameters" in c.metadata.get("tags", [])][0]
    return {t.id: ast.literal_eval(node.value) for node in ast.parse(cell.source).body
            for t in node.targets if isinstance(node, ast.Assign)}


@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_notebook_hygiene(name):
    nb = _nb(name)
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")
    header = nb.cells[0].source
    for word in ("Consumes", "Produces", "Runtime"):
        assert word in header, f"{name}: the header must say what it {word.lower()}"
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{name}: exactly one cell tagged 'parameters'"
    for c in nb.cells:
        if c.cell_type != "code":
            continue
        assert not c.get("outputs") and c.get("execution_count") is None, f"{name}: committed with outputs"
        tree = ast.parse(c.source)
        assert not any(isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.Lambda)) for n in ast.walk(tree)), \
            f"{name}: definitions belong in cbo_utils"
        assert not any(line.lstrip().startswith(("!", "%")) for line in c.source.splitlines()), \
            f"{name}: no shell escapes or magics"
    for node in ast.parse(tagged[0].source).body:   # literals only: papermill replaces literals
        assert isinstance(node, ast.Assign)
        ast.literal_eval(node.value)
    # papermill's own parser must see every parameter (it warns "unknown parameter" on lines it cannot parse, e.g.
    # an "=" inside a comment)
    import papermill

    assert set(papermill.inspect_notebook(str(NOTEBOOK_DIR / f"{name}.ipynb"))) == set(_parameters(name))


@pytest.mark.parametrize("profile", PROFILES)
def test_every_profile_key_is_a_notebook_parameter(profile):
    cfg = yaml.safe_load((ROOT / "cbo_utils" / "configs" / f"{profile}.yaml").read_text())
    received = {k for spec in NOTEBOOKS.values() for k in spec["keys"]}
    missing = sorted(set(cfg) - received - set(RUNNER_KEYS))
    assert not missing, f"profile keys no notebook receives: {missing}"
    for name, spec in NOTEBOOKS.items():
        declared = set(_parameters(name))
        assert set(spec["keys"]) <= declared, f"{name} lacks parameters {set(spec['keys']) - declared}"
        model = cfg["models"][0] if spec["per_model"] else None
        assert set(parameters_for(name, cfg, model)) <= declared, name


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """All six notebooks on the tiny profile (one model for the per-model ones), into a temporary results folder."""
    res = tmp_path_factory.mktemp("results")
    logs = {}
    for name in sorted(NOTEBOOKS):
        model = "tiny-llama" if NOTEBOOKS[name]["per_model"] else None
        logs[name] = run_notebook(name, "tiny", model, res)
    return res, logs


@pytest.mark.slow
def test_tiny_notebooks_write_their_artifacts(tiny_run):
    res, logs = tiny_run
    d = res / "tiny-llama"
    for M in (2, 3):
        states = pd.read_csv(d / f"states_M{M}.csv")
        assert states["energy"].is_monotonic_increasing                             # sorted by energy
        assert all(len(s.split()) == M for s in states["removed_blocks"])          # exactly M removed
        side = json.loads((d / f"states_M{M}.csv.json").read_text())
        assert side["inputs"]["ising"]["sha256"]                                   # the sidecar lists its inputs
        assert side["command"] == "python -m cbo_utils.notebooks run 03_state_sampling --profile tiny --model " \
            f"tiny-llama --results {res}"                                           # not the kernel's argv
        assert json.loads((d / f"ising_M{M}.json.json").read_text())["inputs"]["gradients"]["sha256"]
        assert json.loads((d / f"pruned_M{M}_cbo0" / "verification.json").read_text())["ok"]
    assert (res / "selections.csv").is_file() and (res / "retraining.csv").is_file()
    ev = pd.read_csv(res / "evaluations.csv")
    assert set(ev["retrained"].astype(str).str.lower()) == {"true", "false"}
    hyb = pd.read_csv(res / "hybrid" / "hybrid_evaluations.csv")
    assert hyb["stand_in"].all()
    figs = json.loads((res / "figures" / "figures.json").read_text())
    assert figs and list((res / "figures").glob("*.png"))
    assert (res / "figures" / "table2_removed_blocks.md").read_text().startswith("<!-- autogenerated")
    for log in logs.values():   # executed copies are logs beside the results, with outputs
        assert log.parent == res / "logs" and any(c.get("outputs") for c in nbformat.read(log, 4).cells)


@pytest.mark.slow
def test_tiny_run_compared_with_itself_is_identical_and_a_planted_change_is_found(tiny_run, tmp_path):
    """The reproduction report on a real run folder: against itself every table is identical; against a copy whose
    selection (removed_blocks of one row) and one perplexity were changed, exactly those two cells differ."""
    import shutil

    from cbo_utils.report.reproduction import compare_runs, write_report

    res, _ = tiny_run
    rep = compare_runs(res, res)
    assert rep["verdict"] == "identical" and rep["totals"]["differs"] == 0 and not rep["tables_missing"]
    assert {"selections.csv", "evaluations.csv", "development.json", "hybrid/hybrid_evaluations.csv",
            "tiny-llama/states_M2.csv"} <= set(rep["tables"])
    assert not any(t.startswith(("logs/", "figures/")) for t in rep["tables"])
    ref = tmp_path / "reference"
    shutil.copytree(res, ref)
    sel = pd.read_csv(ref / "selections.csv", dtype=str, keep_default_na=False)
    row = sel.index[sel["method"] == "sleb"][0]
    sel.loc[row, "removed_blocks"] = "0 1" if sel.loc[row, "removed_blocks"] != "0 1" else "1 2"
    sel.to_csv(ref / "selections.csv", index=False)
    ev = pd.read_csv(ref / "evaluations.csv", dtype=str, keep_default_na=False)
    i = ev.index[ev["metric"] == "perplexity"][0]
    old = float(ev.loc[i, "value"])
    ev.loc[i, "value"] = repr(old * 1.01)
    ev.to_csv(ref / "evaluations.csv", index=False)
    rep = compare_runs(res, ref)
    assert rep["totals"]["differs"] == 2 and rep["verdict"] == "differs"
    assert rep["tables"]["selections.csv"]["differs"]["columns"] == {
        "removed_blocks": {"cells": 1, "max_abs": None, "max_rel": None}}
    col = rep["tables"]["evaluations.csv"]["differs"]["columns"]["value"]
    assert col["max_abs"] == pytest.approx(abs(old * 0.01), rel=1e-9)
    md, js = write_report(rep, res)
    assert md.parent == res and json.loads(js.read_text())["totals"]["differs"] == 2


def test_the_graph_of_a_run_folder_writes_only_there():
    """make reproduce's graph (generated for its run folder) names no path under the reference results/tiny: every
    target, stamp and log is in the run folder, the figures in <run>/figures, and every recipe passes --results."""
    text = make_graph("tiny", "runs/tiny")
    assert "results/tiny" not in text
    targets = [t for ln in text.splitlines() if ln.startswith(("STAGE_TARGETS := ", "STAMPS := "))
               for t in ln.split(":= ")[1].split()]
    assert targets and all(t.startswith("runs/tiny/") for t in targets)
    assert "REPRODUCE_TARGETS := runs/tiny/figures/figures.json" in text
    assert "STAMPS := runs/tiny/logs/04_pruning_and_retraining.done runs/tiny/logs/05_moe_nemotron.done" in text
    recipes = [ln for ln in text.splitlines() if ln.startswith("\t")]
    assert len(recipes) == 3 * 3 + 3 and all("--results runs/tiny" in r for r in recipes)
    # the reference given as the run folder: figures go to figures/<profile>/ as before
    ref = make_graph("tiny", "results/tiny")
    assert "REPRODUCE_TARGETS := figures/tiny/figures.json" in ref and "runs/" not in ref
    assert outputs("tiny", "results/tiny") == outputs("tiny")
    assert parameters_for("06_report", "tiny", results_dir="runs/tiny")["figures_dir"] == "runs/tiny/figures"
    assert parameters_for("06_report", "tiny", results_dir="results/tiny")["figures_dir"] == "figures/tiny"
    assert parameters_for("06_report", "tiny")["results_dir"] == "results/tiny"
    assert parameters_for("01_hessian_estimation", "tiny", "tiny-llama", "runs/tiny")["results_dir"] == "runs/tiny"


@pytest.mark.slow
def test_make_reproduce_writes_into_the_run_folder(tmp_path):
    """`make -n reproduce PROFILE=tiny` in a copy of the checkout: the graph goes to runs/tiny/graph.mk, every
    notebook run gets --results runs/tiny, nothing is planned under results/tiny, and the reproduction report follows;
    RUN=results/tiny plans the reference (figures/tiny, no report)."""
    import os
    import shutil
    import sys

    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("Makefile", "requirements.txt", "pyproject.toml"):
        shutil.copy2(ROOT / name, repo / name)
    for name in ("cbo_utils", "notebooks"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("requirements.txt", "pyproject.toml"):   # older than the venv's stamp: no reinstall is planned
        os.utime(repo / name, (0, 0))
    venv = Path(sys.executable).parent.parent
    if not (venv / ".cbo-installed").is_file():
        pytest.skip(f"no installed venv stamp at {venv}")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("RUN", None)
    env.pop("MAKEFLAGS", None)

    def make_n(*extra):
        r = subprocess.run(["make", "-n", "reproduce", "PROFILE=tiny", f"VENV={venv}", *extra], cwd=repo, env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        return r.stdout

    out = make_n()
    assert (repo / "runs" / "tiny" / "graph.mk").is_file() and not (repo / "results").exists()
    runs = [ln for ln in out.splitlines() if " -m cbo_utils.notebooks run " in ln]
    assert len(runs) == 3 * 3 + 3 and all(ln.split("--results ")[1].split()[0] == "runs/tiny" for ln in runs)
    assert "results/tiny/" not in out.replace("--reference results/tiny", "")
    assert "cbo_utils.report.reproduction --run runs/tiny --reference results/tiny" in out
    out = make_n("RUN=results/tiny")
    assert (repo / "results" / "tiny" / "graph.mk").is_file()
    assert "06_report --profile tiny --results results/tiny" in out and "runs/" not in out
    assert "cbo_utils.report.reproduction" not in out and "no reproduction report" in out
    assert "figures/tiny/figures.json" in (repo / "results" / "tiny" / "graph.mk").read_text()


def test_make_graph_declares_every_prerequisite():
    text = make_graph("mini")
    rule = [ln for ln in text.splitlines() if ln.startswith("results/mini/smollm2/states_M4.csv:")][0]
    for need in ("results/mini/smollm2/ising_M4.json", "results/mini/smollm2/ising_M15.json",
                 "notebooks/03_state_sampling.ipynb", "cbo_utils/configs/mini.yaml", "cbo_utils/solvers/exact.py",
                 "cbo_utils/experiments/stages.py", "cbo_utils/problem/bounds.py", "cbo_utils/__init__.py"):
        assert need in rule
    assert "results/mini/smollm2/states_M8.csv results/mini/smollm2/states_M15.csv" in text   # made alongside
    assert "REPRODUCE_TARGETS := figures/mini/figures.json" in text
    # a resumable stage's first target is its stamp (an interrupt deletes the stamp, never the tables)
    rule04 = [ln for ln in text.splitlines() if ln.startswith("results/mini/logs/04_pruning_and_retraining.done:")]
    assert rule04 and "results/mini/selections.csv results/mini/evaluations.csv" in text
    assert "STAMPS := results/mini/logs/04_pruning_and_retraining.done results/mini/logs/05_moe_nemotron.done" in text


@pytest.mark.slow
def test_touching_the_solver_reruns_only_the_stages_downstream_of_it(tmp_path):
    """`make -n` after touching cbo_utils/select/swm.py (in 04's and 06's import closure, not in 01–03's): the stages
    that import it — states (03), comparison (04), hybrid (05) — and the report (06) downstream rerun; the gradients
    (01) and the Ising models (02) do not."""
    import shutil

    repo = tmp_path / "repo"
    shutil.copytree(ROOT, repo, ignore=shutil.ignore_patterns(".venv", "results", ".git", "__pycache__", "figures"))
    graph = repo / "graph.mk"
    graph.write_text(make_graph("tiny").replace("$(STAMP)", ""))
    (repo / "stamp.mk").write_text("NB := echo RUN\n")
    files = [t for ln in graph.read_text().splitlines() if ln.startswith(("STAGE_TARGETS := ", "STAMPS := "))
             for t in ln.split(":= ")[1].split()]
    import os
    import time

    t = time.time() - 100
    for f in files:                      # every artifact exists and is newer than its prerequisites
        p = repo / f
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("x")
    for p in list(repo.rglob("*.py")) + list(repo.rglob("*.ipynb")) + list(repo.rglob("*.yaml")):
        os.utime(p, (t, t))
    for f in files:
        os.utime(repo / f, (t + 50, t + 50))
    base = ["make", "-n", "-f", "stamp.mk", "-f", "graph.mk"]
    targets = ["figures/tiny/figures.json"]
    assert "RUN" not in subprocess.run(base + targets, cwd=repo, capture_output=True, text=True).stdout
    (repo / "cbo_utils" / "select" / "swm.py").touch()
    out = subprocess.run(base + targets, cwd=repo, capture_output=True, text=True).stdout
    ran = [ln.split()[3] for ln in out.splitlines() if ln.startswith("echo RUN run")]
    assert {"04_pruning_and_retraining", "06_report"} <= set(ran)
    assert not {"01_hessian_estimation", "02_ising_construction", "03_state_sampling"} & set(ran), ran
    for f in files:                      # everything up to date again; then only the report module changes
        os.utime(repo / f, (t + 200, t + 200))
    os.utime(repo / "cbo_utils" / "report" / "tables.py", (t + 300, t + 300))
    out = subprocess.run(base + targets, cwd=repo, capture_output=True, text=True).stdout
    assert [ln.split()[3] for ln in out.splitlines() if ln.startswith("echo RUN run")] == ["06_report"], out
    for f in files:
        os.utime(repo / f, (t + 400, t + 400))
    # the module that builds Table 1 (comparison_table) is in 06's import closure, so 06 goes stale with it
    os.utime(repo / "cbo_utils" / "experiments" / "compare.py", (t + 500, t + 500))
    out = subprocess.run(base + targets, cwd=repo, capture_output=True, text=True).stdout
    ran = [ln.split()[3] for ln in out.splitlines() if ln.startswith("echo RUN run")]
    assert "06_report" in ran and "01_hessian_estimation" not in ran, out


def test_library_prerequisites_are_the_import_closure():
    """A notebook's library prerequisites are computed from the AST: 06 depends on the module that builds Table 1
    (through report → compare) and on figures' imports; 01 does not depend on the figures or the comparison."""
    from cbo_utils.core.imports import import_closure
    from cbo_utils.notebooks import library_sources

    six = library_sources("06_report")
    assert {"cbo_utils/experiments/compare.py", "cbo_utils/report/figures.py", "cbo_utils/report/tables.py",
            "cbo_utils/experiments/retrain.py"} <= set(six)
    one = library_sources("01_hessian_estimation")
    assert "cbo_utils/model/tiny.py" in one and "cbo_utils/gradients.py" in one
    assert not {"cbo_utils/report/figures.py", "cbo_utils/experiments/compare.py"} & set(one)
    # the closure is transitive and includes package __init__ files (independent check on a known chain)
    clo = import_closure(["cbo_utils.experiments.stages"])
    assert {"cbo_utils", "cbo_utils.solvers", "cbo_utils.solvers.exact", "cbo_utils.problem.bounds"} <= clo


def test_readme_carries_the_generated_paper_items_table():
    from cbo_utils.report.tables import README_BEGIN, README_END, paper_items_table

    text = (ROOT / "README.md").read_text()
    block = text.split(README_BEGIN, 1)[1].split(README_END, 1)[0].strip()
    assert block == paper_items_table(), "run `python -m cbo_utils.report.tables readme`"
    for nb in NOTEBOOKS:   # every notebook appears in the map
        assert nb in block or nb[:2] in block


def test_paper_profile_stops_early_when_the_models_cannot_be_reached():
    import os
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "cbo_utils.notebooks", "check", "--profile", "paper"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "cannot reach 'meta-llama/Llama-3.1-8B-Instruct'" in r.stderr and "PROFILE=mini" in r.stderr
    ok = subprocess.run([sys.executable, "-m", "cbo_utils.notebooks", "check", "--profile", "tiny"], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0 and "reachable" in ok.stdout


def test_paper_graph_uses_slugs_for_hub_ids():
    text = make_graph("paper")
    assert "results/paper/meta-llama__Llama-3.1-8B-Instruct/gradients.safetensors:" in text
    assert "--model meta-llama/Llama-3.1-8B-Instruct" in text
