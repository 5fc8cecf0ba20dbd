"""The trainer: recovery of planted features, exact resume after SIGKILL, and bad input."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fastxc import Crosscoder
from fastxc import train as train_mod
from fastxc.analysis.diff import classify, relative_norms
from fastxc.data.synthetic import SHARED, PlantedSource, best_match, recovery
from fastxc.train import TrainConfig, main, train
from fastxc.train import loop as train_loop
from kill_at_checkpoint import kill_at_checkpoint

TINY = ["--source", "synthetic", "--widths", "16,16", "--n-features", "64", "--k", "4", "--batch-size", "64",
        "--synthetic-shared", "8", "--synthetic-unique", "8", "--no-progress"]


@pytest.mark.parametrize(
    "activation, extra",
    [("topk", {"k": 8}), ("relu", {"l1_coef": 0.05})],
)
def test_training_recovers_planted_features(tmp_path, activation, extra):
    """Planted 32 shared + 32 only-A + 32 only-B features in two 64-wide sources."""
    cfg = TrainConfig(source="synthetic", widths="64,64", out=str(tmp_path), activation=activation, n_features=256,
                      steps=1500, batch_size=512, progress=False, log_every=500, checkpoint_every=0, **extra)
    res = train(cfg)
    truth = PlantedSource([64, 64], seed=0).truth
    cos = recovery(res.model.W_dec, truth)
    assert float(cos.mean()) >= 0.9, f"mean max cosine {float(cos.mean()):.3f}"
    cls = classify(relative_norms(res.model).nrn[best_match(res.model.W_dec, truth)])
    want = torch.where(truth.kind == SHARED, 0, truth.kind + 1)
    for c, name in enumerate(["shared", "only-A", "only-B"]):
        acc = float((cls[want == c] == c).float().mean())
        assert acc >= 0.9, f"{name}: {acc:.2f} of planted features in the right NRN class"
    assert max(res.summary["fvu"]) < 0.05
    loaded = Crosscoder.load(tmp_path / "crosscoder")
    assert torch.equal(loaded.W_dec, res.model.W_dec)


def _run_cli(args, **kw):
    return subprocess.run([sys.executable, "-m", "fastxc.train", *args], capture_output=True, text=True, timeout=300, **kw)


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(path / "crosscoder" / "model.safetensors"))






@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("activation", ["topk", pytest.param("batchtopk", marks=pytest.mark.slow), pytest.param("relu", marks=pytest.mark.slow)])
def test_sigkill_then_resume_gives_identical_weights(tmp_path, activation, dtype):
    args = TINY + ["--activation", activation, "--steps", "600", "--checkpoint-every", "100", "--log-every", "100",
                   "--aux-k", "8" if activation != "relu" else "0", "--dead-tokens", "2000", "--l1-coef", "0.05",
                   "--dtype", dtype]
    ref = _run_cli(args + ["--out", str(tmp_path / "ref")])
    assert ref.returncode == 0, ref.stderr

    out = tmp_path / "killed"
    kill_at_checkpoint(args, out, stop_at=400)
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 300
    assert not (out / "crosscoder").exists()
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [100, 200, 300, 400]

    resumed = _run_cli(args + ["--out", str(out), "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    a, b = _weights(tmp_path / "ref"), _weights(out)
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs after resume"
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(100, 601, 100)), "metrics.jsonl must hold each logged step once"
    # the checkpoint records the dtype: the trainer config, and the model config when not fp32
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["config"]["dtype"] == dtype
    cfg = json.loads((out / "checkpoint" / "model" / "config.json").read_text())
    assert cfg.get("compute_dtype", "float32") == dtype
    assert all(v.dtype == torch.float32 for v in b.values() if v.is_floating_point()), "fp32 master weights"


def test_resume_with_another_dtype_is_refused(tmp_path, capsys):
    args = TINY + ["--steps", "4", "--checkpoint-every", "2", "--out", str(tmp_path), "--dtype", "bfloat16"]
    assert main(args) == 0
    line = _error_line(capsys, TINY + ["--steps", "8", "--out", str(tmp_path), "--resume"])
    assert "trained with --dtype bfloat16, this run has --dtype float32" in line, line
    assert main(TINY + ["--steps", "8", "--out", str(tmp_path), "--resume", "--dtype", "bfloat16"]) == 0
    assert "--dtype must be one of float32, bfloat16" in _error_line(capsys, TINY + ["--dtype", "float16"])


def test_device_auto_is_the_default_and_bad_devices_are_one_line(tmp_path, capsys):
    from fastxc.core.device import resolve_device

    assert TrainConfig().device == "auto"
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = ["--steps", "2", "--out", str(tmp_path / "o")]
    assert "--device 'bogus' is not a device" in _error_line(capsys, TINY + out + ["--device", "bogus"])
    if not torch.cuda.is_available():
        assert "no CUDA device is available" in _error_line(capsys, TINY + out + ["--device", "cuda"])
    assert not (tmp_path / "o" / "crosscoder").exists()
    assert main(TINY + out) == 0  # auto


def test_aux_k_that_cannot_act_is_one_warning_line(tmp_path, capsys):
    """AuxK trains features silent for --dead-tokens rows: a run shorter than twice that (the
    defaults: 1M of 1.02M rows) or a relu run gets one warning line; a run where AuxK acts none."""
    cases = {  # flags -> the warning's text (None: no warning)
        ("--aux-k", "8", "--steps", "20"): "on at most the last 0% of this run's 1280 rows; lower --dead-tokens",
        ("--aux-k", "8", "--steps", "20", "--dead-tokens", "1000"): "on at most the last 22% of this run's 1280 rows",
        ("--aux-k", "8", "--steps", "20", "--dead-tokens", "640"): None,
        ("--aux-k", "8", "--steps", "20", "--dead-tokens", "64", "--activation", "relu"):
            "--aux-k 8 is ignored: AuxK applies to topk and batchtopk, not relu",
        ("--steps", "20"): None,
    }
    for i, (flags, want) in enumerate(cases.items()):
        assert main(TINY + list(flags) + ["--out", str(tmp_path / str(i))]) == 0
        warnings = [x for x in capsys.readouterr().err.splitlines() if x.startswith("warning: --aux-k")]
        assert len(warnings) == (want is not None) and (want is None or want in warnings[0]), (flags, warnings)
    # a sweep names the run
    (tmp_path / "sweep.json").write_text(json.dumps({"runs": [{"name": "a", "aux_k": 8}, {"name": "b"}]}))
    assert main(TINY + ["--steps", "20", "--sweep", str(tmp_path / "sweep.json"), "--out", str(tmp_path / "sw")]) == 0
    warnings = [x for x in capsys.readouterr().err.splitlines() if x.startswith("warning:")]
    assert len(warnings) == 1 and warnings[0].startswith("warning: run a: --aux-k 8 acts only"), warnings
    # the defaults: AuxK could act on only the last 2% of a default run
    assert "last 2% of this run's 1024000 rows" in TrainConfig(aux_k=128).aux_k_warning()


def test_metrics_jsonl_and_summary(tmp_path):
    res = train(TrainConfig(source="synthetic", widths="16,16", n_features=64, k=4, batch_size=64, steps=60, log_every=20,
                            out=str(tmp_path), progress=False, synthetic_shared=8, synthetic_unique=8))
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [20, 40, 60]
    for r in lines:
        assert set(r) >= {"loss", "mse", "fvu", "l0", "dead", "tokens_per_s", "lr", "skipped"}
        assert len(r["fvu"]) == 2 and r["tokens"] == r["step"] * 64
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 60 and sum(summary["classes"].values()) == summary["live_features"]
    assert res.summary["fvu"] == summary["fvu"]


def test_config_file_and_flag_precedence(tmp_path):
    (tmp_path / "c.yaml").write_text("n-features: 48\nk: 3\nsteps: 7\n")
    cfg = train_mod.parse_config(["--config", str(tmp_path / "c.yaml"), "--k", "5"])
    assert (cfg.n_features, cfg.k, cfg.steps, cfg.batch_size) == (48, 5, 7, TrainConfig().batch_size)
    (tmp_path / "c.json").write_text(json.dumps({"n_features": 48, "bogus": 1}))
    with pytest.raises(train_mod.TrainError, match="unknown field 'bogus'"):
        train_mod.parse_config(["--config", str(tmp_path / "c.json")])


def _store(tmp_path, widths=(8, 8), rows=200):
    from fastxc.data.store import write_store

    path = tmp_path / "store"
    write_store(path, [np.random.randn(rows, w).astype(np.float32) for w in widths])
    return path


def _error_line(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    assert err and err[-1].startswith("error: "), err
    assert not any("Traceback" in line for line in err)
    return err[-1]


def test_bad_input_one_clear_line(tmp_path, capsys):
    store = _store(tmp_path)
    out = ["--out", str(tmp_path / "o"), "--no-progress"]
    assert "unrecognized arguments: --bogus" in _error_line(capsys, ["--bogus"])
    assert "--k must satisfy 0 < k <= n_features (64)" in _error_line(capsys, TINY + ["--k", "65"] + out)
    assert "--k must satisfy" in _error_line(capsys, TINY + ["--k", "0"] + out)
    assert "--k must satisfy" in _error_line(capsys, TINY + ["--k", "-3"] + out)
    line = _error_line(capsys, ["--store", str(store), "--widths", "8,9"] + out)
    assert "do not match the store's widths [8, 8]" in line
    missing = _error_line(capsys, ["--store", str(tmp_path / "nope")] + out)
    assert "not found" in missing and str(tmp_path / "nope") in missing
    (tmp_path / "empty").mkdir()
    assert str(tmp_path / "empty") in _error_line(capsys, ["--store", str(tmp_path / "empty")] + out)
    assert "--steps must be positive" in _error_line(capsys, TINY + ["--steps", "0"] + out)
    assert "invalid int value" in _error_line(capsys, ["--steps", "ten"])
    assert not (tmp_path / "o" / "crosscoder").exists()


def test_store_with_no_rows_is_refused(tmp_path, capsys):
    store = _store(tmp_path)
    manifest = json.loads((store / "manifest.json").read_text())
    manifest["shards"] = []
    for key in ("rows", "n_rows", "tokens", "n_tokens"):
        if key in manifest:
            manifest[key] = 0
    (store / "manifest.json").write_text(json.dumps(manifest))
    line = _error_line(capsys, ["--store", str(store), "--out", str(tmp_path / "o"), "--no-progress"])
    assert "empty" in line or "0 rows" in line, line


def test_existing_run_is_not_overwritten(tmp_path, capsys):
    args = TINY + ["--steps", "5", "--out", str(tmp_path)]
    assert main(args) == 0
    before = (tmp_path / "crosscoder" / "model.safetensors").read_bytes()
    assert "already holds a run" in _error_line(capsys, args)
    assert (tmp_path / "crosscoder" / "model.safetensors").read_bytes() == before
    assert main(args + ["--overwrite"]) == 0


def test_cli_exit_code_without_traceback():
    res = _run_cli(["--k", "0", "--source", "synthetic"])
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [res.stderr.strip()] and "Traceback" not in res.stderr


class _Poisoned:
    """A data source whose batches at the given indices hold NaN/Inf."""

    def __init__(self, bad, src):
        self.bad, self.src = set(bad), src

    def batches(self, batch_size, seed=0, start=0):
        i = start
        for x in self.src.batches(batch_size, seed=seed, start=start):
            if seed == 0 and i in self.bad:
                x = x.clone()
                x[3, 5] = float("nan") if i % 2 else float("inf")
            yield x
            i += 1


def _poison(monkeypatch, bad):
    src = PlantedSource([16, 16], n_shared=8, n_unique=8)
    data = train_mod.DataSource([16, 16], _Poisoned(bad, src).batches, None, "poisoned", None)
    monkeypatch.setattr(train_loop, "open_data", lambda cfg: data)  # where train() looks it up


def test_nan_batches_are_skipped_and_counted(tmp_path, monkeypatch):
    _poison(monkeypatch, bad=[3, 4, 17])
    res = train(TrainConfig(source="synthetic", n_features=64, k=4, batch_size=64, steps=30, out=str(tmp_path), progress=False))
    assert res.summary["skipped_batches"] == 3
    assert all(torch.isfinite(p).all() for p in res.model.parameters())


def test_run_of_nan_batches_stops_with_message(tmp_path, monkeypatch, capsys):
    _poison(monkeypatch, bad=range(5, 100))
    line = _error_line(capsys, TINY + ["--steps", "50", "--max-bad-batches", "4", "--out", str(tmp_path)])
    assert "4 consecutive batches held NaN/Inf" in line


def test_trains_from_store(tmp_path):
    """Training reads the store: the model has its widths and normalisation, took every step,
    and fits the store's rows better than the same model untrained."""
    from fastxc.data.store import open_store

    store = _store(tmp_path, widths=(12, 20), rows=500)
    cfg = TrainConfig(store=str(store), n_features=32, k=4, batch_size=50, steps=20, out=str(tmp_path / "o"), progress=False)
    res = train(cfg)
    reader = open_store(store)
    assert res.model.widths == [12, 20] and res.summary["steps"] == 20 and res.summary["skipped_batches"] == 0
    torch.testing.assert_close(res.model.input_scale, torch.as_tensor(reader.scales, dtype=torch.float32))
    torch.manual_seed(cfg.seed)  # the trainer's initialisation
    untrained = Crosscoder([12, 20], cfg.n_features, cfg.activation, k=cfg.k, dead_tokens=cfg.dead_tokens)
    x = reader.read_rows(np.arange(len(reader)))  # every row, normalised as training saw them

    def fvu(model):
        with torch.no_grad():
            return model.fvu(x, model.decode(model.encode(x)))

    trained_fvu, untrained_fvu = fvu(res.model), fvu(untrained)
    assert (trained_fvu < untrained_fvu).all(), (trained_fvu, untrained_fvu)


@pytest.mark.slow
def test_no_arguments_runs_offline(tmp_path):
    """The Quickstart's main job. It shares the user's organism cache with the organism tests
    (building the organism twice would double CI time); the hub is unreachable by construction."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-m", "fastxc.train"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1500)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "FVU per source" in res.stdout
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and (runs[0] / "crosscoder" / "config.json").is_file()
