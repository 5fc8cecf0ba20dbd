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


# A sitecustomize that hides triton from every Python process started with it on PYTHONPATH
# (the training command's child processes too).
_HIDE_TRITON = '''
import sys

class _NoTriton:
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ImportError(f"{name} hidden by tests/test_dispatch.py")
        return None

sys.meta_path.insert(0, _NoTriton())
'''

_NO_TRITON_OPS = '''
import sys
import fastxc
assert "triton" not in sys.modules
import fastxc.kernels as K
assert "triton" not in sys.modules
try:
    import triton  # noqa: F401
except ImportError:
    pass
else:
    raise AssertionError("triton is not hidden")
import torch
torch.manual_seed(0)
x = torch.randn(8, 16)
W = torch.randn(33, 16, requires_grad=True)
b = torch.zeros(33, requires_grad=True)
Wd = torch.randn(33, 16, requires_grad=True)
vals, idx = K.topk_encode(x, W, b, 4)
recon = K.sparse_decode(vals, idx, Wd)
recon.pow(2).sum().backward()
assert W.grad is not None and Wd.grad is not None and b.grad is not None
assert torch.isfinite(W.grad).all() and torch.isfinite(Wd.grad).all()
from fastxc.kernels import _dispatch
assert _dispatch.choose(x) == "cpu"
assert "triton" not in sys.modules
print("no-triton ok")
'''


def test_works_without_triton(tmp_path):
    """With triton hidden from the import system (a meta_path finder that raises ImportError,
    installed by a sitecustomize in every process): ``import fastxc``, a topk_encode +
    sparse_decode forward and backward on CPU tensors, and a 20-step synthetic training run."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    (tmp_path / "hide").mkdir()
    (tmp_path / "hide" / "sitecustomize.py").write_text(_HIDE_TRITON)
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTXC_BACKEND")}
    env.update(OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(tmp_path / "hide"), root, env.get("PYTHONPATH", "")]))
    p = subprocess.run([sys.executable, "-c", _NO_TRITON_OPS], capture_output=True, text=True,
                       env=env, cwd=root, timeout=300)
    assert p.returncode == 0 and "no-triton ok" in p.stdout, p.stdout[-2000:] + p.stderr[-3000:]
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, "-m", "fastxc.train", "--source", "synthetic", "--steps", "20",
                        "--out", str(out), "--no-progress"], capture_output=True, text=True, env=env,
                       cwd=root, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "hidden by tests/test_dispatch.py" not in p.stderr
    assert any(out.iterdir())


def _fake_cuda_tensor():
    """A tensor that says it lives on a GPU, on a machine without one (a FakeTensor: shape,
    dtype and device only), enough for the per-call backend choice."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        return torch.empty(2, 3, device="cuda")


def test_triton_on_cuda_never_falls_back_silently(monkeypatch):
    """#13: backend="triton" (argument or FASTXC_BACKEND) on CUDA tensors raises when triton
    cannot run them; unasked, CUDA tensors without triton take the reference with a warning."""
    x = _fake_cuda_tensor()
    monkeypatch.delenv("FASTXC_BACKEND", raising=False)
    monkeypatch.setattr(_dispatch, "_triton_importable", lambda: True)
    assert _dispatch.choose(x) == "triton" and _dispatch.choose(x, backend="triton") == "triton"
    monkeypatch.setattr(_dispatch, "_triton_importable", lambda: False)
    with pytest.raises(K.BackendError, match="triton >= 3.4"):
        _dispatch.choose(x, backend="triton")
    monkeypatch.setenv("FASTXC_BACKEND", "triton")
    with pytest.raises(K.BackendError, match="not importable"):
        _dispatch.choose(x)
    monkeypatch.delenv("FASTXC_BACKEND")
    monkeypatch.setattr(_dispatch, "_warned", set())
    with pytest.warns(RuntimeWarning, match="reference"):
        assert _dispatch.choose(x) == "reference"
    with pytest.raises(K.BackendError, match="cannot run CUDA"):
        _dispatch.choose(x, backend="cpu")
