"""Distributed training (fastxc.train.parallel, data_parallel, feature_parallel) on CPU with gloo: 2 ranks under torchrun against
1 process on the same global batches.

Each torchrun launch costs ~10-35 s on the shared 2-core machine (three interpreters import
torch), so the default run launches two (50 feature-parallel training steps, and one step of
every mode and activation checked against the reference); the data-parallel training comparison
and the kill-and-resume test launch three more and are marked slow.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastxc.core.crosscoder import Crosscoder
from fastxc.data.synthetic import PlantedSource
from fastxc.train import find_checkpoint, parallel, parse_config, train
from fastxc.train import main as train_main
from fastxc.train.checkpoint import (
    PARAM_NAMES,
    load_checkpoint,
    load_full_model,
    sync_replicated,
)
from fastxc.train.data_parallel import DataParallelCrosscoder
from fastxc.train.feature_parallel import (
    FeatureParallelCrosscoder,
    feature_parallel_comm_bytes,
    feature_slices,
)

# batchtopk with AuxK exercises every collective: the global k*B threshold, the running
# threshold, the dead-feature counters (dead_tokens = 4 batches) and the AuxK top-k and reduce.
ARGS = [
    "--source", "synthetic", "--widths", "32,32", "--n-features", "64", "--k", "4", "--batch-size", "64",
    "--steps", "50", "--activation", "batchtopk", "--aux-k", "8", "--dead-tokens", "256",
    "--checkpoint-every", "10", "--log-every", "10", "--eval-batches", "1", "--no-progress",
]
# Max abs difference of any weight after 50 steps, 2 ranks vs 1 process. Measured: 1.5e-8 in
# both modes against Crosscoder's plain-torch path, 2.2e-8 against its fused-kernel path, and
# 1.5e-8 for a 2-rank checkpoint at step 20 continued in one process (the partial
# reconstructions / gradients are summed in another order, one fp32 ulp of values ~0.1-1, and
# Adam carries it); 1e-6 leaves room for platform rounding, while a wrong gradient (a reduce
# that doubled it) or a different selection gives differences >= 1e-3.
TOL = 1e-6


def _torchrun(args: list[str], nproc: int = 2) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "fastxc.train", *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _run(args: list[str], nproc: int = 2) -> str:
    p = _torchrun(args, nproc)
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out[-3000:]
    return out


def _max_diff(a: Crosscoder, b: Crosscoder) -> dict[str, float]:
    sb = b.state_dict()
    return {k: (v.double() - sb[k].double()).abs().max().item() for k, v in a.state_dict().items()}


def _assert_close(a: Crosscoder, b: Crosscoder, tol: float) -> None:
    diffs = _max_diff(a, b)
    bad = {k: v for k, v in diffs.items() if not v <= tol}
    assert not bad, f"tensors differ by more than {tol}: {bad} (all: {diffs})"


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Crosscoder:
    """The 1-process reference run."""
    out = tmp_path_factory.mktemp("single") / "run"
    return train(parse_config([*ARGS, "--out", str(out)])).model


@pytest.fixture(scope="module")
def features2(tmp_path_factory) -> Path:
    """An uninterrupted 2-rank feature-parallel run; returns its --out folder."""
    out = tmp_path_factory.mktemp("features2") / "run"
    log = _run([*ARGS, "--parallel", "features", "--out", str(out)])
    assert "differed between ranks" not in log, log[-3000:]  # b_dec / threshold stayed replicated
    return out


def test_feature_parallel_matches_one_process(features2, single):
    two = Crosscoder.load(features2 / "crosscoder")
    _assert_close(two, single, TOL)
    assert int(two.tokens_since_fired.max()) >= 256, "no feature went dead: AuxK was never exercised"
    manifest = json.loads((features2 / "checkpoint" / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["slices"] == [[0, 32], [32, 64]]


def test_two_rank_checkpoint_loads_into_one_process(features2, single):
    ckpt = features2 / "checkpoint"
    full = load_full_model(ckpt)
    saved = Crosscoder.load(features2 / "crosscoder")
    _assert_close(full, saved, 0.0)  # rank 0 wrote out/crosscoder from the same shards
    x = PlantedSource([32, 32], seed=0).batch(64, 12345)
    single = copy.deepcopy(single)  # forward in train mode moves buffers; keep the fixture intact
    full.train(), single.train()  # batchtopk over the batch: no running threshold involved
    r_full, r_single = full(x).recon, single(x).recon
    assert (r_full - r_single).abs().max().item() <= TOL  # measured 6e-8 (inputs up to 1.7)

    # the same checkpoint as a world of 1 under --parallel features: one slice holding everything
    ctx = parallel.setup("features", "cpu")
    try:
        fp = FeatureParallelCrosscoder(Crosscoder(**{k: v for k, v in full.config().items() if k != "version"}), ctx)
        opt = torch.optim.Adam(fp.parameters())
        load_checkpoint(ckpt, fp, opt, version=1)
        assert torch.equal(fp.W_dec, full.W_dec) and torch.equal(fp.b_dec, full.b_dec)
        assert opt.state_dict()["state"][0]["exp_avg"].shape == full.W_enc.shape
        fp.train()
        # Crosscoder.forward runs the fused kernels' CPU path; the slice runs the plain-torch one
        assert (fp(x).recon - full(x).recon).abs().max().item() <= TOL
    finally:
        parallel.shutdown(ctx)


def test_two_rank_checkpoint_resumes_in_one_plain_process(features2, tmp_path):
    """--resume without --parallel reads the sharded checkpoint (here the final one, so no steps
    are left) and writes the ordinary single-process format back, weights unchanged. Continuing
    a mid-run 2-rank checkpoint in one process is part of the kill-and-resume test (slow)."""
    run = tmp_path / "run"
    shutil.copytree(features2, run)
    res = train(parse_config([*ARGS, "--out", str(run), "--resume"]))
    _assert_close(res.model, Crosscoder.load(features2 / "crosscoder"), 0.0)
    assert not (run / "checkpoint" / "manifest.json").exists() and (run / "checkpoint" / "model").is_dir()


@pytest.mark.slow
def test_data_parallel_matches_one_process(single, tmp_path):
    out = tmp_path / "run"
    _run([*ARGS, "--parallel", "data", "--out", str(out)])
    _assert_close(Crosscoder.load(out / "crosscoder"), single, TOL)


PAUSING_TRAINER = Path(__file__).with_name("pausing_trainer.py")  # see its docstring


def _descendants(pid: int) -> list[int]:
    """pid's children, grandchildren, ... (torchrun starts each worker in its own session)."""
    try:
        kids = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []
    return kids + [d for k in kids for d in _descendants(k)]


def _kill_at_checkpoint(args: list[str], out: Path, stop_at: int) -> int:
    """Run 2 ranks until both are about to write the checkpoint of ``stop_at``, SIGKILL torchrun
    and its workers; returns the step of the checkpoint left on disk."""
    marker = out.parent / "paused"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(PAUSING_TRAINER),
           str(marker), str(stop_at), *args]
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 600
        while not all(Path(f"{marker}.{r}").exists() for r in (0, 1)):
            if p.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the run never reached step {stop_at} (rc {p.poll()}): {p.communicate()[0][-3000:]}")
            time.sleep(0.05)
    finally:
        for pid in [p.pid, *_descendants(p.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        p.communicate(timeout=60)
    assert not (out / "summary.json").exists(), "the run finished before it was killed"
    return json.loads((find_checkpoint(out) / "state.json").read_text())["step"]


@pytest.mark.slow
def test_killed_two_rank_run_resumes_exactly(features2, single, tmp_path):
    out = tmp_path / "run"
    args = [*ARGS, "--parallel", "features", "--out", str(out)]
    step = _kill_at_checkpoint(args, out, stop_at=30)
    assert step == 20
    one = tmp_path / "one"  # the same checkpoint, continued by one plain process
    shutil.copytree(out, one)
    _run([*args, "--resume"])
    ref = Crosscoder.load(features2 / "crosscoder")
    # same ranks, same order of every sum: the resumed run repeats the uninterrupted one exactly
    _assert_close(Crosscoder.load(out / "crosscoder"), ref, 0.0)
    res = train(parse_config([*ARGS, "--out", str(one), "--resume"]))
    _assert_close(res.model, ref, TOL)
    _assert_close(res.model, single, TOL)


@pytest.mark.parametrize("mode", ["data", "features"])
def test_bf16_parallel_world_of_one_trains_and_resumes_in_one_process(tmp_path, mode):
    """--dtype bfloat16 under --parallel (a world of 1, no torchrun): fp32 masters, the dtype in
    the checkpoint (the sharded manifest's config too), and the checkpoint continues in a plain
    process only with the same --dtype."""
    args = ["--source", "synthetic", "--widths", "16,16", "--n-features", "32", "--k", "4", "--batch-size", "32",
            "--checkpoint-every", "5", "--no-progress", "--dtype", "bfloat16", "--out", str(tmp_path / mode)]
    out = tmp_path / mode
    res = train(parse_config([*args, "--steps", "10", "--parallel", mode]))
    assert res.model.compute_dtype == torch.bfloat16 and res.model.W_dec.dtype == torch.float32
    if mode == "features":
        assert json.loads((out / "checkpoint" / "manifest.json").read_text())["config"]["compute_dtype"] == "bfloat16"
    assert load_full_model(out / "checkpoint").compute_dtype == torch.bfloat16
    cont = train(parse_config([*args, "--steps", "14", "--resume"]))  # one plain process
    assert cont.summary["steps"] == 14 and cont.model.compute_dtype == torch.bfloat16


def test_parallel_none_under_torchrun_env_is_refused(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert train_main([*ARGS, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "error: 2 processes were started" in err and "--parallel data" in err
    assert not (tmp_path / "r").exists()


def test_bad_parallel_value(tmp_path, capsys):
    assert train_main([*ARGS, "--parallel", "pipeline", "--out", str(tmp_path / "r")]) == 2
    assert "error: --parallel must be one of none, data, features" in capsys.readouterr().err


def test_data_parallel_batch_must_split_evenly():
    """Checked before any training; a world of 1 divides everything, so ask for 3 ranks' split."""
    ctx = parallel.DistContext("data", 0, 3, 0, torch.device("cpu"), "gloo", False)
    with pytest.raises(parallel.DistributedError, match="multiple of the 3"):
        parallel.batches(PlantedSource([8, 8]).batches, 64, 0, 0, ctx)


# ---------------------------------------------------------------------------- one step, every mode
# One torchrun launch runs this file as a script on 2 ranks: for every activation, an odd F
# (unequal slices), k wider than a slice and forced dead features, each rank checks the
# distributed forward and backward of one step against the reference Crosscoder on the same
# batch, and every rank writes its largest differences to its own JSON file (rank r's
# comparisons cover its own feature slice and rows, so each rank's file counts).
STEP_CASES = [  # (activation, n_features, k, aux_k)
    ("relu", 37, 4, 0),
    ("topk", 37, 4, 8),
    ("topk", 37, 24, 0),  # k = 24 > the 18- and 19-feature slices: candidates are padded
    ("batchtopk", 37, 4, 8),
    ("batchtopk", 64, 3, 5),
]
# Largest relative difference measured over all 81 quantities: 2.0e-7 (data-parallel AuxK, whose
# residual variance is a one-pass float64 sum instead of the two-pass fp32 one); a doubled
# gradient gives 0.4.
STEP_TOL = 1e-6
# bf16 compute: relative difference of the outputs (max) and gradients (Frobenius) of both modes
# from the single-process bf16 step; bf16 rounds at other points there (feature parallel sums
# fp32 partials, one process rounds the whole reconstruction to bf16). Measured: <= 1.1e-2
# for relu / topk and every output. Training batchtopk runs the dense path in both modes, whose
# bf16 GEMM rounds pre to bf16, against the fused single-process step (fp32 products of the bf16
# operands): a few of the 10 x 37 selections flip at near ties, measured <= 0.112 of the
# gradient (cpu backend). A doubled or lost gradient gives >= 0.5.
BF16_STEP_TOL = 5e-2
BF16_STEP_TOL_BATCHTOPK = 0.2


def _one_step_worker(result_dir: str) -> None:
    import dataclasses

    import torch.distributed as dist

    torch.manual_seed(0)
    ctx = parallel.setup("features", "cpu")
    rank, W = ctx.rank, ctx.world_size
    worst: dict[str, float] = {}

    def note(name: str, a: torch.Tensor, b: torch.Tensor) -> None:
        # relative to the reference's scale (losses are ~10, gradients ~0.01-1)
        d = (a.detach().double() - b.detach().double()).abs().max().item() / max(1.0, b.detach().abs().max().item())
        worst[name] = max(worst.get(name, 0.0), d)

    for activation, F, k, aux_k in STEP_CASES:
        g = torch.Generator().manual_seed(F * 100 + k)
        base = Crosscoder([8, 8], F, activation, k=k, aux_k=aux_k, dead_tokens=100, l1_coef=0.3)
        base.reset_parameters(generator=g)
        with torch.no_grad():
            base.b_enc.normal_(0, 0.05, generator=g)
            base.b_dec.normal_(0, 0.05, generator=g)
            base.tokens_since_fired[::3] = 1000  # every third feature dead: AuxK has work
            if activation == "batchtopk":
                base.threshold.fill_(0.2)
        x = torch.randn(10, 16, generator=g)
        ref = copy.deepcopy(base).train()
        out = ref(x, l1_coef=0.3)
        out.loss.backward()
        assert aux_k == 0 or out.aux.item() > 0, "no dead feature reached AuxK"
        lo, hi = feature_slices(F, W)[rank]

        fp = FeatureParallelCrosscoder(copy.deepcopy(base), ctx).train()
        sent = {"all_gather": 0, "all_reduce": 0}
        real_gather, real_reduce = parallel.all_gather, parallel.all_reduce

        def count(kind, real):
            def wrapped(t, *a):
                sent[kind] += t.numel() * t.element_size()
                return real(t, *a)
            return wrapped

        parallel.all_gather, parallel.all_reduce = count("all_gather", real_gather), count("all_reduce", real_reduce)
        try:
            o = fp(x, l1_coef=0.3)
            o.loss.backward()
        finally:
            parallel.all_gather, parallel.all_reduce = real_gather, real_reduce
        k_aux = min(aux_k, int(ref.dead_mask().sum()))
        want = feature_parallel_comm_bytes(x.shape[0], 16, k, activation, k_aux, W)
        assert sent == {key: want[key] for key in sent}, f"{activation}: sent {sent}, formula {want}"
        tag = f"features/{activation}"
        for name, a, b in [("recon", o.recon, out.recon), ("code", o.code, out.code[:, lo:hi]), ("loss", o.loss, out.loss),
                           ("mse", o.mse, out.mse), ("aux", o.aux, out.aux), ("sparsity", o.sparsity, out.sparsity),
                           ("l0", o.l0, out.l0), ("threshold", fp.threshold, ref.threshold),
                           ("tokens_since_fired", fp.tokens_since_fired, ref.tokens_since_fired[lo:hi]),
                           ("dead_mask", fp.dead_mask().int(), ref.dead_mask().int())]:
            note(f"{tag}/{name}", a, b)
        for name in ("W_enc", "b_enc", "W_dec"):
            note(f"{tag}/grad_{name}", getattr(fp, name).grad, getattr(ref, name).grad[lo:hi])
        note(f"{tag}/grad_b_dec", fp.b_dec.grad, ref.b_dec.grad)
        torch.optim.Adam(fp.parameters(), lr=0.1).step()
        assert sync_replicated(fp, ctx) == 0.0, "replicated b_dec / threshold differ between ranks"

        dp = DataParallelCrosscoder(copy.deepcopy(base), dataclasses.replace(ctx, mode="data")).train()
        b = x.shape[0] // W
        o = dp(x[rank * b : (rank + 1) * b], l1_coef=0.3)
        o.loss.backward()
        tag = f"data/{activation}"
        for name, a, bb in [("recon", o.recon, out.recon[rank * b : (rank + 1) * b]), ("loss", o.loss, out.loss),
                            ("mse", o.mse, out.mse), ("fvu", o.fvu, out.fvu), ("aux", o.aux, out.aux),
                            ("sparsity", o.sparsity, out.sparsity), ("l0", o.l0, out.l0),
                            ("threshold", dp.threshold, ref.threshold), ("tokens_since_fired", dp.tokens_since_fired, ref.tokens_since_fired)]:
            note(f"{tag}/{name}", a, bb)
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            note(f"{tag}/grad_{name}", getattr(dp, name).grad, getattr(ref, name).grad)

    # bf16 compute (--dtype bfloat16): both modes against the single-process bf16 Crosscoder
    # (fp32 master weights and gradients; feature parallel sums its partials in fp32)
    worst_bf16: dict[str, float] = {}
    for activation, F, k, aux_k in STEP_CASES[:4]:
        g = torch.Generator().manual_seed(F * 100 + k)
        base = Crosscoder([8, 8], F, activation, k=k, aux_k=aux_k, dead_tokens=100, l1_coef=0.3,
                          compute_dtype="bfloat16")
        base.reset_parameters(generator=g)
        with torch.no_grad():
            base.b_enc.normal_(0, 0.05, generator=g)
            base.b_dec.normal_(0, 0.05, generator=g)
            base.tokens_since_fired[::3] = 1000
        x = torch.randn(10, 16, generator=g)
        ref = copy.deepcopy(base).train()
        out = ref(x, l1_coef=0.3)
        out.loss.backward()
        lo, hi = feature_slices(F, W)[rank]
        b = x.shape[0] // W
        fp = FeatureParallelCrosscoder(copy.deepcopy(base), ctx).train()
        dp = DataParallelCrosscoder(copy.deepcopy(base), dataclasses.replace(ctx, mode="data")).train()
        assert fp.compute_dtype == dp.compute_dtype == torch.bfloat16
        of, od = fp(x, l1_coef=0.3), dp(x[rank * b : (rank + 1) * b], l1_coef=0.3)
        of.loss.backward()
        od.loss.backward()
        for mode, o, m, rows, feats in (("features", of, fp, slice(None), slice(lo, hi)),
                                        ("data", od, dp, slice(rank * b, (rank + 1) * b), slice(None))):
            assert o.recon.dtype == torch.float32 and all(p.grad.dtype == torch.float32 for p in m.parameters())
            for name, a, bb in [("recon", o.recon, out.recon[rows]), ("loss", o.loss, out.loss), ("mse", o.mse, out.mse)]:
                d = (a.detach() - bb.detach()).abs().max().item() / max(1.0, bb.detach().abs().max().item())
                worst_bf16[f"{mode}/{activation}/{name}"] = max(worst_bf16.get(f"{mode}/{activation}/{name}", 0.0), d)
            for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
                want = getattr(ref, name).grad
                want = want if name == "b_dec" else want[feats]
                got = getattr(m, name).grad
                rel = ((got - want).norm() / want.norm().clamp_min(1e-12)).item()
                worst_bf16[f"{mode}/{activation}/grad_{name}"] = rel
    Path(result_dir, f"worst_bf16.rank{rank}.json").write_text(json.dumps(worst_bf16, indent=1))

    # a single-process checkpoint (after one Adam step) re-sliced into this rank's features
    # 18 | 19 of 37: the rows of the weights and of both Adam moments
    from fastxc.train import save_checkpoint

    one = Crosscoder([8, 8], 37, "topk", k=4)
    opt1 = torch.optim.Adam(one.parameters(), lr=1e-2)
    one(torch.randn(10, 16)).loss.backward()
    opt1.step()
    ckpt_dir = Path(result_dir) / "one"
    if rank == 0:
        save_checkpoint(ckpt_dir, one, opt1, {"step": 1})
    dist.barrier()
    fp = FeatureParallelCrosscoder(Crosscoder([8, 8], 37, "topk", k=4), ctx)
    opt = torch.optim.Adam(fp.parameters(), lr=1e-2)
    assert load_checkpoint(ckpt_dir / "checkpoint", fp, opt, version=1)["step"] == 1
    lo, hi = fp.lo, fp.hi
    st, st1 = opt.state_dict()["state"], opt1.state_dict()["state"]
    for pid, name in enumerate(PARAM_NAMES):
        rows = slice(None) if name == "b_dec" else slice(lo, hi)
        assert torch.equal(getattr(fp, name), getattr(one, name)[rows]), name
        for moment in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(st[pid][moment], st1[pid][moment][rows]), f"{name} {moment}"

    # data parallel reads only its rows of a store's global batch i, and every rank skips a
    # batch that is non-finite on any rank
    from fastxc.data.store import open_store, write_store

    dctx = dataclasses.replace(ctx, mode="data")
    store = Path(result_dir) / "store"
    if rank == 0:
        write_store(store, torch.randn(200, 2, 8, generator=torch.Generator().manual_seed(1)))
    dist.barrier()
    reader = open_store(store)
    mine, whole = parallel.batches(reader.batches, 16, 3, 5, dctx), reader.batches(16, seed=3, start=5, prefetch=0)
    for _ in range(3):
        assert torch.equal(next(mine), next(whole)[rank * 8 : (rank + 1) * 8]), "wrong rows of the store batch"
    poisoned = torch.zeros(16, 16)
    poisoned[12, 3] = float("nan")  # in rank 1's rows only
    x = next(parallel.batches(lambda bs, seed, start: iter([poisoned]), 16, 0, 0, dctx))
    assert x.shape == (8, 16) and not torch.isfinite(x).all(), "ranks disagree on skipping a NaN batch"
    Path(result_dir, f"worst.rank{rank}.json").write_text(json.dumps(worst, indent=1))
    parallel.shutdown(ctx)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_one_step_every_mode_matches_reference(tmp_path, backend):
    """reference: Crosscoder's plain-torch path against the distributed modules' plain path.
    cpu: the fused kernels (Crosscoder, and data parallel for topk / relu) against the same."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    env["FASTXC_BACKEND"] = backend
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", __file__,
                        "--one-step-worker", str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    for rank in range(2):
        worst = json.loads((tmp_path / f"worst.rank{rank}.json").read_text())
        assert len(worst) == 3 * (14 + 13), sorted(worst)  # 3 activations x (features, data) quantities
        bad = {k: v for k, v in worst.items() if not v <= STEP_TOL}
        assert not bad, f"rank {rank}: distributed step differs from the reference: {bad}"
        worst = json.loads((tmp_path / f"worst_bf16.rank{rank}.json").read_text())
        assert len(worst) == 2 * 3 * 7, sorted(worst)  # (features, data) x 3 activations x 7 quantities
        bad = {k: v for k, v in worst.items() if not v <= (BF16_STEP_TOL_BATCHTOPK if "batchtopk/grad" in k else BF16_STEP_TOL)}
        assert not bad, f"rank {rank}: bf16 distributed step differs from the bf16 reference: {bad}"



if __name__ == "__main__" and sys.argv[1:2] == ["--one-step-worker"]:
    _one_step_worker(sys.argv[2])
