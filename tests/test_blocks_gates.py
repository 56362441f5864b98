"""Adapters, gates and gate derivatives against independent computations."""

import pytest
import torch
from conftest import gate_finite_differences, varied_calibration
from torch.nn.attention import SDPBackend, sdpa_kernel

from cbo_utils.gradients import collect_gate_gradients, exact_gate_hessian, fisher_from_gradients, sample_loss
from cbo_utils.model.blocks import (
    ADAPTERS,
    Adapter,
    Gates,
    UnsupportedArchitectureError,
    block_types,
    describe_blocks,
    get_adapter,
    num_blocks,
    register_adapter,
)
from cbo_utils.model.tiny import TINY_NEMOTRON_PATTERN, build_tiny


def test_adapters_find_blocks_and_types(tiny_name, tiny):
    model, _ = tiny
    n = num_blocks(model)
    types = block_types(model)
    assert len(types) == n == len(describe_blocks(model))
    if tiny_name == "tiny-nemotron-h":
        letters = {"mamba": "M", "moe": "E", "attention": "*", "mlp": "-"}
        assert "".join(letters[t] for t in types) == TINY_NEMOTRON_PATTERN
        assert get_adapter(model).name == "nemotron_h"
    else:
        assert set(types) == {"decoder"} and n == 6


def test_unknown_architecture_error_says_how_to_register():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedArchitectureError) as e:
        get_adapter(model)
    msg = str(e.value)
    assert "gpt2" in msg and "register_adapter" in msg and "llama" in msg


def test_register_adapter_for_new_architecture():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=32, n_head=2, vocab_size=64)).eval()
    ad = register_adapter(Adapter("gpt2-test", ("gpt2",), layers_path="transformer.h", gate_modules=("attn", "mlp")))
    try:
        assert num_blocks(model) == 3
        x = torch.randint(0, 64, (1, 8))
        ref = model(x).logits
        with Gates(model) as g:
            torch.testing.assert_close(model(x).logits, ref)
            g.alpha = torch.tensor([1.0, 0.0, 1.0])
            assert not torch.allclose(model(x).logits, ref)
    finally:
        ADAPTERS.pop(ad.name)


def test_gates_identity_and_clean_detach(tiny):
    model, tok = tiny
    x = torch.randint(3, len(tok), (2, 10))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ref = model(x).logits
    gates = Gates(model).attach()
    assert gates.alpha.dtype == torch.float32 and gates.alpha.shape == (num_blocks(model),)
    assert not any(p.requires_grad for p in model.parameters())
    torch.testing.assert_close(model(x).logits, ref, rtol=0, atol=0)
    loss = sample_loss(model, x[0])
    loss.backward()
    assert gates.alpha.grad is not None and all(p.grad is None for p in model.parameters())
    gates.alpha = torch.zeros(gates.n)
    assert not torch.allclose(model(x).logits, ref)
    gates.detach()
    torch.testing.assert_close(model(x).logits, ref, rtol=0, atol=0)
    assert all(p.requires_grad for p in model.parameters())  # restored
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-nemotron-h"])
def test_gate_gradient_matches_central_finite_differences(name):
    # top-k routing is piecewise constant in α: route every token to all experts so the loss is smooth
    model, tok = build_tiny(name, **({"experts_per_token": 4} if name == "tiny-nemotron-h" else {}))
    # float64 where the kernels allow it (NemotronH's grouped MoE matmul is float32-only)
    dt = torch.float32 if name == "tiny-nemotron-h" else torch.float64
    model = model.to(dt)
    calib = varied_calibration(tok, n=2)
    ids = calib[1]["input_ids"]
    gates = Gates(model).attach()
    N = gates.n

    def loss_at(a):
        gates.alpha = a
        return sample_loss(model, ids)[0]

    a0 = torch.ones(N, dtype=dt, requires_grad=True)
    (grad,) = torch.autograd.grad(loss_at(a0), a0)
    # RMSNorm computes in float32 even in a float64 model: smaller steps would only measure its rounding
    eps, rtol, atol = (1e-3, 1e-3, 2e-6) if dt == torch.float64 else (1e-2, 2e-2, 5e-5)
    fd = gate_finite_differences(loss_at, N, dt, eps)
    gates.detach()
    assert grad.abs().min() > 0  # every block matters a little
    torch.testing.assert_close(grad.double(), fd, rtol=rtol, atol=atol)
    # the library's float32 gates give the same row (float32 precision)
    res = collect_gate_gradients(model, calib, progress=False)
    torch.testing.assert_close(res.A[1], grad.double(), rtol=1e-5, atol=1e-8)


def test_fisher_equals_mean_of_outer_products():
    A = torch.randn(7, 5, dtype=torch.float64)
    H = fisher_from_gradients(A)
    ref = sum(torch.outer(a, a) for a in A) / 7
    torch.testing.assert_close(H, ref)
    assert torch.equal(H, H.T)


def test_rows_are_per_sample_and_batching_pads_correctly(tiny):
    model, tok = tiny
    calib = varied_calibration(tok, n=5)
    one = collect_gate_gradients(model, calib, progress=False)
    batched = collect_gate_gradients(model, calib, batch_size=3, progress=False)
    torch.testing.assert_close(batched.A, one.A, rtol=1e-4, atol=1e-6)
    # row s is the gradient of sample s alone
    solo = collect_gate_gradients(model, [calib[3]], progress=False)
    torch.testing.assert_close(one.A[3], solo.A[0], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(one.g, one.A.mean(0))
    assert one.H.dtype == torch.float64 and one.meta["samples"] == 5


def test_response_only_counts_only_masked_tokens(tokenizer):
    model, tok = build_tiny("tiny-llama")
    calib = varied_calibration(tok, n=2)
    full = collect_gate_gradients(model, calib, progress=False)
    resp = collect_gate_gradients(model, calib, response_only=True, progress=False)
    assert not torch.allclose(full.A, resp.A)
    # independent: loss over masked target tokens only, by hand
    s = calib[0]
    gates = Gates(model).attach()
    a = torch.ones(gates.n, requires_grad=True)
    gates.alpha = a
    logits = model(s["input_ids"][None]).logits[0, :-1]
    nll = torch.nn.functional.cross_entropy(logits, s["input_ids"][1:], reduction="none")
    m = s["loss_mask"][1:]
    (g,) = torch.autograd.grad(nll[m].mean(), a)
    gates.detach()
    torch.testing.assert_close(resp.A[0].float(), g, rtol=1e-5, atol=1e-7)


def test_gradient_checkpointing_gives_same_rows():
    model, tok = build_tiny("tiny-qwen3")
    calib = varied_calibration(tok, n=2)
    a = collect_gate_gradients(model, calib, progress=False)
    b = collect_gate_gradients(model, calib, gradient_checkpointing=True, progress=False)
    torch.testing.assert_close(a.A, b.A, rtol=1e-5, atol=1e-8)
    assert not model.training


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-nemotron-h"])
def test_exact_hessian_matches_autograd_functional(name):
    model, tok = build_tiny(name)
    dt = torch.float32 if name == "tiny-nemotron-h" else torch.float64
    model = model.to(dt)
    calib = varied_calibration(tok, n=2)
    H = exact_gate_hessian(model, list(calib))
    gates = Gates(model).attach()

    def mean_loss(a):
        gates.alpha = a
        return sum(sample_loss(model, s["input_ids"])[0] for s in calib) / len(calib)

    with sdpa_kernel([SDPBackend.MATH]):
        ref = torch.autograd.functional.hessian(mean_loss, torch.ones(gates.n, dtype=dt))
    gates.detach()
    torch.testing.assert_close(H, ref.double(), rtol=1e-4, atol=1e-6)
    assert torch.equal(H, H.T)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_weights_keep_float32_gates(dtype):
    model, tok = build_tiny("tiny-llama")
    model = model.to(dtype)
    res = collect_gate_gradients(model, varied_calibration(tok, n=2), progress=False)
    assert torch.isfinite(res.A).all() and (res.A != 0).any()
    assert res.meta["gate_dtype"] == "float32" and res.meta["model_dtype"] == str(dtype)


def test_interrupted_collection_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    import cbo_utils.gradients as hz

    model, tok = build_tiny("tiny-llama")
    calib = varied_calibration(tok, n=7)
    ref = collect_gate_gradients(model, calib, progress=False)
    real, calls = hz.sample_loss, []

    def dying(*a, **k):
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt  # the user presses Ctrl-C during sample 6
        return real(*a, **k)

    monkeypatch.setattr(hz, "sample_loss", dying)
    prefix = tmp_path / "grad.partial"
    with pytest.raises(KeyboardInterrupt):
        collect_gate_gradients(model, calib, progress=False, checkpoint=prefix, checkpoint_every=2)
    assert (tmp_path / "grad.partial.rank0-of-1.safetensors").is_file()
    calls.clear()
    res = collect_gate_gradients(model, calib, progress=False, checkpoint=prefix, checkpoint_every=2)
    assert len(calls) == 3 and res.meta["resumed_from_sample"] == 4  # samples 0-3 were saved, 4-6 recomputed
    torch.testing.assert_close(res.A, ref.A, rtol=0, atol=0)
    assert not list(tmp_path.iterdir())  # the partial file is gone once complete
    # a checkpoint of another calibration set is never reused
    with pytest.raises(KeyboardInterrupt):
        calls.clear()
        collect_gate_gradients(model, calib, progress=False, checkpoint=prefix, checkpoint_every=2)
    monkeypatch.setattr(hz, "sample_loss", real)
    other = collect_gate_gradients(model, varied_calibration(tok, n=7, seed=1), progress=False, checkpoint=prefix)
    assert other.meta["resumed_from_sample"] == 0


def test_without_blocks_equals_the_gated_model_and_restores_everything(tiny):
    import copy

    from cbo_utils.model.blocks import remove_blocks, without_blocks

    model, tok = tiny
    model.eval()
    x = torch.randint(3, len(tok), (2, 12))
    ad = get_adapter(model)
    layers = list(ad.layers(model))
    idx = [(m, m.layer_idx) for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int)]
    config = copy.deepcopy(model.config.to_dict())
    remove = [1, 2] if num_blocks(model) > 4 else [1]
    with torch.no_grad():
        dense = model(x).logits
        with Gates(model) as g, g.removed(remove):
            gated = model(x).logits
        with without_blocks(model, remove):
            assert num_blocks(model) == len(layers) - len(remove)
            skipped = model(x).logits
        pruned = remove_blocks(copy.deepcopy(model), remove)(x).logits   # the independent copy
    torch.testing.assert_close(skipped, gated, rtol=0, atol=1e-6)
    torch.testing.assert_close(skipped, pruned, rtol=0, atol=0)
    assert list(ad.layers(model)) == layers and all(m.layer_idx == i for m, i in idx)
    assert model.config.to_dict() == config and not hasattr(model.config, "cbo_removed_blocks")
    with pytest.raises(RuntimeError, match="inside"):   # restored after an error too
        with without_blocks(model, remove):
            raise RuntimeError("inside")
    assert list(ad.layers(model)) == layers and model.config.to_dict() == config
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, dense, rtol=0, atol=0)
