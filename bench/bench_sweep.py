"""A sweep of 3 crosscoders against the 3 single runs and one read of the data (issue #15:
sweep wall time <= 1.1 x (sum of the three runs' step time + one read of the data)).

    python -m pytest bench/bench_sweep.py --benchmark-only --benchmark-group-by=group

The store (2 sources x 256, bf16 on disk, 2**17 rows = 128 MiB) is written once per module and
read once so the page cache holds it. Providers, each over STEPS steps of B rows
(FASTXC_BENCH_STEPS overrides STEPS, e.g. 2 for a smoke run):

- ``sweep``: ``train_sweep`` of the three runs from one stream of batches.
- ``single-x3``: the same three runs one after another, each reading its own batches.
- ``read``: the batches alone (``StoreReader.batches`` moved to the device), the read the sweep
  does once and ``single-x3`` three times.

Outputs (checkpoints only at the end, 1 evaluation batch) go to a temporary folder; the device
is the trainer's default (CUDA when available).
"""
import os
import shutil

import pytest
import torch

from fastxc.core.device import resolve_device
from fastxc.data import store as S
from fastxc.train import TrainConfig, train
from fastxc.train.sweep import Sweep, train_sweep

B = 1024
WIDTH = 256
ROWS = 1 << 17
SHARD_ROWS = 1 << 15
STEPS = int(os.environ.get("FASTXC_BENCH_STEPS", "100"))
RUNS = {
    "k16": {"k": 16, "n_features": 2048},
    "k32": {"k": 32, "n_features": 4096},
    "relu": {"activation": "relu", "n_features": 2048, "l1_coef": 0.05},
}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench_sweep") / "s"
    path.mkdir()
    writer = S.ShardWriter(path, [WIDTH, WIDTH], "bfloat16")
    g = torch.Generator().manual_seed(0)
    shards = [writer.write_shard(k, torch.randn(SHARD_ROWS, 2 * WIDTH, generator=g)) for k in range(ROWS // SHARD_ROWS)]
    S.atomic_write_json(path / S.MANIFEST, S.build_manifest(widths=[WIDTH, WIDTH], dtype="bfloat16", shards=shards,
                                                            sources=[{}, {}]))
    for p in path.iterdir():  # into the page cache
        with open(p, "rb") as f:
            while f.read(1 << 24):
                pass
    yield path
    shutil.rmtree(path)


def _config(store, out, **own) -> TrainConfig:
    return TrainConfig(store=str(store), out=str(out), steps=STEPS, batch_size=B, checkpoint_every=0, log_every=STEPS,
                       eval_batches=1, progress=False, overwrite=True, **own)


def _sweep(store, out) -> Sweep:
    base = _config(store, out)
    return Sweep(base, {name: _config(store, out / name, **own) for name, own in RUNS.items()})


@pytest.mark.benchmark(group="sweep")
def test_sweep(benchmark, store, tmp_path):
    benchmark.pedantic(lambda: train_sweep(_sweep(store, tmp_path / "sweep")), rounds=1, iterations=1)


@pytest.mark.benchmark(group="sweep")
def test_single_x3(benchmark, store, tmp_path):
    def three():
        for name, own in RUNS.items():
            train(_config(store, tmp_path / name, **own))

    benchmark.pedantic(three, rounds=1, iterations=1)


@pytest.mark.benchmark(group="sweep")
def test_read(benchmark, store):
    device = resolve_device("auto")

    def read():
        it = S.open_store(store).batches(B, seed=0, start=0)
        for _ in range(STEPS):
            x = next(it).to(device=device, dtype=torch.float32, non_blocking=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return x

    benchmark.pedantic(read, rounds=1, iterations=1)
