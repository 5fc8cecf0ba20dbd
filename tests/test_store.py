"""The activation store: format, round trip per dtype, normalisation, shuffled batches, errors."""
import errno
import json
import math

import numpy as np
import pytest
import torch

from fastxc import _C
from fastxc.data import store as S
from fastxc.data.store import StoreError, StoreNotFoundError, open_store, write_store

DTYPES = ["bfloat16", "float16", "float32", "float8_e4m3fn"]


def _ref_stored(x: torch.Tensor, dtype: str, offsets) -> torch.Tensor:
    """What the store must give back for float rows x [R, D], computed with torch alone."""
    if dtype in ("bfloat16", "float16", "float32"):
        return x.to(getattr(torch, dtype)).float()
    out = torch.empty_like(x)
    for lo, hi in zip(offsets[:-1], offsets[1:]):
        seg = x[:, lo:hi]
        s = seg.abs().amax(1, keepdim=True) / 448.0
        s = torch.where(s > 0, s, torch.ones_like(s))
        out[:, lo:hi] = (seg / s).to(torch.float8_e4m3fn).float() * s
    return out


@pytest.fixture
def acts():
    # 3 shards of 100 + a last one of 37 rows; sources with different norms
    x = torch.randn(337, 2, 24)
    x[:, 1] *= 7.0
    return x


# ---------------------------------------------------------------- round trip and normalisation
@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_per_dtype(tmp_path, acts, dtype):
    write_store(tmp_path / "s", acts, dtype=dtype, shard_rows=100)
    r = open_store(tmp_path / "s")
    assert len(r) == 337 and r.n_sources == 2 and r.widths == [24, 24] and r.dtype == dtype
    assert len(r.manifest["shards"]) == 4
    got = r.read_rows(np.arange(337), normalise=False)
    assert got.shape == (337, 2, 24) and got.dtype == torch.float32
    want = _ref_stored(acts.reshape(337, 48), dtype, [0, 24, 48]).reshape(337, 2, 24)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_normalisation_scales(tmp_path, acts, dtype):
    write_store(tmp_path / "s", acts, dtype=dtype, shard_rows=100)
    r = open_store(tmp_path / "s")
    x = r.read_rows(np.arange(len(r)))
    mean_norm = x.double().norm(dim=-1).mean(0)
    # float32 scales and float32 products: agreement to a few ulp of sqrt(24)
    torch.testing.assert_close(mean_norm, torch.full((2,), math.sqrt(24), dtype=torch.float64), rtol=2e-6, atol=0)
    raw = r.read_rows(np.arange(len(r)), normalise=False)
    # fp8 multiplies value * (col_scale * row_scale) vs (value * row_scale) * col_scale here: 1 ulp
    rtol = 2.4e-7 if dtype == "float8_e4m3fn" else 0
    torch.testing.assert_close(x, raw * torch.from_numpy(r.scales)[None, :, None], rtol=rtol, atol=0)
    assert r.scales.dtype == np.float32 and r.scales[1] < r.scales[0] / 5  # the 7x louder source


def test_unequal_widths_list_input(tmp_path):
    a, b = torch.randn(50, 7), torch.randn(50, 13) * 3
    write_store(tmp_path / "u", [a, b], source_names=["small", "big"], dtype="float32", shard_rows=16)
    r = open_store(tmp_path / "u")
    assert r.widths == [7, 13] and r.source_names == ["small", "big"]
    x = r.read_rows([3, 0, 49], normalise=False)
    assert x.shape == (3, 20)
    torch.testing.assert_close(x, torch.cat([a, b], 1)[[3, 0, 49]], rtol=0, atol=0)
    b0 = next(iter(r.batches(8, prefetch=0)))
    assert b0.shape == (8, 20)
    n = r.read_rows(np.arange(50))
    torch.testing.assert_close(n[:, :7].double().norm(dim=1).mean(), torch.tensor(math.sqrt(7), dtype=torch.float64),
                               rtol=2e-6, atol=0)
    torch.testing.assert_close(n[:, 7:].double().norm(dim=1).mean(), torch.tensor(math.sqrt(13), dtype=torch.float64),
                               rtol=2e-6, atol=0)


@pytest.mark.parametrize("kind", ["numpy16", "numpy32", "bf16", "fp16"])
def test_input_types(tmp_path, kind):
    x = torch.randn(20, 2, 8)
    inp = {"numpy16": x.numpy().astype(np.float16), "numpy32": x.numpy(), "bf16": x.bfloat16(),
           "fp16": x.half()}[kind]
    write_store(tmp_path / "s", inp, dtype="float32")
    got = open_store(tmp_path / "s").read_rows(np.arange(20), normalise=False)
    want = torch.as_tensor(np.asarray(inp, dtype=np.float32)) if kind.startswith("numpy") else inp.float()
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_tokens_and_manifest(tmp_path, acts):
    toks = np.arange(337) * 3 % 101
    write_store(tmp_path / "s", acts, tokens=toks, source_names=["base", "chat"], shard_rows=100,
                sources=[{"model": "m/a", "layer": 3}, {"model": "m/b", "layer": 3}], seed=7)
    r = open_store(tmp_path / "s")
    assert r.tokens.dtype == np.int32 and np.array_equal(r.tokens, toks)
    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert m["format"] == "fastxc-store" and m["version"] == S.FORMAT_VERSION and m["n_tokens"] == 337
    assert [s["name"] for s in m["sources"]] == ["base", "chat"]
    assert m["sources"][0]["model"] == "m/a" and m["sources"][1]["layer"] == 3 and m["seed"] == 7
    for rec in m["shards"]:
        for f in rec["files"].values():
            p = tmp_path / "s" / f["path"]
            assert p.stat().st_size == f["bytes"] and S.sha256_file(p) == f["sha256"]
    write_store(tmp_path / "n", acts)
    assert open_store(tmp_path / "n").tokens is None


# ------------------------------------------------------------------------------ shuffled batches
@pytest.mark.parametrize("n", [1, 2, 3, 5, 64, 1000, 4099])
def test_permute_is_a_bijection(n):
    for key in (0, 1, 2**63 + 5):
        p = S.permute(np.arange(n, dtype=np.int64), n, key)
        assert np.array_equal(np.sort(p), np.arange(n))


@pytest.mark.parametrize("n", [1, 2, 3, 37, 1 << 20, 3_000_001, (1 << 40) + 7])
def test_permute_cpp_equals_numpy_reference(n):
    """The C++ shuffle gives the very ids of the numpy reference (stores and checkpoints
    written with either read the same batches)."""
    idx = np.random.default_rng(n % 1000).integers(0, n, size=3000) if n > 1 else np.zeros(4, np.int64)
    for key in (0, 1, 2**63 + 5, 2**64 - 1):
        assert np.array_equal(S.permute(idx, n, key), S.permute_reference(idx, n, key))
    with pytest.raises(IndexError):
        S.permute(np.array([n], dtype=np.int64), n, 0)


def test_batches_deterministic_resumable_and_global(tmp_path):
    x = torch.randn(1000, 2, 4)
    write_store(tmp_path / "s", x, dtype="float32", shard_rows=100)
    r = open_store(tmp_path / "s")
    B = 64
    it = r.batches(B, seed=3)
    first = [next(it) for _ in range(20)]  # 1280 rows: crosses the epoch boundary at 1000
    assert it.position == 20
    it.close()
    again = r.batches(B, seed=3, prefetch=0)
    for k in range(20):
        torch.testing.assert_close(next(again), first[k], rtol=0, atol=0)
    resumed = r.batches(B, seed=3, start=13)
    for k in range(13, 20):
        torch.testing.assert_close(next(resumed), first[k], rtol=0, atol=0)
    resumed.close()
    assert not r.readahead  # a 32 KiB store stays in the page cache: no madvise per row
    r.readahead = True  # the path a store larger than RAM takes reads the same batches
    ahead = r.batches(B, seed=3)
    for k in range(20):
        torch.testing.assert_close(next(ahead), first[k], rtol=0, atol=0)
    ahead.close()
    other = next(iter(r.batches(B, seed=4, prefetch=0)))
    assert not torch.equal(other, first[0])
    # batch content is exactly the rows batch_rows names
    rows = r.batch_rows(B, 3, 5)
    torch.testing.assert_close(first[5], r.read_rows(rows), rtol=0, atol=0)
    # one epoch visits every row once; batches draw from many shards (shuffled across shards)
    first_epoch = np.concatenate([r.batch_rows(100, 3, i) for i in range(10)])
    assert np.array_equal(np.sort(first_epoch), np.arange(1000))
    assert len(np.unique(r.locate(r.batch_rows(B, 3, 0))[0])) == 10


def test_batches_bad_args(tmp_path):
    write_store(tmp_path / "s", torch.randn(10, 2, 4))
    r = open_store(tmp_path / "s")
    with pytest.raises(StoreError, match="batch_size"):
        r.batches(0)
    with pytest.raises(StoreError, match="start"):
        r.batches(4, start=-1)
    with pytest.raises(IndexError):
        r.read_rows([10])


def test_iterator_dropped_stops_thread(tmp_path):
    import gc
    import threading

    write_store(tmp_path / "s", torch.randn(100, 2, 4))
    r = open_store(tmp_path / "s")
    before = threading.active_count()
    it = r.batches(8)
    next(it)
    del it
    gc.collect()
    for _ in range(100):
        if threading.active_count() == before:
            break
        threading.Event().wait(0.05)
    assert threading.active_count() == before


# -------------------------------------------------------------------------------------- errors
def test_missing_path(tmp_path):
    with pytest.raises(StoreNotFoundError, match="nope"):
        open_store(tmp_path / "nope")
    with pytest.raises(FileNotFoundError):
        open_store(tmp_path / "nope")
    with pytest.raises(ValueError):
        open_store(tmp_path / "nope")


def test_no_manifest(tmp_path):
    (tmp_path / "s").mkdir()
    with pytest.raises(StoreError, match="manifest.json is missing"):
        open_store(tmp_path / "s")


def test_version_mismatch(tmp_path):
    write_store(tmp_path / "s", torch.randn(10, 2, 4))
    mp = tmp_path / "s" / "manifest.json"
    m = json.loads(mp.read_text())
    m["version"] = 99
    mp.write_text(json.dumps(m))
    with pytest.raises(StoreError, match=r"manifest.json: store format version 99"):
        open_store(tmp_path / "s")
    mp.write_text("{not json")
    with pytest.raises(StoreError, match="not valid JSON"):
        open_store(tmp_path / "s")


def test_truncated_shard(tmp_path):
    write_store(tmp_path / "s", torch.randn(300, 2, 4), shard_rows=100)
    p = tmp_path / "s" / "shard-00001.acts"
    with open(p, "r+b") as f:
        f.truncate(p.stat().st_size - 2)
    with pytest.raises(StoreError, match=r"shard-00001\.acts .*truncated"):
        open_store(tmp_path / "s")
    p.unlink()
    with pytest.raises(StoreNotFoundError, match=r"shard-00001\.acts"):
        open_store(tmp_path / "s")


def test_corrupted_shard_checksum(tmp_path):
    write_store(tmp_path / "s", torch.randn(300, 2, 4), tokens=np.arange(300), shard_rows=100)
    for name in ("shard-00002.acts", "shard-00000.tokens"):
        p = tmp_path / "s" / name
        orig = p.read_bytes()
        b = bytearray(orig)
        b[5] ^= 0xFF
        p.write_bytes(bytes(b))
        r = open_store(tmp_path / "s")  # same size: only the checksum can tell
        r.validate(checksums=False)
        with pytest.raises(StoreError, match=f"checksum mismatch in .*{name}"):
            r.validate(checksums=True)
        p.write_bytes(orig)
        open_store(tmp_path / "s").validate(checksums=True)


def test_empty_store(tmp_path):
    with pytest.raises(StoreError, match="empty store"):
        write_store(tmp_path / "e", torch.randn(0, 2, 4))
    assert not (tmp_path / "e" / "manifest.json").exists()
    write_store(tmp_path / "s", torch.randn(10, 2, 4))
    mp = tmp_path / "s" / "manifest.json"
    m = json.loads(mp.read_text())
    m["shards"], m["n_rows"] = [], 0
    mp.write_text(json.dumps(m))
    with pytest.raises(StoreError, match="empty"):
        open_store(tmp_path / "s")


def test_bad_inputs(tmp_path):
    with pytest.raises(StoreError, match="unknown store dtype"):
        write_store(tmp_path / "a", torch.randn(4, 2, 3), dtype="int8")
    with pytest.raises(StoreError, match="row count"):
        write_store(tmp_path / "a", [torch.randn(4, 3), torch.randn(5, 3)])
    with pytest.raises(StoreError, match=r"\[N, n_sources, d\]"):
        write_store(tmp_path / "a", torch.randn(4, 3))
    with pytest.raises(StoreError, match="floating point"):
        write_store(tmp_path / "a", torch.ones(4, 2, 3, dtype=torch.int64))
    with pytest.raises(StoreError, match="tokens must have shape"):
        write_store(tmp_path / "a", torch.randn(4, 2, 3), tokens=np.arange(3))
    with pytest.raises(StoreError, match="source_names"):
        write_store(tmp_path / "a", torch.randn(4, 2, 3), source_names=["x"])
    write_store(tmp_path / "a", torch.randn(4, 2, 3))
    with pytest.raises(StoreError, match="already exists"):
        write_store(tmp_path / "a", torch.randn(4, 2, 3))
    x = torch.randn(6, 2, 3)
    write_store(tmp_path / "a", x, overwrite=True, dtype="float32")
    torch.testing.assert_close(open_store(tmp_path / "a").read_rows(range(6), normalise=False), x, rtol=0, atol=0)


def test_disk_full_leaves_consistent_directory(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = S._write_chunks

    def full_on_third(f, chunks):
        calls["n"] += 1
        if calls["n"] == 3:
            f.write(bytes(chunks[0])[:7])  # a partial write, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        real(f, chunks)

    monkeypatch.setattr(S, "_write_chunks", full_on_third)
    with pytest.raises(StoreError, match=r"disk full while writing .*shard-00002\.acts"):
        write_store(tmp_path / "s", torch.randn(500, 2, 4), shard_rows=100)
    names = sorted(p.name for p in (tmp_path / "s").iterdir())
    assert names == ["shard-00000.acts", "shard-00001.acts"]  # no temporary, no partial file
    with pytest.raises(StoreError, match="manifest.json is missing"):
        open_store(tmp_path / "s")


# -------------------------------------------------------------------------- the C++ gather itself
def test_cpp_decoders_match_torch_bitwise():
    f16 = np.arange(65536, dtype=np.uint32).astype(np.uint16)[:, None]
    rows = np.arange(65536, dtype=np.int64)
    out = np.empty((65536, 1), np.float32)
    _C.gather_rows(f16, rows, out, "float16", np.empty(0, np.float32))
    want = torch.from_numpy(f16.view(np.int16)).view(torch.float16).float().numpy()
    np.testing.assert_array_equal(out, want)  # NaN == NaN here, at the same positions
    _C.gather_rows(f16, rows, out, "bfloat16", np.empty(0, np.float32))
    want = torch.from_numpy(f16.view(np.int16)).view(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(out, want)
    f8 = np.arange(256, dtype=np.uint8)[:, None]
    out8 = np.empty((256, 1), np.float32)
    _C.gather_rows(f8, np.arange(256, dtype=np.int64), out8, "float8_e4m3fn", np.empty(0, np.float32),
                   row_scale=np.ones((256, 1), np.float32))
    want8 = torch.from_numpy(f8).view(torch.float8_e4m3fn).float().numpy()
    np.testing.assert_array_equal(out8, want8)


def test_cpp_gather_scales_and_errors():
    src = np.random.randn(10, 5).astype(np.float32)
    out = np.empty((3, 5), np.float32)
    col = np.arange(1, 6, dtype=np.float32)
    _C.gather_rows(src, np.array([9, 0, 4]), out, "float32", col)
    np.testing.assert_array_equal(out, src[[9, 0, 4]] * col)
    rs = np.random.rand(10, 2).astype(np.float32)
    q = np.random.randint(0, 120, size=(10, 5)).astype(np.uint8)
    _C.gather_rows(q, np.array([2, 7, 2]), out, "float8_e4m3fn", col, row_scale=rs,
                   seg_offsets=np.array([0, 2, 5]))
    dec = torch.from_numpy(q).view(torch.float8_e4m3fn).float().numpy()
    want = dec[[2, 7, 2]] * col * np.concatenate([np.repeat(rs[[2, 7, 2], :1], 2, 1), np.repeat(rs[[2, 7, 2], 1:], 3, 1)], 1)
    np.testing.assert_allclose(out, want, rtol=1e-7, atol=0)
    with pytest.raises(IndexError):
        _C.gather_rows(src, np.array([10]), np.empty((1, 5), np.float32), "float32", col)
    with pytest.raises(ValueError, match="dtype"):
        _C.gather_rows(src, np.array([1]), np.empty((1, 5), np.float32), "int8", col)
    with pytest.raises(ValueError, match="out must be"):
        _C.gather_rows(src, np.array([1]), np.empty((2, 5), np.float32), "float32", col)
    with pytest.raises(ValueError, match="row_scale"):
        _C.gather_rows(q, np.array([1]), np.empty((1, 5), np.float32), "float8_e4m3fn", col)
    with pytest.raises(IndexError):
        _C.gather_shards([src, src], np.array([2], np.int32), np.array([0]), np.empty((1, 5), np.float32),
                         "float32", col)


def test_cpp_gather_shards_with_one_thread_equals_the_team(monkeypatch):
    """The prefetch thread gathers with one OpenMP thread (store.PREFETCH_GATHER_THREADS): the
    same rows, bit for bit, as the full team; and the prefetched batches are the synchronous ones."""
    a, b = np.random.randn(300, 7).astype(np.float32), np.random.randn(200, 7).astype(np.float32)
    ids = np.random.randint(0, 2, 1000).astype(np.int32)
    rows = np.where(ids == 0, np.random.randint(0, 300, 1000), np.random.randint(0, 200, 1000))
    col = np.random.rand(7).astype(np.float32)
    outs = []
    for threads in (0, 1, 3):
        out = np.empty((1000, 7), np.float32)
        _C.gather_shards([a, b], ids, rows, out, "float32", col, threads=threads)
        outs.append(out)
    np.testing.assert_array_equal(outs[0], np.where((ids == 0)[:, None], a[rows.clip(max=299)], b[rows.clip(max=199)]) * col)
    np.testing.assert_array_equal(outs[1], outs[0])
    np.testing.assert_array_equal(outs[2], outs[0])


def test_many_shards_raise_open_file_limit(tmp_path):
    resource = pytest.importorskip("resource")
    write_store(tmp_path / "s", torch.randn(120, 2, 4), shard_rows=1)  # 120 shard files
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 120 + 256:
        pytest.skip(f"hard open-file limit {hard} too low for this test")
    resource.setrlimit(resource.RLIMIT_NOFILE, (100, hard))
    try:
        r = open_store(tmp_path / "s")
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] >= 120 + 256
        assert r.read_rows(np.arange(120)).shape == (120, 2, 4)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
