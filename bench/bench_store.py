"""Shuffled batch reads from a page-cached activation store (issue 4 target: >= 3x numpy).

    pytest bench/bench_store.py --benchmark-only --benchmark-group-by=group

The store (2 sources x 512, bf16 on disk, 2**20 rows = 2 GiB in 16 shards) is written once
per module into a temporary folder, read once so the page cache holds it, and deleted at the
end. Every provider reads the same batches (B = 4096 rows, fp32 out, normalised):

- ``numpy``: the plain way: per shard, ``memmap[sorted local rows]`` (numpy fancy indexing),
  concatenate, then ``torch.from_numpy(...).view(bfloat16).float() * scale``.
- ``fastxc``: ``reader._gather(rows)``: one ``fastxc._C.gather_shards`` call (OpenMP, GIL
  released) that gathers, converts and scales in one pass.
- ``fastxc-prefetch``: ``next(reader.batches(...))``: what the trainer sees with the background
  prefetch thread; when nothing else runs this is the gather rate plus the queue hand-off.
"""
import os
import shutil

import numpy as np
import pytest
import torch

from fastxc import _C
from fastxc import store as S

B = 4096
WIDTH = 512
ROWS = 1 << 20  # x 2 sources x 512 x 2 bytes = 2 GiB
SHARD_ROWS = 1 << 16


@pytest.fixture(scope="module")
def big_store(tmp_path_factory):
    """A 2 GiB bf16 store, created once for the module and deleted afterwards."""
    path = tmp_path_factory.mktemp("bench_store") / "s"
    path.mkdir()
    writer = S.ShardWriter(path, [WIDTH, WIDTH], "bfloat16")
    g = torch.Generator().manual_seed(0)
    shards = []
    for k in range(ROWS // SHARD_ROWS):
        x = torch.randn(SHARD_ROWS, 2 * WIDTH, generator=g)
        x[:, WIDTH:] *= 3.0
        shards.append(writer.write_shard(k, x))
    m = S.build_manifest(widths=[WIDTH, WIDTH], dtype="bfloat16", shards=shards, sources=[{}, {}])
    S.atomic_write_json(path / S.MANIFEST, m)
    for p in path.iterdir():  # into the page cache
        with open(p, "rb") as f:
            while f.read(1 << 24):
                pass
    yield S.open_store(path)
    shutil.rmtree(path)


def _numpy_gather(reader: S.StoreReader, rows: np.ndarray) -> torch.Tensor:
    shard, local = reader.locate(rows)
    parts = []
    for s in np.unique(shard):
        parts.append(reader._shards[s].acts[local[shard == s]])  # fancy indexing on the memmap
    raw = np.concatenate(parts)
    x = torch.from_numpy(raw.view(np.int16)).view(torch.bfloat16).float()
    return x * torch.from_numpy(reader._col_scale)


@pytest.mark.benchmark(group="store-shuffled-read-B4096-2x512-bf16")
@pytest.mark.parametrize("provider", ["numpy", "fastxc", "fastxc-prefetch"])
def test_shuffled_batch_read(benchmark, big_store, provider):
    r = big_store
    counter = {"i": 0}
    ref = _numpy_gather(r, r.batch_rows(B, 0, 0))
    torch.testing.assert_close(r._gather(r.batch_rows(B, 0, 0)), ref, rtol=0, atol=0)  # same bytes out

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
    benchmark.extra_info.update({
        "store_gib": round(len(r) * 2 * WIDTH * 2 / 2**30, 2), "batch": B, "omp_threads": _C.num_threads(),
        "rows_per_s": round(B / st.mean), "gb_per_s_read": round(B * 2 * WIDTH * 2 / st.mean / 1e9, 2),
    })
