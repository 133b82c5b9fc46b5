"""ONNX Runtime CPU forward latency, the peer of `acclimate bench`'s forward rows.

Same inputs as the others (uniform in [-2, 2)), intra-op threads = every logical core unless
`--threads`; the median over `--iters` runs after `--warmup`. Prints one JSON object per batch.
"""
import argparse
import json
import os
import statistics
import time

import numpy as np
import onnxruntime as ort


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("model")
    ap.add_argument("--batch", default="1", help="comma-separated batch sizes")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    a = ap.parse_args()
    so = ort.SessionOptions()
    so.intra_op_num_threads = a.threads
    sess = ort.InferenceSession(a.model, so, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    rest = [int(d) for d in inp.shape[1:]]
    rng = np.random.default_rng(0)
    for b in [int(s) for s in a.batch.split(",") if s]:
        x = (rng.random([b] + rest, dtype=np.float32) * 4 - 2).astype(np.float32)
        for _ in range(a.warmup):
            sess.run(None, {inp.name: x})
        t = []
        for _ in range(max(a.iters, 1)):
            s = time.perf_counter()
            sess.run(None, {inp.name: x})
            t.append((time.perf_counter() - s) * 1e3)
        print(json.dumps({"model": a.model, "batch": b, "forward_ms": statistics.median(t), "threads": a.threads,
                          "onnxruntime": ort.__version__}), flush=True)


if __name__ == "__main__":
    main()
