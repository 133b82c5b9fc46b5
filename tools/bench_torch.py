"""PyTorch peers of `acclimate bench --adapt tent`: eager forward, eager TENT step and, on CUDA, the
TENT step captured in a CUDA graph, on the same ONNX model's weights.

The network is tools/onnx_torch.py's interpreter (the same initializers the runtime loads), with
BatchNormalization through `F.batch_norm` (cuDNN's kernel on a GPU), as an `nn.BatchNorm2d` in
train mode without running statistics would run it: what TENT's reference code does.

TENT step (Wang et al. 2021, as Acclimate's default): BN statistics of the batch, loss = mean
entropy of softmax(logits), gradients for the BN scale and bias only, SGD (lr 2.5e-4, momentum
0.9). Forward: source statistics, no gradient. Each figure is the median over `--iters` timed
calls after `--warmup` untimed ones; on CUDA every call ends with a synchronize, so it is the
latency an application sees. Peak memory is `torch.cuda.max_memory_allocated` (CUDA only).

Prints one JSON object per batch size on stdout.
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from onnx_torch import OnnxTorch  # noqa: E402


class Net(OnnxTorch):
    """OnnxTorch with BatchNormalization through F.batch_norm (one fused kernel per layer)."""

    def _bn(self, n, x, a):
        eps = a.get("epsilon", 1e-5)
        g, b = self.tensor(n.input[1]), self.tensor(n.input[2])
        if self.norm == "source":
            return F.batch_norm(x, self.tensor(n.input[3]), self.tensor(n.input[4]), g, b, False, 0.0, eps)
        if self.norm == "batch":
            return F.batch_norm(x, None, None, g, b, True, 0.0, eps)
        raise ValueError(f"bench_torch measures source and batch statistics, not {self.norm!r}")


def entropy(logits):
    p = logits.softmax(1)
    return -(p * logits.log_softmax(1)).sum(1).mean()


def timed(fn, warmup, iters, sync):
    for _ in range(warmup):
        fn()
    sync()
    out = []
    for _ in range(max(iters, 1)):
        t = time.perf_counter()
        fn()
        sync()
        out.append((time.perf_counter() - t) * 1e3)
    return statistics.median(out)


def bench(model_path, batch, device, warmup, iters, cuda_graph, seed=0):
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    fwd_net = Net(model_path, norm="source").to(device).eval()
    net = Net(model_path, norm="batch").to(device)
    shape = [batch] + [d.dim_value for d in net.proto.graph.input[0].type.tensor_type.shape.dim[1:]]
    gen = torch.Generator().manual_seed(seed)
    x = (torch.rand(shape, generator=gen) * 4 - 2).to(device)
    row = {"model": model_path, "batch": batch, "device": str(device),
           "device_name": torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} threads",
           "torch": torch.__version__}

    with torch.no_grad():
        row["forward_ms"] = timed(lambda: fwd_net(x), warmup, iters, sync)

    params = [p for _, p in net.adapted_parameters()]
    opt = torch.optim.SGD(params, lr=2.5e-4, momentum=0.9)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = entropy(net(x))
        loss.backward()
        opt.step()
        return loss

    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    row["step_eager_ms"] = timed(step, warmup, iters, sync)
    row["step_over_forward"] = row["step_eager_ms"] / row["forward_ms"]
    if cuda:
        row["step_peak_bytes"] = torch.cuda.max_memory_allocated(device)
    if cuda and cuda_graph:
        row["step_cuda_graph_ms"] = graph_step(net, x, warmup, iters)
    return row


def graph_step(net, x, warmup, iters):
    """The TENT step captured once in a CUDA graph and replayed (no launch overhead)."""
    params = [p for _, p in net.adapted_parameters()]
    opt = torch.optim.SGD(params, lr=2.5e-4, momentum=0.9)
    static_x = x.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        # Warm-up on a side stream, as capture requires; also creates the momentum buffers.
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            entropy(net(static_x)).backward()
            opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        loss = entropy(net(static_x))
        loss.backward()
        opt.step()
    return timed(graph.replay, warmup, iters, torch.cuda.synchronize)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--batch", default="1", help="comma-separated batch sizes")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--device", default="auto", help="auto (cuda when available), cuda or cpu")
    ap.add_argument("--no-cuda-graph", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's own choice)")
    a = ap.parse_args()
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    name = "cuda" if a.device == "auto" and torch.cuda.is_available() else ("cpu" if a.device == "auto" else a.device)
    device = torch.device(name)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    for b in [int(s) for s in a.batch.split(",") if s]:
        print(json.dumps(bench(a.model, b, device, a.warmup, a.iters, not a.no_cuda_graph)), flush=True)


if __name__ == "__main__":
    main()
