"""--activation jumprelu: the Crosscoder (fast path against the plain-torch one, persistence,
inference) and the trainer (planted-feature recovery over seeds, checkpoints, refusals)."""
from __future__ import annotations

import copy
import json
import math
import subprocess
import sys

import pytest
import torch
from kernel_cases import KERNEL_TOL

from fastxc.core.crosscoder import Crosscoder
from fastxc.data.synthetic import PlantedSource, recovery
from fastxc.train import TrainConfig, train
from fastxc.train.config import TrainError

WIDTHS = [40, 56]


def make(**kw):
    torch.manual_seed(1)
    cc = Crosscoder(WIDTHS, 257, activation="jumprelu", l0_coef=0.3, jumprelu_bandwidth=0.2,
                    jumprelu_init_threshold=0.3, **kw)
    with torch.no_grad():  # per-feature thresholds
        cc.log_threshold.add_(torch.randn(257) * 0.3)
    return cc


def run(cc, x, backend):
    cc.backend = backend
    out = cc(x)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in cc.named_parameters()}


def close(name, got, want, tol=KERNEL_TOL[torch.float32]):
    got, want = got.detach().float(), want.detach().float()
    err = (got - want).abs().max().item() if got.numel() else 0.0
    scale = want.abs().max().item() if want.numel() else 0.0
    assert err <= tol["atol"] + tol["rtol"] * scale, f"{name}: max err {err:.3g} (scale {scale:.3g})"


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_crosscoder_jumprelu_fast_matches_reference(backend):
    cc = make()
    x = torch.randn(37, sum(WIDTHS)) * 4  # pre ~ N(0, 0.4^2): codes of a few dozen entries
    fast, ref = copy.deepcopy(cc), copy.deepcopy(cc)
    out_f, g_f = run(fast, x, backend)
    out_r, g_r = run(ref, x, "reference")
    assert out_f.vals is not None and out_r.vals is None  # the sparse path against the dense one
    for name in ("loss", "recon", "code", "mse", "fvu", "sparsity", "l0"):
        close(name, getattr(out_f, name), getattr(out_r, name))
    assert out_r.sparsity.item() > 0 and 0 < out_r.l0.item() < 257
    assert set(g_r) == {"W_enc", "b_enc", "W_dec", "b_dec", "log_threshold"}
    for n in g_r:
        close(f"grad {n}", g_f[n], g_r[n])
    assert g_r["log_threshold"].abs().sum() > 0
    # the code is pre * (pre > theta)
    pre = x @ cc.W_enc.detach().T + cc.b_enc.detach()
    want = pre * (pre > cc.log_threshold.detach().exp())
    torch.testing.assert_close(out_f.code.detach(), want, rtol=0, atol=2e-6)


def test_crosscoder_jumprelu_l0_coef_per_call_and_bf16():
    cc = make()
    x = torch.randn(16, sum(WIDTHS)) * 4
    a, b = cc(x, l0_coef=0.0), cc(x, l0_coef=2.0)
    assert a.sparsity.item() == 0
    torch.testing.assert_close(b.sparsity, 2.0 * b.l0 * torch.ones(()), rtol=1e-6, atol=0)
    half = make(compute_dtype="bfloat16")
    out = half(x)
    out.loss.backward()
    assert half.log_threshold.grad is not None and torch.isfinite(half.log_threshold.grad).all()


def test_crosscoder_jumprelu_saves_loads_and_encodes(tmp_path):
    cc = make()
    cfg = cc.config()
    assert (cfg["activation"], cfg["l0_coef"], cfg["jumprelu_bandwidth"]) == ("jumprelu", 0.3, 0.2)
    assert "l0_coef" not in Crosscoder(WIDTHS, 64, "topk", k=4).config()  # other configs unchanged
    cc.save(tmp_path / "m")
    back = Crosscoder.load(tmp_path / "m")
    assert torch.equal(back.log_threshold, cc.log_threshold)
    x = torch.randn(8, sum(WIDTHS)) * 4
    cc.eval()
    back.eval()
    torch.testing.assert_close(back.encode(x), cc.encode(x))
    with pytest.raises(ValueError, match="jumprelu_bandwidth and jumprelu_init_threshold must be > 0"):
        Crosscoder(WIDTHS, 64, "jumprelu", jumprelu_bandwidth=0.0)


def _recovery(seed: int, tmp_path) -> tuple[torch.Tensor, dict]:
    """The planted setting of tests/test_train.py::test_training_recovers_planted_features,
    with --activation jumprelu at the default l0 coefficient, bandwidth and threshold init."""
    cfg = TrainConfig(source="synthetic", widths="64,64", out=str(tmp_path / f"s{seed}"), activation="jumprelu",
                      n_features=256, steps=1500, batch_size=512, progress=False, log_every=500, checkpoint_every=0,
                      seed=seed)
    res = train(cfg)
    return recovery(res.model.W_dec, PlantedSource([64, 64], seed=seed).truth), res.summary


@pytest.mark.parametrize("seed", [0, 1])
def test_jumprelu_training_recovers_planted_features(seed, tmp_path):
    cos, summary = _recovery(seed, tmp_path)
    assert float(cos.mean()) >= 0.9, f"MMCS {float(cos.mean()):.3f}"
    assert float((cos >= 0.9).float().mean()) >= 0.9, f"recovered {int((cos >= 0.9).sum())}/{cos.numel()}"
    assert summary["planted_right_class"] >= 0.9
    assert max(summary["fvu"]) < 0.05
    assert summary["l0"] < 10  # the source fires ~4.7 planted features a row


def test_train_cli_jumprelu_and_resume_state(tmp_path):
    """The CLI flags reach the model; the optimizer state of log_threshold is checkpointed and
    restored (it is the fifth parameter)."""
    out = tmp_path / "run"
    args = ["--source", "synthetic", "--widths", "16,16", "--n-features", "64", "--batch-size", "64",
            "--synthetic-shared", "8", "--synthetic-unique", "8", "--no-progress", "--activation", "jumprelu",
            "--l0-coef", "0.02", "--jumprelu-bandwidth", "0.1", "--jumprelu-init-threshold", "0.2",
            "--steps", "30", "--log-every", "10", "--out", str(out)]
    p = subprocess.run([sys.executable, "-m", "fastxc.train", *args], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    model = Crosscoder.load(out / "crosscoder")
    assert (model.activation, model.l0_coef, model.jumprelu_bandwidth) == ("jumprelu", 0.02, 0.1)
    assert not torch.allclose(model.log_threshold, torch.full((64,), math.log(0.2)))  # it trained
    rec = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert rec[-1]["l0_coef"] == pytest.approx(0.02)
    from fastxc.core.optim import AdamInBackward
    from fastxc.train import checkpoint

    fresh = Crosscoder.load(out / "checkpoint" / "model")
    opt = AdamInBackward(fresh.parameters())
    checkpoint.load_checkpoint(out / "checkpoint", fresh, opt)
    st = opt.state_dict()["state"]
    assert set(st) == {0, 1, 2, 3, 4} and st[4]["exp_avg"].shape == (64,)
    assert st[4]["exp_avg"].abs().sum() > 0


def test_jumprelu_refused_feature_parallel():
    with pytest.raises(TrainError, match="jumprelu does not run under --parallel features"):
        TrainConfig(source="synthetic", activation="jumprelu", parallel="features").validate()
    with pytest.raises(TrainError, match="--jumprelu-bandwidth must be a finite positive number"):
        TrainConfig(source="synthetic", activation="jumprelu", jumprelu_bandwidth=0.0).validate()
