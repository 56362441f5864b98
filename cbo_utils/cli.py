"""The ``cbo`` command line: one command to compress a model, or the steps gradients → solve → prune → verify.

    cbo compress  --model smollm2 -M 8 --out smollm2-M8     # select (default CBO), prune, verify, measure
    cbo blocks    --model smollm2
    cbo gradients --model smollm2 --calibration embedded --out results/smollm2 --samples 128 --max-tokens 256
    cbo solve     --hessian results/smollm2 -M 8 -k 20 --solver exact --out results/smollm2/states_M8.csv
    cbo prune     --model smollm2 --states results/smollm2/states_M8.csv --rank 0 --out pruned/smollm2-M8
    cbo verify    pruned/smollm2-M8 --original smollm2
    cbo retrain   --teacher smollm2 --student pruned/smollm2-M8 --out retrained/smollm2-M8 --max-steps 30
    cbo hybrid    --profile mini                       # only-MoE / only-attention / ... removal on the hybrid model
    cbo prune-files Nemotron-FP8/ --remove 8,10,38 --out Nemotron-FP8-pruned/
    cbo prune-files model.Q4_1.gguf --remove 3,7,12 --out pruned.gguf   # GGUF: quantised data kept byte for byte

Models: a local folder, a Hub id, ``smollm2`` (the embedded SmolLM2-135M-Instruct) or a tiny model built in code
(``tiny-llama``, ``tiny-qwen3``, ``tiny-nemotron-h``). Block indices are 0-based everywhere.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import pickle
import sys
import time
from pathlib import Path

import yaml

from cbo_utils.core.artifacts import (
    check_output,
    check_writable,
    file_is_recorded,
    parse_blocks,
    provenance,
    read_json,
    sidecar_path,
)
from cbo_utils.problem.energies import ENERGIES, energy_gradient

EXIT_USAGE = 2          # a user error: bad input, an output that exists, a file that cannot be read
EXIT_INTERRUPTED = 130  # Ctrl-C / SIGINT (the shell's convention)
EXIT_INTERNAL = 1       # a bug in cbo (and `cbo verify`: a check failed)
EXACT_STATE_LIMIT = 10**11  # beyond this `cbo solve --solver exact` asks for --force


class CLIError(Exception):
    pass


def _blocks_arg(text: str) -> list[int]:

    try:
        return parse_blocks(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _typed(convert, ok, need: str):
    """An argparse type: ``convert`` the text (int or float), then require ``ok(value)``; the messages say what the
    value must be."""
    def parse(text: str):
        try:
            v = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'a whole number' if convert is int else 'a number'}") \
                from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"must be {need}, got {text}")
        return v

    return parse


_positive = _typed(int, lambda v: v >= 1, "a positive whole number")
_nonnegative = _typed(int, lambda v: v >= 0, "a whole number, 0 or more")
_positive_float = _typed(float, lambda v: math.isfinite(v) and v > 0, "a finite number above 0")
_nonnegative_float = _typed(float, lambda v: math.isfinite(v) and v >= 0, "a finite number, 0 or more")
_fraction = _typed(float, lambda v: 0 <= v < 1, "a fraction in [0, 1)")


#: what --device-map accepts (accelerate's strategies), besides a device ("cpu", "cuda", "cuda:1") or a JSON mapping
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def _device_map(text: str):
    """--device-map: a strategy, a device, or a JSON mapping of module names to devices (cpu, disk, mps, cuda,
    cuda:N or a GPU number N), every device checked; one naming a CUDA device is refused on a machine without one
    (torch is imported only then)."""
    def cuda_index(d):   # None: not a CUDA device; -1: "cuda"; N: cuda:N or N
        if isinstance(d, int) and not isinstance(d, bool) and d >= 0:
            return d
        if isinstance(d, str) and (d == "cuda" or (d.startswith("cuda:") and d[5:].isdigit())):
            return int(d[5:]) if ":" in d else -1
        return None

    t = text.strip()
    if t in DEVICE_MAPS or t in ("cpu", "mps"):
        return t
    if cuda_index(t) is not None:
        m, devices = t, [t]
    elif t.startswith("{"):
        try:
            m = json.loads(t)
        except json.JSONDecodeError as exc:
            raise argparse.ArgumentTypeError(f"{text!r} is not valid JSON ({exc.msg})") from None
        if not isinstance(m, dict) or not m:
            raise argparse.ArgumentTypeError(f"{text!r} must be a non-empty JSON mapping of module names to devices, "
                                             'e.g. \'{"": "cpu"}\' or \'{"model.layers.0": 0, "lm_head": "cpu"}\'')
        for name, d in m.items():
            if not (d in ("cpu", "disk", "mps") or cuda_index(d) is not None):
                raise argparse.ArgumentTypeError(f"{text!r}: module {name!r} is placed on {d!r}, which is not a "
                                                 "device; use cpu, disk, mps, cuda, cuda:N or a GPU number N")
        devices = list(m.values())
    else:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device map; use one of {', '.join(DEVICE_MAPS)}, a "
                                         "device (cpu, cuda, cuda:1) or a JSON mapping of module names to devices")
    want = [cuda_index(d) for d in devices if cuda_index(d) is not None]
    if want:
        import torch

        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise argparse.ArgumentTypeError(f"{text!r} places the model on CUDA, but this machine has no CUDA GPU "
                                             f"that torch can use (torch {torch.__version__}); leave --device-map out "
                                             "to run on the CPU")
        if max(want) >= n:
            raise argparse.ArgumentTypeError(f"{text!r} names CUDA device {max(want)}, but this machine has {n} "
                                             f"(numbered 0..{n - 1})")
    return m


def _device(text: str) -> str:
    t = text.strip()
    if t == "cpu" or t == "cuda" or t == "mps" or (t.startswith("cuda:") and t[5:].isdigit()):
        return t
    raise argparse.ArgumentTypeError(f"{text!r} is not a device; use cpu, cuda or cuda:N")


def _check_device(device: str | None) -> None:
    """A CUDA device asked for on a machine without one: refused before anything loads."""
    if device and device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise CLIError(f"--device {device}: this machine has no CUDA GPU that torch can use "
                           f"(torch {torch.__version__}); leave --device out to run on the CPU")
        n = torch.cuda.device_count()
        if ":" in device and int(device.split(":")[1]) >= n:
            raise CLIError(f"--device {device}: this machine has {n} CUDA device(s), numbered 0..{n - 1}")


def _block_types(text: str) -> tuple[str, ...]:
    """--only-types: comma-separated block types, normalised (spaces, case); the types the package knows."""
    from cbo_utils.model.blocks import BLOCK_TYPES

    types = tuple(t.strip().lower() for t in text.split(",") if t.strip())
    unknown = [t for t in types if t not in BLOCK_TYPES]
    if not types or unknown:
        raise argparse.ArgumentTypeError(f"{text!r}: unknown block type(s) {unknown or [text]}; use a comma-separated "
                                         f"subset of {', '.join(BLOCK_TYPES)}")
    return types


def _common_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="local folder, Hub id, 'smollm2' or a tiny model name")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="weight dtype (gates are always float32; default float32)")
    p.add_argument("--device-map", type=_device_map, default=None,
                   help="e.g. 'auto' to shard a large model over the GPUs")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code (off by default)")


def _load(args):
    from cbo_utils.model.load import load_model

    return load_model(args.model, dtype=args.dtype, device_map=args.device_map,
                      trust_remote_code=args.trust_remote_code)


# --------------------------------------------------------------------------------------------------- commands
def cmd_blocks(args) -> int:
    from cbo_utils.model.blocks import describe_blocks

    model, _ = _load(args)
    rows = describe_blocks(model)
    print(f"{type(model).__name__}: {len(rows)} blocks (0-based)")
    for b in rows:
        print(f"{b.index:4d}  {b.type:10s} {b.parameters:>14,d} parameters")
    return 0


GRADIENT_PARAMETERS = ("dtype", "samples", "max_tokens", "calibration", "response_only", "exact_hessian",
                       "batch_size", "random_removal", "points_per_sample")


def _gradient_parameters(args) -> dict:
    """What `cbo gradients` records of its inputs (and compares with an existing output's record)."""
    p = {"model": args.model, "seed": args.seed, **{k: getattr(args, k) for k in GRADIENT_PARAMETERS}}
    p["calibration_spec"] = p.pop("calibration")
    return json.loads(json.dumps(p))   # tuples as lists, as read back from the sidecar


def cmd_gradients(args) -> int:
    import torch

    from cbo_utils.calibration import load_calibration
    from cbo_utils.gradients import collect_gate_gradients, gradients_provenance

    out = check_writable(args.out, "folder")
    _check_device(args.device)
    target = out / "gradients.safetensors"
    if target.exists() or target.is_symlink():
        side = sidecar_path(target)
        if not file_is_recorded(target):
            raise CLIError(f"{target} is not what cbo wrote there (no sidecar {side.name} recording its content, or "
                           "it was truncated or changed since); cbo does not replace a file it cannot prove is its "
                           "own — move or delete it, or choose another --out")
        old = read_json(side).get("parameters", {})
        new = _gradient_parameters(args)
        same = {k: old.get(k) for k in new} == new
        if same and not args.overwrite:
            print(f"{target} is up to date (made from the same model, calibration and settings; its content checked "
                  "against its record); nothing to do — pass --overwrite to compute it again")
            return 0
        if not args.overwrite:
            differ = sorted(k for k in new if old.get(k) != new[k])
            raise CLIError(f"{target} exists and was made from other inputs ({', '.join(differ) or 'no record'}); "
                           "choose another --out, or pass --overwrite to replace it")
    torch.manual_seed(args.seed)
    model, tok = _load(args)
    if args.device and not args.device_map:
        model.to(args.device)
    calib = load_calibration(args.calibration, tok, samples=args.samples, max_tokens=args.max_tokens,
                             enable_thinking=args.enable_thinking)
    print(f"calibration: {len(calib)} samples, {calib.tokens} tokens ({calib.recipe.get('source')})", file=sys.stderr)
    if args.exact_hessian > len(calib):
        raise CLIError(f"--exact-hessian {args.exact_hessian} exceeds the {len(calib)} calibration samples; give at "
                       "most --samples")
    res = collect_gate_gradients(model, calib, batch_size=args.batch_size, response_only=args.response_only,
                                 exact_hessian_samples=args.exact_hessian,
                                 gradient_checkpointing=args.gradient_checkpointing, progress=not args.quiet,
                                 checkpoint=out / "gradients.partial",
                                 random_removal=args.random_removal, points_per_sample=args.points_per_sample,
                                 seed=args.seed)
    rec = gradients_provenance(args.model, calib, args.seed, dtype=args.dtype, samples=args.samples,
                               max_tokens=args.max_tokens, calibration_spec=args.calibration,
                               response_only=args.response_only, exact_hessian=args.exact_hessian,
                               batch_size=args.batch_size, random_removal=args.random_removal,
                               points_per_sample=args.points_per_sample)
    written = res.save(out, rec)
    m = res.meta
    print(f"wrote {written} (A {tuple(res.A.shape)}, g, H{', H_exact' if res.H_exact is not None else ''}); "
          f"{m['seconds_gradients']:.1f} s ({m['seconds_per_sample']:.3f} s/sample), "
          f"peak RSS {m['peak_rss_gb']:.2f} GB, mean loss {m['mean_loss']:.4f}")
    return 0


def _check_file_out(out, overwrite: bool) -> Path:
    """A file output (states / selection CSV): writable, not a folder; an existing one is replaced only with
    --overwrite and only when cbo wrote it (its sidecar)."""
    out = check_writable(out, "file")
    return check_output(out, overwrite)


_NOT_INPUTS = ("func", "overwrite", "debug", "verbose", "quiet", "out", "command")


def _cli_record(args) -> dict:
    """The command's settings as the sidecar records them (what a rerun is compared with)."""
    return json.loads(json.dumps({k: v for k, v in vars(args).items() if k not in _NOT_INPUTS}, default=str))


def _up_to_date(out, args, inputs: dict | None = None) -> bool:
    """Whether ``out`` (a file with its sidecar) was made by this command with the same settings and the same input
    files (their SHA-256): then a rerun is a no-op."""
    from cbo_utils.core.artifacts import file_sha256

    out = Path(out)
    side = sidecar_path(out)
    if args.overwrite or not out.is_file() or not side.is_file():
        return False
    try:
        rec = read_json(side)
    except ValueError:
        return False
    if not file_is_recorded(out):
        if isinstance(rec, dict) and isinstance(rec.get("artifact"), dict):
            raise CLIError(f"{out} is not what cbo wrote there (truncated, emptied or edited since: its sidecar "
                           f"{side.name} records {rec['artifact'].get('size')} bytes of other content); cbo does not "
                           "replace a file it cannot prove is its own — move or delete it, then rerun")
        return False
    if rec.get("cli") != _cli_record(args):
        return False
    for role, path in (inputs or {}).items():
        if not Path(path).is_file() or (rec.get("inputs", {}).get(role) or {}).get("sha256") != file_sha256(path):
            return False
    print(f"{out} is up to date (same settings and inputs); nothing to do — pass --overwrite to compute it again")
    return True


def cmd_baseline(args) -> int:
    from cbo_utils.calibration import load_calibration
    from cbo_utils.select.methods import run_method
    from cbo_utils.select.selection import write_selections_csv

    if _up_to_date(args.out, args):
        return 0
    _check_file_out(args.out, args.overwrite)
    model, tok = _load(args)
    calib = load_calibration(args.calibration, tok, samples=args.samples, max_tokens=args.max_tokens)
    name = args.method.strip().lower().replace("-", "_")
    kw = {"seed": args.seed} if name == "random" else ({} if name == "tail" else {"batch_size": args.batch_size})
    sel = run_method(args.method, model, calib, args.M, **kw)
    write_selections_csv([sel], args.out, provenance("selection", {"method": sel.method, "M": args.M,
                                                                   "calibration": calib.describe()},
                                                     cli=_cli_record(args)))
    print(f"{sel.method}: remove {' '.join(map(str, sel.removed))} ({sel.seconds:.1f} s) → {args.out}")
    return 0


def cmd_compare(args) -> int:
    from cbo_utils.experiments.compare import STAGES, run_compare

    if args.stages is not None and not args.stages:
        raise CLIError(f"--stages was given without a stage; name the stages to run ({' '.join(STAGES)}), or leave "
                       "--stages out to run them all")
    if args.M is not None and (not args.M or min(args.M) < 1):
        raise CLIError(f"-M {' '.join(map(str, args.M)) or '(nothing)'}: give one or more block counts above 0, or "
                       "leave -M out for the profile's M values")
    stages = args.stages or ("select", "develop", "evaluate", "correlate", "efficiency", "report")
    unknown = [st for st in stages if st not in STAGES]
    if unknown:
        raise CLIError(f"unknown --stages {unknown}; choose from {' '.join(STAGES)}")
    path = run_compare(args.profile, Path(args.results) if args.results else None, M_values=args.M, stages=stages)
    print(f"report: {path}")
    return 0


def cmd_solve(args) -> int:
    from cbo_utils.gradients import load_gradients
    from cbo_utils.problem.bounds import certify
    from cbo_utils.problem.ising import BlockRemovalProblem
    from cbo_utils.solvers.states import write_states_csv

    if _up_to_date(args.out, args, {"hessian": _gradient_file(args.hessian)}):
        return 0
    _check_file_out(args.out, args.overwrite)
    if args.checkpoint:
        check_writable(args.checkpoint, "file")
    res = load_gradients(args.hessian, kind=args.input_kind)
    H = res.H
    if args.hessian_kind == "exact":
        if res.H_exact is None:
            raise CLIError(f"{args.hessian} holds no exact Hessian; recompute with `cbo gradients --exact-hessian K` "
                           "or use --hessian-kind fisher")
        H = res.H_exact
    types = res.meta.get("block_types")
    if args.only_types and not types:
        raise CLIError("--only-types needs block types, which this gradient file does not record")
    problem = BlockRemovalProblem.from_hessian(
        H.numpy(), args.M, energy_gradient(args.energy, g=res.g.numpy()), energy=args.energy,
        keep=args.keep or (), remove=args.remove or (), block_types=types,
        only_types=args.only_types or None)
    n_states = math.comb(len(problem.free), problem.M_free)
    if args.solver == "exact" and n_states > EXACT_STATE_LIMIT and not args.force:
        raise CLIError(f"exact enumeration of C({len(problem.free)}, {problem.M_free}) = {n_states:.3g} states would "
                       f"take hours or more (≈ 10⁸ states/s on 2 cores); use --solver tabu or --solver sa with --bound "
                       "(a certified gap), restrict the problem (--keep, --only-types), or pass --force to enumerate "
                       "anyway (--checkpoint makes it resumable)")
    if args.time_limit is not None and args.solver != "tabu":
        raise CLIError(f"--time-limit applies to --solver tabu (split over its reads); {args.solver} is bounded by its "
                       "work instead (exact: C(N, M) states, resumable with --checkpoint; sa: --reads/--sweeps)")
    kw = {}
    if args.solver == "sa":
        kw.update(num_reads=args.reads or 1000, num_sweeps=args.sweeps)
    elif args.solver == "tabu":
        reads = args.reads or 20
        ms = args.timeout_ms if args.time_limit is None else max(1, int(1000 * args.time_limit / reads))
        kw.update(num_reads=reads, timeout_ms=ms)
    if args.checkpoint:
        if args.solver != "exact":
            raise CLIError("--checkpoint applies to --solver exact")
        kw.update(checkpoint=args.checkpoint)
    t0 = time.perf_counter()
    df = _feasible_states(problem, res, args, kw)
    info = df.attrs["solver_info"]
    if args.bound:

        certify(problem, df, time_limit=args.bound_time_limit)
    dt = time.perf_counter() - t0
    rec = provenance("states", {"M": args.M, "k": args.k, "solver": args.solver, "energy": args.energy,
                                "hessian_kind": args.hessian_kind, "keep": args.keep, "remove": args.remove,
                                "only_types": args.only_types, "seed": args.seed, "bound": args.bound,
                                **{a: (str(b) if a == "checkpoint" else b) for a, b in kw.items()}},
                     inputs={"hessian": _gradient_file(args.hessian)}, seconds=round(dt, 4), cli=_cli_record(args))
    write_states_csv(df, args.out, rec)
    print(df.head(min(len(df), 10)).to_string(index=False))
    if "lower_bound" in info:
        best = float(df["energy"].iloc[0])
        rel = info["gap"] / abs(best) if best else float("nan")
        status = "proven optimal" if info.get("proven_optimal") else f"gap {info['gap']:.6g} ({rel:.2%} of the best)"
        print(f"best energy {best:.10g}; certified lower bound {info['lower_bound']:.10g}: {status}")
    print(f"wrote {args.out} ({len(df)} states, {dt:.2f} s) and {sidecar_path(args.out)}")
    return 0


def _feasible_states(problem, res, args, kw):
    """The solver's k lowest states that `cbo prune` accepts: on a hybrid model every state that removes all attention
    blocks is dropped (the rule of :func:`cbo_utils.model.blocks.check_indices`), and more states are asked for until
    k remain or the solver has no more."""
    from cbo_utils.model.blocks import ATTENTION, MAMBA, RemovalError, check_indices
    from cbo_utils.solvers.heuristics import solve
    from cbo_utils.solvers.states import states_blocks

    types = res.meta.get("block_types")
    hybrid = bool(res.meta.get("hybrid", types is not None and MAMBA in types))
    if not (types and hybrid and ATTENTION in types):
        return solve(problem, solver=args.solver, k=args.k, seed=args.seed, **kw)
    att = [i for i, t in enumerate(types) if t == ATTENTION]
    removable = [i for i in att if i not in set(args.keep or ())]
    if set(att) <= set(args.remove or ()):
        raise CLIError(f"--remove takes out every attention block {att} of this hybrid model; at least one must "
                       "remain (cached generation needs it)")
    if problem.only_types is not None and set(problem.only_types) == {ATTENTION} and args.M >= len(removable) \
            and len(removable) == len(att):
        raise CLIError(f"removing {args.M} attention blocks of this hybrid model removes all {len(att)}; at least one "
                       f"must remain: use -M {len(att) - 1} or less")

    def ok(blocks):
        try:
            check_indices(blocks, len(types), types, hybrid)
            return True
        except RemovalError:
            return False

    k = args.k
    while True:
        df = solve(problem, solver=args.solver, k=k, seed=args.seed, **kw)
        keep = [ok(b) for b in states_blocks(df)]
        if sum(keep) >= args.k or len(df) < k or k >= 64 * args.k:
            break
        k *= 4
    dropped = len(df) - sum(keep)
    out = df[keep].head(args.k).reset_index(drop=True)
    out["rank"] = range(len(out))
    out.attrs = dict(df.attrs)
    out.attrs["solver_info"] = {**df.attrs.get("solver_info", {}), "dropped_infeasible": int(dropped),
                                "rule": "a hybrid model keeps at least one attention block"}
    if out.empty:
        raise CLIError("every state the solver found removes all attention blocks of this hybrid model; lower -M or "
                       "--keep one attention block")
    if dropped:
        print(f"dropped {dropped} state(s) that remove every attention block (a hybrid model keeps one)",
              file=sys.stderr)
    return out


def _gradient_file(path) -> Path:
    p = Path(path)
    return p / "gradients.safetensors" if p.is_dir() else p


def cmd_prune(args) -> int:
    import copy

    from cbo_utils.prune.export import export_pruned, verify_export
    from cbo_utils.solvers.states import read_states_csv, states_blocks


    energy, method = None, "manual"
    if args.states:
        df = read_states_csv(args.states)
        rows = df[df["rank"] == args.rank]
        if rows.empty:
            raise CLIError(f"{args.states} has no state with rank {args.rank} (ranks 0..{int(df['rank'].max())})")
        remove = states_blocks(rows)[0]
        energy = float(rows["energy"].iloc[0])
        method = f"cbo:{args.rank} ({rows['solver'].iloc[0]}, {args.states})"
    else:
        remove = args.remove
    out = Path(args.out)
    check_writable(out, "folder")
    resumed = _unverified_export(out, args.model, remove) if args.verify else False
    if not resumed:
        check_output(out, args.overwrite)
    model, tok = _load(args)
    if resumed:   # an earlier run exported the same blocks and was stopped before its verification
        print(f"{out} holds the export of an earlier run with the same blocks, not yet verified: verifying it")
        rep = verify_export(out, model, tok)
        print(f"verified: {', '.join(k for k in rep['checks'])} all ok")
        return 0
    original = copy.deepcopy(model) if args.verify else None
    out = export_pruned(model, tok, remove, args.out, method=method, energy=energy, source=args.model,
                        overwrite=args.overwrite)
    print(f"wrote {out}: removed blocks {' '.join(map(str, remove))}")
    if args.verify:
        rep = verify_export(out, original, tok)
        print(f"verified: {', '.join(k for k in rep['checks'])} all ok")
    return 0


def _unverified_export(out: Path, source: str, remove) -> bool:
    """Whether ``out`` is a complete export by cbo of ``source`` without ``remove`` that was never verified (a run
    killed during its verification): a rerun verifies it instead of refusing the folder."""
    from cbo_utils.core.artifacts import read_manifest, unowned_entries

    rec_path = out / "removed_blocks.json"
    if not rec_path.is_file() or (out / "verification.json").is_file():
        return False
    man = read_manifest(out)   # the record cbo wrote last, listing every file of the export unchanged
    if man is None or man.get("output") != "pruned_model" or "removed_blocks.json" not in man["files"] \
            or unowned_entries(out, man):
        return False
    try:
        rec = read_json(rec_path)
    except ValueError:
        return False
    return rec.get("source_model") == source and sorted(rec.get("removed_blocks", [])) == sorted(remove)


def cmd_verify(args) -> int:
    from cbo_utils.model.load import load_model
    from cbo_utils.prune.export import read_removal_record, verify_export

    if not (Path(args.folder) / "removed_blocks.json").is_file():
        raise CLIError(f"{args.folder} is not a folder written by `cbo prune` (no removed_blocks.json)")
    rec = read_removal_record(args.folder)   # a malformed record: one message naming it, before any model loads
    original, tok = load_model(args.original, dtype="float32", trust_remote_code=args.trust_remote_code)
    n = rec.get("num_blocks_original")
    from cbo_utils.model.blocks import model_layers

    adapter, _, have = model_layers(original)
    from cbo_utils.model.blocks import RemovalError, block_types, check_indices

    try:
        check_indices(rec.get("removed_blocks", []), have, block_types(original), adapter.hybrid,
                      what=f"--original {args.original}")
    except RemovalError as exc:
        raise CLIError(f"{args.folder}/removed_blocks.json does not fit --original {args.original}: {exc}") from None
    if n is not None and int(n) != have:
        raise CLIError(f"{args.folder} was pruned from a model of {n} blocks, but --original {args.original} has "
                       f"{have}; give the model it was pruned from (its record names {rec.get('source_model')!r})")
    if type(original).__name__ != _saved_class(Path(args.folder)) and _saved_class(Path(args.folder)):
        raise CLIError(f"{args.folder} is a {_saved_class(Path(args.folder))}, --original {args.original} a "
                       f"{type(original).__name__}; give the model it was pruned from (its record names "
                       f"{rec.get('source_model')!r})")
    from safetensors import SafetensorError

    try:
        rep = verify_export(args.folder, original, tok, raise_on_fail=False)
    except SafetensorError as exc:
        raise CLIError(f"{args.folder}: a weight file cannot be read ({exc}); the folder is truncated or corrupt — "
                       "export it again with `cbo prune`") from None
    print(json.dumps(rep["checks"], indent=2, default=str))
    print("PASS" if rep["ok"] else "FAIL")
    return 0 if rep["ok"] else 1


def _saved_class(folder: Path) -> str | None:
    try:
        arch = read_json(folder / "config.json").get("architectures") or []
    except (OSError, ValueError):
        return None
    return arch[0] if arch else None


def cmd_retrain(args) -> int:
    import torch

    from cbo_utils.model.load import load_model
    from cbo_utils.prune.distill import DistillConfig, distill, kd_data, load_teacher, pruned_student


    if (args.student is None) == (args.remove is None):
        raise CLIError("give the student either as --student FOLDER (e.g. from `cbo prune`) or as --remove "
                       "BLOCKS (removed from a fresh copy of --teacher)")
    # validation before any work: settings that cannot work (DistillConfig.check names the flag), an NF4 teacher
    # without its GPU and package, a student record of the wrong shape
    cfg = DistillConfig(lr=args.lr, batch_size=args.batch_size, micro_batch_size=args.micro_batch_size,
                        epochs=args.epochs, max_steps=args.max_steps, warmup_steps=args.warmup_steps,
                        weight_decay=args.weight_decay, grad_clip=args.grad_clip, temperature=args.temperature,
                        teacher_dtype=args.teacher_dtype, student_dtype=args.dtype, save_every=args.save_every,
                        seed=args.seed)
    cfg.check(cli=True)
    if args.teacher_dtype == "nf4":
        import importlib.util

        if not torch.cuda.is_available():
            raise CLIError("--teacher-dtype nf4 needs a CUDA GPU (bitsandbytes' 4-bit kernels) and this machine has "
                           "none that torch can use; use --teacher-dtype bfloat16 (or float32) here")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise CLIError("--teacher-dtype nf4 needs the bitsandbytes package (pip install bitsandbytes); or use "
                           "--teacher-dtype bfloat16")
    srec = None
    if args.student and (Path(args.student) / "removed_blocks.json").is_file():
        from cbo_utils.prune.export import read_removal_record

        srec = read_removal_record(args.student)   # a malformed record: ValueError naming the file
    from cbo_utils.core.artifacts import claim_folder

    out = check_writable(args.out, "folder")
    claim_folder(out, "retraining", overwrite=args.overwrite, create=False)   # refuses a folder cbo did not write
    if out.is_dir() and any(out.iterdir()):
        prev = out / "distill_run.json"
        if prev.is_file() and not args.overwrite:
            rec = read_json(prev)
            if (rec.get("teacher"), rec.get("student")) != (args.teacher, args.student or f"remove {args.remove}"):
                raise CLIError(f"--out {out} holds a retraining of another model ({rec.get('student')} from "
                               f"{rec.get('teacher')}); choose another --out, or pass --overwrite to start over there")
    if args.student and srec is None:
        raise CLIError(f"--student {args.student} is not a pruned folder written by `cbo prune` (no "
                       "removed_blocks.json); prune the teacher first, or give --remove BLOCKS")
    teacher, tok = load_teacher(args.teacher, cfg.teacher_dtype, device_map=args.device_map)
    if args.student:
        student, _ = load_model(args.student, dtype=cfg.student_dtype)
    else:
        student, _ = pruned_student(args.teacher, args.remove, dtype=cfg.student_dtype)
    if torch.cuda.is_available():   # one GPU without `accelerate launch`: train there
        student.to("cuda")
        if args.device_map is None and cfg.teacher_dtype != "nf4":
            teacher.to("cuda")
    data = kd_data(tok, args.data, max_length=args.max_length, heldout_fraction=args.heldout_fraction,
                   packing=args.packing, samples=args.samples, seed=args.seed)
    src = srec.get("source_model") if srec else None
    from cbo_utils.model.blocks import model_layers

    n_teacher, n_student = len(model_layers(teacher)[1]), len(model_layers(student)[1])
    if type(student).__name__ != type(teacher).__name__ or n_student >= n_teacher:
        raise CLIError(f"--student {args.student or args.remove} ({type(student).__name__}, {n_student} blocks) is not "
                       f"a pruned copy of --teacher {args.teacher} ({type(teacher).__name__}, {n_teacher} blocks)"
                       + (f"; its record says it was pruned from {src!r}" if src else ""))
    if args.student:   # by the weights, not by the class name: the kept blocks are the teacher's
        from cbo_utils.prune.distill import check_student_of_teacher

        check_student_of_teacher(student, teacher, srec["removed_blocks"], student_name=args.student,
                                 teacher_name=args.teacher)
    claim_folder(out, "retraining", overwrite=args.overwrite)   # checked above; now emptied (--overwrite) or resumed
    from cbo_utils.core.artifacts import write_json

    write_json(out / "distill_run.json", {"teacher": args.teacher, "student": args.student or f"remove {args.remove}"})
    res = distill(student, teacher, tok, data, cfg, args.out,
                  extra_provenance={"teacher": args.teacher, "student": args.student or f"remove {args.remove}"})
    print(f"retrained {res.steps} steps, {res.tokens:,} tokens in {res.seconds:.0f} s; held-out KL "
          f"{res.heldout_kl_before:.4f} → {res.heldout_kl_after:.4f}; model: {args.out}")
    return 0


def cmd_hybrid(args) -> int:
    from cbo_utils.experiments.hybrid import run_profile, summary_table

    res = run_profile(args.profile, args.results, progress=True)
    print(summary_table(res["evaluations"], res["states"]).to_string(index=False))
    print(f"report: {res['paths']['report']}")
    return 0


def cmd_compress(args) -> int:
    from cbo_utils.experiments.compress import compress

    compress(args.model, args.M, args.out, method=args.method, calibration=args.calibration, samples=args.samples,
             max_tokens=args.max_tokens, retrain_steps=args.retrain_steps, dtype=args.dtype,
             device_map=args.device_map, gguf=args.gguf, seed=args.seed)
    print(f"summary: {Path(args.out) / 'summary.md'}")
    return 0


def cmd_prune_files(args) -> int:
    from cbo_utils.prune.files import prune_checkpoint_files, prune_gguf_file

    if str(args.src).endswith(".gguf"):
        rep = prune_gguf_file(args.src, args.remove, args.out, overwrite=args.overwrite)
        print(f"wrote {rep['out']}: removed blocks {' '.join(map(str, rep['removed_blocks']))} of "
              f"{rep['block_count'][0]} ({rep['tensors'][0]} → {rep['tensors'][1]} tensors, data copied byte for "
              f"byte; rewritten: {', '.join(rep['fields_rewritten'])})")
        return 0
    out = prune_checkpoint_files(args.src, args.remove, args.out, overwrite=args.overwrite, method="manual",
                                 source=str(args.src))
    print(f"wrote {out}: removed blocks {' '.join(map(str, args.remove))} (weights renamed without loading the "
          "model; config and quantisation metadata remapped)")
    return 0


def _range_arg(text: str) -> tuple[int, int]:
    parts = text.replace("-", ",").split(",")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts) or int(parts[0]) > int(parts[1]):
        raise argparse.ArgumentTypeError(f"{text!r} is not a range LO,HI of block counts (e.g. 0,8)")
    return int(parts[0]), int(parts[1])


# ------------------------------------------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="cbo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-v", "--verbose", action="store_true")
    ap.add_argument("--debug", action="store_true", help="show Python tracebacks (also: CBO_DEBUG=1)")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("blocks", help="list the blocks of a model and their types")
    _common_model_args(p)
    p.set_defaults(func=cmd_blocks)

    p = sub.add_parser("gradients", help="per-sample gate gradients A, g, Fisher H (and the exact Hessian)")
    _common_model_args(p)
    p.add_argument("--calibration", default="mix",
                   help="mix (the default mixture: SciQ chat, SQuAD prose, CoQA stories, MBPP code, GSM8K math) | "
                        "embedded (SciQ chat only) | text:PATH | jsonl:PATH | hf:NAME | openhermes (default: mix)")
    p.add_argument("--out", required=True, help="output folder (gradients.safetensors + .json sidecar)")
    p.add_argument("--samples", type=_positive, default=128)
    p.add_argument("--max-tokens", type=_positive, default=256, help="tokens per sample (window length)")
    p.add_argument("--exact-hessian", type=_nonnegative, default=0, metavar="K",
                   help="exact gate Hessian on the first K samples (N Hessian-vector products each)")
    p.add_argument("--batch-size", type=_positive, default=1, help="samples per step (per-sample gates; default 1)")
    p.add_argument("--response-only", action="store_true", help="count only assistant tokens in the loss")
    p.add_argument("--enable-thinking", action="store_true", default=None, help="Qwen3 thinking chat template")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--device", type=_device, default=None,
                   help="cpu, cuda, cuda:1 ... (default: where the model loads)")
    p.add_argument("--overwrite", action="store_true", help="replace gradients of other inputs in --out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--random-removal", type=_range_arg, default=None, metavar="LO,HI",
                   help="stochastic-depth gradients: each row at a random removal of LO..HI blocks (e.g. 0,8 "
                        "for M = 8); default: all at α = 1, as in the paper")
    p.add_argument("--points-per-sample", type=_positive, default=1, help="random points per sample (with "
                   "--random-removal)")
    p.set_defaults(func=cmd_gradients)

    p = sub.add_parser("baseline", help="select M blocks with a baseline method (BI, SLEB, SWM, ...)")
    _common_model_args(p)
    p.add_argument("--method", required=True, help="block_influence (bi), block_influence_iterative, norm_ratio, "
                   "angular_distance, tail, one_shot_perplexity (ppl), taylor_plus, sleb, sliding_window_merging "
                   "(swm), random")
    p.add_argument("-M", type=_positive, required=True)
    p.add_argument("--calibration", default="mix", help="mix (default) | embedded | text:PATH | jsonl:PATH | hf:NAME")
    p.add_argument("--samples", type=_positive, default=16)
    p.add_argument("--max-tokens", type=_positive, default=128)
    p.add_argument("--batch-size", type=_positive, default=8)
    p.add_argument("--seed", type=int, default=0, help="for --method random")
    p.add_argument("--out", required=True, help="selection CSV (one row: removed blocks, order, scores, seconds)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing selection CSV written by cbo")
    p.set_defaults(func=cmd_baseline)

    p = sub.add_parser("compare", help="every baseline and CBO variant on one profile, evaluated the same way")
    p.add_argument("--profile", default="mini", help="tiny | mini | paper | a YAML file")
    p.add_argument("--results", default=None, help="default: results/<profile>/")
    p.add_argument("-M", nargs="*", type=int, default=None, help="a subset of the profile's M values")
    p.add_argument("--stages", nargs="*", default=None,
                   help="select develop evaluate correlate efficiency report (default: all)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("solve", help="the k lowest-energy removals of exactly M blocks")
    p.add_argument("--hessian", required=True, help="folder or file from `cbo gradients`, or a .pt m×N tensor")
    p.add_argument("--input-kind", choices=["gradients", "matrix"], default=None,
                   help="what a .pt tensor holds: gradients (m × N rows, the default for non-square tensors) or an N × "
                        "N matrix H; a square tensor needs it said")
    p.add_argument("-M", type=_positive, required=True, help="number of blocks to remove")
    p.add_argument("-k", type=_positive, default=20, help="number of lowest states to return")
    p.add_argument("--solver", default="exact", choices=["exact", "sa", "tabu"],
                   help="exact: enumeration of the k lowest, pruned by certified bounds; sa, tabu: heuristics")
    p.add_argument("--energy", default="fisher",
                   choices=sorted(n for n, e in ENERGIES.items() if e.source == "gradients"),
                   help="fisher: xᵀHx (the paper); taylor: −gᵀx + ½xᵀHx")
    p.add_argument("--hessian-kind", default="fisher", choices=["fisher", "exact"])
    p.add_argument("--keep", type=_blocks_arg, help="blocks that must stay, e.g. 0,29")
    p.add_argument("--remove", type=_blocks_arg, help="blocks that must be removed")
    p.add_argument("--only-types", type=_block_types, help="remove only blocks of these types, e.g. moe or "
                   "attention,moe")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="enumerate even beyond 10¹¹ states")
    p.add_argument("--reads", type=_positive, help="samples for sa/tabu")
    p.add_argument("--sweeps", type=_positive, default=1000, help="sweeps per SA read")
    p.add_argument("--timeout-ms", type=_positive, default=200, help="time per tabu read")
    p.add_argument("--time-limit", type=_positive_float, default=None, help="seconds for tabu (split over its reads)")
    p.add_argument("--bound", action="store_true",
                   help="also compute a certified lower bound on the ground-state energy and report the gap")
    p.add_argument("--bound-time-limit", type=_positive_float, default=10.0, help="seconds for the bound (--bound)")
    p.add_argument("--checkpoint", help="exact: save the enumeration here; a rerun resumes an interrupted one")
    p.add_argument("--out", required=True, help="states CSV (rank, energy, removed_blocks, ...)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing states CSV written by cbo")
    p.set_defaults(func=cmd_solve)

    p = sub.add_parser("prune", help="remove blocks and save a standard from_pretrained folder")
    _common_model_args(p)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--remove", type=_blocks_arg, help="0-based blocks to remove, e.g. 3,7,12 or 24-29")
    g.add_argument("--states", help="states CSV from `cbo solve`")
    p.add_argument("--rank", type=_nonnegative, default=0, help="which state of --states (0 = ground state)")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-verify", dest="verify", action="store_false", help="skip the verification of the export")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("retrain", help="heal a pruned model by knowledge distillation from the dense model")
    p.add_argument("--teacher", required=True, help="the dense model (folder, Hub id, smollm2, tiny name)")
    p.add_argument("--student", default=None, help="a pruned folder (from `cbo prune`)")
    p.add_argument("--remove", type=_blocks_arg, default=None, help="or: 0-based blocks to remove from the teacher")
    p.add_argument("--out", required=True, help="folder for checkpoints, train_log.csv and the retrained model")
    p.add_argument("--data", default="embedded", help="embedded | openhermes | jsonl:PATH (chat conversations)")
    p.add_argument("--samples", type=_positive, default=None, help="use only the first N conversations")
    p.add_argument("--max-length", type=_positive, default=1024)
    p.add_argument("--packing", action="store_true", help="concatenate conversations into full windows")
    p.add_argument("--heldout-fraction", type=_fraction, default=0.01)
    p.add_argument("--lr", type=_positive_float, default=2e-5)
    p.add_argument("--batch-size", type=_positive, default=16, help="global batch (sequences per step)")
    p.add_argument("--micro-batch-size", type=_positive, default=4)
    p.add_argument("--epochs", type=_positive_float, default=1.0)
    p.add_argument("--max-steps", type=_positive, default=None)
    p.add_argument("--warmup-steps", type=_nonnegative, default=100)
    p.add_argument("--weight-decay", type=_nonnegative_float, default=1e-4)
    p.add_argument("--grad-clip", type=_positive_float, default=1.0)
    p.add_argument("--temperature", type=_positive_float, default=1.0)
    p.add_argument("--teacher-dtype", default="bfloat16", choices=["bfloat16", "float16", "float32", "nf4"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="student weights")
    p.add_argument("--device-map", type=_device_map, default=None, help="teacher placement, e.g. auto")
    p.add_argument("--save-every", type=_positive, default=50, help="steps between resumable checkpoints")
    p.add_argument("--overwrite", action="store_true", help="start over in an --out that holds another retraining")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_retrain)

    p = sub.add_parser("hybrid", help="type-restricted removal (only MoE / attention / Mamba blocks, or a mix) on "
                                      "the hybrid Nemotron of a profile (a stand-in on tiny and mini)")
    p.add_argument("--profile", default="mini")
    p.add_argument("--results", default=None)
    p.set_defaults(func=cmd_hybrid)

    p = sub.add_parser("prune-files", help="remove blocks from a checkpoint folder without loading it (e.g. the "
                                           "FP8 checkpoint with a selection made on the BF16 one)")
    p.add_argument("src", help="a save_pretrained folder with safetensors weights, or a .gguf file")
    p.add_argument("--remove", type=_blocks_arg, required=True, help="0-based blocks, e.g. 8,10,38")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_prune_files)

    p = sub.add_parser("compress", help="one command: select M blocks (default CBO), remove them, verify, optionally "
                                        "retrain, and measure before → after")
    _common_model_args(p)
    p.add_argument("-M", type=_positive, required=True, help="number of blocks to remove")
    p.add_argument("--out", required=True, help="a new folder (an interrupted run resumes in it)")
    p.add_argument("--method", default="cbo", help="cbo (the default CBO variant) or any method of `cbo baseline`")
    p.add_argument("--calibration", default="mix", help="mix (default: the stated mixture of chat, prose, "
                   "stories, code and math) | embedded (SciQ chat) | text:PATH | jsonl:PATH | hf:NAME")
    p.add_argument("--samples", type=_positive, default=16, help="calibration windows (default 16)")
    p.add_argument("--max-tokens", type=_positive, default=128, help="tokens per window (default 128)")
    p.add_argument("--retrain-steps", type=_nonnegative, default=0,
                   help="knowledge-distillation steps after pruning (0)")
    p.add_argument("--gguf", action="store_true", help="with a .gguf --model: also write <out>/model.gguf, the "
                                                       "source file with the blocks removed (quantisation kept)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("verify", help="check an exported model against the original")
    p.add_argument("folder")
    p.add_argument("--original", required=True, help="the model it was pruned from")
    p.add_argument("--trust-remote-code", action="store_true")
    p.set_defaults(func=cmd_verify)
    return ap


def resume_hint(args) -> str:
    """What a rerun of an interrupted command will do — read off what it actually saved, so the promise is true."""
    cmd, out = args.command, Path(getattr(args, "out", None) or ".")
    atomic = "nothing was half-written (outputs are written atomically)"
    if cmd == "gradients":
        parts = sorted(out.glob("gradients.partial*")) if out.is_dir() else []
        return (f"rerun the same command: it resumes from {parts[0]}" if parts else
                f"{atomic}; no checkpoint was saved yet, so a rerun starts from the first sample")
    if cmd == "solve":
        ck = getattr(args, "checkpoint", None)
        if ck and Path(ck).is_file():
            return f"rerun the same command: exact enumeration resumes from {ck}"
        if ck:
            return f"{atomic}; {ck} was not saved yet, so a rerun starts the enumeration over"
        return f"{atomic}; rerun the command (with --checkpoint FILE an exact enumeration can resume)"
    if cmd == "retrain":
        st = out / "checkpoint" / "state.json"
        if st.is_file():
            try:
                step = read_json(st).get("step")
            except (OSError, ValueError):
                step = None
            return f"rerun the same command: it resumes from {out / 'checkpoint'}" + (f" (step {step})" if step else "")
        return (f"{atomic}; no checkpoint was saved yet (one every --save-every steps), so a rerun in the same --out "
                "starts the training over")
    if cmd == "compress":
        run = out / "compress.json"
        try:
            done = list(read_json(run).get("steps") or {}) if run.is_file() else None
        except (OSError, ValueError, AttributeError):
            done = None
        if done is None:
            return f"{atomic}; rerun the same command to start over in {out}"
        return (f"rerun the same command: it resumes in {out}" + (f" after the finished steps ({', '.join(done)})"
                                                                  if done else " at the first step"))
    if cmd == "compare":
        return "rerun the same command: what is already in its tables is not measured again"
    if cmd == "hybrid":
        return "rerun the same command: finished stages are not repeated"
    return f"{atomic}; rerun the command"


def _user_errors() -> tuple[type[BaseException], ...]:
    errs: list[type[BaseException]] = [CLIError, ValueError, OSError, KeyError, yaml.YAMLError, pickle.UnpicklingError,
                                       json.JSONDecodeError, argparse.ArgumentTypeError]
    try:
        from safetensors import SafetensorError

        errs.append(SafetensorError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errs)


def _message(exc: BaseException) -> str:
    msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    if isinstance(exc, pickle.UnpicklingError) or "weights_only" in msg:
        return ("a file holds Python objects that cbo does not unpickle (loading them could run code): save tensors "
                "with safetensors (safetensors.torch.save_file) or as a plain tensor with torch.save")
    return " ".join(str(msg).split("\n")[0:3]).strip() or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    """Run one ``cbo`` command. Exit codes: 0 done, 1 a bug in cbo (or `cbo verify`: a check failed), 2 a user error
    (bad input, an output that exists, an unreadable file), 130 interrupted, 141 the output pipe closed early (quietly,
    e.g. ``cbo blocks … | head -1``). No traceback unless ``--debug`` or ``CBO_DEBUG=1``."""
    ap = build_parser()
    args = ap.parse_args(argv)
    debug = args.debug or os.environ.get("CBO_DEBUG", "").strip().lower() in ("1", "true", "yes", "on")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    from cbo_utils.core import tempfiles

    tempfiles.install_signal_handlers()   # SIGTERM / SIGHUP clean up like Ctrl-C: no temporary files left behind
    try:
        rc = args.func(args)
        sys.stdout.flush()   # a closed pipe shows here, not at the interpreter's exit
        return rc
    except BrokenPipeError:   # the reader stopped early (`cbo blocks … | head -1`): quiet, like `yes | head`
        try:   # the Python docs' recipe: stdout to devnull so the interpreter's final flush does not fail again
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):   # stdout without a file descriptor (captured)
            pass
        return 141   # 128 + SIGPIPE: what a shell reports for a writer whose pipe closed
    except (KeyboardInterrupt, tempfiles.Terminated) as exc:
        tempfiles.cleanup_all()
        if debug:
            raise
        what = f"stopped by {exc.name}" if isinstance(exc, tempfiles.Terminated) else "interrupted"
        print(f"\ncbo {args.command}: {what}; {resume_hint(args)}", file=sys.stderr)
        return 128 + exc.signum if isinstance(exc, tempfiles.Terminated) else EXIT_INTERRUPTED
    except _user_errors() as exc:  # OSError: missing files, unreachable models, unwritable outputs
        if debug:
            raise
        print(f"cbo {args.command}: error: {_message(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:
        if debug:
            raise
        print(f"cbo {args.command}: internal error ({type(exc).__name__}: {_message(exc)}); this is a bug in cbo, not "
              "in your input — rerun with --debug (or CBO_DEBUG=1) for the traceback and report it", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
