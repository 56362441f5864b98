"""``make reproduce`` for the stages that exist so far: gradients → states → pruned, verified checkpoints → the
comparison of every baseline and CBO variant (:mod:`cbo_utils.compare`).

Each stage writes its artifact atomically and is skipped when the artifact already exists with the same
parameters (an interrupted run resumes from the last complete artifact). The notebooks, retraining and the
figures/tables are not built yet: the run says so at the end.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import yaml

from .artifacts import write_json

ROOT = Path(__file__).resolve().parent.parent
NOT_YET = [
    "notebooks 01-05 and the papermill graph (issue 5)",
    "figures and the paper's tables (issue 5)",
]
from .stages import EXACT_LIMIT  # noqa: E402,F401  (re-exported: above this many states tabu replaces enumeration)


def load_profile(name_or_path: str) -> dict:
    p = Path(name_or_path)
    if not p.suffix:
        p = ROOT / "configs" / f"{name_or_path}.yaml"
    if not p.is_file():
        raise FileNotFoundError(f"no profile {name_or_path!r} ({p}); choose tiny, mini or paper")
    return yaml.safe_load(p.read_text())


def profile_with(profile: str, section: str, override=None) -> dict:
    """The profile, with its ``section`` (``compare``, ``retrain``, ``hybrid``) replaced by ``override`` when given
    (how the notebooks pass their parameter to a stage)."""
    cfg = load_profile(profile)
    return cfg if override is None else {**cfg, section: dict(override)}


def _slug(model: str) -> str:
    return model.replace("/", "__")


def _m_values(cfg: dict, model: str) -> list[int]:
    mv = cfg["M_values"]
    return list(mv[model] if isinstance(mv, dict) else mv)


def _check_reachable(model: str) -> None:
    from .tiny import TINY_BUILDERS

    if model in TINY_BUILDERS or model.startswith("smollm2") or Path(model).exists():
        return
    try:
        from transformers import AutoConfig

        AutoConfig.from_pretrained(model)
    except Exception as exc:  # noqa: BLE001 - any failure here means the same thing to the user
        sys.exit(f"cannot reach {model!r}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}\n"
                 "The paper profile needs the Hugging Face Hub (and accepted licences for Llama) and GPUs. Log in "
                 "with `huggingface-cli login`, or run PROFILE=mini (CPU, embedded SmolLM2) instead.")


def run(profile: str, results: Path | None = None, compare: bool = True, retrain: bool = True,
        hybrid: bool = True) -> list[Path]:
    """Gradients → states → pruned checkpoints for every model of the profile, then (``compare=True`` and the
    profile has a ``compare:`` section) the comparison harness: every baseline and CBO variant evaluated the same
    way (:mod:`cbo_utils.compare`); then (``retrain=True``, after the comparison, with a ``retrain:`` section) the
    knowledge distillation of the chosen selections, evaluated before and after (:mod:`cbo_utils.retrain`); then
    (``hybrid=True``) the type-restricted hybrid experiment — the Nemotron stand-in on the tiny and mini profiles,
    the real Nemotron-3-Nano on the paper profile (:mod:`cbo_utils.hybrid`)."""
    from .stages import build_ising, estimate_hessian, export_ground_state, sample_states

    cfg = load_profile(profile)
    results = Path(results or ROOT / "results" / cfg["profile"])
    produced: list[Path] = []
    for model_name in cfg["models"]:
        _check_reachable(model_name)
    for model_name in cfg["models"]:
        t0 = time.perf_counter()
        print(f"[{model_name}] gradients ({cfg['samples']} samples × {cfg['max_tokens']} tokens) ...", flush=True)
        grad_file = estimate_hessian(model_name, results, calibration=cfg["calibration"], samples=cfg["samples"],
                                     max_tokens=cfg["max_tokens"], dtype=cfg["dtype"],
                                     exact_hessian_samples=cfg.get("exact_hessian_samples") or 0, seed=cfg["seed"],
                                     device_map=cfg.get("device_map"))
        produced.append(grad_file)
        Ms = _m_values(cfg, model_name)
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
        from .compare import run_compare

        print("\n[compare] every baseline and CBO variant on the same calibration, evaluated the same way ...")
        report = run_compare(profile, results)
        produced += [report, results / "selections.csv", results / "evaluations.csv", results / "correlations.csv"]
        if retrain and cfg.get("retrain") is not None:
            from .retrain import run_retrain

            print("\n[retrain] knowledge distillation of the selections, evaluated before and after ...")
            produced += [run_retrain(profile, results), results / "retraining.csv"]
    if hybrid and cfg.get("hybrid") is not None:
        from .hybrid import run_profile

        print("\n[hybrid] type-restricted removal on the hybrid Mamba/MoE/attention model ...")
        res = run_profile(profile, results)
        produced += [Path(p) for p in res["paths"].values()]
    write_json(results / "reproduce_manifest.json", {"profile": cfg["profile"], "produced": [str(p) for p in produced],
                                                      "not_yet_built": NOT_YET})
    print("\nProduced:")
    for p in produced:
        print(f"  {p}")
    print("\nNot built yet (their issues are open): " + "; ".join(NOT_YET))
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
