"""``--log tensorboard|wandb``: the same metrics as metrics.jsonl at the same steps, and the NRN
histogram at the end; a missing package is one line."""
import json
import sys

import pytest

from fastxc.train.command import main

TINY = ["--source", "synthetic", "--widths", "16,16", "--n-features", "64", "--k", "4", "--batch-size", "64",
        "--synthetic-shared", "8", "--synthetic-unique", "8", "--no-progress", "--steps", "30", "--log-every", "10"]


def _expected_scalars(out):
    """{tag: {step: value}} from metrics.jsonl, written out by hand (source names A and B)."""
    want: dict = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        for key in ("loss", "l0", "dead", "lr", "skipped", "tokens", "tokens_per_s"):
            want.setdefault(key, {})[rec["step"]] = rec[key]
        for key in ("mse", "fvu"):
            for name, v in zip("AB", rec[key]):
                want.setdefault(f"{key}/{name}", {})[rec["step"]] = v
    return want


def test_tensorboard_scalars_equal_metrics_jsonl(tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed: pip install 'fastxc[tensorboard]'")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert main(TINY + ["--log", "tensorboard", "--out", str(out)]) == 0
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    want = _expected_scalars(out)
    assert set(acc.Tags()["scalars"]) == set(want)  # l1_coef is None for topk: not logged
    for tag, by_step in want.items():
        got = {e.step: e.value for e in acc.Scalars(tag)}
        assert sorted(got) == [10, 20, 30], tag
        assert got == pytest.approx(by_step, rel=1e-6), tag  # TensorBoard keeps float32
    hist = acc.Histograms("nrn")
    summary = json.loads((out / "summary.json").read_text())
    assert [h.step for h in hist] == [30] and hist[0].histogram_value.num == summary["live_features"]


def test_tensorboard_resume_drops_the_rewound_steps(tmp_path, monkeypatch):
    """A run stopped after logging step 30 but checkpointed at 20 resumes at 20: TensorBoard
    keeps each step once, as metrics.jsonl does."""
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed: pip install 'fastxc[tensorboard]'")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from test_rough_edges_train import interrupt_at_checkpoint

    out = tmp_path / "run"
    args = TINY + ["--steps", "40", "--checkpoint-every", "20", "--log", "tensorboard", "--out", str(out)]
    interrupt_at_checkpoint(monkeypatch, 40)
    assert main(args) == 130
    monkeypatch.undo()
    assert main(args + ["--resume"]) == 0
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    want = _expected_scalars(out)
    got = {e.step: e.value for e in acc.Scalars("loss")}
    assert sorted(got) == [10, 20, 30, 40] and got == pytest.approx(want["loss"], rel=1e-6)


def test_wandb_offline_writes_a_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="the wandb extra is not installed: pip install 'fastxc[wandb]'")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    import wandb

    out = tmp_path / "run"
    assert main(TINY + ["--log", "wandb", "--out", str(out)]) == 0
    # wandb's service writes the .wandb file behind run.finish() and closes it when the process
    # ends (its atexit hook, what a `python -m fastxc.train` user gets); in this process, wait as
    # that hook does. Without it the file was read half-written in 1 of 5 runs after test_sweep.
    wandb.teardown()
    runs = list((tmp_path / "wandb-dir" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((tmp_path / "wandb-dir").rglob("*"))
    run_id = (out / "wandb-run-id").read_text().strip()
    assert runs[0].name.endswith(run_id) and list(runs[0].glob(f"run-{run_id}.wandb"))
    history = _wandb_history(runs[0] / f"run-{run_id}.wandb")
    want = _expected_scalars(out)
    assert sorted(history) == [10, 20, 30]
    for tag, by_step in want.items():
        assert {step: history[step][tag] for step in history} == by_step, tag
    summary = json.loads((out / "summary.json").read_text())  # the NRN histogram of the live features, at the end
    assert history[30]["nrn/_type"] == "histogram" and sum(history[30]["nrn/values"]) == summary["live_features"]
    assert history[30]["nrn/bins"] == pytest.approx([i / 20 for i in range(21)])


def _wandb_history(path):
    """{step: {key: value}} from the history records of a .wandb file: wandb's protobuf
    ``Record``s in LevelDB log framing (7-byte file header; 32 KiB blocks of chunks, each with
    a 7-byte header crc32, length, type 1 full / 2 first / 3 middle / 4 last)."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, records, part = path.read_bytes(), 7, 32768, [], b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # too little left in the block for a header: padding
            pos += block - pos % block
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        part, pos = part + data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 4):
            records.append(part)
            part = b""
    history: dict = {}
    for raw in records:
        rec = pb.Record()
        rec.ParseFromString(raw)
        if rec.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in rec.history.item}
            history.setdefault(items["_step"], {}).update(items)
    return history


@pytest.mark.parametrize("backend", ["wandb", "tensorboard"])
def test_missing_package_is_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch, backend):
    # None in sys.modules makes the import raise ImportError, as when the package is absent
    for name in list(sys.modules):
        if name == backend or name.startswith(backend + ".") or (backend == "tensorboard" and name.startswith("torch.utils.tensorboard")):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, backend, None)
    if backend == "tensorboard":
        monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    out = tmp_path / "run"
    assert main(TINY + ["--log", backend, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --log {backend} needs the {backend} package: pip install 'fastxc[{backend}]'"]
    assert not out.exists()


def test_bad_log_value_is_one_line(capsys):
    assert main(TINY + ["--log", "mlflow"]) == 2
    assert "--log must be none, tensorboard, wandb" in capsys.readouterr().err
