"""bench/roofline.py: FLOP / byte counts against hand formulas, the CLI for every GPU and dtype,
the JSON output. Pure Python (no torch)."""
from __future__ import annotations

import importlib.util
import json
import re
import sys
from dataclasses import replace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("fastxc_bench_roofline", ROOT / "bench" / "roofline.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


rl = _load()
SMALL = rl.Shape(batch=64, widths=(32, 32), n_features=256, k=8)  # D = 64


def test_encoder_gemm_counts():
    B, D, F = 64, 64, 256
    for mode, s in (("bf16", 2), ("tf32", 4)):
        op = rl.encoder_gemm(SMALL, rl.dtypes(mode))
        assert op.flops == 2 * B * F * D
        assert op.bytes == (B * D + F * D + F) * s  # x, W_enc, b_enc once; no [B, F] output
    assert rl.encoder_gemm(SMALL, rl.dtypes("bf16")).pipe == "bf16"
    assert rl.encoder_gemm(SMALL, rl.dtypes("tf32")).pipe == "fp32"  # input_precision="ieee"
    assert rl.encoder_gemm(SMALL, rl.dtypes("tf32", encoder_tf32=True)).pipe == "tf32"
    # the floor writes the [B, F] output
    assert rl.gemm_floor(SMALL, "bf16").bytes == (B * D + F * D + B * F) * 2


def test_sparse_decode_counts():
    B, D, F, k = 64, 64, 256, 8
    gpu = rl.GPUS["h100"]
    op = rl.sparse_decode(SMALL, rl.dtypes("bf16"), gpu)
    assert op.flops == 2 * B * k * D
    code, bias, recon = B * k * (2 + 8), D * 2, B * D * 2
    # [F, BLOCK_D] slab fits in L2: each gathered W_dec row is read from HBM once (B*k = 512 > F)
    assert op.bytes == min(B * k, F) * D * 2 + code + bias + recon
    # a GPU with a tiny L2: every one of the B*k gathered rows is an HBM read
    tiny = replace(gpu, l2_bytes=1024)
    op = rl.sparse_decode(SMALL, rl.dtypes("tf32"), tiny)
    assert op.bytes == B * k * D * 4 + B * k * (4 + 8) + D * 4 + B * D * 4


def test_time_is_max_of_compute_and_memory():
    gpu = rl.GPUS["h200"]
    op = rl.Op("x", flops=2e12, bytes=1e9, pipe="bf16", phase="fwd")
    assert op.time_s(gpu) == pytest.approx(max(2e12 / 989e12, 1e9 / 4.8e12))
    assert op.bound(gpu) == "compute"
    assert rl.GPUS["h100"].hbm_bytes_s == 3.35e12 and rl.GPUS["h100"].tf32_flops == 494e12


def test_topk_network_steps():
    # n = 128, k = 32: stages 1..5 over 128 (15 rounds), then two halvings with a 5-round merge
    assert rl.topk_network_steps(128, 32) == 15 * 128 + (64 + 5 * 64) + (32 + 5 * 32)
    assert rl.topk_network_steps(8, 1) == 7


def test_scatter_executed_flops():
    op = rl.scatter(SMALL, rl.dtypes("bf16"), rl.GPUS["h100"], "dW_dec", 4)
    # F / 32 = 8 feature blocks of 64 entries -> 2 steps each; 1 column block of 128
    assert op.flops == 8 * 1 * 2 * 2 * 32 * 32 * 128


def test_kernel_constants_match_sources():
    src = "\n".join(p.read_text() for p in (ROOT / "fastxc" / "kernels").glob("*.py"))
    # (names as of this writing; decode.py's BLOCK_NNZ was BLOCK_E)
    for name, val in (("BLOCK_D", rl.DEC_BLOCK_D), ("BLOCK_(?:E|NNZ)", rl.SCATTER_BLOCK_NNZ),
                      ("BLOCK_F", rl.SCATTER_BLOCK_F)):
        assert re.search(rf"^{name} = {val}\b", src, re.MULTILINE), name
    # GPU tile width of the top-k GEMM: max(128, candidates per tile)
    assert re.search(r"= max\(64 if _dispatch\.interpreting\(\) else 128, \w+\)", src)
    assert 'input_precision="ieee"' in src


@pytest.mark.parametrize("gpu", ["h100", "h200"])
@pytest.mark.parametrize("dtype", ["bf16", "tf32"])
def test_cli_seed_table(capsys, gpu, dtype):
    assert rl.main(["--shape", "seed", "--gpu", gpu, "--dtype", dtype]) == 0
    out = capsys.readouterr().out
    assert "B=4096 widths=[1536, 1536] (D=3072) F=32768 k=32" in out
    for needle in ("encoder GEMM x @ W_enc^T", "sparse decode", "Adam W_enc", "predicted fastxc step",
                   "GEMM floor", "step / floor", "costliest op besides the encoder GEMM", "verdict"):
        assert needle in out


def test_cli_explicit_shape_and_json(tmp_path, capsys):
    path = tmp_path / "r.json"
    rl.main(["--batch", "128", "--widths", "64", "96", "--n-features", "1024", "--k", "16", "--json", str(path)])
    assert "D=160" in capsys.readouterr().out
    data = json.loads(path.read_text())
    t = data["totals"]
    assert data["shape"]["D"] == 160
    assert t["step_us"] == pytest.approx(sum(o["us"] for o in data["ops"]))
    assert t["step_over_floor"] == pytest.approx(t["step_us"] / t["floor_us"])
    assert {"floor_us", "dense_step_us", "costliest_other_op", "within_1p3x_floor"} <= set(t)


def test_bench_shape_json(tmp_path):
    path = tmp_path / "b.json"
    rl.main(["--shape", "bench", "--gpu", "h200", "--dtype", "tf32", "--json", str(path)])
    data = json.loads(path.read_text())
    assert data["shape"]["batch"] == 1024 and data["gpu"]["name"] == "H200 SXM"
    assert data["totals"]["floor_us"] > 0
