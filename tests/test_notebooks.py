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

from cbo_utils.notebooks import NOTEBOOK_DIR, NOTEBOOKS, RUNNER_KEYS, make_graph, parameters_for, run_notebook

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
            "tiny-llama"                                                            # not the kernel's argv
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
