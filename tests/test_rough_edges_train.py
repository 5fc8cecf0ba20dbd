"""The trainer's rough edges (issue #16): a full disk, file modes, divergence, --resume without a
checkpoint, --verify-store, and the synthetic source's recovery report. All in-process through
``fastxc.train.command.main`` on the tiny synthetic source."""
import errno
import json
import os

import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch

from fastxc.train import checkpoint as ckpt_mod
from fastxc.train import loop as train_loop
from fastxc.train.command import main


def interrupt_at_checkpoint(monkeypatch, step: int) -> None:
    """Make training stop like Ctrl-C (exit 130) when it is about to write the checkpoint of
    ``step``; the earlier checkpoints are written as usual."""
    real = ckpt_mod.save

    def interrupted(out, model, opt, ctx, state):
        if state["step"] == step:
            raise KeyboardInterrupt
        real(out, model, opt, ctx, state)

    monkeypatch.setattr(ckpt_mod, "save", interrupted)


TINY = ["--source", "synthetic", "--widths", "16,16", "--n-features", "64", "--k", "4", "--batch-size", "64",
        "--synthetic-shared", "8", "--synthetic-unique", "8", "--no-progress"]


def _run(capsys, argv):
    """main(argv) -> (exit code, stderr lines); never a traceback."""
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert not any("Traceback" in line for line in err), err
    return code, err


def _weights(path):
    return safetensors.torch.load_file(str(path / "crosscoder" / "model.safetensors"))


def _step(out):
    return json.loads((out / "checkpoint" / "state.json").read_text())["step"]


# ---------------------------------------------------------------------------- 1. full disk
def _disk_full(kind):
    if kind == "oserror":
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    # what safetensors raises on a real full disk (seen on a 64 KiB tmpfs)
    return safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def _fill_disk_at(monkeypatch, fail, kind):
    """safetensors' save_file raises as on a full disk when ``fail(path)`` says so, after
    writing part of the file (as a real full disk does)."""
    real = safetensors.torch.save_file

    def save_file(tensors, filename, metadata=None):
        if fail(filename):
            with open(filename, "wb") as fh:
                fh.write(b"\0" * 100)
            raise _disk_full(kind)
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)


ARGS = TINY + ["--steps", "40", "--checkpoint-every", "10", "--log-every", "10"]


@pytest.mark.parametrize("kind", ["oserror", "safetensors"])
@pytest.mark.parametrize("where", ["checkpoint", "model"])
def test_disk_full_is_one_line_keeps_the_checkpoint_and_resumes_exactly(tmp_path, capsys, monkeypatch, kind, where):
    assert main(ARGS + ["--out", str(tmp_path / "ref")]) == 0
    capsys.readouterr()
    out = tmp_path / "full"
    calls = []
    if where == "checkpoint":  # 2 files a checkpoint: the 6th write is step 30's optimizer state
        fail = lambda f: calls.append(f) or len(calls) == 6  # noqa: E731
    else:  # the trained model, after the final checkpoint
        fail = lambda f: "crosscoder.tmp" in str(f)  # noqa: E731
    _fill_disk_at(monkeypatch, fail, kind)
    code, err = _run(capsys, ARGS + ["--out", str(out)])
    assert code == 2
    kept = 20 if where == "checkpoint" else 40
    what = "the checkpoint of step 30" if where == "checkpoint" else "the trained model"
    assert err[-1].startswith(f"error: disk full while writing {what}"), err[-1]
    assert f"the checkpoint of step {kept} in {out / 'checkpoint'} is intact" in err[-1] and "--resume" in err[-1]
    # the good checkpoint is there and loads; no half-written checkpoint or model is left
    assert _step(out) == kept
    assert ckpt_mod.load_full_model(out / "checkpoint").n_features == 64
    assert not (out / "checkpoint.tmp").exists() and not (out / "crosscoder.tmp").exists()
    assert not (out / "crosscoder").exists() and not (out / "summary.json").exists()

    monkeypatch.undo()
    assert main(ARGS + ["--out", str(out), "--resume"]) == 0
    a, b = _weights(tmp_path / "ref"), _weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [10, 20, 30, 40]


def test_disk_full_on_metrics_is_one_line(tmp_path, capsys, monkeypatch):
    def write(self, run, lr, l1):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(train_loop._MetricsLog, "write", write)
    code, err = _run(capsys, ARGS + ["--out", str(tmp_path)])
    assert code == 2 and err[-1].startswith(f"error: disk full while writing the run's files in {tmp_path}"), err


def test_resume_survives_a_torn_metrics_line(tmp_path, capsys):
    """A full disk (or a kill) can leave half a line at the end of metrics.jsonl."""
    out = tmp_path / "run"
    assert main(TINY + ["--steps", "20", "--checkpoint-every", "10", "--log-every", "10", "--out", str(out)]) == 0
    with open(out / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 30, "loss": 0.')
    assert main(TINY + ["--steps", "20", "--checkpoint-every", "10", "--log-every", "10", "--out", str(out), "--resume"]) == 0
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [10, 20]


# ---------------------------------------------------------------------------- 2. file modes
@pytest.mark.parametrize("umask", [0o022, 0o077], ids=["umask022", "umask077"])
def test_every_file_follows_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        assert main(TINY + ["--steps", "4", "--checkpoint-every", "2", "--log-every", "2", "--out", str(tmp_path / "run")]) == 0
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"model.safetensors", "optimizer.safetensors", "state.json", "config.json", "metrics.jsonl", "summary.json"} <= names
    modes = {str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777) for p in files}
    assert set(modes.values()) == {oct(0o666 & ~umask)}, modes


# ---------------------------------------------------------------------------- 3. divergence
def test_huge_lr_warns_then_stops(tmp_path, capsys):
    code, err = _run(capsys, TINY + ["--lr", "1e6", "--steps", "100", "--out", str(tmp_path)])
    assert code == 2
    warnings = [line for line in err if line.startswith("warning: ")]
    assert len(warnings) == 1 and "training diverged at step" in warnings[0] and "lower --lr" in warnings[0], err
    assert err[-1].startswith("error: training diverged: 10 batches in a row"), err[-1]
    assert not (tmp_path / "crosscoder").exists() and not (tmp_path / "checkpoint").exists()


def test_divergence_keeps_the_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    """The lr jumps to 1e6 at step 20: the checkpoint of step 30 (diverged) is not written."""
    real = train_loop.lr_at
    monkeypatch.setattr(train_loop, "lr_at", lambda cfg, step: 1e6 if step >= 20 else real(cfg, step))
    code, err = _run(capsys, TINY + ["--steps", "100", "--checkpoint-every", "10", "--max-bad-batches", "15",
                                     "--out", str(tmp_path)])
    assert code == 2
    assert err[-1].startswith("error: training diverged: 15 batches in a row"), err[-1]
    assert f"the last good checkpoint is {tmp_path / 'checkpoint'}" in err[-1]
    assert _step(tmp_path) == 20
    model = ckpt_mod.load_full_model(tmp_path / "checkpoint")
    assert all(torch.isfinite(p).all() and p.abs().max() < 100 for p in model.parameters())


def test_non_finite_loss_is_skipped_then_stops(tmp_path, capsys, monkeypatch):
    """NaN weights give a NaN loss: the batch is not trained on (Adam's state stays finite), and
    after --max-bad-batches of them the run stops."""
    real = train_loop._train_step

    def poisoned(run, x):
        if run.step == 5:
            with torch.no_grad():
                run.model.W_dec.fill_(float("nan"))
        return real(run, x)

    monkeypatch.setattr(train_loop, "_train_step", poisoned)
    code, err = _run(capsys, TINY + ["--steps", "50", "--max-bad-batches", "4", "--out", str(tmp_path)])
    assert code == 2
    assert any(line.startswith("warning: training diverged at step 5 (loss nan)") for line in err), err
    assert err[-1].startswith("error: training diverged: 4 batches in a row up to step 8 (loss nan)"), err[-1]


def test_normal_run_prints_no_warning(tmp_path, capsys):
    code, err = _run(capsys, TINY + ["--steps", "60", "--out", str(tmp_path)])
    assert code == 0
    assert not [line for line in err if "warning" in line.lower()], err


# ---------------------------------------------------------------------------- 4. --resume
def test_resume_without_a_checkpoint_is_an_error(tmp_path, capsys):
    for out in (tmp_path / "missing", tmp_path / "empty"):
        if out.name == "empty":
            out.mkdir()
        code, err = _run(capsys, TINY + ["--steps", "5", "--out", str(out), "--resume"])
        assert code == 2 and err[-1].startswith("error: --resume: no checkpoint in"), err
        assert str(out) in err[-1] and "--resume-if-exists" in err[-1]
        assert out.name == "empty" or not out.exists(), "nothing written"
        assert not (out / "metrics.jsonl").exists()
    code, err = _run(capsys, TINY + ["--steps", "5", "--out", str(tmp_path / "o"), "--resume-if-exists", "--overwrite"])
    assert code == 2 and "--resume-if-exists and --overwrite contradict" in err[-1]


def test_resume_if_exists_starts_fresh_then_resumes(tmp_path, capsys, monkeypatch):
    args = TINY + ["--steps", "30", "--checkpoint-every", "10", "--log-every", "10"]
    assert main(args + ["--out", str(tmp_path / "ref")]) == 0
    out = tmp_path / "run"
    interrupt_at_checkpoint(monkeypatch, 20)
    assert main(args + ["--out", str(out), "--resume-if-exists"]) == 130  # no checkpoint: started fresh
    assert _step(out) == 10
    monkeypatch.undo()
    capsys.readouterr()
    code, err = _run(capsys, args + ["--out", str(out), "--resume-if-exists"])
    assert code == 0
    assert [int(line.split()[1]) for line in err if line.startswith("step ")] == [20, 30], "resumed at step 10"
    a, b = _weights(tmp_path / "ref"), _weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------- 6. --verify-store
def _store(tmp_path):
    from fastxc.data.store import write_store

    rng = np.random.default_rng(0)
    return write_store(tmp_path / "store", [rng.standard_normal((300, 8), dtype=np.float32) for _ in range(2)],
                       dtype="float32", shard_rows=100)


def test_verify_store_names_the_corrupt_shard_and_writes_nothing(tmp_path, capsys):
    store = _store(tmp_path)
    common = ["--n-features", "16", "--k", "2", "--batch-size", "32", "--steps", "3", "--no-progress"]
    code, err = _run(capsys, ["--store", str(store), "--verify-store", "--progress", "true", "--out", str(tmp_path / "ok")] + common[:-1])
    assert code == 0 and any("checksums" in line and "B/s" in line for line in err), "a progress bar while hashing"
    shard = store / json.loads((store / "manifest.json").read_text())["shards"][1]["files"]["acts"]["path"]
    raw = bytearray(shard.read_bytes())
    raw[123] ^= 0xFF  # same size: only the checksum can tell
    shard.write_bytes(bytes(raw))
    out = tmp_path / "bad"
    code, err = _run(capsys, ["--store", str(store), "--verify-store", "--out", str(out)] + common)
    assert code == 2 and err[-1] == f"error: --verify-store: checksum mismatch in {shard} (shard 1): the file is corrupted", err
    assert not out.exists(), "nothing written"
    assert main(["--store", str(store), "--out", str(out)] + common) == 0, "without the flag the sizes pass"


def test_verify_store_needs_a_store(capsys):
    code, err = _run(capsys, TINY + ["--verify-store"])
    assert code == 2 and "--verify-store checks a --store" in err[-1]


# ---------------------------------------------------------------------------- 7. recovery report
def test_synthetic_run_reports_recovery_of_the_planted_features(tmp_path, capsys):
    """Measured (seeds 0-3, these flags): MMCS 0.9959-0.9988, 24/24 in the right class."""
    argv = TINY + ["--n-features", "128", "--batch-size", "256", "--steps", "1000", "--lr", "3e-3",
                   "--checkpoint-every", "0", "--log-every", "500", "--out", str(tmp_path)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["planted_mmcs"] >= 0.99, summary["planted_mmcs"]
    assert summary["planted_right_class"] >= 0.95, summary["planted_right_class"]
    assert set(summary["planted_right_class_by_kind"]) == {"shared", "only-A", "only-B"}
    assert f"planted features: MMCS {summary['planted_mmcs']:.3f}" in printed
    assert f"{summary['planted_right_class']:.1%} in the right NRN class" in printed


def test_recovery_report_is_low_for_an_untrained_model():
    """The fields measure recovery, not just exist: a random decoder scores far lower."""
    from fastxc.core.crosscoder import Crosscoder
    from fastxc.data.synthetic import PlantedSource, recovery_report

    truth = PlantedSource([16, 16], n_shared=8, n_unique=8).truth
    rep = recovery_report(Crosscoder([16, 16], 128, "topk", k=4), truth)
    assert rep["planted_mmcs"] < 0.8, rep
    # the planted directions themselves, as a decoder: perfect
    perfect = Crosscoder([16, 16], 24, "topk", k=4)
    with torch.no_grad():
        perfect.W_dec.copy_(truth.directions)
    rep = recovery_report(perfect, truth)
    assert rep["planted_mmcs"] > 0.9999 and rep["planted_right_class"] == 1.0, rep
