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
