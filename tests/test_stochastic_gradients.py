"""Stochastic-depth gate gradients: every row equals the gradient of that sample's loss at its own random point,
computed independently by finite differences on the gated model."""

import numpy as np
import pytest
import torch

from cbo_utils.calibration import embedded
from cbo_utils.gradients import collect_gate_gradients, sample_loss
from cbo_utils.model.blocks import Gates
from cbo_utils.model.tiny import build_tiny


@pytest.fixture(scope="module")
def setup():
    model, tok = build_tiny("tiny-llama")
    model = model.double()
    calib = embedded(tok, samples=3, max_tokens=24)
    return model, calib


def _loss_at(model, sample, alpha):
    with Gates(model) as g:
        g.alpha = torch.tensor(alpha, dtype=torch.float32)
        with torch.no_grad():
            return float(sample_loss(model, sample["input_ids"][None])[0])


def test_rows_are_gradients_at_their_random_points(setup):
    model, calib = setup
    res = collect_gate_gradients(model, calib, random_removal=(1, 2), points_per_sample=2, seed=3, progress=False,
                                 batch_size=2)
    pts = res.meta["random_points"]
    assert res.A.shape == (6, 6) and len(pts) == 6
    assert all(1 <= len(p) <= 2 and len(set(p)) == len(p) for p in pts)
    assert len({tuple(p) for p in pts}) > 1  # really random
    for row in (0, 4):
        sample = calib[row % 3]
        alpha = np.ones(6)
        alpha[pts[row]] = 0.0
        for i in (0, 3, 5):
            h = 1e-3
            up, dn = alpha.copy(), alpha.copy()
            up[i] += h
            dn[i] -= h
            fd = (_loss_at(model, sample, up) - _loss_at(model, sample, dn)) / (2 * h)
            assert float(res.A[row, i]) == pytest.approx(fd, rel=2e-3, abs=1e-5)


def test_seeded_and_validated(setup):
    model, calib = setup
    a = collect_gate_gradients(model, calib, random_removal=(0, 3), seed=7, progress=False)
    b = collect_gate_gradients(model, calib, random_removal=(0, 3), seed=7, progress=False)
    assert a.meta["random_points"] == b.meta["random_points"] and torch.equal(a.A, b.A)
    dense = collect_gate_gradients(model, calib, progress=False)
    zero = collect_gate_gradients(model, calib, random_removal=(0, 0), progress=False)
    torch.testing.assert_close(zero.A, dense.A)  # no removal = the paper's gradients
    with pytest.raises(ValueError, match="random_removal"):
        collect_gate_gradients(model, calib, random_removal=(2, 6), progress=False)
    with pytest.raises(ValueError, match="points_per_sample"):
        collect_gate_gradients(model, calib, points_per_sample=2, progress=False)
