"""Harvest rough edges (issue #16): bad dataset lines named or skipped, empty datasets, the
hub offline or unreachable, a harvest that runs out of data, and what a failed harvest leaves."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastxc.data import harvest as H
from fastxc.data import models as M
from fastxc.data.harvest import HarvestError
from fastxc.data.models import ModelError
from fastxc.data.store import StoreError, open_store

from test_harvest import WORDS_A, model_pair, write_jsonl


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Two tiny Llama models sharing a tokenizer, and a 60-document jsonl dataset."""
    root = tmp_path_factory.mktemp("pair")
    return {**model_pair(root), "ds": write_jsonl(root / "ds.jsonl", WORDS_A, 60, seed=0)}


def _with_bad_line(src: Path, dst: Path, line: int, bad: bytes = b'{"text": "the \xff cat"}') -> Path:
    """``src`` with line ``line`` (1-based) replaced by ``bad`` (not UTF-8)."""
    lines = src.read_bytes().split(b"\n")
    lines[line - 1] = bad
    dst.write_bytes(b"\n".join(lines))
    return dst


def _without_line(src: Path, dst: Path, line: int) -> Path:
    lines = src.read_bytes().split(b"\n")
    del lines[line - 1]
    dst.write_bytes(b"\n".join(lines))
    return dst


def _argv(pair, out, ds, tokens=200, *extra):
    return ["--model-a", pair["a"], "--model-b", pair["b"], "--dataset", str(ds), "--tokens", str(tokens),
            "--out", str(out), "--context-length", "16", "--batch-size", "4", "--shard-tokens", "64",
            "--no-progress", *extra]


def _shard_digests(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.glob("shard-*"))}


def _err_lines(capsys) -> list[str]:
    err = capsys.readouterr().err.strip().splitlines()
    return [l for l in err if l.startswith(("error:", "warning:", "Traceback"))]


# ------------------------------------------------------------------------- 1. a line that is not UTF-8
def test_bad_line_is_named_and_nothing_is_left_behind(tmp_path, pair, capsys):
    ds = _with_bad_line(pair["ds"], tmp_path / "data.jsonl", 2)
    out = tmp_path / "s"
    assert H.main(_argv(pair, out, ds)) == 2
    err = _err_lines(capsys)
    assert err == [f"error: dataset {ds}, line 2: not valid UTF-8 (byte 0xff at column 15); "
                   "fix the line or pass --skip-bad-lines"], err
    assert not out.exists()  # it failed before finishing a shard: no harvest-state.json, no folder
    # the same command after fixing the file simply runs
    ds.write_bytes(pair["ds"].read_bytes())
    assert H.main(_argv(pair, out, ds)) == 0
    assert len(open_store(out)) == 200
    # a folder that existed before is kept (empty), not removed
    (tmp_path / "pre").mkdir()
    _with_bad_line(pair["ds"], ds, 2)
    assert H.main(_argv(pair, tmp_path / "pre", ds)) == 2
    assert (tmp_path / "pre").is_dir() and not any((tmp_path / "pre").iterdir())


def test_text_and_json_array_files_name_the_bad_line(tmp_path, pair):
    txt = tmp_path / "d.txt"
    txt.write_bytes(b"the cat sat\nthe \xff dog\nred house\n")
    with pytest.raises(HarvestError, match=rf"dataset {txt}, line 2: not valid UTF-8 \(byte 0xff at column 5\)"):
        list(H.iter_texts(H.parse_dataset_specs([str(txt)])[0], "text"))
    # a .json file holding one JSON array goes through datasets; the line is found afterwards
    arr = tmp_path / "d.json"
    arr.write_bytes(b'[\n{"text": "the cat"},\n{"text": "a \xfe dog"}\n]\n')
    with pytest.raises(HarvestError, match=rf"dataset {arr}, line 3: not valid UTF-8 \(byte 0xfe at column 13\)"):
        H.check_dataset(H.parse_dataset_specs([str(arr)])[0], "text")


def test_a_harvest_stopped_by_a_bad_line_after_some_shards_continues(tmp_path, pair, capsys):
    """Shards already written are kept (and said so); rerun with --skip-bad-lines, the harvest
    continues to the store an uninterrupted --skip-bad-lines run writes."""
    ds = _with_bad_line(pair["ds"], tmp_path / "data.jsonl", 25)
    out = tmp_path / "s"
    assert H.main(_argv(pair, out, ds, 700)) == 2
    err = _err_lines(capsys)
    assert len(err) == 1 and f"{ds}, line 25" in err[0] and "finished shard(s) are kept" in err[0], err
    st = json.loads((out / H.STATE).read_text())
    assert len(st["shards"]) >= 2 and not (out / "manifest.json").exists()
    assert H.main(_argv(pair, out, ds, 700, "--skip-bad-lines")) == 0
    assert H.main(_argv(pair, tmp_path / "ref", ds, 700, "--skip-bad-lines")) == 0
    assert _shard_digests(out) == _shard_digests(tmp_path / "ref")
    assert (out / "manifest.json").read_bytes() == (tmp_path / "ref" / "manifest.json").read_bytes()


# -------------------------------------------------------------------------------- 2. --skip-bad-lines
def test_skip_bad_lines_counts_and_skips(tmp_path, pair, capsys):
    ds = _with_bad_line(pair["ds"], tmp_path / "data.jsonl", 6)
    _with_bad_line(ds, ds, 9, b'{"text": "not json')  # and one line that is not JSON
    out = tmp_path / "s"
    assert H.main(_argv(pair, out, ds, 300, "--skip-bad-lines")) == 0
    err = _err_lines(capsys)
    assert err == [f"warning: skipped 2 bad line(s) of {ds} (--skip-bad-lines)"], err
    m = open_store(out).manifest
    assert m["datasets"][0]["bad_lines_skipped"] == 2
    # the rows are those of the file without the two lines (document ids included)
    clean = _without_line(_without_line(pair["ds"], tmp_path / "clean.jsonl", 9), tmp_path / "clean.jsonl", 6)
    assert H.main(_argv(pair, tmp_path / "c", clean, 300)) == 0
    assert _shard_digests(out) == _shard_digests(tmp_path / "c")
    assert "bad_lines_skipped" not in open_store(tmp_path / "c").manifest["datasets"][0]
    # a text file: the bad line is skipped, the others are records
    txt = tmp_path / "d.txt"
    txt.write_bytes(b"the cat sat\nthe \xff dog\nred house\n")
    bad = H.BadLines()
    spec = H.parse_dataset_specs([str(txt)])[0]
    assert list(H.iter_texts(spec, "text", skip_bad_lines=True, bad=bad)) == [(0, "the cat sat"), (1, "red house")]
    assert (bad.count, bad.first) == (1, 2)


def test_line_reader_gives_the_records_datasets_gives(tmp_path):
    """Local .jsonl / .txt files are read line by line by fastxc; the records (and so the
    document ids and the store) are those ``datasets`` gives."""
    import datasets

    jl = tmp_path / "a.jsonl"
    jl.write_bytes(b'\xef\xbb\xbf{"text": "a b", "n": 1}\n\n{"text": "c"}\r\n  \n{"text": null}\n{"text": "d\\u00e9"}')
    tx = tmp_path / "a.txt"
    tx.write_bytes(b"l1\r\nl2\rl3\n\n\xc3\xa9 l5")
    for path, builder in ((jl, "json"), (tx, "text")):
        want = [r["text"] for r in datasets.load_dataset(builder, data_files=str(path), split="train", streaming=True)]
        got = [r.get("text") for r in H.load_text_dataset(str(path))]
        assert got == want, (path, got, want)


# ------------------------------------------------------------------------------------ 3. empty datasets
@pytest.mark.parametrize("name,content", [("empty.jsonl", b""), ("blank.jsonl", b"\n  \n"), ("empty.txt", b""),
                                          ("empty.parquet", b"")])
def test_empty_dataset_is_one_clear_line(tmp_path, pair, capsys, name, content):
    ds = tmp_path / name
    ds.write_bytes(content)
    assert H.main(_argv(pair, tmp_path / "s", ds)) == 2
    err = _err_lines(capsys)
    assert len(err) == 1 and err[0].startswith(f"error: dataset {ds} is empty"), err
    assert not (tmp_path / "s").exists()


# ------------------------------------------------------------------- 4. the hub offline or unreachable
@pytest.fixture
def no_retries(monkeypatch):
    """Fails the test if anything sleeps (huggingface_hub's retries back off with time.sleep):
    "at once" is checked as "no retry", not by a wall clock (machines are noisy)."""
    def sleep(seconds):
        raise AssertionError(f"slept {seconds} s: a retry")

    monkeypatch.setattr(time, "sleep", sleep)


def test_offline_hub_id_fails_at_once(monkeypatch, no_retries):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match=r"fastxc-no-org/no-model: HF_HUB_OFFLINE is set and fastxc-no-org/no-model "
                                         r"is not in the local Hugging Face cache"):
        M.load_tokenizer("fastxc-no-org/no-model")
    with pytest.raises(HarvestError, match=r"cannot load dataset fastxc-no-org/no-data: HF_HUB_OFFLINE is set"):
        H.check_dataset(H.parse_dataset_specs(["fastxc-no-org/no-data"])[0], "text")


def test_unreachable_hub_fails_at_once(monkeypatch, no_retries):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on port 9
    probes = []
    real_probe = M.hub_unreachable
    monkeypatch.setattr(M, "hub_unreachable", lambda *a, **kw: probes.append(1) or real_probe(*a, **kw))
    monkeypatch.setattr(M, "_hub_probes", {})
    with pytest.raises(ModelError, match=r"the Hugging Face hub at http://127.0.0.1:9 is unreachable \(.*\) and "
                                         r"fastxc-no-org/no-model is not in the local Hugging Face cache"):
        M.load_config("fastxc-no-org/no-model")
    with pytest.raises(HarvestError, match=r"dataset fastxc-no-org/no-data: the Hugging Face hub at "
                                           r"http://127.0.0.1:9 is unreachable"):
        H.check_dataset(H.parse_dataset_specs(["fastxc-no-org/no-data"])[0], "text")
    assert len(probes) == 2 and len(M._hub_probes) == 1  # one probe per endpoint, then the answer is kept


def test_unreachable_hub_cli(tmp_path, pair):
    """``HF_ENDPOINT`` pointing nowhere: the harvest command fails without a retry (it used to
    retry for 52 s; every time.sleep of the process is summed and must be 0), one error line."""
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "OMP_NUM_THREADS": "1"}
    env.pop("HF_HUB_OFFLINE", None)
    code = ("import sys, time; slept = []; real = time.sleep; "
            "time.sleep = lambda s: slept.append(s) or real(s); "
            "from fastxc.data import harvest as H; rc = H.main(sys.argv[1:]); "
            "print(f'slept {sum(slept):.2f}', file=sys.stderr); sys.exit(rc)")
    argv = ["--model-a", "fastxc-no-org/no-model", "--model-b", pair["b"], "--dataset", str(pair["ds"]),
            "--tokens", "10", "--out", str(tmp_path / "s"), "--no-progress"]
    p = subprocess.run([sys.executable, "-c", code, *argv], env=env, capture_output=True, text=True, timeout=120,
                       cwd=Path(__file__).resolve().parents[1])  # the repository root: fastxc importable
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 2, p.stderr
    assert lines[0].startswith("error: cannot load the tokenizer of fastxc-no-org/no-model: the Hugging Face hub at "
                               "http://127.0.0.1:9 is unreachable")
    assert lines[1] == "slept 0.00", lines
    assert not (tmp_path / "s").exists()


# ------------------------------------------------------------------------ 5. a harvest that runs short
def test_running_out_of_data_is_an_error_unless_allowed(tmp_path, pair, capsys):
    out = tmp_path / "s"
    assert H.main(_argv(pair, out, pair["ds"], 5000)) == 2
    err = _err_lines(capsys)
    assert len(err) == 1 and err[0].startswith("error: harvested ") and " of 5000 requested tokens: " in err[0], err
    assert f"{pair['ds']} ran out" in err[0] and "--allow-short" in err[0]
    with pytest.raises(StoreError, match="manifest.json is missing"):  # never looks complete
        open_store(out)
    shards = _shard_digests(out)
    assert shards
    # the same command again: the same error (the data is still short)
    assert H.main(_argv(pair, out, pair["ds"], 5000)) == 2
    capsys.readouterr()
    # --allow-short finishes the folder from the shards already written
    assert H.main(_argv(pair, out, pair["ds"], 5000, "--allow-short")) == 0
    err = _err_lines(capsys)
    assert len(err) == 1 and err[0].startswith("warning: harvested ") and "of 5000 requested tokens" in err[0], err
    r = open_store(out)
    r.validate(checksums=True)
    assert _shard_digests(out) == shards
    assert r.manifest["short"] == {"requested_tokens": 5000, "harvested_tokens": len(r),
                                   "exhausted_datasets": [str(pair["ds"])]}
    # an uninterrupted --allow-short run writes the same store
    assert H.main(_argv(pair, tmp_path / "ref", pair["ds"], 5000, "--allow-short")) == 0
    assert (out / "manifest.json").read_bytes() == (tmp_path / "ref" / "manifest.json").read_bytes()


# ------------------------------------------------------------------------------------ --overwrite
def test_overwrite_replaces_an_unfinished_harvest_with_other_settings(tmp_path, pair, capsys):
    out = tmp_path / "s"
    assert H.main(_argv(pair, out, pair["ds"], 5000)) == 2  # short: left unfinished
    assert (out / H.STATE).exists()
    capsys.readouterr()
    assert H.main(_argv(pair, out, pair["ds"], 300)) == 2
    assert "holds an unfinished harvest with other settings" in capsys.readouterr().err
    assert H.main(_argv(pair, out, pair["ds"], 300, "--overwrite")) == 0
    assert len(open_store(out)) == 300 and not (out / H.STATE).exists()
    assert H.main(_argv(pair, tmp_path / "ref", pair["ds"], 300)) == 0
    assert _shard_digests(out) == _shard_digests(tmp_path / "ref")
    # --overwrite redoes even a finished store with the same settings (the data may have changed)
    ds2 = tmp_path / "other.jsonl"
    ds2.write_bytes(pair["ds"].read_bytes())
    assert H.main(_argv(pair, out, pair["ds"], 300, "--overwrite")) == 0
    assert _shard_digests(out) == _shard_digests(tmp_path / "ref")
