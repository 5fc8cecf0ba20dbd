"""Shuffled batch reads from a page-cached activation store (issue 4 target: >= 3x numpy).

    pytest bench/bench_store.py --benchmark-only --benchmark-group-by=group

The store (2 sources x 512, bf16 on disk, 2**20 rows = 2 GiB in 16 shards; and the same rows
as fp8 e4m3 with per-row scales, 1 GiB, for the fp8 group) is written once per module into a
temporary folder, read once so the page cache holds it, and deleted at the end. Every provider reads the same batches (B = 4096 rows, fp32 out, normalised):

- ``numpy``: the plain way: per shard, ``memmap[sorted local rows]`` (numpy fancy indexing),
  concatenate, then ``torch.from_numpy(...).view(bfloat16).float() * scale``.
- ``fastxc``: ``reader._gather(rows)``: one ``fastxc._C.gather_shards`` call (OpenMP, GIL
  released) that gathers, converts and scales in one pass.
- ``fastxc-prefetch``: ``next(reader.batches(...))``: what the trainer sees with the background
  prefetch thread; when nothing else runs this is the gather rate plus the queue hand-off.
"""
import shutil

import numpy as np
import pytest
import torch

from fastxc import _C
from fastxc.data import store as S

B = 4096
WIDTH = 512
ROWS = 1 << 20  # x 2 sources x 512 x 2 bytes = 2 GiB
SHARD_ROWS = 1 << 16


def _make_store(tmp_path_factory, dtype):
    path = tmp_path_factory.mktemp("bench_store") / "s"
    path.mkdir()
    writer = S.ShardWriter(path, [WIDTH, WIDTH], dtype)
    g = torch.Generator().manual_seed(0)
    shards = []
    for k in range(ROWS // SHARD_ROWS):
        x = torch.randn(SHARD_ROWS, 2 * WIDTH, generator=g)
        x[:, WIDTH:] *= 3.0
        shards.append(writer.write_shard(k, x))
    m = S.build_manifest(widths=[WIDTH, WIDTH], dtype=dtype, shards=shards, sources=[{}, {}])
    S.atomic_write_json(path / S.MANIFEST, m)
    for p in path.iterdir():  # into the page cache
        with open(p, "rb") as f:
            while f.read(1 << 24):
                pass
    return path


@pytest.fixture(scope="module")
def big_store(tmp_path_factory):
    """A 2 GiB bf16 store, created once for the module and deleted afterwards."""
    path = _make_store(tmp_path_factory, "bfloat16")
    yield S.open_store(path)
    shutil.rmtree(path)


@pytest.fixture(scope="module")
def big_store_fp8(tmp_path_factory):
    """The same rows as fp8 e4m3 + per-row scales: 1 GiB + 8 MiB."""
    path = _make_store(tmp_path_factory, "float8_e4m3fn")
    yield S.open_store(path)
    shutil.rmtree(path)


def _numpy_gather(reader: S.StoreReader, rows: np.ndarray) -> torch.Tensor:
    shard, local = reader.locate(rows)
    parts, scales = [], []
    for s in np.unique(shard):
        parts.append(reader._shards[s].acts[local[shard == s]])  # fancy indexing on the memmap
        if reader.dtype == "float8_e4m3fn":
            scales.append(reader._shards[s].rscale[local[shard == s]])
    raw = np.concatenate(parts)
    if reader.dtype == "float8_e4m3fn":
        x = torch.from_numpy(raw).view(torch.float8_e4m3fn).float()
        rs = torch.from_numpy(np.concatenate(scales)).repeat_interleave(WIDTH, dim=1)
        return x * rs * torch.from_numpy(reader._col_scale)
    x = torch.from_numpy(raw.view(np.int16)).view(torch.bfloat16).float()
    return x * torch.from_numpy(reader._col_scale)


@pytest.mark.benchmark(group="store-shuffled-read-B4096-2x512-bf16")
@pytest.mark.parametrize("provider", ["numpy", "fastxc", "fastxc-prefetch"])
def test_shuffled_batch_read(benchmark, big_store, provider):
    r = big_store
    _run_read(benchmark, r, provider)


@pytest.mark.benchmark(group="store-shuffled-read-B4096-2x512-fp8")
@pytest.mark.parametrize("provider", ["numpy", "fastxc", "fastxc-prefetch"])
def test_shuffled_batch_read_fp8(benchmark, big_store_fp8, provider):
    _run_read(benchmark, big_store_fp8, provider)


def _run_read(benchmark, r, provider):
    counter = {"i": 0}
    ref = _numpy_gather(r, r.batch_rows(B, 0, 0))
    # same values out (fp8: the C++ path multiplies value * (col * row scale), numpy
    # (value * row) * col: 1 ulp apart)
    torch.testing.assert_close(r._gather(r.batch_rows(B, 0, 0)), ref, rtol=2.4e-7 if r.dtype != "bfloat16" else 0,
                               atol=0)

    if provider == "numpy":
        def run():
            counter["i"] += 1
            return _numpy_gather(r, r.batch_rows(B, 0, counter["i"]))
    elif provider == "fastxc":
        def run():
            counter["i"] += 1
            return r._gather(r.batch_rows(B, 0, counter["i"]))
    else:
        it = r.batches(B, seed=0, prefetch=2)
        next(it)

        def run():
            return next(it)

    benchmark.pedantic(run, rounds=30, iterations=1, warmup_rounds=3)
    if provider == "fastxc-prefetch":
        it.close()
    st = benchmark.stats.stats
    row_bytes = 2 * WIDTH * (1 if r.dtype == "float8_e4m3fn" else 2) + (8 if r.dtype == "float8_e4m3fn" else 0)
    benchmark.extra_info.update({
        "store_gib": round(len(r) * row_bytes / 2**30, 2), "dtype": r.dtype, "batch": B,
        "omp_threads": _C.num_threads(), "rows_per_s": round(B / st.mean),
        "gb_per_s_read": round(B * row_bytes / st.mean / 1e9, 2),
    })
