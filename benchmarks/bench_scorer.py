"""Zero-shot scoring speed on SmolLM2-135M: lm-eval's HFLM against the shared-context scorer, side by side in one
run, on the same requests (the first ``--limit`` items of the five zero-shot tasks); prints seconds per task, the
ratio and the largest log-likelihood difference.

    python benchmarks/bench_scorer.py --limit 40
"""

from __future__ import annotations

import argparse
import time

import torch
from lm_eval.models.huggingface import HFLM

from cbo_utils.evaluate.lmeval import ZERO_SHOT_TASKS, task_requests
from cbo_utils.evaluate.scorer import PrefixSharingLM
from cbo_utils.model.load import load_model


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--limit", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    model, tok = load_model(a.model)
    model.eval()
    ref = HFLM(pretrained=model, tokenizer=tok, batch_size=8)
    fast = PrefixSharingLM(pretrained=model, tokenizer=tok, batch_size=8)
    tot = [0.0, 0.0]
    print("| task | requests | HFLM s | shared-context s | ratio | max |Δ log-lik| |\n|---|---|---|---|---|---|")
    for task in ZERO_SHOT_TASKS:
        reqs = task_requests(task, limit=a.limit)
        t0 = time.perf_counter()
        r = ref.loglikelihood(reqs, disable_tqdm=True)
        t1 = time.perf_counter()
        f = fast.loglikelihood(reqs, disable_tqdm=True)
        t2 = time.perf_counter()
        err = max(abs(x[0] - y[0]) for x, y in zip(r, f))
        tot[0] += t1 - t0
        tot[1] += t2 - t1
        print(f"| {task} | {len(reqs)} | {t1 - t0:.2f} | {t2 - t1:.2f} | {(t1 - t0) / (t2 - t1):.2f}× | {err:.2g} |")
    print(f"| all | | {tot[0]:.2f} | {tot[1]:.2f} | **{tot[0] / tot[1]:.2f}×** | |  (scorer: {fast.status})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
