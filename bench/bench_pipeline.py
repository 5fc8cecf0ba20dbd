"""The training pipeline end to end, in one run on one shape (issue #15, item 3):

    python -m pytest bench/bench_pipeline.py --benchmark-only
    python bench/bench_pipeline.py --device cuda --shape gpu --json pipeline.json   # the same, as a script

Two random Llama-style models (built from a config into a temporary folder: no hub download)
read a jsonl of random words; the crosscoder reads the input of their middle layer. Every
benchmark below runs through the public entry points (``fastxc.train.train``,
``fastxc.train.train_sweep``, ``fastxc.data.harvest.harvest``) on the same models, data and
crosscoder shape, for STEPS steps of B rows:

- ``harvest``: ``harvest()`` of STEPS x B rows into a store; that store is what the next four read
  (page-cached: it was just written, and is read once more before each training).
- ``step-in-memory``: ``train()`` on the store's first STEPS batches, read into memory (on the
  training device) beforehand: the pure step, with nothing to wait for. It ends with the
  ``store`` run's weights, bit for bit (checked): the same batches, the same work.
- ``store``: ``train(TrainConfig(store=...))``: the store reader and its prefetch thread.
- ``on-the-fly``: ``train(TrainConfig(model_a=..., model_b=..., dataset=...))``: the models run
  on the buffer's producer thread while the crosscoder trains.
- ``read``: the STEPS batches of the store alone (``StoreReader.batches``, moved to the device):
  one read of the data.
- ``single-x3`` / ``sweep``: three dictionaries (``k32``, ``k16``, ``k32-lr3e-4``) trained one
  after another from the store, and as one ``train_sweep`` from one stream of batches; the
  sweep's weights are checked bit-identical to the single runs' (``torch.equal`` on every
  tensor). Their ``tokens_per_s`` counts every row once per dictionary (3 x STEPS x B).

A module fixture first runs a small harvest and 3 steps of each dictionary, so that no measured
run pays a first call's costs (Triton compilation on a GPU, lazy initialisation).

How the times are taken (from outside: no file of ``fastxc`` is changed; the probes are
monkeypatched in for one benchmark and removed after it):

- the trainer's data iterator (the store's ``batches``, the in-memory batches, the on-the-fly
  ``BufferedBatches``) is wrapped: ``trainer_wait_s`` is the time spent in its ``next()``;
- ``fastxc.train.loop._step_on`` (one training step, also what a sweep runs for each of its
  runs) is wrapped: ``step_s`` is the time spent in it (on CUDA it synchronises at the end of
  each step, so that a step's time is its own);
- the producer's work is timed: the store reader's ``_gather`` and ``batch_rows`` on the
  prefetch thread, the harvest's ``iter_activations`` on the on-the-fly producer thread.
  ``producer_wait_s`` is the window minus that work: the time the producer sat idle on its
  full queue (or, before the trainer asked, had nothing to do);
- ``window_s`` runs from the creation of the training data iterator (on the fly: the start of
  the buffer's first fill, which the trainer waits for: ``first_fill_s``) to the end of the last
  step; ``tokens_per_s`` = STEPS x B / ``window_s``. Setup (loading the models, building the
  crosscoder) and the end (final checkpoint, evaluation) are outside it. ``loop_overhead_s`` is
  what the window holds besides the steps, the waits and the first fill (moving batches to the
  device, the loop's bookkeeping).
- ``harvest``: ``tokens_per_s`` over the harvest's stream, from its first model batch
  (after the tokenizers, datasets and models are loaded) to the finished store;
  ``tokens_per_s_end_to_end`` over the whole call; ``forward_tokens_per_s`` over the time
  inside ``iter_activations`` alone (tokenization, forwards, outlier filter; no store writes).
- on the fly, ``producer_rows``: the rows the models gave by the end of the window (the run
  trains on ``tokens`` of them; the producer may run ahead of what the trainer takes).

The acceptance ratios of issue #15 go in the extra_info of the benchmark that completes them and
are printed at the end of the session:

- store: tokens/s(store) / tokens/s(step-in-memory), target >= 0.95;
- on the fly: tokens/s(on-the-fly) / (1 / (1/harvest + 1/step-in-memory)), target >= 0.9 (the
  models and the crosscoder share one device here, so their work adds up);
- sweep: window(sweep) / (sum of the three single runs' step_s + window(read)), target <= 1.1.

A ratio off its target is reported (extra_info, the summary), not failed: timings on a shared
machine are noisy. Only the bit-identity checks fail a benchmark.

Environment (or the script's flags): FASTXC_BENCH_DEVICE (``auto``: CUDA when available),
FASTXC_BENCH_SHAPE (``cpu``, the default on a CPU, or ``gpu``, the default on CUDA; SHAPES
below), FASTXC_BENCH_STEPS (overrides the shape's steps), FASTXC_BENCH_ROUNDS (rounds of each
benchmark, default 1; the figures are the best round's).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

SHAPES = {
    # CPU: two 4-layer models of width 256 (read at layer 2, the input of the third block),
    # crosscoder 2 x 256 -> 4096, k 32, batch 512; a harvest and a step cost about the same
    "cpu": {"hidden": 256, "layers": 4, "layer": 2, "vocab": 1024, "context": 128, "harvest_batch": 8,
            "model_dtype": "float32", "batch": 512, "n_features": 4096, "k": 32, "steps": 100, "buffer_rows": 16384},
    # GPU: two 8-layer models of width 1024 in bf16 (read at layer 4), crosscoder 2 x 1024 -> 32768
    "gpu": {"hidden": 1024, "layers": 8, "layer": 4, "vocab": 4096, "context": 128, "harvest_batch": 32,
            "model_dtype": "bfloat16", "batch": 4096, "n_features": 32768, "k": 32, "steps": 200, "buffer_rows": 262144},
}
# the three dictionaries of the sweep (and of the three single runs): each changes these fields
RUNS = {"k32": {}, "k16": {"k": 16}, "k32-lr3e-4": {"lr": 3e-4}}
PHASES = ("harvest", "step-in-memory", "store", "on-the-fly", "read", "single-x3", "sweep")
RESULTS: dict[str, dict] = {}  # phase -> its figures (the best round's)
CHECKS: dict[str, str] = {}  # correctness checks: name -> outcome


def _device() -> torch.device:
    from fastxc.core.device import resolve_device

    return resolve_device(os.environ.get("FASTXC_BENCH_DEVICE", "auto"))


def _shape(device: torch.device) -> tuple[str, dict]:
    name = os.environ.get("FASTXC_BENCH_SHAPE") or ("gpu" if device.type == "cuda" else "cpu")
    shape = dict(SHAPES[name])
    if os.environ.get("FASTXC_BENCH_STEPS"):
        shape["steps"] = int(os.environ["FASTXC_BENCH_STEPS"])
    return name, shape


ROUNDS = int(os.environ.get("FASTXC_BENCH_ROUNDS", "1"))


# ---------------------------------------------------------------------------- probes
class Probe:
    """What one benchmark round saw: data iterators, steps, producer work (perf_counter times)."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.iters: list[dict] = []  # {"created": (t0, t1), "next": [(t0, t1), ...]} in creation order
        self.steps: list[tuple[float, float, str]] = []  # (t0, t1, run folder)
        self.producer: list[tuple[float, float]] = []  # busy intervals of the producer thread
        self.produced: list[tuple[float, int]] = []  # (time, rows) of each model batch the producer gave
        self.marks: dict[str, float] = {}

    def timed_iter(self, make):
        """Call ``make()`` (the iterator's creation, timed) and wrap what it returns."""
        t0 = time.perf_counter()
        inner = make()
        rec = {"created": (t0, time.perf_counter()), "next": []}
        self.iters.append(rec)
        return _TimedIter(inner, rec)

    def busy(self, fn):
        """``fn`` whose calls on a thread other than the main one count as producer work."""
        main = threading.main_thread()

        def wrapped(*a, **k):
            if threading.current_thread() is main:
                return fn(*a, **k)
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.producer.append((t0, time.perf_counter()))

        return wrapped

    def busy_gen(self, gen_fn, always: bool = False):
        """A generator function whose items' production counts as producer work."""

        def wrapped(*a, **k):
            it = iter(gen_fn(*a, **k))
            self.marks.setdefault("stream_start", time.perf_counter())
            while True:
                t0 = time.perf_counter()
                try:
                    item = next(it)
                except StopIteration:
                    return
                finally:
                    if always or threading.current_thread() is not threading.main_thread():
                        self.producer.append((t0, time.perf_counter()))
                x = getattr(item, "x", None)
                if x is not None:
                    self.produced.append((time.perf_counter(), int(x.shape[0])))
                yield item

        return wrapped

    def install_steps(self, mp) -> None:
        from fastxc.train import loop

        orig = loop._step_on

        def _step_on(run, x, *a, **k):
            t0 = time.perf_counter()
            out = orig(run, x, *a, **k)
            if self.cuda:
                torch.cuda.synchronize()
            self.steps.append((t0, time.perf_counter(), str(run.out)))
            return out

        mp.setattr(loop, "_step_on", _step_on)

    def figures(self, tokens: int) -> dict:
        """The training window's figures (the first data iterator created is the training one)."""
        it = self.iters[0]
        start, end = it["created"][0], self.steps[-1][1]
        window = end - start
        step_s = sum(b - a for a, b, _ in self.steps)
        wait = sum(b - a for a, b in it["next"])
        busy = sum(max(0.0, min(b, end) - max(a, start)) for a, b in self.producer)
        out = {"tokens": tokens, "window_s": window, "tokens_per_s": tokens / window, "step_s": step_s,
               "trainer_wait_s": wait, "loop_overhead_s": window - step_s - wait - (it["created"][1] - start),
               "producer_busy_s": busy if self.producer else None,
               "producer_wait_s": window - busy if self.producer else None}
        per_run: dict[str, float] = {}
        for a, b, name in self.steps:
            per_run[Path(name).name] = per_run.get(Path(name).name, 0.0) + (b - a)
        if len(per_run) > 1:
            out["step_s_per_run"] = per_run
        if self.produced:  # on the fly: rows the models gave by the end of the window (tokens: needed)
            out["producer_rows"] = sum(n for t, n in self.produced if t <= end)
        return out


class _TimedIter:
    """An iterator whose ``next()`` calls are timed; everything else goes to the wrapped one."""

    def __init__(self, inner, rec):
        object.__setattr__(self, "_inner", inner)
        object.__setattr__(self, "_rec", rec)

    def __iter__(self):
        return self

    def __next__(self):
        t0 = time.perf_counter()
        try:
            return next(self._inner)
        finally:
            self._rec["next"].append((t0, time.perf_counter()))

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def __setattr__(self, name, value):
        setattr(self._inner, name, value)


def _install_store_probe(mp, probe: Probe, memory: dict | None = None) -> None:
    """Wrap ``loop.open_data``: the store reader's producer work is timed and its ``batches``
    wrapped; with ``memory`` the training batches come from memory instead (the pure step)."""
    from fastxc.train import loop

    orig = loop.open_data

    def open_data(cfg, *a, **k):
        data = orig(cfg, *a, **k)
        reader = getattr(data.batches, "__self__", None)
        if reader is not None and memory is None:  # in memory: no producer
            reader._gather = probe.busy(reader._gather)
            reader.batch_rows = probe.busy(reader.batch_rows)
        make = data.batches

        def batches(batch_size, seed=0, start=0):
            if memory is not None and (batch_size, seed) == memory["key"]:
                return probe.timed_iter(lambda: iter(memory["batches"][start:]))
            return probe.timed_iter(lambda: make(batch_size, seed=seed, start=start))

        what = "in-memory batches of " + data.description if memory is not None else data.description
        return data._replace(batches=batches, description=what)

    mp.setattr(loop, "open_data", open_data)


def _install_stream_probe(mp, probe: Probe) -> None:
    """On the fly: the buffer's streams are wrapped (creation: the first fill) and the
    producer's model batches timed."""
    from fastxc.data import buffer

    orig = buffer.OnTheFlySource.stream

    def stream(self, *a, **k):
        return probe.timed_iter(lambda: orig(self, *a, **k))

    mp.setattr(buffer.OnTheFlySource, "stream", stream)
    mp.setattr(buffer, "iter_activations", probe.busy_gen(buffer.iter_activations))


# ---------------------------------------------------------------------------- the world
WORDS = [f"w{i}" for i in range(1000)]


def _build(root: Path, shape: dict) -> dict:
    """Tokenizer, two random Llama models and a jsonl of random-word documents."""
    from tiny_models import build_llama_pair

    words = WORDS[: shape["vocab"] - 3]
    h = shape["hidden"]
    paths, _ = build_llama_pair(root, words, vocab_size=shape["vocab"], hidden=h, intermediate=4 * h,
                                layers=shape["layers"], heads=max(4, h // 64), max_positions=2 * shape["context"])
    dirs = [str(d) for d in paths]
    # documents of 60-400 words; about 3x the rows a run needs (a harvest and the evaluations)
    rng = np.random.default_rng(0)
    need = 3 * shape["steps"] * shape["batch"]
    data = root / "data.jsonl"
    with open(data, "w") as f:
        n = 0
        while n < need:
            k = int(rng.integers(60, 400))
            f.write(json.dumps({"text": " ".join(rng.choice(words, size=k))}) + "\n")
            n += k
    return {"models": dirs, "data": str(data)}


@pytest.fixture(scope="module")
def world(tmp_path_factory, request):
    device = _device()
    name, shape = _shape(device)
    root = tmp_path_factory.mktemp("bench_pipeline")
    w = {"root": root, "device": device, "shape_name": name, "shape": shape, **_build(root, shape),
         "tokens": shape["steps"] * shape["batch"], "store": None, "memory": None}
    plugin = _Summary(w)
    request.config.pluginmanager.register(plugin, "fastxc-bench-pipeline-summary")
    _warm_up(w)
    yield w
    shutil.rmtree(root, ignore_errors=True)


def _harvest_kwargs(w: dict) -> dict:
    s = w["shape"]
    return {"layer": s["layer"], "context_length": s["context"], "batch_size": s["harvest_batch"],
            "device": str(w["device"]), "model_dtype": s["model_dtype"], "progress": False}


def _store(w: dict) -> Path:
    """The store every training benchmark reads (harvested here unless ``harvest`` ran first),
    read once more so that the page cache holds it."""
    if w["store"] is None:
        from fastxc.data.harvest import harvest

        w["store"] = harvest(w["models"], w["root"] / "store", [w["data"]], w["tokens"], **_harvest_kwargs(w))
    for p in Path(w["store"]).iterdir():
        with open(p, "rb") as f:
            while f.read(1 << 24):
                pass
    return Path(w["store"])


def _config(w: dict, out: Path, **fields):
    from fastxc.train import TrainConfig

    s = w["shape"]
    base = {"out": str(out), "steps": s["steps"], "batch_size": s["batch"], "n_features": s["n_features"], "k": s["k"],
            "checkpoint_every": 0, "log_every": s["steps"], "eval_batches": 1, "progress": False, "overwrite": True,
            "device": str(w["device"])}
    base.update(fields)
    return TrainConfig(**base)


def _store_config(w: dict, out: Path, **fields):
    return _config(w, out, store=str(_store(w)), **fields)


def _otf_config(w: dict, out: Path):
    s = w["shape"]
    return _config(w, out, model_a=w["models"][0], model_b=w["models"][1], dataset=[w["data"]], layer=s["layer"],
                   context_length=s["context"], harvest_batch_size=s["harvest_batch"], model_dtype=s["model_dtype"],
                   buffer_rows=s["buffer_rows"])


def _memory(w: dict) -> dict:
    """The store's first STEPS training batches, on the training device."""
    if w["memory"] is None:
        from fastxc.data.store import open_store

        s = w["shape"]
        it = open_store(_store(w)).batches(s["batch"], seed=0, start=0)
        batches = [next(it).to(w["device"]) for _ in range(s["steps"])]
        it.close()
        w["memory"] = {"key": (s["batch"], 0), "batches": batches}
    return w["memory"]


def _warm_up(w: dict) -> None:
    """A few steps of every dictionary and a small harvest, so that no measured run pays a
    first call's costs (kernel compilation on a GPU, lazy initialisation)."""
    from fastxc.data.harvest import harvest
    from fastxc.train import train

    s = w["shape"]
    path = harvest(w["models"], w["root"] / "warm-store", [w["data"]], 4 * s["batch"], **_harvest_kwargs(w))
    with pytest.MonkeyPatch.context() as mp:
        mem = {"key": (s["batch"], 0), "batches": None}
        from fastxc.data.store import open_store

        it = open_store(path).batches(s["batch"], seed=0)
        mem["batches"] = [next(it).to(w["device"]) for _ in range(3)]
        it.close()
        _install_store_probe(mp, Probe(False), mem)
        for name, own in RUNS.items():
            train(_config(w, w["root"] / "warm" / name, store=str(path), steps=3, log_every=3, **own))
    shutil.rmtree(w["root"] / "warm", ignore_errors=True)
    shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------- reporting
def _record(benchmark, w: dict, phase: str, figures: dict) -> None:
    """Keep the best round's figures and put them (and any ratio they complete) in extra_info."""
    best = RESULTS.get(phase)
    if best is None or figures["tokens_per_s"] > best["tokens_per_s"]:
        RESULTS[phase] = figures
    s = w["shape"]
    info = {"shape": w["shape_name"], "device": str(w["device"]), "steps": s["steps"], "batch": s["batch"],
            "widths": [s["hidden"], s["hidden"]], "n_features": s["n_features"], "k": s["k"],
            "machine": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads()}
    info.update({k: (round(v, 4) if isinstance(v, float) else v) for k, v in RESULTS[phase].items()})
    info.update({k: v for k, v in _ratios().items() if phase in v.get("from", ())})
    benchmark.extra_info.update(info)


def _ratios() -> dict:
    """The three acceptance ratios, as far as this session's results give them."""
    r, out = RESULTS, {}
    if "store" in r and "step-in-memory" in r:
        v = r["store"]["tokens_per_s"] / r["step-in-memory"]["tokens_per_s"]
        out["store_vs_step"] = {"value": round(v, 4), "target": ">= 0.95", "ok": v >= 0.95,
                                "from": ("store", "step-in-memory")}
    if "on-the-fly" in r and "harvest" in r and "step-in-memory" in r:
        # the models and the crosscoder share one device here: their work adds up
        both = 1 / (1 / r["harvest"]["tokens_per_s"] + 1 / r["step-in-memory"]["tokens_per_s"])
        v = r["on-the-fly"]["tokens_per_s"] / both
        out["on_the_fly_vs_parts"] = {"value": round(v, 4), "target": ">= 0.9", "ok": v >= 0.9,
                                      "parts_tokens_per_s": round(both, 1),
                                      "from": ("on-the-fly", "harvest", "step-in-memory")}
    if "sweep" in r and "single-x3" in r and "read" in r:
        budget = r["single-x3"]["step_s"] + r["read"]["window_s"]
        v = r["sweep"]["window_s"] / budget
        out["sweep_vs_steps_and_read"] = {"value": round(v, 4), "target": "<= 1.1", "ok": v <= 1.1,
                                          "budget_s": round(budget, 3), "from": ("sweep", "single-x3", "read")}
    return out


class _Summary:
    """Prints the figures and the acceptance ratios at the end of the session."""

    def __init__(self, w: dict):
        self.w = w

    def pytest_terminal_summary(self, terminalreporter):
        if not RESULTS:
            return
        tr, w, s = terminalreporter, self.w, self.w["shape"]
        tr.section("bench_pipeline: issue #15 item 3")
        tr.write_line(f"shape {w['shape_name']}: models {s['layers']} layers x {s['hidden']} (layer {s['layer']}), "
                      f"crosscoder 2 x {s['hidden']} -> {s['n_features']}, k {s['k']}, batch {s['batch']}, "
                      f"{s['steps']} steps; device {w['device']}, {torch.get_num_threads()} torch threads")
        for phase in PHASES:
            f = RESULTS.get(phase)
            if f is None:
                continue
            parts = [f"{f['tokens_per_s']:>10.0f} tok/s"]
            for key in ("window_s", "step_s", "trainer_wait_s", "first_fill_s", "producer_wait_s",
                        "forward_tokens_per_s", "tokens_per_s_end_to_end", "wall_s"):
                if f.get(key) is not None:
                    parts.append(f"{key} {f[key]:.0f}" if "per_s" in key else f"{key} {f[key]:.3f}")
            tr.write_line(f"  {phase:<15}" + "  ".join(parts))
        for name, r in _ratios().items():
            extra = {k: v for k, v in r.items() if k not in ("value", "target", "ok", "from")}
            tr.write_line(f"  {name:<24} {r['value']:.3f} (target {r['target']}: {'met' if r['ok'] else 'NOT met'})"
                          + (f"  {extra}" if extra else ""))
        for name, what in CHECKS.items():
            tr.write_line(f"  check {name}: {what}")


def _best_of_rounds(benchmark, fn) -> None:
    benchmark.pedantic(fn, rounds=ROUNDS, iterations=1, warmup_rounds=0)


def _state(model) -> dict:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _check_equal(name: str, a: dict, b: dict) -> None:
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    CHECKS[name] = "bit-identical" if not bad else f"DIFFER in {bad}"
    assert not bad, f"{name}: the weights differ in {bad}"


# ---------------------------------------------------------------------------- benchmarks
@pytest.mark.benchmark(group="pipeline")
def test_harvest(benchmark, world):
    from fastxc.data import harvest as H
    from fastxc.data.store import MANIFEST

    w, n = world, {"i": 0}

    def run():
        n["i"] += 1
        out = w["root"] / f"harvest{n['i']}"
        probe = Probe(w["device"].type == "cuda")
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(H, "iter_activations", probe.busy_gen(H.iter_activations, always=True))
            t0 = time.perf_counter()
            path = H.harvest(w["models"], out, [w["data"]], w["tokens"], **_harvest_kwargs(w))
            t1 = time.perf_counter()
        rows = json.loads((path / MANIFEST).read_text())["n_rows"]
        stream = t1 - probe.marks["stream_start"]
        forward = sum(b - a for a, b in probe.producer)
        _record(benchmark, w, "harvest", {
            "tokens": rows, "tokens_per_s": rows / stream, "window_s": stream, "wall_s": t1 - t0,
            "tokens_per_s_end_to_end": rows / (t1 - t0), "forward_s": forward, "forward_tokens_per_s": rows / forward,
            "writer_s": stream - forward})  # the store writer's share: encode, checksums, writes, manifest
        if w["store"] is None:
            w["store"] = path  # the store the training benchmarks read
        else:
            shutil.rmtree(path)

    _best_of_rounds(benchmark, run)


def _train_round(benchmark, w: dict, phase: str, cfg, memory: dict | None = None, stream: bool = False):
    from fastxc.train import train

    probe = Probe(w["device"].type == "cuda")
    with pytest.MonkeyPatch.context() as mp:
        probe.install_steps(mp)
        if stream:
            _install_stream_probe(mp, probe)
        else:
            _install_store_probe(mp, probe, memory)
        result = train(cfg)
    figures = probe.figures(w["tokens"])
    if stream:
        a, b = probe.iters[0]["created"]
        figures["first_fill_s"] = b - a
    _record(benchmark, w, phase, figures)
    return result


@pytest.mark.benchmark(group="pipeline")
def test_step_in_memory(benchmark, world):
    w = world
    memory = _memory(w)
    out = {}

    def run():
        out["result"] = _train_round(benchmark, w, "step-in-memory", _store_config(w, w["root"] / "memory"), memory)

    _best_of_rounds(benchmark, run)
    w["memory_state"] = _state(out["result"].model)


@pytest.mark.benchmark(group="pipeline")
def test_store(benchmark, world):
    w = world
    out = {}

    def run():
        out["result"] = _train_round(benchmark, w, "store", _store_config(w, w["root"] / "store-run"))

    _best_of_rounds(benchmark, run)
    if "memory_state" in w:  # the same batches, so the same weights: the pure step did the same work
        _check_equal("in-memory == store", w["memory_state"], _state(out["result"].model))


@pytest.mark.benchmark(group="pipeline")
def test_on_the_fly(benchmark, world):
    w = world

    def run():
        _train_round(benchmark, w, "on-the-fly", _otf_config(w, w["root"] / "otf"), stream=True)

    _best_of_rounds(benchmark, run)


@pytest.mark.benchmark(group="pipeline")
def test_read(benchmark, world):
    from fastxc.data.store import open_store

    w, s = world, world["shape"]
    path = _store(w)

    def run():
        t0 = time.perf_counter()
        it = open_store(path).batches(s["batch"], seed=0, start=0)
        for _ in range(s["steps"]):
            x = next(it).to(device=w["device"], dtype=torch.float32, non_blocking=True)
        if w["device"].type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter() - t0
        it.close()
        _record(benchmark, w, "read", {"tokens": w["tokens"], "tokens_per_s": w["tokens"] / t, "window_s": t})
        return x

    _best_of_rounds(benchmark, run)


@pytest.mark.benchmark(group="pipeline")
def test_single_x3(benchmark, world):
    from fastxc.train import train

    w = world
    states = {}

    def run():
        t0 = time.perf_counter()
        runs = {}
        for name, own in RUNS.items():
            probe = Probe(w["device"].type == "cuda")
            with pytest.MonkeyPatch.context() as mp:
                probe.install_steps(mp)
                _install_store_probe(mp, probe)
                states[name] = _state(train(_store_config(w, w["root"] / "single" / name, **own)).model)
            runs[name] = probe.figures(w["tokens"])
        wall = time.perf_counter() - t0

        def total(key):
            return sum(f[key] for f in runs.values())

        window = total("window_s")
        _record(benchmark, w, "single-x3", {
            "tokens": 3 * w["tokens"], "tokens_per_s": 3 * w["tokens"] / window, "window_s": window,
            "step_s": total("step_s"), "step_s_per_run": {n: f["step_s"] for n, f in runs.items()},
            "trainer_wait_s": total("trainer_wait_s"), "producer_wait_s": total("producer_wait_s"), "wall_s": wall})

    _best_of_rounds(benchmark, run)
    w["single_states"] = states
    if "sweep_states" in w:
        for name in RUNS:
            _check_equal(f"sweep {name} == single {name}", w["sweep_states"][name], states[name])


@pytest.mark.benchmark(group="pipeline")
def test_sweep(benchmark, world):
    from fastxc.train.sweep import Sweep, train_sweep

    w = world
    states = {}

    def run():
        out = w["root"] / "sweep"
        sweep = Sweep(_store_config(w, out), {name: _store_config(w, out / name, **own) for name, own in RUNS.items()})
        probe = Probe(w["device"].type == "cuda")
        with pytest.MonkeyPatch.context() as mp:
            probe.install_steps(mp)
            _install_store_probe(mp, probe)
            t0 = time.perf_counter()
            results = train_sweep(sweep)
            wall = time.perf_counter() - t0
        f = probe.figures(3 * w["tokens"])  # three dictionaries trained on every row
        f["wall_s"] = wall
        _record(benchmark, w, "sweep", f)
        states.update({name: _state(r.model) for name, r in results.items()})

    _best_of_rounds(benchmark, run)
    w["sweep_states"] = states
    if "single_states" in w:
        for name in RUNS:
            _check_equal(f"sweep {name} == single {name}", states[name], w["single_states"][name])


# ---------------------------------------------------------------------------- as a script
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Run bench/bench_pipeline.py's benchmarks on one device and shape.")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    p.add_argument("--shape", choices=sorted(SHAPES), default=None, help="default: gpu on CUDA, cpu otherwise")
    p.add_argument("--steps", type=int, default=None, help="steps of every run (default: the shape's)")
    p.add_argument("--rounds", type=int, default=1, help="rounds of each benchmark (the best round's figures)")
    p.add_argument("--json", default=None, help="also write pytest-benchmark's JSON (extra_info holds the figures)")
    args = p.parse_args(argv)
    os.environ["FASTXC_BENCH_DEVICE"] = args.device
    os.environ["FASTXC_BENCH_ROUNDS"] = str(args.rounds)
    if args.shape:
        os.environ["FASTXC_BENCH_SHAPE"] = args.shape
    if args.steps:
        os.environ["FASTXC_BENCH_STEPS"] = str(args.steps)
    extra = [f"--benchmark-json={args.json}"] if args.json else []
    return int(pytest.main([__file__, "--benchmark-only", "-p", "no:cacheprovider", *extra]))


if __name__ == "__main__":
    sys.exit(main())
