"""Training-free repair of removed blocks, fused into the weights (issue 25; the idea of ReplaceMe and LinearPatch).

For every maximal run ``a..b`` of removed blocks with a kept block ``p = a − 1`` before it, a d × d map T is fitted on
calibration activations so that p's last residual branch, mapped by T, plus p's residual stream reproduces the dense
model's hidden state after block b:

    h_p(T) = r_p + y_p T   ≈   h_b^dense          (r_p: p's output without its last branch y_p)

Runs are fitted in order, each on the model whose earlier runs are already removed and repaired. T is then fused into
the last linear map of that branch (``W ← Tᵀ W``, ``bias ← bias T``: the MLP's down projection), so the repaired
model is a plain checkpoint of the same architecture and cost. Where that is not exact the run is refused with the
reason (a run that starts at block 0 has no block before it; a branch that ends in a norm — Gemma 2/3, OLMo 2 — or
has no single down projection — MoE experts — is not fused here). Nothing is approximated silently.

Fits (:data:`FITS`, each a registered option): ``lstsq`` (least squares with a ridge towards T = I — plain
removal — chosen on held-out calibration windows), ``diag`` (a diagonal T, the same ridge rule), ``cosine``
(gradient descent on the mean cosine distance, started from the least-squares map), ``kl`` (gradient descent on T
alone against the model's own output: the KL to the dense model, from the least-squares map; every other weight
stays as it is).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from cbo_utils.model.blocks import check_removal, get_adapter, remove_blocks, without_blocks
from cbo_utils.model.loss import block_output, forward_blocks, make_batches
from cbo_utils.prune.distill import kd_loss

#: the ridge grid (towards T = I), as multiples of the mean diagonal of yᵀy; the held-out windows pick one
RIDGES = (0.0, 1e-6, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)


class RepairError(ValueError):
    """A run of removed blocks that cannot be repaired exactly (the message says why and what to do)."""


def removed_runs(removed: Iterable[int], n: int) -> list[tuple[int | None, list[int]]]:
    """The maximal runs of consecutive removed blocks, in order, each with the kept block before it (None for a run
    that starts at block 0)."""
    rem = sorted({int(b) for b in removed})
    runs: list[list[int]] = []
    for b in rem:
        if not 0 <= b < n:
            raise ValueError(f"block {b} is out of range for a model of {n} blocks")
        if runs and b == runs[-1][-1] + 1:
            runs[-1].append(b)
        else:
            runs.append([b])
    return [(r[0] - 1 if r[0] > 0 else None, r) for r in runs]


def branch_projection(model: nn.Module, p: int) -> tuple[nn.Module, nn.Linear]:
    """Block ``p``'s last residual branch (the module whose output is added to the residual stream) and the linear
    map that produces it, into which T fuses exactly. Raises :class:`RepairError` where no such map exists."""
    adapter = get_adapter(model)
    block = adapter.layers(model)[p]
    branch = adapter.gate_targets(block)[-1]
    name = type(branch).__name__
    if "norm" in name.lower() or any(isinstance(branch, t) for t in (nn.LayerNorm,)):
        raise RepairError(f"block {p}'s last branch ends in a norm ({name}): a map after the norm cannot be fused into "
                          "the down projection exactly; repair is not supported for this architecture yet")
    if getattr(branch, "experts", None) is not None:
        raise RepairError(f"block {p}'s last branch is a mixture of experts ({name}): fusing into every expert's down "
                          "projection is not supported yet")
    lin = getattr(branch, "down_proj", None)
    if not isinstance(lin, nn.Linear):
        raise RepairError(f"block {p}'s last branch ({name}) has no down_proj linear map to fuse a repair into")
    return branch, lin


# ------------------------------------------------------------------------------------------------ activations
@dataclass
class Activations:
    """Per-token activations of one run (valid tokens of the calibration windows, float64): ``y`` p's last branch,
    ``r`` p's output without it, ``target`` the dense hidden state after the run; ``window`` each row's window."""

    y: torch.Tensor
    r: torch.Tensor
    target: torch.Tensor
    window: torch.Tensor

    def split(self, heldout: Sequence[int]) -> tuple[Activations, Activations]:
        m = torch.isin(self.window, torch.as_tensor(list(heldout), dtype=self.window.dtype))
        return (Activations(self.y[~m], self.r[~m], self.target[~m], self.window[~m]),
                Activations(self.y[m], self.r[m], self.target[m], self.window[m]))


def collect(work: nn.Module, dense: nn.Module, p: int, last: int, batches, gone: Sequence[int]) -> Activations:
    """Run ``work`` (with ``gone`` — the earlier runs — taken out, their repairs fused) and ``dense`` over ``batches``
    and return the activations of block ``p`` (in ``work``'s original numbering) and of the dense model after block
    ``last``."""
    branch, _ = branch_projection(work, p)
    wl = get_adapter(work).layers(work)
    dl = get_adapter(dense).layers(dense)
    got: dict[str, torch.Tensor] = {}
    ys, rs, ts, ws = [], [], [], []

    def grab(key):
        def hook(module, args, output):
            got[key] = block_output(output).detach()
        return hook

    hs = [branch.register_forward_hook(grab("y")), wl[p].register_forward_hook(grab("h")),
          dl[last].register_forward_hook(grab("t"))]
    try:
        with torch.no_grad():
            start = 0
            for b in batches:
                with without_blocks(work, gone):
                    forward_blocks(work, b)
                forward_blocks(dense, b)
                v = b.valid
                ys.append(got["y"][v].double())
                rs.append((got["h"] - got["y"])[v].double())
                ts.append(got["t"][v].double())
                win = torch.arange(start, start + v.shape[0]).unsqueeze(1).expand_as(v)
                ws.append(win[v])
                start += v.shape[0]
    finally:
        for h in hs:
            h.remove()
    return Activations(torch.cat(ys), torch.cat(rs), torch.cat(ts), torch.cat(ws))


# ------------------------------------------------------------------------------------------------------- fits
def mse(a: Activations, T: torch.Tensor | None) -> float:
    """Mean squared error of the repaired hidden state against the dense one (T None: no repair, T = I)."""
    out = a.r + (a.y if T is None else (a.y @ T if T.dim() == 2 else a.y * T))
    return float(((out - a.target) ** 2).sum(dim=1).mean())


def solve_ridge(y: torch.Tensor, d: torch.Tensor, ridge: float, diagonal: bool = False) -> torch.Tensor:
    """argmin_T ‖y T − d‖² + λ‖T − I‖² with λ = ``ridge`` · mean diag(yᵀy), in float64 (diagonal: T = diag(t),
    the vector t returned). The ridge pulls towards the identity — plain removal, the map that changes nothing — so a
    large λ means "do not repair", not "drop the branch"."""
    y, d = y.double(), d.double()
    if diagonal:
        g = (y * y).sum(0)
        lam = ridge * float(g.mean())
        return 1 + (y * (d - y)).sum(0) / (g + lam).clamp_min(1e-300)
    G = y.T @ y
    lam = ridge * float(torch.diagonal(G).mean())
    eye = torch.eye(G.shape[0], dtype=G.dtype)
    return eye + torch.linalg.lstsq(G + lam * eye, y.T @ (d - y)).solution


def _choose_ridge(fit: Activations, held: Activations, diagonal: bool, ridges: Sequence[float] = RIDGES
                  ) -> tuple[float, torch.Tensor]:
    """The ridge of lowest held-out error (fitted on ``fit``), then the map refitted on both with it."""
    best = None
    for lam in ridges:
        T = solve_ridge(fit.y, fit.target - fit.r, lam, diagonal)
        err = mse(held, T)
        if best is None or err < best[0]:
            best = (err, lam)
    return best[1], solve_ridge(torch.cat([fit.y, held.y]), torch.cat([fit.target - fit.r, held.target - held.r]),
                                best[1], diagonal)


def fit_lstsq(fit: Activations, held: Activations, ridges: Sequence[float] = RIDGES, **_) -> tuple[torch.Tensor, dict]:
    lam, T = _choose_ridge(fit, held, diagonal=False, ridges=ridges)
    return T, {"ridge": lam}


def fit_diag(fit: Activations, held: Activations, ridges: Sequence[float] = RIDGES, **_) -> tuple[torch.Tensor, dict]:
    lam, t = _choose_ridge(fit, held, diagonal=True, ridges=ridges)
    return torch.diag(t), {"ridge": lam}


def fit_cosine(fit: Activations, held: Activations, steps: int = 200, lr: float = 1e-3,
               ridges: Sequence[float] = RIDGES, **_) -> tuple[torch.Tensor, dict]:
    """Minimise the mean cosine distance 1 − cos(r + y T, target) by Adam, from the least-squares map; the step of
    lowest held-out cosine distance is kept."""
    lam, T0 = _choose_ridge(fit, held, diagonal=False, ridges=ridges)
    T = T0.float().clone().requires_grad_(True)
    y, r, t = fit.y.float(), fit.r.float(), fit.target.float()
    hy, hr, ht = held.y.float(), held.r.float(), held.target.float()
    opt = torch.optim.Adam([T], lr=lr)

    def held_cos(M):
        with torch.no_grad():
            return float((1 - torch.nn.functional.cosine_similarity(hr + hy @ M, ht, dim=1)).mean())

    best = (held_cos(T), T.detach().clone(), 0)
    for step in range(1, steps + 1):
        opt.zero_grad()
        loss = (1 - torch.nn.functional.cosine_similarity(r + y @ T, t, dim=1)).mean()
        loss.backward()
        opt.step()
        c = held_cos(T)
        if c < best[0]:
            best = (c, T.detach().clone(), step)
    return best[1].double(), {"ridge": lam, "steps": steps, "lr": lr, "best_step": best[2],
                              "heldout_cosine_distance": best[0]}


@dataclass
class FitContext:
    """What a fit against the model's own output needs beyond the activations: the model being repaired (``work``,
    original numbering, earlier runs' maps fused), the dense teacher, the block ``p``, the blocks out so far
    including this run (``out``), the calibration batches and which windows are held out."""

    work: nn.Module
    dense: nn.Module
    p: int
    out: list[int]
    batches: list
    heldout: list[int]


def _logits_kl(student: torch.Tensor, teacher: torch.Tensor, valid: torch.Tensor, rows: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, int]:
    """Σ KL(teacher ‖ student) over the valid tokens of the rows ``rows`` (None: all) and their count."""
    m = valid if rows is None else valid & rows.unsqueeze(1)
    n = int(m.sum())
    if n == 0:
        return student.sum() * 0, 0
    return kd_loss(student, teacher, m, reduction="sum"), n


def fit_kl(fit: Activations, held: Activations, *, context: FitContext, steps: int = 100, lr: float = 1e-4,
           ridges: Sequence[float] = RIDGES, **_) -> tuple[torch.Tensor, dict]:
    """Fit T against the model's own output: from the least-squares map, Adam on T alone (every weight frozen) to
    minimise the per-token KL(dense ‖ repaired model) on the fit windows, with this run and the earlier ones
    removed (later runs not yet); the step of lowest held-out KL is kept (step 0 = the least-squares map)."""
    lam, T0 = _choose_ridge(fit, held, diagonal=False, ridges=ridges)
    c = context
    branch, _ = branch_projection(c.work, c.p)
    T = T0.float().clone().requires_grad_(True)
    opt = torch.optim.Adam([T], lr=lr)
    held_set = torch.as_tensor(c.heldout, dtype=torch.long)
    teacher, rows = [], []
    start = 0
    with torch.no_grad():
        for b in c.batches:
            teacher.append(c.dense(input_ids=b.ids, attention_mask=b.attention_mask, use_cache=False).logits.half())
            idx = torch.arange(start, start + b.ids.shape[0])
            rows.append(torch.isin(idx, held_set))
            start += b.ids.shape[0]

    def hook(module, args, output):
        y = block_output(output)
        z = y @ T.to(y.dtype)
        return (z, *output[1:]) if isinstance(output, tuple) else z

    frozen = [(q, q.requires_grad) for q in c.work.parameters()]
    for q, _ in frozen:
        q.requires_grad_(False)
    h = branch.register_forward_hook(hook)
    history = []
    try:
        with without_blocks(c.work, c.out):
            def held_kl() -> float:
                tot, n = 0.0, 0
                with torch.no_grad():
                    for b, t, r in zip(c.batches, teacher, rows, strict=True):
                        if r.any() or not c.heldout:   # no held-out windows: the fit windows themselves
                            out = c.work(input_ids=b.ids, attention_mask=b.attention_mask, use_cache=False).logits
                            k, m = _logits_kl(out, t.float(), b.valid, r if c.heldout else None)
                            tot, n = tot + float(k), n + m
                return tot / max(n, 1)

            best = (held_kl(), T.detach().clone(), 0)
            history.append(best[0])
            for step in range(1, steps + 1):
                opt.zero_grad()
                tot, n = None, 0
                for b, t, r in zip(c.batches, teacher, rows, strict=True):
                    fit_rows = ~r if c.heldout else None
                    if fit_rows is not None and not fit_rows.any():
                        continue
                    out = c.work(input_ids=b.ids, attention_mask=b.attention_mask, use_cache=False).logits
                    k, m = _logits_kl(out, t.float(), b.valid, fit_rows)
                    tot, n = (k if tot is None else tot + k), n + m
                (tot / max(n, 1)).backward()
                opt.step()
                if step % max(1, steps // 10) == 0 or step == steps:
                    v = held_kl()
                    history.append(v)
                    if v < best[0]:
                        best = (v, T.detach().clone(), step)
    finally:
        h.remove()
        for q, g in frozen:
            q.requires_grad_(g)
    return best[1].double(), {"ridge": lam, "steps": steps, "lr": lr, "best_step": best[2],
                              "heldout_kl": best[0], "heldout_kl_start": history[0]}


#: fitting variant → ``fit(fit_activations, heldout_activations, **options) -> (T, info)``
FITS: dict[str, Callable[..., tuple[torch.Tensor, dict]]] = {"lstsq": fit_lstsq, "diag": fit_diag,
                                                              "cosine": fit_cosine, "kl": fit_kl}


def register_fit(name: str, fn: Callable[..., tuple[torch.Tensor, dict]]) -> None:
    if name in FITS:
        raise ValueError(f"a repair fit named {name!r} is already registered")
    FITS[name] = fn


# ----------------------------------------------------------------------------------------------------- fusion
def fuse(linear: nn.Linear, T: torch.Tensor) -> None:
    """``linear`` followed by T, as one linear map, in place: W ← Tᵀ W, bias ← bias T (float64, cast back)."""
    with torch.no_grad():
        W = linear.weight.double()
        linear.weight.copy_((T.double().T @ W).to(linear.weight.dtype))
        if linear.bias is not None:
            linear.bias.copy_((linear.bias.double() @ T.double()).to(linear.bias.dtype))


@contextlib.contextmanager
def mapped_branch(model: nn.Module, maps: dict[int, torch.Tensor]):
    """Apply ``maps`` {block: T} by forward hooks on each block's last branch (``y → y T``), without touching the
    weights: the reference the fused model is verified against."""
    hs = []
    try:
        for p, T in maps.items():
            branch, _ = branch_projection(model, p)

            def hook(module, args, output, T=T):
                y = block_output(output)
                z = (y.double() @ T.double()).to(y.dtype)
                return (z, *output[1:]) if isinstance(output, tuple) else z

            hs.append(branch.register_forward_hook(hook))
        yield model
    finally:
        for h in hs:
            h.remove()


# --------------------------------------------------------------------------------------------------- repairing
@dataclass
class RunRecord:
    """What the repair of one run did: the kept block ``p`` it fused into, the run, the fit and its settings, the
    tokens it saw and the hidden-state error before (T = I) and after, on the fit and the held-out windows."""

    p: int | None
    run: list[int]
    fit: str | None
    repaired: bool
    reason: str = ""
    tokens: int = 0
    info: dict = field(default_factory=dict)
    mse_before: float | None = None
    mse_after: float | None = None
    heldout_mse_before: float | None = None
    heldout_mse_after: float | None = None


def repair(model: nn.Module, removed: Iterable[int], calibration, *, fit: str = "lstsq", heldout: float = 0.25,
           batch_size: int = 8, options: dict | None = None, strict: bool = False
           ) -> tuple[nn.Module, list[RunRecord], dict[int, torch.Tensor]]:
    """Remove ``removed`` from a COPY of ``model`` and repair every run it can (module docstring); ``model`` is
    untouched. ``calibration``: the windows (a calibration set); the last ``heldout`` fraction of them chooses the
    ridge (and the cosine fit's step). A run that cannot be repaired exactly is left as plain removal with its
    reason in the record (``strict``: raise :class:`RepairError` instead). Returns the pruned, repaired model, one
    :class:`RunRecord` per run, and the maps {block p (original index): T} before fusion."""
    if fit not in FITS:
        raise ValueError(f"unknown repair fit {fit!r}; choose one of {sorted(FITS)}")
    n = len(get_adapter(model).layers(model))
    removed = check_removal(model, removed)
    work = copy.deepcopy(model)
    dense = model
    batches = make_batches(model, calibration, batch_size)
    n_windows = sum(b.valid.shape[0] for b in batches)
    n_held = min(n_windows - 1, max(1, round(heldout * n_windows))) if heldout > 0 and n_windows > 1 else 0
    held_idx = list(range(n_windows - n_held, n_windows))
    records, maps, gone = [], {}, []
    was_training = work.training
    work.eval()
    for p, run in removed_runs(removed, n):
        rec = RunRecord(p=p, run=run, fit=fit, repaired=False)
        try:
            if p is None:
                raise RepairError(f"the run {run} starts at block 0: no kept block before it to fuse a map into")
            _, lin = branch_projection(work, p)
        except RepairError as e:
            if strict:
                raise
            rec.reason, rec.fit = str(e), None
            records.append(rec)
            gone += run
            continue
        acts = collect(work, dense, p, run[-1], batches, gone)
        fit_a, held_a = acts.split(held_idx) if n_held else (acts, acts)
        ctx = FitContext(work, dense, p, gone + run, batches, held_idx)
        T, info = FITS[fit](fit_a, held_a, context=ctx, **(options or {}))
        rec.tokens, rec.info = int(acts.y.shape[0]), info
        rec.mse_before, rec.mse_after = mse(fit_a, None), mse(fit_a, T)
        rec.heldout_mse_before, rec.heldout_mse_after = mse(held_a, None), mse(held_a, T)
        fuse(lin, T)
        maps[p] = T
        rec.repaired = True
        records.append(rec)
        gone += run
    remove_blocks(work, removed)
    work.train(was_training)
    work.config.cbo_repair = [asdict(r) for r in records]
    return work, records, maps

