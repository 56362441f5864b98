"""Run the parameterised notebooks with papermill, and write the Make graph that connects them.

    python -m cbo_utils.notebooks run 01_hessian_estimation --profile mini --model smollm2
    python -m cbo_utils.notebooks graph --profile mini --results runs/mini --out runs/mini/graph.mk
    python -m cbo_utils.notebooks params 03_state_sampling --profile tiny --model tiny-llama

A notebook's parameters are the profile's keys (:data:`NOTEBOOKS` says which notebook receives which), plus
``profile``, ``results_dir`` and, for the per-model notebooks, ``model`` (one of the profile's ``models``; the
``M_values`` of that model when the profile gives them per model). Executed notebooks are logs, kept beside the
results in ``<results>/logs/`` (papermill writes them even when a cell fails, so they are never Make targets);
the artifacts each notebook writes are the targets.

Two kinds of results folder: the committed *reference* ``results/<profile>/`` (figures in ``figures/<profile>/``),
and a *run folder* (``make reproduce`` writes ``runs/<profile>/`` by default, figures in ``runs/<profile>/figures/``)
that a reproduction fills from scratch and :mod:`cbo_utils.report.reproduction` compares with the reference. Here
``results=None`` means the reference (as for :func:`cbo_utils.core.profiles.results_dir`); the Makefile passes its
run folder explicitly (``--results $(RUN)``).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cbo_utils.core.artifacts import (
    atomic_write_bytes,
    atomic_write_text,
    claim_folder,
    owning_folder,
    portable_path,
    read_manifest,
    record_files,
    remove_owned,
    repo_root,
)
from cbo_utils.core.imports import closure_files, imported_modules, notebook_sources
from cbo_utils.core.profiles import load_profile, m_values, slug
from cbo_utils.model.load import check_reachable

ROOT = repo_root() or Path.cwd()  # notebooks/ lives in the checkout, not in an installed package
NOTEBOOK_DIR = ROOT / "notebooks"

#: notebook → whether it runs once per model, the profile keys it receives (its library prerequisites are
#: computed: :func:`library_sources`)
NOTEBOOKS: dict[str, dict[str, Any]] = {
    "01_hessian_estimation": {
        "per_model": True,
        "keys": ["dtype", "calibration", "samples", "max_tokens", "exact_hessian_samples", "seed", "device_map"]},
    "02_ising_construction": {
        "per_model": True, "keys": ["M_values", "energy"]},
    "03_state_sampling": {
        "per_model": True, "keys": ["M_values", "k", "solver", "bound", "seed", "dtype", "device_map"]},
    "04_pruning_and_retraining": {
        "per_model": False, "keys": ["compare", "retrain"]},
    "05_moe_nemotron": {
        "per_model": False, "keys": ["hybrid"]},
    "06_report": {
        "per_model": False, "keys": []},
}
#: profile keys the runner itself consumes (not notebook parameters)
RUNNER_KEYS = {"profile": "passed to every notebook as `profile`",
               "models": "one run of each per-model notebook per entry, passed as `model`"}


def _profile(profile):

    return load_profile(profile) if isinstance(profile, str) else dict(profile)


def reference_dir(profile: str) -> Path:
    """The committed reference results of ``profile``: ``results/<profile>`` (relative to the repository root)."""
    return Path("results") / profile


def is_reference(profile: str, results_dir=None) -> bool:
    """Whether ``results_dir`` (None: the default) is the reference folder of ``profile``, ``results/<profile>``
    (a relative path counts from the repository root, where the notebooks run)."""
    if results_dir is None:
        return True

    def anchored(p: Path) -> Path:
        return (p if p.is_absolute() else ROOT / p).resolve()

    return anchored(Path(results_dir)) == anchored(reference_dir(profile))


def figures_dir_for(profile: str, results_dir=None) -> Path:
    """Where the report notebook draws the figures of ``results_dir``: ``figures/<profile>`` for the reference
    (``results/<profile>``, the default), else ``<results_dir>/figures`` (a run keeps its figures beside its
    results)."""
    return Path("figures") / profile if is_reference(profile, results_dir) else Path(results_dir) / "figures"


def parameters_for(notebook: str, profile, model: str | None = None, results_dir=None) -> dict[str, Any]:
    """The papermill parameters of ``notebook`` for ``profile`` (name, path or dict) and ``model``; ``results_dir``
    None: the reference ``results/<profile>``."""

    if notebook not in NOTEBOOKS:
        raise ValueError(f"unknown notebook {notebook!r}; choose from {sorted(NOTEBOOKS)}")
    cfg = _profile(profile)
    spec = NOTEBOOKS[notebook]
    params: dict[str, Any] = {"profile": cfg["profile"],
                              "results_dir": str(results_dir or reference_dir(cfg["profile"]))}
    if spec["per_model"]:
        if model is None:
            raise ValueError(f"{notebook} runs once per model: give --model (one of {cfg['models']})")
        if model not in cfg["models"]:
            match = [m for m in cfg["models"] if slug(m) == model]
            if not match:
                raise ValueError(f"model {model!r} is not in profile {cfg['profile']!r}: {cfg['models']}")
            model = match[0]
        params["model"] = model
    if notebook == "06_report":   # figures/<profile>/ for the reference, else beside the given results
        params["figures_dir"] = str(figures_dir_for(cfg["profile"], results_dir))
    for key in spec["keys"]:
        if key == "M_values":
            params[key] = [int(m) for m in m_values(cfg, model)]
        else:
            params[key] = cfg.get(key)
    return params


def log_path(notebook: str, profile: str, model: str | None = None, results_dir=None) -> Path:
    """The executed copy of a notebook run: ``<results_dir>/logs/`` (None: the reference's)."""
    base = Path(results_dir or ROOT / reference_dir(profile)) / "logs"
    return base / (f"{notebook}__{slug(model)}.ipynb" if model else f"{notebook}.ipynb")


def run_notebook(notebook: str, profile, model: str | None = None, results_dir=None, progress: bool = False,
                 kernel_name: str = "python3") -> Path:
    """Execute ``notebooks/<notebook>.ipynb`` with papermill in a fresh kernel (cwd = repository root); the executed
    copy goes to ``<results_dir>/logs/`` (None: the reference ``results/<profile>``). Raises papermill's error
    (naming the failing cell) on failure."""
    import papermill

    cfg = _profile(profile)
    params = parameters_for(notebook, cfg, model, results_dir)
    claim_folder(ROOT / params["results_dir"], "results")   # a results folder of the user's is refused
    out = log_path(notebook, cfg["profile"], params.get("model"), ROOT / params["results_dir"])
    out.parent.mkdir(parents=True, exist_ok=True)
    where = "" if is_reference(cfg["profile"], results_dir) else f" --results {portable_path(out.parent.parent)}"
    command = f"python -m cbo_utils.notebooks run {notebook} --profile {cfg['profile']}" + (
        f" --model {params['model']}" if params.get("model") else "") + where
    before = os.environ.get("CBO_COMMAND")
    os.environ["CBO_COMMAND"] = command  # the kernel inherits it: provenance names this command, not the kernel's
    try:
        papermill.execute_notebook(str(NOTEBOOK_DIR / f"{notebook}.ipynb"), str(out), parameters=params,
                                   cwd=str(ROOT), kernel_name=kernel_name, progress_bar=progress, log_output=False)
    finally:
        if before is None:
            os.environ.pop("CBO_COMMAND", None)
        else:
            os.environ["CBO_COMMAND"] = before
        if out.is_file() and owning_folder(out) is not None:   # the executed notebook (papermill writes it itself)
            record_files(owning_folder(out), [out])
    return out


# ----------------------------------------------------------------------------------------------- the Make graph
def library_sources(notebook: str) -> list[str]:
    """The ``cbo_utils`` source files a notebook can run: the import closure (read from the AST) of what its code
    cells import — so editing any module a notebook depends on, however indirectly, makes its outputs stale."""
    code = notebook_sources(NOTEBOOK_DIR / f"{notebook}.ipynb")
    return closure_files(imported_modules(code))


def _lib(notebook: str) -> str:
    return " ".join(library_sources(notebook))


def _folder(path) -> str:
    """A folder as the graph names it (as given, relative to the repository root where Make runs; no trailing /)."""
    return Path(path).as_posix()


def outputs(profile, results_dir=None) -> dict[str, list[str]]:
    """Artifact paths (relative to the repository root) per stage, for a run into ``results_dir`` (None: the
    reference ``results/<profile>``): the Make targets."""

    cfg = _profile(profile)
    R = _folder(results_dir or reference_dir(cfg["profile"]))
    out: dict[str, list[str]] = {}
    for m in cfg["models"]:
        d = f"{R}/{slug(m)}"
        Ms = m_values(cfg, m)
        out[f"01:{m}"] = [f"{d}/gradients.safetensors"]
        out[f"02:{m}"] = [f"{d}/ising_M{M}.json" for M in Ms]
        out[f"03:{m}"] = [f"{d}/states_M{M}.csv" for M in Ms] + [f"{d}/pruned_M{M}_cbo0/verification.json"
                                                                  for M in Ms]
    out["04"] = [f"{R}/selections.csv", f"{R}/evaluations.csv"] + (
        [f"{R}/retraining.csv"] if cfg.get("retrain") is not None else [])
    out["05"] = [f"{R}/hybrid/hybrid_evaluations.csv"] if cfg.get("hybrid") is not None else []
    out["06"] = [f"{_folder(figures_dir_for(cfg['profile'], results_dir))}/figures.json"]
    return out


def _rule(targets: Sequence[str], prereqs: Sequence[str], recipe: str) -> list[str]:
    """One notebook run: the first target carries the recipe, the others depend on it with an empty recipe (GNU
    make 4.3's grouped targets do not propagate ``make -n``'s "would be remade" to their dependents)."""
    first, rest = targets[0], list(targets[1:])
    lines = [f"{first}: {' '.join(prereqs)} | $(STAMP)", f"\t{recipe}"]
    if rest:
        lines.append(f"{' '.join(rest)}: {first} ;")
    return lines + [""]


def stamp(notebook: str, profile: str, results_dir=None) -> str:
    """The file that records a finished run of a resumable stage (see :func:`make_graph`), in the run's logs."""
    return f"{_folder(results_dir or reference_dir(profile))}/logs/{notebook}.done"


def make_graph(profile, results_dir=None) -> str:
    """A Makefile fragment with one rule per notebook run into ``results_dir`` (None: the reference
    ``results/<profile>``; the Makefile passes its run folder): file targets, every prerequisite declared."""
    cfg = _profile(profile)
    p = cfg["profile"]
    outs = outputs(cfg, results_dir)
    conf = f"cbo_utils/configs/{p}.yaml"
    res = "" if results_dir is None else f" --results {_folder(results_dir)}"   # every recipe writes there
    lines = [f"# autogenerated by `python -m cbo_utils.notebooks graph --profile {p}{res}` — do not edit", ""]
    states_all: list[str] = []
    for m in cfg["models"]:
        g, ising, states = outs[f"01:{m}"], outs[f"02:{m}"], outs[f"03:{m}"]
        states_all += states
        for name, targets, upstream in (("01_hessian_estimation", g, []), ("02_ising_construction", ising, g),
                                        ("03_state_sampling", states, ising)):
            lines += _rule(targets, [*upstream, f"notebooks/{name}.ipynb", conf, _lib(name)],
                           f"$(NB) run {name} --profile {p} --model {m}{res}")
    # the resumable stages (their tables fill up row by row, and a rerun continues them) get a stamp as their first
    # target, written only when the notebook finished: an interrupted run makes Make's .DELETE_ON_ERROR delete the
    # stamp, never the tables, and the next `make reproduce` reruns the stage, which resumes
    lines += _rule([stamp("04_pruning_and_retraining", p, results_dir), *outs["04"]],
                   [*states_all, "notebooks/04_pruning_and_retraining.ipynb", conf, _lib("04_pruning_and_retraining")],
                   f"$(NB) run 04_pruning_and_retraining --profile {p}{res} && touch $@")
    if outs["05"]:
        lines += _rule([stamp("05_moe_nemotron", p, results_dir), *outs["05"]],
                       ["notebooks/05_moe_nemotron.ipynb", conf, _lib("05_moe_nemotron")],
                       f"$(NB) run 05_moe_nemotron --profile {p}{res} && touch $@")
    lines += _rule(outs["06"], [*outs["04"], *outs["05"], "notebooks/06_report.ipynb",
                                _lib("06_report")], f"$(NB) run 06_report --profile {p}{res}")
    stamps = [stamp("04_pruning_and_retraining", p, results_dir)] + (
        [stamp("05_moe_nemotron", p, results_dir)] if outs["05"] else [])
    lines += [f"REPRODUCE_TARGETS := {' '.join(outs['06'])}",
              f"STAGE_TARGETS := {' '.join(t for v in outs.values() for t in v)}",
              f"STAMPS := {' '.join(stamps)}", ""]
    return "\n".join(lines)


#: the files of a run folder that make up a committed reference: its tables and reports, and the small per-model
#: tables the figures are drawn from (the states tables of Figs. 1 and 4 and the gradients' sidecar, which records
#: N and the block types) — not the models, gradients, Ising files, pair tables, logs or the reproduction report
#: (which compares the run with the reference it would replace). So ``make reference`` redraws every figure of the
#: run from the reference alone.
REFERENCE_FILES = ("*.csv", "*.md", "*.json", "hybrid/*.csv", "hybrid/*.json", "hybrid/*.md",
                   "*/states_M*.csv", "*/states_M*.csv.json", "*/gradients.safetensors.json",
                   "*/compare/states_*_M*.csv")
NOT_REFERENCE = ("reproduction.md", "reproduction.json", "graph.mk")


def promote_run(run, profile: str, reference=None) -> list[Path]:
    """Make the run folder ``run`` the committed reference ``results/<profile>``: the reference's recorded files
    are removed (refused, with nothing removed, when it holds anything cbo did not write), the run's tables and
    reports (:data:`REFERENCE_FILES`) copied byte for byte and recorded (``reference``: another folder than
    ``results/<profile>``). Returns the files written. Redraw the
    reference figures afterwards (``make figures RUN=results/<profile>``; ``make reference`` does both)."""
    run = Path(run)
    if read_manifest(run) is None:
        raise FileNotFoundError(f"{run} is not a run folder cbo wrote (no {run}/.cbo-manifest.json); give the RUN "
                                "folder of a finished `make reproduce`")
    ref = Path(reference) if reference is not None else ROOT / reference_dir(profile)
    if run.resolve() == ref.resolve():
        raise ValueError(f"{run} is already the reference of profile {profile}")
    files = sorted({f for pat in REFERENCE_FILES for f in run.glob(pat) if f.is_file() and not f.is_symlink()
                    and f.name not in NOT_REFERENCE and f.name != ".cbo-manifest.json"
                    and not f.name.endswith(".cbo-tmp")})
    if not any(f.name == "selections.csv" for f in files):
        raise FileNotFoundError(f"{run} has no selections.csv: the run has not finished its comparison; finish it "
                                "with `make reproduce` first")
    claim_folder(ref, "results", overwrite=True)
    out = []
    for f in files:
        dest = ref / f.relative_to(run)
        out.append(atomic_write_bytes(dest, f.read_bytes()))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="execute one notebook with papermill")
    r.add_argument("notebook", choices=sorted(NOTEBOOKS))
    r.add_argument("--profile", default="mini")
    r.add_argument("--model", default=None)
    r.add_argument("--results", default=None, help="results folder to write (default: the reference "
                                                    "results/<profile>; make reproduce passes its run folder)")
    g = sub.add_parser("graph", help="write the Make graph of a profile")
    g.add_argument("--profile", default="mini")
    g.add_argument("--results", default=None, help="the run folder the graph writes into (default: the reference "
                                                    "results/<profile>)")
    g.add_argument("--out", default=None)
    k = sub.add_parser("clean", help="remove what cbo wrote under a results folder (by each folder's record); keep "
                                     "the rest")
    k.add_argument("--results", default="results")
    pr = sub.add_parser("promote", help="make a finished run folder the committed reference results/<profile>")
    pr.add_argument("--profile", default="mini")
    pr.add_argument("--run", required=True)
    c = sub.add_parser("check", help="stop early, with a clear message, when a model of the profile is unreachable")
    c.add_argument("--profile", default="mini")
    q = sub.add_parser("params", help="print a notebook's parameters for a profile")
    q.add_argument("notebook", choices=sorted(NOTEBOOKS))
    q.add_argument("--profile", default="mini")
    q.add_argument("--model", default=None)
    q.add_argument("--results", default=None)
    args = ap.parse_args(argv)
    if args.cmd == "run":
        import time

        t0 = time.perf_counter()
        label = f"{args.notebook}" + (f" [{args.model}]" if args.model else "")
        print(f"▶ {label} (profile {args.profile}) ...", flush=True)
        out = run_notebook(args.notebook, args.profile, args.model, args.results)
        print(f"✔ {label} in {time.perf_counter() - t0:.0f} s — log: {out}", flush=True)
    elif args.cmd == "graph":

        text = make_graph(args.profile, args.results)
        if args.out:
            claim_folder(Path(args.out).parent, "results")   # <run>/graph.mk: the run's first file
            atomic_write_text(args.out, text)
        else:
            print(text)
    elif args.cmd == "clean":
        removed_any = False
        for folder in sorted(Path(args.results).iterdir()) if Path(args.results).is_dir() else []:
            if folder.is_dir() and not folder.is_symlink() and read_manifest(folder) is not None:
                kept = remove_owned(folder, strict=False)
                removed_any = True
                print(f"{folder}: removed what cbo wrote" + (f"; kept {len(kept)} file(s) it did not write or that "
                                                             f"changed since: {', '.join(kept[:5])}" if kept else ""))
        if not removed_any:
            print(f"nothing to clean: no folder under {args.results} has a record of what cbo wrote")
    elif args.cmd == "promote":
        written = promote_run(args.run, args.profile)
        print(f"{reference_dir(args.profile)}: {len(written)} files from {args.run} (the new reference); redraw its "
              f"figures with `make figures RUN={reference_dir(args.profile)} PROFILE={args.profile}`")
    elif args.cmd == "check":

        cfg = _profile(args.profile)
        models = list(cfg["models"])
        hyb = (cfg.get("hybrid") or {}).get("model")
        if hyb and hyb != "standin":
            models.append(hyb)
        for m in models:
            check_reachable(m)   # exits with the reason and what to do
        print(f"profile {cfg['profile']}: {len(models)} model(s) reachable")
    else:
        import json

        print(json.dumps(parameters_for(args.notebook, args.profile, args.model, args.results), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
