"""The per-model stages behind notebooks 01-03: each artifact checked against an independent computation."""

import itertools
import json

import numpy as np
import pandas as pd

from cbo_utils.experiments.stages import build_ising, estimate_hessian, load_ising, sample_states, states_summary
from cbo_utils.gradients import load_gradients


def test_gradients_ising_states_chain(tmp_path):
    grad = estimate_hessian("tiny-llama", tmp_path, samples=6, max_tokens=32, progress=False)
    res = load_gradients(grad)
    A = res.A.double().numpy()
    H = A.T @ A / A.shape[0]
    (path,) = build_ising("tiny-llama", tmp_path, [2])
    doc = json.loads(path.read_text())
    np.testing.assert_allclose(np.asarray(doc["Q"]), H, rtol=1e-12, atol=1e-15)   # Q = Fisher = AᵀA/m
    prob = load_ising(path)
    h, J = np.asarray(doc["ising"]["h"]), np.asarray(doc["ising"]["J"])
    N = doc["N"]
    every = []
    for rem in itertools.combinations(range(N), 2):
        x = np.zeros(N)
        x[list(rem)] = 1
        s = 2 * x - 1
        e = x @ H @ x
        assert abs(h @ s + s @ J @ s + doc["ising"]["offset"] - e) < 1e-12 * max(1, abs(e))   # the Ising form
        assert abs(prob.energy_of(x[None])[0] - e) < 1e-15 * max(1, abs(e))
        every.append((e, " ".join(map(str, rem))))
        assert int(s.sum()) == doc["ising"]["magnetization"]
    (states,) = sample_states("tiny-llama", tmp_path, [2], k=5)
    df = pd.read_csv(states)
    want = sorted(every)[:5]                                                     # brute force, all C(6,2)
    np.testing.assert_allclose(df["energy"], [e for e, _ in want], rtol=1e-12)
    assert json.loads((states.parent / "states_M2.csv.json").read_text())["inputs"]["ising"]["sha256"]
    stamp = states.stat().st_mtime_ns
    sample_states("tiny-llama", tmp_path, [2], k=5)                               # up to date: not redone
    assert states.stat().st_mtime_ns == stamp
    sample_states("tiny-llama", tmp_path, [2], k=4)                               # other parameters: redone
    assert len(pd.read_csv(states)) == 4
    # certified bound: exact is proven optimal; tabu's answer carries a gap, its bound below the brute-force optimum
    summary = states_summary("tiny-llama", tmp_path, [2])
    assert bool(summary["proven_optimal"].iloc[0]) and summary["gap"].iloc[0] == 0.0
    sample_states("tiny-llama", tmp_path, [2], k=4, solver="tabu", num_reads=2, timeout_ms=20)
    row = states_summary("tiny-llama", tmp_path, [2]).iloc[0]
    assert row["solver"] == "tabu" and row["lower_bound"] <= want[0][0] + 1e-12 * abs(want[0][0])
    assert row["gap"] >= -1e-15 and row["ground_energy"] >= want[0][0] - 1e-15
