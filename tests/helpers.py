"""Checks shared by several test modules (pytest puts tests/ on sys.path: ``from helpers import ...``)."""
import torch

import memkd.ops as ops


def check_ops_compile_fullgraph(q, k, v, fs, ft, compile_backend):
    """torch.compile(fullgraph=True) of the memkd ops gives the eager results: loss and gradients of
    a step through nr_recall and cosine_distance_map (on q, k, v), and anomaly maps (of fs, ft)."""

    def step(q, k, v):
        out = ops.nr_recall(q, k, v)
        return out.square().mean() + ops.cosine_distance_map(out, q).mean()

    compiled = torch.compile(step, fullgraph=True, backend=compile_backend)
    loss = compiled(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    expected_loss = step(q, k, v)
    expected_grads = torch.autograd.grad(expected_loss, (q, k, v))
    torch.testing.assert_close(loss, expected_loss)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want)
    amap = torch.compile(lambda a, b: ops.anomaly_map(a, b, (8, 8), 1.0), fullgraph=True, backend=compile_backend)
    torch.testing.assert_close(amap(fs, ft), ops.anomaly_map(fs, ft, (8, 8), 1.0))
