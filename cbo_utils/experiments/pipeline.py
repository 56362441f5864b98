"""Every stage without notebooks (``make pipeline``): gradients → states → pruned, verified checkpoints → the
comparison of every baseline and CBO variant → retraining → the hybrid experiment. ``make reproduce`` runs the same
library calls through the notebooks.

Each stage writes its artifact atomically and is skipped when the artifact already exists with the same
parameters (an interrupted run resumes from the last complete artifact).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from cbo_utils.core.artifacts import write_json
from cbo_utils.core.profiles import load_profile, m_values, results_dir
from cbo_utils.experiments.compare import run_compare
from cbo_utils.experiments.hybrid import run_profile
from cbo_utils.experiments.retrain import run_retrain
from cbo_utils.experiments.stages import build_ising, estimate_hessian, export_ground_state, sample_states
from cbo_utils.model.load import check_reachable


def run(profile: str, results: Path | None = None, compare: bool = True, retrain: bool = True,
        hybrid: bool = True) -> list[Path]:
    """Gradients → states → pruned checkpoints for every model of the profile, then (``compare=True`` and the
    profile has a ``compare:`` section) the comparison harness: every baseline and CBO variant evaluated the same
    way (:mod:`cbo_utils.experiments.compare`); then (``retrain=True``, after the comparison, with a ``retrain:``
    section) the knowledge distillation of the chosen selections, evaluated before and after
    (:mod:`cbo_utils.experiments.retrain`); then (``hybrid=True``) the type-restricted hybrid experiment — the Nemotron
    stand-in on the tiny and mini profiles, the real Nemotron-3-Nano on the paper profile
    (:mod:`cbo_utils.experiments.hybrid`)."""

    cfg = load_profile(profile)
    results = results_dir(cfg, results)
    produced: list[Path] = []
    for model_name in cfg["models"]:
        check_reachable(model_name)
    for model_name in cfg["models"]:
        t0 = time.perf_counter()
        print(f"[{model_name}] gradients ({cfg['samples']} samples × {cfg['max_tokens']} tokens) ...", flush=True)
        grad_file = estimate_hessian(model_name, results, calibration=cfg["calibration"], samples=cfg["samples"],
                                     max_tokens=cfg["max_tokens"], dtype=cfg["dtype"],
                                     exact_hessian_samples=cfg.get("exact_hessian_samples") or 0, seed=cfg["seed"],
                                     device_map=cfg.get("device_map"))
        produced.append(grad_file)
        Ms = m_values(cfg, model_name)
        produced += build_ising(model_name, results, Ms, energy=cfg["energy"])
        for states in sample_states(model_name, results, Ms, k=cfg["k"], solver=cfg["solver"], seed=cfg["seed"],
                                    bound=cfg.get("bound", True)):
            print(f"[{model_name}] states: {states}")
            produced.append(states)
        for M in Ms:
            pruned = export_ground_state(model_name, results, M, dtype=cfg["dtype"], device_map=cfg.get("device_map"))
            print(f"[{model_name}] M={M}: ground state exported and verified → {pruned}")
            produced.append(pruned)
        print(f"[{model_name}] done in {time.perf_counter() - t0:.1f} s")
    if compare and cfg.get("compare") is not None:

        print("\n[compare] every baseline and CBO variant on the same calibration, evaluated the same way ...")
        report = run_compare(profile, results)
        produced += [report, results / "selections.csv", results / "evaluations.csv", results / "correlations.csv"]
        if retrain and cfg.get("retrain") is not None:

            print("\n[retrain] knowledge distillation of the selections, evaluated before and after ...")
            produced += [run_retrain(profile, results), results / "retraining.csv"]
    if hybrid and cfg.get("hybrid") is not None:

        print("\n[hybrid] type-restricted removal on the hybrid Mamba/MoE/attention model ...")
        res = run_profile(profile, results)
        produced += [Path(p) for p in res["paths"].values()]
    write_json(results / "reproduce_manifest.json", {"profile": cfg["profile"], "produced": [str(p) for p in produced]})
    print("\nProduced:")
    for p in produced:
        print(f"  {p}")
    return produced


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--profile", default="mini")
    ap.add_argument("--results", default=None)
    ap.add_argument("--no-compare", dest="compare", action="store_false", help="skip the comparison harness")
    ap.add_argument("--no-retrain", dest="retrain", action="store_false", help="skip knowledge distillation")
    ap.add_argument("--no-hybrid", dest="hybrid", action="store_false", help="skip the hybrid (Nemotron) experiment")
    args = ap.parse_args(argv)
    run(args.profile, Path(args.results) if args.results else None, compare=args.compare, retrain=args.retrain,
        hybrid=args.hybrid)
    return 0


if __name__ == "__main__":
    sys.exit(main())
