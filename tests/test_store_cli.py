"""``python -m fastxc.store info|validate [--checksums] DIR`` and ``fastxc.data.store.verify_checksums``."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fastxc.cli import main as fastxc_main
from fastxc.data.store import StoreError, open_store, verify_checksums, write_store
from fastxc.store.__main__ import main as store_main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def store(tmp_path) -> Path:
    """3 shards of 100 rows, two 4-wide sources of different loudness, tokens kept."""
    x = torch.randn(300, 2, 4, generator=torch.Generator().manual_seed(0))
    x[:, 1] *= 5
    return write_store(tmp_path / "s", x, tokens=np.arange(300), shard_rows=100, source_names=["base", "tuned"],
                       sources=[{"model": "org/base", "layer": 3}, {"model": "org/tuned", "layer": 3}])


def _run(capsys, *argv):
    rc = store_main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _flip_byte(path: Path, at: int = 5) -> None:
    b = bytearray(path.read_bytes())
    b[at] ^= 0xFF
    path.write_bytes(bytes(b))


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_info_json_reports_the_manifest(store, capsys):
    rc, out, err = _run(capsys, "info", "--json", store)
    assert rc == 0, err
    info = json.loads(out)
    r = open_store(store)
    assert info["rows"] == 300 and info["n_sources"] == 2 and info["widths"] == [4, 4]
    assert info["dtype"] == "bfloat16" and info["shards"] == 3 and info["rows_per_shard"] == 100
    assert info["shard_files"] == 6 and info["side_arrays"] == ["tokens"]
    assert [s["name"] for s in info["sources"]] == ["base", "tuned"]
    assert [s["model"] for s in info["sources"]] == ["org/base", "org/tuned"]
    assert np.allclose([s["scale"] for s in info["sources"]], r.scales, rtol=1e-7)
    assert info["sources"][1]["scale"] < info["sources"][0]["scale"] / 3  # the 5x louder source
    assert info["bytes"] == sum(p.stat().st_size for p in store.iterdir())  # size on disk, manifest included


def test_info_text(store, capsys):
    rc, out, err = _run(capsys, "info", store)
    assert rc == 0, err
    assert "rows      300" in out and "widths [4, 4]" in out and "bfloat16" in out
    assert "3 (up to 100 rows each)" in out
    scale = open_store(store).scales[1]
    assert f"[1] tuned: width 4, scale {scale:.6g}" in out and "model org/tuned, layer 3" in out
    assert f"({sum(p.stat().st_size for p in store.iterdir())} bytes" in out


def test_validate_ok_with_progress_bar(store, capsys):
    rc, out, err = _run(capsys, "validate", store)
    assert rc == 0 and out.startswith("ok: ") and "sizes match" in out and err == ""
    rc, out, err = _run(capsys, "validate", "--checksums", store)
    assert rc == 0 and "6 checksums" in out
    assert "checksums" in err and "100%" in err  # the tqdm bar, on stderr
    rc, out, err = _run(capsys, "validate", "--checksums", "--no-progress", store)
    assert rc == 0 and err == ""


def test_validate_finds_a_corrupted_byte(store, capsys):
    _flip_byte(store / "shard-00001.acts")
    rc, out, err = _run(capsys, "validate", store)  # same size: only the checksum can tell
    assert rc == 0
    rc, out, err = _run(capsys, "validate", "--checksums", "--no-progress", store)
    line = _one_error_line(err)
    assert rc == 2 and out == ""
    assert line.startswith("error: checksum mismatch in ") and "shard-00001.acts (shard 1)" in line


def test_validate_finds_a_truncated_or_missing_shard(store, capsys):
    p = store / "shard-00002.tokens"
    with open(p, "r+b") as f:
        f.truncate(p.stat().st_size - 4)
    for cmd in ("validate", "info"):  # the structure is checked on open: no --checksums needed
        rc, out, err = _run(capsys, cmd, store)
        assert rc == 2 and "shard-00002.tokens" in _one_error_line(err) and "truncated" in err
    p.unlink()
    rc, out, err = _run(capsys, "validate", store)
    assert rc == 2 and "shard file missing" in _one_error_line(err)


def test_not_a_store(tmp_path, capsys):
    rc, _, err = _run(capsys, "info", tmp_path / "nope")
    assert rc == 2 and _one_error_line(err) == f"error: store not found: {tmp_path / 'nope'}"
    rc, _, err = _run(capsys, "validate", tmp_path)
    assert rc == 2 and "manifest.json is missing" in _one_error_line(err)


def test_bad_flags(store, capsys):
    for argv in (["info", "--checksums", str(store)], ["validate", "--json", str(store)], ["check", str(store)],
                 ["validate", "--checksum", str(store)]):
        with pytest.raises(SystemExit) as e:
            store_main(argv)
        assert e.value.code == 2
        assert _one_error_line(capsys.readouterr().err)


def test_verify_checksums_function(store):
    """The library call the trainer's --verify-store uses."""
    assert verify_checksums(store, progress=False) == 6
    assert verify_checksums(open_store(store), progress=False) == 6  # an open reader works too
    _flip_byte(store / "shard-00002.tokens", at=0)
    with pytest.raises(StoreError, match=r"checksum mismatch in .*shard-00002\.tokens \(shard 2\)"):
        verify_checksums(store, progress=False)


def test_fastxc_store_subcommand_and_module_entry(store, capsys):
    assert fastxc_main(["store", "validate", str(store)]) == 0
    assert capsys.readouterr().out.startswith("ok: ")
    _flip_byte(store / "shard-00000.acts")
    p = subprocess.run([sys.executable, "-m", "fastxc.store", "validate", "--checksums", str(store)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stdout == ""
    assert "shard-00000.acts (shard 0)" in _one_error_line(p.stderr)
