"""The per-model stages of the method, one function per notebook, each reading and writing named artifacts.

    estimate_hessian   (01_hessian_estimation)  model + calibration  → <results>/<model>/gradients.safetensors
    build_ising        (02_ising_construction)  gradients            → <results>/<model>/ising_M<M>.json
    sample_states      (03_state_sampling)      ising_M<M>.json      → <results>/<model>/states_M<M>.csv
    export_ground_state(03 / pipeline)          states_M<M>.csv      → <results>/<model>/pruned_M<M>_cbo0/

Arguments are the profile's keys (the notebooks' parameters). Every artifact is written atomically with a provenance
sidecar naming its inputs (and their SHA-256); a stage whose artifact is newer than its inputs and was made with the
same parameters is not redone. Block indices are 0-based; energies float64.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cbo_utils.calibration import load_calibration
from cbo_utils.core.artifacts import provenance, read_json, sidecar_path, write_json, write_sidecar
from cbo_utils.gradients import GRADIENTS_FILE, collect_gate_gradients, gradients_provenance, load_gradients
from cbo_utils.model.load import load_model
from cbo_utils.problem.bounds import certify
from cbo_utils.problem.energies import energy_gradient
from cbo_utils.problem.ising import BlockRemovalProblem
from cbo_utils.prune.export import export_pruned, verify_export
from cbo_utils.solvers.heuristics import EXACT_LIMIT, solve
from cbo_utils.solvers.states import read_states_csv, states_blocks, write_states_csv


def model_dir(results_dir, model: str) -> Path:
    """``<results>/<model slug>/`` (``/`` in Hub ids becomes ``__``)."""
    return Path(results_dir) / model.replace("/", "__")


def _fresh(artifact: Path, inputs: Sequence[Path], params: dict | None = None) -> bool:
    """The artifact exists, is newer than every input and (when given) was made with ``params``."""
    if not artifact.exists() or any(not Path(p).exists() or Path(p).stat().st_mtime > artifact.stat().st_mtime
                                    for p in inputs):
        return False
    if params is None:
        return True
    side = sidecar_path(artifact)
    return side.is_file() and read_json(side).get("parameters", {}).get("stage") == params


# ------------------------------------------------------------------------------------------------ 01
def estimate_hessian(model: str, results_dir, *, calibration: str = "mix", samples: int = 128,
                     max_tokens: int | None = 256, dtype: str = "float32", exact_hessian_samples: int = 0,
                     seed: int = 0, device_map=None, force: bool = False, progress: bool = True) -> Path:
    """Per-sample gate gradients A (m × N), their mean g and the Fisher H = AᵀA/m (method §1, Eq. of the paper's
    Hessian surrogate), plus the exact gate Hessian on the first ``exact_hessian_samples`` samples. Resumable
    (``gradients.partial``); returns the gradients file."""

    out = model_dir(results_dir, model)
    grad_file = out / GRADIENTS_FILE
    params = {"calibration": calibration, "samples": samples, "max_tokens": max_tokens, "dtype": dtype,
              "exact_hessian_samples": exact_hessian_samples, "seed": seed}
    if not force and _fresh(grad_file, [], params):
        print(f"[{model}] gradients: up to date ({grad_file})", flush=True)
        return grad_file
    net, tok = load_model(model, dtype=dtype, device_map=device_map)
    thinking = True if "qwen3" in model.lower() else None  # the paper: Qwen3 with its thinking template
    # the calibration's own seed is its recipe's (embedded: 0, OpenHermes: 42, the paper's); ``seed`` is recorded
    calib = load_calibration(calibration, tok, samples=samples, max_tokens=max_tokens, enable_thinking=thinking)
    res = collect_gate_gradients(net, calib, exact_hessian_samples=exact_hessian_samples or 0,
                                 checkpoint=out / "gradients.partial", progress=progress)
    res.save(out, gradients_provenance(model, calib, seed, stage=params))
    return grad_file


# ------------------------------------------------------------------------------------------------ 02
def build_ising(model: str, results_dir, M_values: Sequence[int], *, energy: str = "fisher",
                hessian_kind: str = "fisher", keep: Sequence[int] = (), remove: Sequence[int] = (),
                only_types: Sequence[str] | None = None, force: bool = False) -> list[Path]:
    """For each M: the constrained binary problem min xᵀQx s.t. Σx = M (``energy="fisher"``: Q = H, the paper;
    ``"taylor"``: −gᵀx + ½xᵀHx) and its Ising form over spins s = 2x − 1 (h, J, offset, fixed magnetisation), as
    ``ising_M<M>.json`` (float64, JSON numbers round-trip exactly)."""

    out = model_dir(results_dir, model)
    grad_file = out / GRADIENTS_FILE
    if not grad_file.is_file():
        raise FileNotFoundError(f"{grad_file} is missing: run 01_hessian_estimation (make gradients) first")
    res = None
    paths = []
    for M in M_values:
        path = out / f"ising_M{M}.json"
        params = {"M": int(M), "energy": energy, "hessian_kind": hessian_kind, "keep": list(keep),
                  "remove": list(remove), "only_types": None if only_types is None else list(only_types)}
        if not force and _fresh(path, [grad_file], params):
            paths.append(path)
            continue
        if res is None:
            res = load_gradients(grad_file)
        H = res.H if hessian_kind == "fisher" else res.H_exact
        if H is None:
            raise ValueError(f"{grad_file} has no exact Hessian; rerun 01 with exact_hessian_samples > 0")
        types = res.meta.get("block_types")
        prob = BlockRemovalProblem.from_hessian(H.numpy(), int(M), energy_gradient(energy, g=res.g.numpy()),
                                                energy=energy, keep=keep, remove=remove, block_types=types,
                                                only_types=only_types)
        ising = prob.to_ising()
        doc = {"N": prob.N, "M": prob.M, "energy": prob.energy, "Q": prob.Q.tolist(), "const": prob.const,
               "keep": list(prob.keep), "remove": list(prob.remove), "block_types": types,
               "only_types": None if prob.only_types is None else list(prob.only_types),
               "free_blocks": [int(i) for i in prob.free], "M_free": prob.M_free,
               "ising": {"h": ising.h.tolist(), "J": ising.J.tolist(), "offset": ising.offset,
                         "magnetization": ising.magnetization,
                         "convention": "E(s) = h·s + sᵀJs + offset, s = 2x − 1 over free_blocks, J upper"},
               "penalty_lambda": prob.penalty_lambda(), "states": math.comb(len(prob.free), prob.M_free)}
        write_json(path, doc)
        write_sidecar(path, provenance("ising", {"stage": params}, inputs={"gradients": grad_file}))
        paths.append(path)
    return paths


def load_ising(path):
    """The :class:`~cbo_utils.problem.ising.BlockRemovalProblem` stored in an ``ising_M<M>.json``."""

    d = read_json(path)
    return BlockRemovalProblem(Q=np.asarray(d["Q"], dtype=np.float64), M=int(d["M"]), const=float(d["const"]),
                               keep=tuple(d["keep"]), remove=tuple(d["remove"]), block_types=d.get("block_types"),
                               only_types=None if d.get("only_types") is None else tuple(d["only_types"]),
                               energy=d["energy"])


# ------------------------------------------------------------------------------------------------ 03
def sample_states(model: str, results_dir, M_values: Sequence[int], *, k: int = 20, solver: str = "exact",
                  seed: int = 0, bound: bool = True, force: bool = False, **solver_kw) -> list[Path]:
    """The k lowest-energy states of each ``ising_M<M>.json``: exact enumeration (the default; tabu beyond
    5·10⁹ states), simulated annealing (``sa``, neal) or ``tabu``; ``states_M<M>.csv`` sorted by energy, 0-based
    removed blocks, with a sidecar holding the solver's parameters, time and the input's SHA-256.

    ``bound``: the sidecar's ``solver_info`` also gets ``lower_bound`` (a certified lower bound on the ground-state
    energy: :func:`cbo_utils.problem.bounds.lower_bound` for the heuristics, the optimum itself for exact enumeration),
    ``gap`` (best energy − bound) and ``proven_optimal``; :func:`states_summary` tabulates them."""

    out = model_dir(results_dir, model)
    paths = []
    for M in M_values:
        src = out / f"ising_M{M}.json"
        if not src.is_file():
            raise FileNotFoundError(f"{src} is missing: run 02_ising_construction (make ising) first")
        prob = load_ising(src)
        use = solver
        if solver == "exact" and math.comb(len(prob.free), prob.M_free) > EXACT_LIMIT:
            use = "tabu"
        path = out / f"states_M{M}.csv"
        params = {"M": int(M), "k": int(k), "solver": use, "seed": int(seed), **{k_: v for k_, v in solver_kw.items()}}
        if not force and _fresh(path, [src], params):
            paths.append(path)
            continue
        t0 = time.perf_counter()
        kw: dict[str, Any] = dict(solver_kw)
        if use == "exact":
            kw.setdefault("progress", False)
        df = solve(prob, solver=use, k=k, seed=seed, **kw)
        if bound:

            certify(prob, df)
        write_states_csv(df, path, provenance("states", {"stage": params, **params, "energy": prob.energy},
                                              inputs={"ising": src}, seconds=round(time.perf_counter() - t0, 4)))
        paths.append(path)
    return paths


def states_summary(model: str, results_dir, M_values: Sequence[int]):
    """One row per M: solver, states, ground-state energy, certified lower bound, gap (absolute and relative to
    the best energy), proven optimal, solver seconds — read from the ``states_M<M>.csv`` sidecars."""
    import pandas as pd


    rows = []
    for M in M_values:
        path = model_dir(results_dir, model) / f"states_M{M}.csv"
        side = read_json(sidecar_path(path)) if sidecar_path(path).is_file() else {}
        info = side.get("solver_info", {})
        df = pd.read_csv(path)
        best = float(df["energy"].iloc[0])
        lb = info.get("lower_bound")
        rows.append({"M": int(M), "solver": info.get("solver"), "states": len(df), "ground_energy": best,
                     "lower_bound": lb, "gap": None if lb is None else best - lb,
                     "rel_gap": None if lb is None or best == 0 else (best - lb) / abs(best),
                     "proven_optimal": info.get("proven_optimal"), "seconds": side.get("seconds")})
    return pd.DataFrame(rows)


def export_ground_state(model: str, results_dir, M: int, *, dtype: str = "float32", device_map=None,
                        rank: int = 0, net=None, tok=None, verify: bool = True) -> Path:
    """The state of ``rank`` (0 = ground state) of ``states_M<M>.csv`` as a standard ``save_pretrained`` folder
    ``pruned_M<M>_cbo<rank>/``, verified against the original model (reload, logits with α = 0, cached generation).
    Not redone when a verified export newer than the states file exists."""
    import copy


    out = model_dir(results_dir, model)
    states = out / f"states_M{M}.csv"
    folder = out / f"pruned_M{M}_cbo{rank}"
    ver = folder / "verification.json"
    if ver.is_file() and read_json(ver).get("ok") and ver.stat().st_mtime >= states.stat().st_mtime:
        print(f"[{model}] M={M}: pruned model verified earlier ({folder})", flush=True)
        return folder
    if net is None:
        net, tok = load_model(model, dtype=dtype, device_map=device_map)
    df = read_states_csv(states)
    row = df[df["rank"] == rank]
    remove = states_blocks(row)[0]
    info = read_json(sidecar_path(states)).get("parameters", {})
    victim = copy.deepcopy(net)
    export_pruned(victim, tok, remove, folder, method=f"cbo:{rank} ({info.get('solver')}, {info.get('energy')})",
                  energy=float(row["energy"].iloc[0]), source=model, overwrite=True)
    del victim
    if verify:
        verify_export(folder, net, tok)
    return folder
