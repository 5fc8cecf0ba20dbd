"""Training straight from the models (``--model-a/--model-b``): the shuffle buffer, its
scales, --save-store, bad input and kill-and-resume, on tiny Llama models built here."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fastxc.data.buffer import OnTheFlySource, scales_from_sums
from fastxc.data.harvest import harvest, plan_harvest
from fastxc.data.store import open_store
from fastxc.train import main as train_cli
from kill_at_checkpoint import kill_at_checkpoint
from test_harvest import WORDS_A, WORDS_B, build_model, build_tokenizer, write_jsonl


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("otf")
    tok = build_tokenizer(root / "tok")
    return {"a": str(build_model(root / "a", "llama", tok, seed=1)),
            "b": str(build_model(root / "b", "llama", tok, seed=2)),
            "ga": str(write_jsonl(root / "ga.jsonl", WORDS_A, 200, seed=0)),
            "gb": str(write_jsonl(root / "gb.jsonl", WORDS_B, 200, seed=1))}


def _plan(pair, tokens, **kw):
    return plan_harvest([pair["a"], pair["b"]], [pair["ga"] + ":0.6", pair["gb"] + ":0.4"], tokens,
                        context_length=16, batch_size=4, **kw)


def _flags(pair, out, *extra):
    return ["--model-a", pair["a"], "--model-b", pair["b"], "--dataset", pair["ga"] + ":0.6",
            "--dataset", pair["gb"] + ":0.4", "--context-length", "16", "--harvest-batch-size", "4",
            "--buffer-rows", "256", "--batch-size", "32", "--steps", "40", "--n-features", "64", "--k", "4",
            "--device", "cpu", "--no-progress", *extra, "--out", str(out)]


def _drain(it):
    out = []
    while True:
        try:
            out.append(next(it))
        except ValueError:  # HarvestError: the stream ran out
            return out


# ------------------------------------------------------------------------------- the buffer
def test_every_row_served_once_in_mixed_order(pair):
    """Unscaled batches drawn until the stream (1200 rows) runs out hold exactly the rows of
    the harvest stream, each once, and neighbouring rows of the stream are spread apart."""
    plan = _plan(pair, 1200)
    src = OnTheFlySource(plan, "cpu", buffer_rows=256, tokens=1200)
    it = src.stream(40, seed=0, scales=[1.0, 1.0])
    served = torch.cat(_drain(it)).flatten(1)
    it.close()
    assert served.shape[0] == 1200  # 30 batches of 40: the buffer drained to the last row
    from fastxc.data.harvest import iter_activations

    rows = torch.cat([b.x for b in iter_activations(plan, src.caps, "cpu")])[:1200]
    from collections import Counter

    key = lambda t: Counter(tuple(r) for r in t.numpy().tolist())  # rows repeat: same word after BOS
    assert key(served) == key(rows)
    # where each served row sits in the stream: a batch mixes rows from far apart
    index = {}
    for i, r in enumerate(rows.numpy().round(5).tolist()):
        index.setdefault(tuple(r), i)
    pos = np.array([index[tuple(r)] for r in served.numpy().round(5).tolist()]).reshape(30, 40)
    assert np.median(pos.max(1) - pos.min(1)) > 200  # measured 379 (buffer 256)
    src.close()


def test_draws_depend_on_seed_and_resume_is_exact(pair):
    """The batch sequence is a function of the seed; a stream rebuilt from ``state()`` at
    batch 13 draws the next batches bit-identically (the buffer rebuilt from its slots)."""
    src = OnTheFlySource(_plan(pair, 2000), "cpu", buffer_rows=200, tokens=2000)
    it = src.stream(32, seed=0)
    scales = scales_from_sums(it.first_fill_sums, it.first_fill_rows, src.plan.widths)
    it.set_scales(scales)
    xs, state = [], None
    for i in range(50):
        if i == 13:
            state = it.state()
        xs.append(next(it))
    it.close()
    # the first fill gives E||x_i|| = sqrt(d_i) over its rows
    first = torch.cat(xs[:3]).flatten(1)
    assert abs(first[:, :32].norm(dim=1).mean().item() / 32 ** 0.5 - 1) < 0.1
    again = src.stream(32, seed=0, state=state)
    for i in range(13, 50):
        assert torch.equal(next(again), xs[i]), i
    again.close()
    other = src.stream(32, seed=1, scales=scales)
    assert not torch.equal(next(other), xs[0])
    other.close()
    src.close()


# ------------------------------------------------------------------------------- the trainer
def test_train_on_the_fly(pair, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_cli(_flags(pair, out)) == 0
    from fastxc import Crosscoder

    cc = Crosscoder.load(out / "crosscoder")
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["data"]["position"] == 40 and state["data"]["taken"] <= 40 * 32
    # the scales are the first fill's, kept in the model
    src = OnTheFlySource(_plan(pair, 40 * 32), "cpu", buffer_rows=256, tokens=40 * 32)
    it = src.stream(32, seed=0)
    want = scales_from_sums(it.first_fill_sums, it.first_fill_rows, src.plan.widths)
    it.close()
    src.close()
    assert cc.input_scale.tolist() == pytest.approx(want, rel=1e-6)
    s = json.loads((out / "summary.json").read_text())
    assert max(s["fvu"]) < 0.9  # measured 0.77 / 0.78 after 40 steps (untrained: 1.15)
    assert cc.source_names == ["a", "b"]


@pytest.mark.parametrize("extra, message", [
    (["--store", "x"], "either --store or --model-a"),
    (["--buffer-rows", "16"], "--buffer-rows 16 is smaller than the batch"),
    (["--tokens", "100"], "--tokens 100 is fewer than --steps x --batch-size"),
    (["--model-b", None], "one model gives one source"),
    (["--source", "synthetic"], "either --source synthetic or --model-a"),
    (["--dataset", "missing.jsonl:0.2"], "dataset file not found: missing.jsonl"),
])
def test_bad_input_one_error_line_nothing_written(pair, tmp_path, capsys, extra, message):
    flags = _flags(pair, tmp_path / "run", "--save-store", str(tmp_path / "store"))
    if extra[1] is None:  # drop the flag and its value
        i = flags.index(extra[0])
        del flags[i:i + 2]
    else:
        flags += extra
    assert train_cli(flags) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert list(tmp_path.iterdir()) == []


def test_harvest_flags_need_models(tmp_path, capsys):
    assert train_cli(["--source", "synthetic", "--dataset", "x.jsonl", "--out", str(tmp_path / "r")]) == 2
    assert "--dataset is for training straight from the models" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_save_store_is_the_harvest_store(pair, tmp_path):
    """--save-store writes, file for file, the bytes ``fastxc harvest`` writes for the same
    tokens (here more tokens than training reads, and several shards)."""
    assert train_cli(_flags(pair, tmp_path / "run", "--tokens", "1500", "--save-store", str(tmp_path / "otf"),
                            "--shard-tokens", "400")) == 0
    harvest([pair["a"], pair["b"]], tmp_path / "ref", [pair["ga"] + ":0.6", pair["gb"] + ":0.4"], 1500,
            context_length=16, batch_size=4, shard_tokens=400, progress=False)
    names = sorted(p.name for p in (tmp_path / "ref").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "otf").iterdir()) and "manifest.json" in names
    assert len([n for n in names if n.endswith(".acts")]) == 4
    for n in names:
        assert (tmp_path / "ref" / n).read_bytes() == (tmp_path / "otf" / n).read_bytes(), n
    assert len(open_store(tmp_path / "otf")) == 1500


def _weights(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "crosscoder" / "model.safetensors"))


def test_sigkill_and_resume_is_bit_identical(pair, tmp_path):
    """Killed just before its checkpoint of step 27 (the one of step 18, mid-round, on disk),
    resumed: the same weights as an uninterrupted run (the buffer rebuilt from the
    checkpoint's slots), and its --save-store store the same bytes as ``fastxc harvest``'s."""
    flags = _flags(pair, tmp_path / "ref", "--checkpoint-every", "9", "--steps", "50", "--tokens", "2400",
                   "--shard-tokens", "300")[:-2]
    assert train_cli([*flags, "--out", str(tmp_path / "ref")]) == 0
    out = tmp_path / "killed"
    kill_at_checkpoint([*flags, "--save-store", str(tmp_path / "store")], out, stop_at=27)
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 18
    assert not (tmp_path / "store" / "manifest.json").exists()
    assert train_cli([*flags, "--out", str(out), "--resume", "--save-store", str(tmp_path / "store")]) == 0
    ref, got = _weights(tmp_path / "ref"), _weights(out)
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    harvest([pair["a"], pair["b"]], tmp_path / "hv", [pair["ga"] + ":0.6", pair["gb"] + ":0.4"], 2400,
            context_length=16, batch_size=4, shard_tokens=300, progress=False)
    names = sorted(p.name for p in (tmp_path / "hv").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "store").iterdir())
    for n in names:
        assert (tmp_path / "hv" / n).read_bytes() == (tmp_path / "store" / n).read_bytes(), n
