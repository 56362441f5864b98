import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from cbo_utils.calibration import CalibrationSet, _sample  # noqa: E402
from cbo_utils.model.tiny import build_tiny, build_tokenizer  # noqa: E402

TINY = ["tiny-llama", "tiny-qwen3", "tiny-nemotron-h"]


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(params=TINY)
def tiny_name(request):
    return request.param


@pytest.fixture
def tiny(tiny_name):
    return build_tiny(tiny_name)


def varied_calibration(tok, n=5, seed=0) -> CalibrationSet:
    """Samples of different lengths (so batching must pad correctly), with response masks."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        T = 12 + 5 * i
        ids = torch.randint(3, len(tok), (T,), generator=g)
        mask = torch.zeros(T, dtype=torch.bool)
        mask[T // 2:] = True
        out.append(_sample(ids.tolist(), mask.tolist()))
    return CalibrationSet(out, {"source": "random-test"})


def gate_finite_differences(loss_at, N: int, dt, eps: float, richardson: bool = False):
    """Central differences of ``loss_at(alpha)`` at α = 1 for each of the N gates (float64); ``richardson``:
    (4·D(eps/2) − D(eps))/3, which cancels the eps² error of the central difference."""
    def central(i, h):
        e = torch.zeros(N, dtype=dt)
        e[i] = h
        return (loss_at(torch.ones(N, dtype=dt) + e).double() - loss_at(torch.ones(N, dtype=dt) - e).double()) / (2 * h)

    with torch.no_grad():
        if richardson:
            return torch.tensor([(4 * central(i, eps / 2) - central(i, eps)) / 3 for i in range(N)],
                                dtype=torch.float64)
        return torch.tensor([central(i, eps) for i in range(N)], dtype=torch.float64)
