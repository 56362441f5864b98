"""The package's shape, checked from the source: imports point down the pipeline only, no module imports another
module's private names, the public API works as the README shows, and a non-editable install carries the configs."""

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cbo_utils.core.imports import PACKAGE_DIR, import_closure, module_imports, module_name

#: the layers, top of the pipeline first; a module may import its own layer's modules and the layers above it
LAYERS = ["core", "calibration", "model", "gradients", "interactions", "problem", "solvers", "select", "prune",
          "evaluate", "experiments", "report", "cli", "notebooks"]


def _layer(mod: str) -> int:
    parts = mod.split(".")
    return len(LAYERS) if len(parts) == 1 else LAYERS.index(parts[1])


def _modules():
    return sorted(module_name(f) for f in PACKAGE_DIR.rglob("*.py"))


def test_every_module_is_in_a_layer():
    for m in _modules():
        if m != "cbo_utils":
            assert m.split(".")[1] in LAYERS, f"{m} is in no layer: add it to LAYERS where it belongs"


def test_imports_point_down_the_pipeline_only_and_have_no_cycles():
    bad = [(m, t) for m in _modules() for t in module_imports(m)
           if m != "cbo_utils" and t != "cbo_utils" and _layer(t) > _layer(m)]
    assert not bad, f"upward imports: {bad}"
    graph = {m: {t for t in module_imports(m) if t != "cbo_utils"} for m in _modules()}
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for t in graph.get(m, ()):
            assert state.get(t) != 1, f"import cycle: {' -> '.join(path + [t])}"
            if t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])


def test_no_module_imports_another_modules_private_names():
    bad = []
    for f in PACKAGE_DIR.rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cbo_utils"):
                bad += [(str(f.relative_to(PACKAGE_DIR)), node.module, a.name) for a in node.names
                        if a.name.startswith("_") and not a.name.startswith("__")]
    assert not bad, bad


def test_the_layer_check_catches_an_upward_import(tmp_path, monkeypatch):
    """The checks above are not vacuous: a core module importing a solver is an upward import."""
    from cbo_utils.core import imports

    src = "from cbo_utils.solvers.exact import exact_lowest\nfrom cbo_utils.problem.ising import _x\n"
    found = imports.imported_modules(src, "cbo_utils.core.fake")
    assert "cbo_utils.solvers.exact" in found and _layer("cbo_utils.solvers.exact") > _layer("cbo_utils.core.fake")
    assert {"cbo_utils", "cbo_utils.solvers"} <= import_closure(["cbo_utils.solvers.exact"])


def test_public_api_selects_applies_without_mutating_and_saves(tmp_path):
    import cbo_utils
    from cbo_utils import METHODS, Selection, load_model, save_pruned, select_blocks
    from cbo_utils.model.blocks import Gates, remove_blocks
    from cbo_utils.select.cbo import DEFAULT_VARIANT

    assert {"cbo-sd-rerank", "block_influence", "sleb", "sliding_window_merging"} <= set(METHODS)
    assert set(cbo_utils.__all__) >= {"load_model", "select_blocks", "Selection", "save_pruned", "METHODS",
                                      "register_method", "ENERGIES", "register_energy", "register_adapter",
                                      "BlockRemovalProblem", "solve"}
    model, tok = load_model("tiny-llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sel = select_blocks(model, tok, 2, samples=10, max_tokens=32)      # the default CBO variant
    assert isinstance(sel, Selection) and sel.method == DEFAULT_VARIANT and len(sel.removed) == 2
    assert sel.energy is not None and sel.states is not None
    small = sel.apply(model)
    assert len(small.model.layers) == 4 and len(model.model.layers) == 6
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())   # never mutated
    ids = torch.randint(5, 200, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), Gates(model) as g, g.removed(sel.removed):   # independent: the gated model, α = 0
        want = model(ids).logits
    with torch.no_grad():
        torch.testing.assert_close(small(ids).logits, want, rtol=0, atol=1e-5)
    out = save_pruned(model, tok, sel, tmp_path / "p")
    assert (out / "config.json").is_file() and len(model.model.layers) == 6
    bi = select_blocks(model, tok, 2, method="bi", samples=4, max_tokens=32)
    ref = remove_blocks(__import__("copy").deepcopy(model), bi.removed)
    with torch.no_grad():
        torch.testing.assert_close(bi.apply(model)(ids).logits, ref(ids).logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        select_blocks(model, tok, 2, method="nope")


def test_register_method_and_energy_are_one_call_each():
    import numpy as np

    from cbo_utils import ENERGIES, METHODS, register_energy, register_method
    from cbo_utils.problem.ising import BlockRemovalProblem
    from cbo_utils.select.methods import run_method

    register_method("first_blocks", lambda model, calibration, M, **kw: Selection_of(M))
    try:
        assert run_method("first-blocks", None, None, 2).removed == [0, 1]
    finally:
        METHODS.pop("first_blocks")
    register_energy("diag", lambda H, g: (np.diag(np.diag(H)), 1.0), description="diagonal only")
    try:
        H = np.array([[2.0, 1.0], [1.0, 3.0]])
        p = BlockRemovalProblem.from_hessian(H, 1, energy="diag")
        assert p.energy_of([0, 1]) == pytest.approx(4.0)     # 3 + const 1, off-diagonal ignored
    finally:
        ENERGIES.pop("diag")


def Selection_of(M):
    from cbo_utils import Selection

    return Selection("first_blocks", M, list(range(M)))


@pytest.mark.slow
def test_non_editable_install_carries_configs_and_runs_from_elsewhere(tmp_path):
    """`pip install --target` (not editable) → only cbo_utils lands; from another directory `cbo --help` works, the
    packaged tiny profile runs the comparison's selection stage and `cbo compress` makes a smaller model."""
    repo = Path(__file__).resolve().parents[1]
    target = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                        "--target", str(target), str(repo)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    top = {p.name for p in target.iterdir() if not p.name.endswith((".dist-info", ".egg-info"))} - {"bin"}
    assert top == {"cbo_utils"}, top
    assert (target / "cbo_utils" / "configs" / "tiny.yaml").is_file()
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    h = subprocess.run([sys.executable, "-m", "cbo_utils.cli", "--help"], cwd=work, env=env, capture_output=True,
                       text=True, timeout=300)
    assert h.returncode == 0 and "compare" in h.stdout
    c = subprocess.run([sys.executable, "-m", "cbo_utils.cli", "compare", "--profile", "tiny", "--stages", "select"],
                       cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert c.returncode == 0, c.stderr[-3000:]
    assert (work / "results" / "tiny" / "selections.csv").is_file()
    z = subprocess.run([sys.executable, "-m", "cbo_utils.cli", "compress", "--model", "tiny-llama", "-M", "1",
                        "--out", "small", "--samples", "4", "--max-tokens", "24"], cwd=work, env=env,
                       capture_output=True, text=True, timeout=900)
    assert z.returncode == 0, z.stderr[-3000:]
    assert (work / "small" / "model" / "config.json").is_file() and "generation tokens/s" in z.stdout
    assert str(target) in subprocess.run([sys.executable, "-c", "import cbo_utils; print(cbo_utils.__file__)"],
                                         cwd=work, env=env, capture_output=True, text=True).stdout


def test_the_code_passes_ruff():
    """make lint's check, inside make test: a long line or an unused import fails the suite."""
    ruff = Path(sys.executable).with_name("ruff")
    if not ruff.exists() and shutil.which("ruff") is None:
        pytest.skip("ruff is not installed")
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([str(ruff if ruff.exists() else "ruff"), "check", "cbo_utils", "tests", "benchmarks",
                        "notebooks"], cwd=root, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:]


def test_dependencies_are_ranges_and_the_lock_file_satisfies_them():
    """pyproject.toml states compatible ranges (no exact pins, so the package installs next to other software);
    requirements.txt, the lock `make venv` and CI install, pins one version of each inside its range, and the
    installed environment is that lock."""
    import importlib.metadata as md

    import tomllib
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    repo = Path(__file__).resolve().parents[1]
    deps = [Requirement(d) for d in tomllib.loads((repo / "pyproject.toml").read_text())["project"]["dependencies"]]
    lock = {}
    for line in (repo / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            r = Requirement(line)
            (spec,) = r.specifier
            assert spec.operator == "==", f"the lock pins exact versions: {line}"
            lock[canonicalize_name(r.name)] = spec.version
    for d in deps:
        assert d.specifier and not any(s.operator == "==" for s in d.specifier), f"{d} is a pin, not a range"
        name = canonicalize_name(d.name)
        assert name in lock, f"{d.name} is not in the lock file"
        assert d.specifier.contains(lock[name]), f"the lock's {d.name}=={lock[name]} is outside {d.specifier}"
        installed = md.version(d.name).split("+")[0]   # a local build tag (torch's +cpu) is the same release
        assert installed == lock[name], f"installed {d.name} {installed} ≠ lock {lock[name]}"
