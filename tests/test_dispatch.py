"""The per-call backend choice of fastxc.kernels (fastxc/kernels/_dispatch.py)."""
from __future__ import annotations

import pytest
import torch

import fastxc.kernels as K
from fastxc.kernels import _dispatch
from kernel_cases import params


def test_dispatch(monkeypatch):
    x = torch.randn(2, 3)
    monkeypatch.delenv("FASTXC_BACKEND", raising=False)
    assert _dispatch.choose(x) == "cpu"
    monkeypatch.setenv("FASTXC_BACKEND", "reference")
    assert _dispatch.choose(x) == "reference"
    monkeypatch.setenv("FASTXC_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _dispatch.choose(x) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(_dispatch, "_warned", set())
    with pytest.warns(RuntimeWarning, match="TRITON_INTERPRET"):
        assert _dispatch.choose(x) == "cpu"
    monkeypatch.setenv("FASTXC_BACKEND", "gpu-please")
    with pytest.raises(K.BackendError, match="FASTXC_BACKEND"):
        _dispatch.choose(x)


def graph_nodes(t: torch.Tensor) -> list[str]:
    """Class names of every autograd node behind t."""
    seen, todo, names = set(), [t.grad_fn], []
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(type(node).__name__)
        todo.extend(n for n, _ in node.next_functions)
    return names


def test_env_backend_routes_ops(monkeypatch):
    """FASTXC_BACKEND=reference makes the public op return the reference's autograd graph
    (relu over torch.topk, no fused node); =cpu returns the fused op's node."""
    x, W, b = params(4, 16, 33, torch.float32)
    monkeypatch.setenv("FASTXC_BACKEND", "reference")
    v, _ = K.topk_encode(x, W, b, 3)
    assert type(v.grad_fn).__name__ == "ReluBackward0"
    assert type(v.grad_fn.next_functions[0][0]).__name__ == "TopkBackward0"
    assert not any("EncodeFn" in n for n in graph_nodes(v))
    monkeypatch.setenv("FASTXC_BACKEND", "cpu")
    v2, _ = K.topk_encode(x, W, b, 3)
    assert "EncodeFn" in type(v2.grad_fn).__name__
