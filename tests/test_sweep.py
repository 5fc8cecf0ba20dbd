"""``python -m fastxc.train --sweep FILE`` (issue #15, item 2): several crosscoders from one
stream of batches, each bit-identical to its single run, resumable as one run, and bad sweep
files refused with one line before anything is written."""
import json
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
import yaml

from fastxc.data import store as store_mod
from fastxc.train import checkpoint as ckpt_mod
from fastxc.train.command import main
from kill_at_checkpoint import kill_at_checkpoint

SHARED = {"batch_size": 32, "steps": 40, "checkpoint_every": 10, "log_every": 10, "eval_batches": 2, "seed": 3,
          "progress": False}
RUNS = [
    {"name": "k4", "k": 4, "n_features": 64},
    {"name": "k8", "k": 8, "n_features": 128, "aux_k": 16, "dead_tokens": 200},
    {"name": "relu", "activation": "relu", "n_features": 64, "l1_coef": 0.05, "lr": 3e-3},
]
# Resume tests: relu and jumprelu pick a sparse or dense kernel path from the calls since the
# model was built (fastxc.core.crosscoder; not in a checkpoint), so on these tiny shapes even their
# single runs do not resume bit-identically; batchtopk stands in as the third activation.
RESUMABLE = RUNS[:2] + [{"name": "btk", "activation": "batchtopk", "k": 4, "n_features": 64}]
FILES = ("crosscoder/model.safetensors", "crosscoder/config.json", "checkpoint/state.json",
         "checkpoint/optimizer.safetensors", "metrics.jsonl", "summary.json")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from fastxc.data.store import write_store

    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("sweep") / "store"
    return write_store(path, [rng.standard_normal((512, 8), dtype=np.float32) for _ in range(2)],
                       dtype="float32", shard_rows=200)


def _sweep_file(tmp_path, store, runs=RUNS, name="sweep.yaml", **shared):
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"store": str(store), **SHARED, **shared, "runs": runs}))
    return path


def _flags(fields: dict) -> list[str]:
    """The command line of a single run with these config fields."""
    return [a for key, value in fields.items() if key != "name"
            for a in ((f"--{key.replace('_', '-')}",) if value is True else
                      (f"--no-{key.replace('_', '-')}",) if value is False else
                      (f"--{key.replace('_', '-')}", str(value)))]


def _run(capsys, argv):
    """main(argv) -> (exit code, stderr lines); never a traceback."""
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert not any("Traceback" in line for line in err), err
    return code, err


def _tensors(path):
    return safetensors.torch.load_file(str(path))


def _assert_same_run(a: Path, b: Path) -> None:
    """Run folders a and b hold the same model, checkpoint (Adam state, RNG, step) and metrics."""
    for name in ("crosscoder/model.safetensors", "checkpoint/optimizer.safetensors", "checkpoint/model/model.safetensors"):
        ta, tb = _tensors(a / name), _tensors(b / name)
        assert ta.keys() == tb.keys(), name
        for key in ta:
            assert torch.equal(ta[key], tb[key]), f"{b.name}: {name} {key} differs"
    drop = ("tokens_per_s",)  # wall-clock
    ma = [{k: v for k, v in json.loads(ln).items() if k not in drop} for ln in (a / "metrics.jsonl").read_text().splitlines()]
    mb = [{k: v for k, v in json.loads(ln).items() if k not in drop} for ln in (b / "metrics.jsonl").read_text().splitlines()]
    assert ma == mb, f"{b.name}: metrics.jsonl differs"
    assert json.loads((a / "summary.json").read_text()) == json.loads((b / "summary.json").read_text())
    sa, sb = (json.loads((p / "checkpoint/state.json").read_text()) for p in (a, b))
    assert sa["step"] == sb["step"] == SHARED["steps"]


def test_sweep_runs_are_bit_identical_to_single_runs_and_read_the_data_once(tmp_path, store, capsys, monkeypatch):
    reads = []
    real = store_mod.StoreReader.batches

    def counted(self, batch_size, seed=0, start=0, prefetch=2):
        reads.append((seed, start))
        return real(self, batch_size, seed=seed, start=start, prefetch=prefetch)

    monkeypatch.setattr(store_mod.StoreReader, "batches", counted)
    out = tmp_path / "sweep"
    code = main(["--sweep", str(_sweep_file(tmp_path, store)), "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    # one stream of training batches for all three runs (each run's evaluation reads seed + 1)
    assert [r for r in reads if r[0] == SHARED["seed"]] == [(SHARED["seed"], 0)], reads
    assert sorted(p.name for p in out.iterdir()) == ["k4", "k8", "relu", "sweep.json"]
    for run in RUNS:
        assert f"== {run['name']} ==" in captured.out
        single = tmp_path / "single" / run["name"]
        code, err = _run(capsys, ["--store", str(store), *_flags(SHARED), *_flags(run), "--out", str(single)])
        assert code == 0, err
        for name in FILES:
            assert (out / run["name"] / name).is_file(), name
        _assert_same_run(single, out / run["name"])
    recorded = json.loads((out / "sweep.json").read_text())["runs"]
    assert recorded["k8"]["n_features"] == 128 and recorded["relu"]["activation"] == "relu"
    assert recorded["k4"]["out"] == str(out / "k4")


def test_interrupted_sweep_resumes_as_one_run(tmp_path, store, capsys, monkeypatch):
    """Ctrl-C while the second run writes its step-20 checkpoint: the first run is a checkpoint
    ahead of the others; --resume re-reads from step 10 and every run ends as if never stopped."""
    sweep = _sweep_file(tmp_path, store, runs=RESUMABLE)
    ref = tmp_path / "ref"
    assert _run(capsys, ["--sweep", str(sweep), "--out", str(ref)])[0] == 0

    real, calls = ckpt_mod.save, []

    def interrupted(out, model, opt, ctx, state):
        calls.append((out.name, state["step"]))
        if (out.name, state["step"]) == ("k8", 20):
            raise KeyboardInterrupt
        real(out, model, opt, ctx, state)

    monkeypatch.setattr(ckpt_mod, "save", interrupted)
    out = tmp_path / "cut"
    code, err = _run(capsys, ["--sweep", str(sweep), "--out", str(out)])
    assert code == 130 and err[-1] == "error: interrupted; continue with --resume", err
    monkeypatch.setattr(ckpt_mod, "save", real)
    steps = {p.name: json.loads((p / "checkpoint" / "state.json").read_text())["step"] for p in out.iterdir() if p.is_dir()}
    assert steps == {"k4": 20, "k8": 10, "btk": 10}
    assert not any((out / r["name"] / "crosscoder").exists() for r in RESUMABLE)

    code, err = _run(capsys, ["--sweep", str(sweep), "--out", str(out), "--resume"])
    assert code == 0, err
    for run in RESUMABLE:
        _assert_same_run(ref / run["name"], out / run["name"])
        logged = [json.loads(ln)["step"] for ln in (out / run["name"] / "metrics.jsonl").read_text().splitlines()]
        assert logged == [10, 20, 30, 40], f"{run['name']}: each logged step once"


def test_sigkilled_sweep_resumes_bit_identical(tmp_path, store, capsys):
    """A real SIGKILL (the pausing trainer) as the sweep is about to checkpoint step 30."""
    sweep = _sweep_file(tmp_path, store, runs=RESUMABLE)
    ref = tmp_path / "ref"
    assert _run(capsys, ["--sweep", str(sweep), "--out", str(ref)])[0] == 0
    out = tmp_path / "killed"
    kill_at_checkpoint(["--sweep", str(sweep)], out, stop_at=30)
    assert json.loads((out / "k4" / "checkpoint" / "state.json").read_text())["step"] == 20
    code, err = _run(capsys, ["--sweep", str(sweep), "--out", str(out), "--resume"])
    assert code == 0, err
    for run in RESUMABLE:
        _assert_same_run(ref / run["name"], out / run["name"])


@pytest.mark.parametrize("runs, shared, flags, message", [
    (RUNS, {"bogus": 1}, [], "unknown field 'bogus'"),
    ([{"name": "a", "k": 4}, {"name": "b", "kk": 4}], {}, [], "run 'b': unknown field 'kk'"),
    ([{"name": "a", "k": 4}, {"name": "a", "k": 8}], {}, [], "runs 'a' and 'a' would both write"),
    ([{"name": "Big", "k": 4}, {"name": "big", "k": 8}], {}, [], "runs 'Big' and 'big' would both write"),
    ([{"name": "a", "k": 4}, {"name": "b", "batch_size": 64}], {}, [],
     "run 'b' sets 'batch_size', which every run of a sweep shares; set it at the top of the file"),
    ([{"name": "a", "seed": 1}], {}, [], "run 'a' sets 'seed', which every run of a sweep shares"),
    ([{"name": "../up", "k": 4}], {}, [], "run 1 needs a name of letters, digits"),
    ([{"k": 4}], {}, [], "run 1 needs a name"),
    ([], {}, [], "'runs' must be a non-empty list of runs"),
    ([{"name": "a", "k": 4}, {"name": "b", "k": 99, "n_features": 64}], {}, [], "sweep run 'b': --k must satisfy 0 < k <= n_features (64)"),
    (RUNS, {}, ["--parallel", "data"], "--parallel data|features does not run with it"),
    (RUNS, {"parallel": "features"}, [], "--parallel data|features does not run with it"),
    (RUNS, {"log": "wandb"}, [], "--log wandb does not run under --sweep"),
    (RUNS, {}, ["--resume"], "--resume: no checkpoint in any run of"),
])
def test_bad_sweeps_are_one_line_and_write_nothing(tmp_path, store, capsys, runs, shared, flags, message):
    sweep = _sweep_file(tmp_path, store, runs=runs, **shared)
    out = tmp_path / "out"
    code, err = _run(capsys, ["--sweep", str(sweep), "--out", str(out), *flags])
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not out.exists(), "nothing written"


def test_sweep_with_config_or_without_data_is_refused(tmp_path, store, capsys):
    code, err = _run(capsys, ["--sweep", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "o")])
    assert code == 2 and err == [f"error: sweep file {tmp_path / 'missing.yaml'} does not exist"], err
    sweep = tmp_path / "nodata.yaml"
    sweep.write_text(yaml.safe_dump({**SHARED, "runs": RUNS}))
    code, err = _run(capsys, ["--sweep", str(sweep), "--out", str(tmp_path / "o")])
    assert code == 2 and err == [f"error: sweep file {sweep}: give the data: store: DIR, the models (model_a, model_b, "
                                 "dataset) or source: synthetic"], err
    (tmp_path / "c.json").write_text("{}")
    code, err = _run(capsys, ["--sweep", str(_sweep_file(tmp_path, store)), "--config", str(tmp_path / "c.json"),
                              "--out", str(tmp_path / "o")])
    assert code == 2 and "--sweep and --config do not go together" in err[-1], err
    assert not (tmp_path / "o").exists()


def test_a_second_sweep_into_the_same_folder_is_refused_until_resume(tmp_path, store, capsys):
    """A finished run in one member's folder stops the whole sweep before any folder is touched."""
    sweep = _sweep_file(tmp_path, store, steps=4, checkpoint_every=0)
    out = tmp_path / "out"
    assert _run(capsys, ["--store", str(store), *_flags({**SHARED, "steps": 4}), "--k", "4", "--n-features", "64",
                         "--out", str(out / "k8")])[0] == 0
    before = (out / "k8" / "crosscoder" / "model.safetensors").read_bytes()
    code, err = _run(capsys, ["--sweep", str(sweep), "--out", str(out)])
    want = f"error: {out / 'k8'} already holds a run: pass --resume to continue it or --overwrite to replace it"
    assert code == 2 and err == [want], err
    assert sorted(p.name for p in out.iterdir()) == ["k8"], "no other run folder, no sweep.json"
    assert (out / "k8" / "crosscoder" / "model.safetensors").read_bytes() == before
