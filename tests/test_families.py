"""One test matrix for every supported decoder family (issue 14): tiny models built from a config in code, the same
checks for each — gated α = 0 equals the physically pruned model; gate gradients equal central finite differences;
export → plain ``from_pretrained`` reload (no missing/unexpected keys, equal logits, cached = uncached greedy
generation) with every kept block rebuilt as it was (MoE or dense MLP, sliding or full attention); the checkpoint-file
pruning writes the same config; every selection method and the default CBO selection run (sliding-window merging
refuses, with its reason, models whose blocks differ)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import gate_finite_differences, varied_calibration

from cbo_utils.calibration import CalibrationSet
from cbo_utils.gradients import sample_loss
from cbo_utils.model.blocks import Gates, get_adapter, num_blocks, remove_blocks
from cbo_utils.model.tiny import TINY_BUILDERS, TINY_FAMILIES, build_tiny
from cbo_utils.prune.export import export_pruned, verify_export
from cbo_utils.prune.files import prune_checkpoint_files
from cbo_utils.select.cbo import DEFAULT_VARIANT
from cbo_utils.select.methods import BASELINES, run_method

FAMILIES = sorted(TINY_BUILDERS)
#: settings that route every token to every expert, so the loss is smooth in α (top-k routing is piecewise constant)
DENSE_ROUTING = {"tiny-nemotron-h": {"experts_per_token": 4},
                 **{n: {"num_experts_per_tok": 4} for n, (_, o) in TINY_FAMILIES.items() if "num_experts_per_tok" in o}}


def _removal(model) -> list[int]:
    n = num_blocks(model)
    return [1, n - 2] if n > 4 else [1]


def _signature(block) -> list[tuple]:
    """What a reload rebuilds from the config, per submodule: its class, attention kind and window."""
    return [(name, type(m).__name__, getattr(m, "attention_type", None), getattr(m, "is_sliding", None),
             getattr(m, "sliding_window", None)) for name, m in block.named_modules()]


@pytest.mark.parametrize("name", FAMILIES)
def test_gated_alpha0_equals_the_physically_pruned_model(name):
    model, tok = build_tiny(name)
    x = torch.randint(3, len(tok), (2, 14))
    n = num_blocks(model)
    with torch.no_grad():
        dense = model(x).logits
        for remove in (_removal(model), [0, n - 1]):
            with Gates(model) as g:
                torch.testing.assert_close(model(x).logits, dense, rtol=0, atol=0)   # α = 1 is the original
                with g.removed(remove):
                    gated = model(x).logits
            pruned = remove_blocks(copy.deepcopy(model), remove)(x).logits
            torch.testing.assert_close(gated, pruned, rtol=0, atol=1e-6)
            assert (gated - dense).abs().max() > 1e-4   # the removal changed something


@pytest.mark.parametrize("name", FAMILIES)
def test_gate_gradients_match_central_finite_differences(name):
    model, tok = build_tiny(name, **DENSE_ROUTING.get(name, {}))
    ids = varied_calibration(tok, n=2)[1]["input_ids"]
    try:
        model = model.double()
        model(ids[None])
        dt, eps, rtol, atol = torch.float64, 2e-2, 1e-3, 1e-4   # atol: relative to the largest component
    except RuntimeError:   # a float32-only kernel (e.g. a grouped MoE matmul)
        model = model.float()
        dt, eps, rtol, atol = torch.float32, 4e-2, 2e-2, 1e-3
    gates = Gates(model).attach()
    N = gates.n

    def loss_at(a):
        gates.alpha = a
        return sample_loss(model, ids)[0]

    a0 = torch.ones(N, dtype=dt, requires_grad=True)
    (grad,) = torch.autograd.grad(loss_at(a0), a0)
    fd = gate_finite_differences(loss_at, N, dt, eps, richardson=True)
    gates.detach()
    assert grad.abs().max() > 0
    # some norms compute in float32 even in a float64 model: a block that barely matters (|∂L/∂α| ~ 1e-4 of the
    # largest) is measured to that noise floor, so the absolute tolerance is relative to the largest component
    torch.testing.assert_close(grad.double(), fd, rtol=rtol, atol=atol * float(grad.abs().max()))


@pytest.mark.parametrize("name", FAMILIES)
def test_export_reloads_with_every_kept_block_rebuilt_as_it_was(name, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    model, tok = build_tiny(name)
    remove = _removal(model)
    layers = get_adapter(model).layers(model)
    kept = [i for i in range(len(layers)) if i not in remove]
    before = [_signature(layers[i]) for i in kept]
    dense_dir = tmp_path / "dense"
    model.save_pretrained(dense_dir)
    tok.save_pretrained(dense_dir)
    out = export_pruned(copy.deepcopy(model), tok, remove, tmp_path / "pruned")
    report = verify_export(out, model, tok, max_new_tokens=6)   # reload keys, logits vs gated, cache vs no cache
    assert report["ok"], report["checks"]
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    after = [_signature(b) for b in get_adapter(reloaded).layers(reloaded)]
    assert after == [[(n, c, a, s, w) for n, c, a, s, w in sig] for sig in before]   # MoE/dense, sliding/full kept
    # the checkpoint files pruned without loading the model: the same config and the same logits
    files = prune_checkpoint_files(dense_dir, remove, tmp_path / "files")
    a, b = (json.loads((d / "config.json").read_text()) for d in (out, files))
    for key in set(a) | set(b):
        if key not in ("architectures", "transformers_version", "dtype", "torch_dtype", "cbo_removed_blocks"):
            assert a.get(key) == b.get(key), key
    assert AutoConfig.from_pretrained(files).num_hidden_layers == len(kept)
    x = torch.randint(3, len(tok), (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(files).eval()(x).logits, reloaded(x).logits,
                                   rtol=0, atol=0)


@pytest.mark.parametrize("name", FAMILIES)
def test_every_selection_method_and_the_default_cbo_run(name, tmp_path):
    model, tok = build_tiny(name, **({} if name == "tiny-nemotron-h" else {"num_layers": 8}))  # Taylor+ keeps 5
    calib = CalibrationSet(list(varied_calibration(tok, n=4)), {"source": "test"})
    M, n = 2, num_blocks(model)
    layers = get_adapter(model).layers(model)
    shapes = {tuple((k, tuple(v.shape)) for k, v in b.state_dict().items()) for b in layers}
    for method in BASELINES:
        if method == "sliding_window_merging" and len(shapes) > 1:   # dense and MoE (or Mamba) blocks: refused
            with pytest.raises(ValueError, match="merg"):
                run_method(method, model, calib, M)
            continue
        sel = run_method(method, model, calib, M)
        assert len(sel.removed) == M and all(0 <= b < n for b in sel.removed), method
    sel = run_method(DEFAULT_VARIANT, model, calib, M, cache_dir=tmp_path, rerank_samples=1)
    assert len(sel.removed) == M and sel.method == DEFAULT_VARIANT


def test_an_unregistered_architecture_is_discovered_only_when_it_verifies_itself():
    """A Gemma 2 under an unknown model_type: the discovered adapter gates the post-branch norms (gating self_attn/mlp
    passes α = 0 but not α = 0.9, which the verification catches) and behaves like the registered one; a model whose
    blocks do not remove under gating (MiniMax with a residual factor ≠ 1) is refused with the reasons."""
    from cbo_utils.model.blocks import ADAPTERS, UnsupportedArchitectureError, verify_adapter
    from cbo_utils.model.tiny import tiny_family

    model, tok = build_tiny("tiny-gemma2")
    registered = get_adapter(model)
    wrong = type(registered)("wrong", ("gemma2",), gate_modules=("self_attn", "mlp"))
    assert "α = 0.9" in verify_adapter(model, wrong)
    assert verify_adapter(model, registered) is None
    model.config.model_type = "unknown_gemma2_like"
    try:
        ad = get_adapter(model)
        assert ad.name == "discovered:unknown_gemma2_like"
        assert ad.gate_modules == ("post_attention_layernorm", "post_feedforward_layernorm")
        x = torch.randint(3, len(tok), (1, 10))
        with torch.no_grad(), Gates(model) as g, g.removed([2]):
            gated = model(x).logits
        torch.testing.assert_close(gated, remove_blocks(copy.deepcopy(model), [2])(x).logits, rtol=0, atol=1e-6)
    finally:
        ADAPTERS.pop("discovered:unknown_gemma2_like", None)
    # MiniMax normalises the residual stream itself (residual = norm(h)): α = 0 is not the model without the block.
    # With freshly initialised norm weights (all 1) norm(norm(h)) = norm(h) hides that, so give them trained-like
    # values first — a real checkpoint has them
    mm, _ = tiny_family("minimax", num_layers=4, num_local_experts=4, num_experts_per_tok=2,
                        layer_types=["full_attention"])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in mm.named_parameters():
            if "norm" in n:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    with pytest.raises(UnsupportedArchitectureError, match="none could be discovered.*α = 0 on a block is not"):
        get_adapter(mm)
