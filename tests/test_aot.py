"""The GPU path without a GPU: every Triton kernel of fastxc.kernels compiled ahead of time for
sm_80 / sm_90a by Triton's own compiler and the ptxas in its wheel (``python -m
fastxc.kernels.aot``), and the registry that lists the kernels and their launch configs.

The test session runs with TRITON_INTERPRET=1 (conftest.py), under which triton.jit returns
interpreted functions; the tool therefore always runs in a subprocess with TRITON_INTERPRET=0.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GEMM_TC_DTYPES = ("fp32-tf32", "bf16", "fp16", "x-fp32/w-bf16-tf32")  # tensor cores expected


def _env():
    env = dict(os.environ, TRITON_INTERPRET="0", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_aot(tmp_path, *args, timeout):
    """Run the AOT tool -> (exit status, rows of its JSON report, stdout)."""
    out = tmp_path / "aot.json"
    p = subprocess.run([sys.executable, "-m", "fastxc.kernels.aot", "--json", str(out), *args],
                       capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=timeout)
    assert out.exists(), p.stdout[-3000:] + p.stderr[-3000:]
    return p.returncode, json.loads(out.read_text()), p.stdout


def check_rows(rows):
    """Every compile fits: compiled, 0 spill bytes, shared memory within the arch's per-block
    limit; every GEMM kernel runs on tensor cores in bf16, fp16 and TF32 (mma / wgmma)."""
    assert rows
    for r in rows:
        what = f"{r['kernel']} {r['config']} {r['dtype']} {r['arch']}"
        assert r["ok"], f"{what}: {r['error']}"
        assert r["spill_store"] == 0 and r["spill_load"] == 0, f"{what}: spills {r['spill_store']}/{r['spill_load']} B"
        assert r["smem"] <= r["smem_limit"], f"{what}: {r['smem']} B shared > {r['smem_limit']}"
        assert r["warps_sm"] >= r["num_warps"], f"{what}: not one block per SM"
        if r["gemm"] and r["dtype"] in GEMM_TC_DTYPES:
            assert r["tc"] > 0, f"{what}: no tensor-core instruction"
            if r["arch"].startswith("sm_90"):
                assert r["mma"] == "wgmma", f"{what}: {r['mma']} instead of wgmma on Hopper"
        if r["gemm"] and r["dtype"].endswith("ieee"):
            assert r["tc"] == 0, f"{what}: IEEE fp32 must not round to TF32 on tensor cores"


def test_aot_main_configs_sm90a(tmp_path):
    """The main config of every kernel in its main dtypes, for sm_90a (< 2 min on 2 cores
    without a warm Triton cache)."""
    rc, rows, out = run_aot(tmp_path, "--arch", "sm_90a", "--main-only", "--jobs", "2", timeout=300)
    check_rows(rows)
    assert rc == 0, out[-3000:]
    kernels = {r["kernel"] for r in rows}
    assert {"_encode_fwd_kernel", "_encode_topk_kernel", "_gather_sum_kernel", "_gather_dot_kernel",
            "_scatter_rows_kernel", "_col_stats_kernel"} <= kernels
    gemm = {(r["kernel"], r["dtype"]) for r in rows if r["gemm"]}
    for k in ("_encode_fwd_kernel", "_encode_topk_kernel"):
        for dt in ("fp32-ieee", "fp32-tf32", "bf16", "x-fp32/w-bf16-tf32"):
            assert (k, dt) in gemm


@pytest.mark.aot_full  # ~19 min on 2 cores: too long for CI's slow step; run by hand with -m aot_full
def test_aot_every_config_dtype_arch(tmp_path):
    """Every kernel x shipped config x dtype, on sm_80 and sm_90a (minutes)."""
    rc, rows, out = run_aot(tmp_path, "--arch", "sm_80,sm_90a", "--jobs", str(min(4, os.cpu_count() or 1)),
                            timeout=3600)
    check_rows(rows)
    assert rc == 0, out[-3000:]
    assert {r["arch"] for r in rows} == {"sm_80", "sm_90a"}


def test_registry_is_complete():
    """Every @triton.jit function launched anywhere in fastxc.kernels is in an AOT_CASES
    registry, every other one is a helper of a registered kernel, and every autotune config is
    a registered config."""
    code = "import json; from fastxc.kernels import aot; print(json.dumps(aot.registry_problems()))"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(),
                       cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads(p.stdout.strip().splitlines()[-1]) == []


def test_registry_check_catches_a_missing_kernel(tmp_path):
    """The completeness check is not vacuous: a launched kernel left out of the registry of a
    module is reported."""
    code = (
        "import json\n"
        "from fastxc.kernels import aot, triton_loss\n"
        "triton_loss.AOT_CASES.clear()\n"
        "print(json.dumps(aot.registry_problems()))\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(),
                       cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads(p.stdout.strip().splitlines()[-1]) == [
        "_col_stats_kernel is launched but in no AOT_CASES"]


def test_occupancy_model():
    """Resident warps per SM from registers, shared memory and warps per block."""
    from fastxc.kernels.aot import occupancy

    assert occupancy(32, 0, 4, "sm_90a") == 64  # warp-limited
    assert occupancy(128, 0, 4, "sm_90a") == 16  # 65536 / (128 * 32) = 16 warps
    assert occupancy(255, 0, 8, "sm_90a") == 8  # 256-register allocation units: 8 warps
    assert occupancy(64, 100 * 1024, 4, "sm_80") == 4  # one 101 KiB block in 164 KiB
    assert occupancy(64, 100 * 1024, 4, "sm_90a") == 8  # two in 228 KiB
