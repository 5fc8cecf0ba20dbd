"""Sweeps: ``python -m fastxc.train --sweep sweep.yaml`` trains several crosscoders from one
stream of batches.

The file (YAML or JSON) holds the shared fields at its top level (any TrainConfig field) and
``runs``, a list of runs, each a ``name`` and the fields it changes::

    store: acts/
    steps: 2000
    batch_size: 512
    runs:
      - {name: k16, k: 16}
      - {name: k32, k: 32, n_features: 2048}
      - {name: relu, activation: relu, l1_coef: 0.05}

Each batch is read once and fed to every run in turn. Run NAME writes ``--out/NAME/`` exactly as
a single run does (crosscoder/, checkpoint/, metrics.jsonl, summary.json) and ends bit-identical
to ``python -m fastxc.train`` given the shared fields and its own: the same store, batch size,
seed and steps give the same batches, and the same --seed gives the same init. ``--out/sweep.json``
records every run's full config. Command-line flags override the file's top level.

DATA_OPTIONS decide the batches or how the sweep runs: every run shares them, and a run that
sets one is an error. --seed is one of them: a single run seeds both its data order and its init
with it, so a run with its own seed would not match any single run on the same batches.

On the fly (``model_a``, ``model_b``, ``dataset``, ... at the top: fastxc.data.buffer): the models
run once, into one shuffle buffer whose batches every run trains on, and once more for the
evaluation batches, which every run's final evaluation shares. Each run's checkpoint records
the buffer's position (the same at the same step), and ``save_store`` writes one store.

Resume (--resume): each run continues from its own checkpoint, as a single run would. The runs
checkpoint at the same steps, one after another, so a kill in between leaves some runs one
checkpoint ahead: the batches are read again from the earliest run's step (on the fly: the
buffer rebuilt from that run's checkpoint, or a fresh stream when some run has none), and each
run trains only on the batches past its own step (batch i depends on (seed, i) only). A run
without a checkpoint starts from step 0; --resume with no checkpoint in any run is an error.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fastxc.core.device import resolve_device
from fastxc.train import checkpoint, loggers, loop
from fastxc.train.config import TrainConfig, TrainError, read_mapping

# The fields every run of a sweep shares: what decides the batches (source, order, count, the
# evaluation batches, which batches count as bad), the steps all runs checkpoint at, and how and
# where the sweep runs. On the fly, every harvest setting decides the batches too (and the one
# --save-store store).
DATA_OPTIONS = frozenset({
    "store", "source", "widths", "synthetic_shared", "synthetic_unique", "synthetic_noise", "verify_store",
    "model_a", "model_b", "model", "layer", "layers", "dataset", "text_field", "skip_bad_lines", "tokens",
    "buffer_rows", "context_length", "harvest_batch_size", "model_dtype", "outlier_factor", "shuffle_buffer",
    "ignore_special_tokens", "save_store", "store_dtype", "shard_tokens",
    "batch_size", "seed", "steps", "eval_batches", "max_bad_batches", "checkpoint_every",
    "out", "resume", "resume_if_exists", "overwrite", "device", "parallel", "progress", "log",
})
# A run's name is its folder in --out: one plain path component.
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\Z")


@dataclass
class Sweep:
    """A parsed sweep: the shared config and each run's (name -> config, out = shared out/name)."""

    base: TrainConfig
    runs: dict[str, TrainConfig]


def sweep_from_flags(args: dict) -> Sweep:
    """The Sweep of ``parse_flags``' dict (holding 'sweep': the file); TrainError with one line
    on a bad file, field or value. Reads the file only."""
    args = dict(args)
    path = args.pop("sweep")
    if "config" in args:
        raise TrainError("--sweep and --config do not go together: put the shared fields at the top of the sweep file")
    data = read_mapping(path, "sweep file")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    top, runs = {}, None
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name == "runs":
            runs = value
        elif name not in fields:
            raise TrainError(f"sweep file {path}: unknown field {key!r}")
        else:
            top[name] = value
    if not isinstance(runs, list) or not runs or not all(isinstance(r, dict) for r in runs):
        raise TrainError(f"sweep file {path}: 'runs' must be a non-empty list of runs, each a mapping with a name")
    top.update(args)  # flags override the file's shared fields
    base = TrainConfig(**top)
    if base.parallel != "none":
        raise TrainError("--sweep trains every run in one process; --parallel data|features does not run with it")
    if base.store is None and base.source in (None, "default") and not base.on_the_fly:
        raise TrainError(f"sweep file {path}: give the data: store: DIR, the models (model_a, model_b, dataset) "
                         "or source: synthetic")
    if "wandb" in base.log_backends():
        raise TrainError("--log wandb does not run under --sweep (one wandb run per process); use --log tensorboard")
    if base.out is None:
        if base.resume:
            raise TrainError("--resume needs --out: the sweep folder to continue")
        base.out = os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
    if base.save_store is not None and Path(base.save_store).resolve() == Path(base.out).resolve():
        raise TrainError("--save-store must be another folder than the sweep's --out")
    members: dict[str, TrainConfig] = {}
    folders: dict[str, str] = {}  # casefolded name -> name: one folder on case-insensitive disks
    for i, run in enumerate(runs, 1):
        label = run.get("name")
        if not isinstance(label, str) or not RUN_NAME.match(label):
            raise TrainError(f"sweep file {path}: run {i} needs a name of letters, digits, '.', '_' or '-' "
                             f"(its folder in --out), got {label!r}")
        if label.casefold() in folders:
            raise TrainError(f"sweep file {path}: runs {folders[label.casefold()]!r} and {label!r} would both write "
                             f"{Path(base.out) / label}")
        folders[label.casefold()] = label
        own = {}
        for key, value in run.items():
            if key == "name":
                continue
            name = str(key).replace("-", "_")
            if name not in fields:
                raise TrainError(f"sweep file {path}: run {label!r}: unknown field {key!r}")
            if name in DATA_OPTIONS:
                raise TrainError(f"sweep file {path}: run {label!r} sets {key!r}, which every run of a sweep shares; "
                                 f"set it at the top of the file")
            own[name] = value
        # --resume continues each run that has a checkpoint and starts the others (the sweep
        # checks that some run has one)
        cfg = dataclasses.replace(base, **own, out=str(Path(base.out) / label),
                                  resume_if_exists=base.resume or base.resume_if_exists)
        try:
            cfg.validate()
        except TrainError as e:
            raise TrainError(f"sweep run {label!r}: {e}") from None
        members[label] = cfg
    return Sweep(base, members)


@contextlib.contextmanager
def _named(name: str):
    """TrainError raised inside names the run it came from."""
    try:
        yield
    except TrainError as e:
        raise TrainError(f"sweep run {name!r}: {e}") from None


class _RunBar:
    """A run's view of the sweep's one progress bar: its metrics set the run's entry of the
    postfix (its loss); the sweep, not the run, counts the steps."""

    def __init__(self, bar, name: str, postfix: dict):
        self.bar, self.name, self.postfix = bar, name, postfix

    def update(self, n=1):
        pass

    def set_postfix(self, loss, **kw):
        self.postfix[self.name] = loss
        self.bar.set_postfix(ordered_dict=self.postfix)  # a run may be named "refresh"

    def close(self):
        pass


class _Rngs:
    """Each run's own torch RNG state, swapped in around its work, so that its checkpoints
    record what a single run's would (the state its seeded init, or its checkpoint, left)."""

    def __init__(self):
        self.state: dict[str, torch.Tensor] = {}

    def keep(self, name: str) -> None:
        self.state[name] = torch.get_rng_state()

    @contextlib.contextmanager
    def of(self, name: str):
        torch.set_rng_state(self.state[name])
        try:
            yield
        finally:
            self.keep(name)


def train_sweep(sweep: Sweep) -> dict[str, loop.TrainResult]:
    """Train every run of ``sweep`` from one stream of batches; returns name -> TrainResult.

    Every run's folder is checked, and the data opened (and --verify-store'd; on the fly the
    models loaded and the --save-store folder checked), before anything else is written."""
    base = sweep.base
    device = resolve_device(base.device)
    loggers.check_available(base)
    checked = {name: loop._check_out(cfg) for name, cfg in sweep.runs.items()}
    resuming = base.resume or base.resume_if_exists
    ckpts = {name: checkpoint.find_checkpoint(out) if resuming else None for name, (out, _) in checked.items()}
    if base.resume and not any(ckpts.values()):
        raise TrainError(f"--resume: no checkpoint in any run of {base.out} to continue "
                         "(--resume-if-exists starts fresh when there is none)")
    data = loop.open_data(base, None, device)  # the runs share every field open_data reads
    feed = loop._Run(base, None, device, data, Path(base.out), None, None)  # on the fly: the shared stream and store
    runs: dict[str, loop._Run] = {}
    try:
        if data.models is not None:
            _start_stream(feed, ckpts)
            data = feed.data = data._replace(scales=data.models.scales)
        Path(base.out).mkdir(parents=True, exist_ok=True)
        loop._write_json(Path(base.out) / "sweep.json", {"runs": {n: dataclasses.asdict(c) for n, c in sweep.runs.items()}})
        rngs = _Rngs()
        for name, cfg in sweep.runs.items():
            with _named(name):
                out = loop._make_out(cfg, *checked[name])
                torch.manual_seed(cfg.seed)  # the init a single run of cfg draws
                model = loop._build_model(cfg, data, device)
                # each run's checkpoints record the shared buffer's position
                run = loop._Run(cfg, None, device, data, out, model, loop._make_optimizer(model, cfg),
                                stream=feed.stream, data_state=feed.data_state)
                loop._restore(run)
                rngs.keep(name)
                runs[name] = run
        print(f"fastxc: a sweep of {len(runs)} crosscoders on {data.description}, into {base.out}/: "
              + ", ".join(f"{n} ({_describe(r.cfg)})" for n, r in runs.items()), file=sys.stderr)
        for n, r in runs.items():
            if why := r.cfg.aux_k_warning():
                print(f"warning: run {n}: {why}", file=sys.stderr)
        names = data.source_names or [str(i) for i in range(len(data.widths))]
        for run in runs.values():
            run.backends = loggers.MetricLoggers(run.cfg, run.out, run.step, names)
        _run_steps(base, runs, rngs, device, feed)
        return _finish(runs, rngs, feed)
    except BaseException as e:
        loop._close_stream(feed, data, e)
        if isinstance(e, OSError) and checkpoint.is_disk_full(e):  # metrics.jsonl, summary.json
            raise TrainError(f"disk full while writing the sweep's files in {base.out}; free space and rerun with --resume") from e
        raise
    finally:
        for run in runs.values():
            if run.backends is not None:
                run.backends.close()


def _start_stream(feed: loop._Run, ckpts: dict[str, Path | None]) -> None:
    """On the fly: open the --save-store store and the shared stream, rebuilt at the earliest
    run's checkpoint (every run's checkpoint at a step holds the same position), or fresh when
    some run has none (its first fill gives the scales, as a single run's)."""
    cfg = feed.cfg
    if cfg.save_store is not None:
        from fastxc.data.harvest import StoreSink

        feed.sink = StoreSink.open(feed.data.models.plan, cfg.save_store, cfg.overwrite)
    earliest = None
    if all(ckpts.values()):
        steps = {p: json.loads((p / "state.json").read_text())["step"] for p in ckpts.values()}
        earliest = min(steps, key=steps.get)
    loop._start_stream(feed, earliest)


def _finish(runs: dict[str, loop._Run], rngs: _Rngs, feed: loop._Run) -> dict[str, loop.TrainResult]:
    """Every run's final checkpoint; the stream closed (--save-store finished); then every run
    saved and evaluated on the same evaluation batches, drawn once (on the fly: the models run
    once more for them, not once per run)."""
    for name, run in runs.items():
        with _named(name), rngs.of(name):
            checkpoint.save(run.out, run.model, run.opt, None, run.state())
    loop._close_stream(feed, feed.data)
    shared = feed.data._replace(batches=_Replayed(feed.data.batches))
    results = {}
    for name, run in runs.items():
        run.stream, run.data = None, shared
        with _named(name), rngs.of(name):
            results[name] = loop.TrainResult(run.model, run.out, loop._conclude(run, run.model))
    if feed.data.models is not None:
        feed.data.models.close()
    return results


class _Replayed:
    """A DataSource's ``batches(batch_size, seed, start)`` whose batches are drawn once per
    (batch_size, seed, start) and replayed (as copies) to every later caller: every run's
    final evaluation reads the same batches, and the data (the models) only once."""

    def __init__(self, make):
        self.make, self.drawn = make, {}

    def __call__(self, batch_size: int, seed: int, start: int = 0):
        key = (batch_size, seed, start)
        if key not in self.drawn:
            self.drawn[key] = ([], self.make(batch_size, seed=seed, start=start))
        got, it = self.drawn[key]
        i = 0
        while True:
            if i == len(got):
                got.append(next(it))
            yield got[i].clone()
            i += 1


def _describe(cfg: TrainConfig) -> str:
    return f"{cfg.activation}, F={cfg.n_features}" + (f", k={cfg.k}" if cfg.activation in ("topk", "batchtopk") else "")


def _run_steps(base: TrainConfig, runs: dict[str, loop._Run], rngs: _Rngs, device: torch.device,
               feed: loop._Run) -> None:
    """The steps from the earliest run's up to --steps: each batch read once, then every run
    whose next step it is trains on it (loop._step_on: the single run's step)."""
    start = min(run.step for run in runs.values())
    data = feed.data  # one DataSource, shared by every run
    if data.models is not None:  # on the fly: the shared buffer, at the earliest run's step (None: all finished)
        batches = feed.stream if feed.stream is not None else iter(())
    else:
        batches = data.batches(base.batch_size, seed=base.seed, start=start)
    bar = loop._progress(base, start)
    postfix: dict[str, str] = {}
    with contextlib.ExitStack() as stack:
        stack.enter_context(contextlib.closing(bar))
        logs = {}
        for name, run in runs.items():
            run.model.train()
            # the in-backward optimizers' hooks come off the models when the loop ends, however it ends
            stack.enter_context(loop._hooks_removed(run.opt))
            file = stack.enter_context(open(run.out / "metrics.jsonl", "a"))
            view = _RunBar(bar, name, postfix)
            logs[name] = (loop._MetricsLog(file, view, run.cfg, True, run.backends, label=f"{name}: "), view)
        for step in range(start, base.steps):
            x = loop._to_device(next(batches), device)
            for name, run in runs.items():
                if run.step == step:  # a run resumed from a later checkpoint waits for its step
                    with _named(name), rngs.of(name):
                        loop._step_on(run, x, *logs[name])
            bar.update(1)
            if feed.stream is not None:  # tokens harvested beside the steps trained
                bar.set_description_str(f"sweep [{feed.stream.taken:,} tok harvested]", refresh=False)
