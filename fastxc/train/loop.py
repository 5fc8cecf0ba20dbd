"""The training loop: ``train(cfg)`` from the data to the saved crosscoder and its summary.

Outputs in ``cfg.out``:

    crosscoder/        the trained model (Crosscoder.load)
    checkpoint/        the latest checkpoint (model, optimizer, trainer state; --resume)
    metrics.jsonl      one JSON line every --log-every steps
    summary.json       the final evaluation (per-source FVU, L0, NRN classes; synthetic: recovery
                       of the planted features)
    tensorboard/       --log tensorboard: the same metrics and the NRN histogram
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, TextIO

import torch
from torch import nn

from fastxc.core.crosscoder import Crosscoder
from fastxc.core.device import resolve_device
from fastxc.core.norms import CLASS_NAMES, classify, relative_norms, text_histogram
from fastxc.core.optim import AdamInBackward
from fastxc.train import checkpoint, loggers, parallel
from fastxc.train.config import TrainConfig, TrainError
from fastxc.train.data_parallel import DataParallelCrosscoder
from fastxc.train.feature_parallel import FeatureParallelCrosscoder
from fastxc.train.parallel import DistContext

log = logging.getLogger("fastxc.train")


# ---------------------------------------------------------------------------- data
class DataSource(NamedTuple):
    widths: list[int]
    batches: Any  # callable(batch_size, seed, start) -> iterator of [B, D] or [B, n, d] tensors
    scales: Any  # [n_sources] normalisation multipliers applied to the data (None: 1)
    description: str
    source_names: list[str] | None
    truth: Any = None  # synthetic: the planted features (fastxc.data.synthetic.PlantedTruth)
    models: Any = None  # training straight from the models: the OnTheFlySource (fastxc.data.buffer)


def open_data(cfg: TrainConfig, ctx: DistContext | None = None, device: torch.device | None = None) -> DataSource:
    """The data of ``cfg``: its ``--store``, the models (``--model-a`` ...: harvested on the fly;
    the scales come with the first fill, ``_start_stream``), else the planted synthetic source."""
    want = cfg.parsed_widths()
    if cfg.on_the_fly:
        return _open_models(cfg, want, ctx, device or torch.device("cpu"))
    store_path = cfg.store
    if store_path is not None:
        from fastxc.data.store import open_store

        reader = open_store(store_path)
        if len(reader) == 0:
            raise TrainError(f"store {store_path} is empty")
        if cfg.verify_store:
            verify_store(reader, cfg.progress)
        widths = list(reader.widths)
        if want is not None and want != widths:
            raise TrainError(f"--widths {want} do not match the store's widths {widths} ({store_path})")
        return DataSource(widths, reader.batches, reader.scales, f"store {store_path} ({len(reader)} rows)", list(reader.source_names))

    from fastxc.data.synthetic import PlantedSource

    widths = want or [64, 64]
    src = PlantedSource(widths, n_shared=cfg.synthetic_shared, n_unique=cfg.synthetic_unique, noise=cfg.synthetic_noise, seed=cfg.seed)
    names = ["A", "B"] if len(widths) == 2 else None
    return DataSource(widths, src.batches, None, f"synthetic planted source (widths {widths}, seed {cfg.seed})", names, src.truth)


def _open_models(cfg: TrainConfig, want: list[int] | None, ctx: DistContext | None, device: torch.device) -> DataSource:
    """Check the harvest settings, datasets and tokenizers, then load the models (no forward yet)."""
    from fastxc.data.buffer import OnTheFlySource
    from fastxc.data.harvest import plan_harvest

    plan = plan_harvest(cfg.model_list(), cfg.dataset, cfg.harvest_tokens(), layer=cfg.layer,
                        layers=cfg.parsed_layers(), context_length=cfg.context_length,
                        batch_size=cfg.harvest_batch_size, store_dtype=cfg.store_dtype, model_dtype=cfg.model_dtype,
                        text_field=cfg.text_field, seed=cfg.seed, outlier_factor=cfg.outlier_factor,
                        shard_tokens=cfg.shard_tokens, shuffle_buffer=cfg.shuffle_buffer,
                        ignore_special_tokens=cfg.ignore_special_tokens, skip_bad_lines=cfg.skip_bad_lines)
    if want is not None and want != plan.widths:
        raise TrainError(f"--widths {want} do not match the models' widths {plan.widths}")
    # data parallel: each rank harvests every world-th model batch into its own buffer
    rank, world = (ctx.rank, ctx.world_size) if ctx is not None and ctx.mode == "data" else (0, 1)
    if cfg.batch_size % world or cfg.buffer_rows // world < cfg.batch_size // world:
        raise TrainError(f"--batch-size {cfg.batch_size} and --buffer-rows {cfg.buffer_rows} must split over the "
                         f"{world} data-parallel ranks")
    src = OnTheFlySource(plan, str(device), cfg.buffer_rows // world, cfg.harvest_tokens() // world, rank, world)
    names = [s["name"] for s in plan.sources]
    what = (f"the models {', '.join(plan.models)} on the fly ({cfg.harvest_tokens()} tokens, buffer of "
            f"{cfg.buffer_rows} rows)")
    return DataSource(list(plan.widths), _eval_stream(cfg, src), None, what, names, models=src)


def _eval_stream(cfg: TrainConfig, src):
    """``batches(batch_size, seed, start)`` of an on-the-fly source for the evaluation: a fresh
    stream from the start of the data (with the training stream's scales), as a store's
    evaluation reads the store in another order; a buffer of just the batches it needs. Every
    model batch, also on a data-parallel rank (which trained on its share): the evaluation of
    one process on the same data."""

    def batches(batch_size: int, seed: int, start: int = 0):
        rows = max(batch_size, min(cfg.buffer_rows, cfg.eval_batches * batch_size, cfg.harvest_tokens()))
        it = src.whole().stream(batch_size, seed, buffer_rows=rows, tokens=(start + cfg.eval_batches) * batch_size,
                                scales=src.scales)
        for _ in range(start):
            next(it)
        return it

    return batches


def _data_state(ckpt: Path | None, ctx: DistContext | None) -> tuple[dict, dict] | None:
    """The buffer state (JSON, tensors) this rank resumes from: the checkpoint's ``data``."""
    if ckpt is None:
        return None
    meta = json.loads((ckpt / "state.json").read_text())
    if "data" not in meta:
        raise TrainError(f"{ckpt} holds no data position of a run trained straight from the models "
                         "(a --store run?): resume it with the flags it was trained with")
    from safetensors.torch import load_file

    rank = ctx.rank if ctx is not None and ctx.mode == "data" else 0
    states = meta["data"] if isinstance(meta["data"], list) else [meta["data"]]
    world = ctx.world_size if ctx is not None and ctx.mode == "data" else 1
    if len(states) != world:
        raise TrainError(f"{ckpt} was written by {len(states)} data-parallel rank(s); resume it with as many")
    name = "data.safetensors" if world == 1 else f"data.rank{rank}.safetensors"
    return states[rank], load_file(str(ckpt / name))


def _start_stream(run: "_Run", ckpt: Path | None) -> None:
    """Training straight from the models: open the store sink (--save-store) and the training
    stream, fresh (its first fill gives the scales: all-reduced under data parallel) or
    rebuilt at the checkpoint's position. A finished run only evaluates: no stream then."""
    from fastxc.data.buffer import scales_from_sums

    cfg, src = run.cfg, run.data.models
    state = _data_state(ckpt, run.ctx)
    if state is not None and state[0]["position"] >= cfg.steps and run.sink is None:
        src.scales = state[0]["scales"]  # a finished run: it only evaluates
        run.data_state = state  # and its final checkpoint, written again, keeps the position
        return
    world = src.world
    B = cfg.batch_size // world
    it = src.stream(B, cfg.seed, state=state, sink=run.sink)
    if state is None:
        sums = torch.tensor([*it.first_fill_sums, float(it.first_fill_rows)], dtype=torch.float64)
        if run.ctx is not None and run.ctx.mode == "data":
            parallel.all_reduce(sums)
        it.set_scales(scales_from_sums(sums[:-1].tolist(), int(sums[-1]), run.data.widths))
    src.scales = it.scales
    run.stream = it


def verify_store(reader, progress: bool) -> None:
    """--verify-store: every shard file's sha256 against the manifest's (a progress bar over the
    bytes), before anything is written; TrainError naming the first corrupt file and its shard."""
    from fastxc.data.store import StoreError, verify_checksums

    try:
        n = verify_checksums(reader, progress=progress)
    except StoreError as e:
        raise TrainError(f"--verify-store: {e}") from None
    if n == 0:
        raise TrainError(f"--verify-store: the manifest of {reader.path} records no checksums")


def _to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    return x.to(device=device, dtype=torch.float32, non_blocking=True)


# ---------------------------------------------------------------------------- schedules
def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up, constant, then linear decay to 0 over the last decay_frac of steps."""
    warm = cfg.warmup_frac * cfg.steps
    decay_start = (1 - cfg.decay_frac) * cfg.steps
    if warm > 0 and step < warm:
        return cfg.lr * (step + 1) / warm
    if cfg.decay_frac > 0 and step >= decay_start:
        return cfg.lr * max(0.0, (cfg.steps - step) / (cfg.steps - decay_start))
    return cfg.lr


def l1_at(cfg: TrainConfig, step: int) -> float:
    """The relu L1 coefficient: linear warm-up from 0 over the first l1_warmup_frac of steps."""
    return cfg.l1_coef * _sparsity_warmup(cfg, step)


def l0_at(cfg: TrainConfig, step: int) -> float:
    """The jumprelu L0 coefficient: the same warm-up as l1_at."""
    return cfg.l0_coef * _sparsity_warmup(cfg, step)


def _sparsity_warmup(cfg: TrainConfig, step: int) -> float:
    warm = cfg.l1_warmup_frac * cfg.steps
    return min(1.0, (step + 1) / warm) if warm > 0 else 1.0


# ---------------------------------------------------------------------------- setup
@dataclass
class _Run:
    """One training run in progress: what ``train`` set up and the trainer state it advances."""

    cfg: TrainConfig
    ctx: DistContext | None  # None unless --parallel data|features
    device: torch.device
    data: DataSource
    out: Path
    model: nn.Module  # the module this rank trains (see ``wrap``)
    opt: AdamInBackward
    backends: loggers.MetricLoggers | None = None  # --log backends (rank 0)
    step: int = 0
    skipped: int = 0  # batches skipped in all (NaN/Inf input, or a non-finite loss)
    bad_run: int = 0  # consecutive non-finite batches just before this step
    first_fvu: float | None = None  # the worst source FVU of the untrained model (step 0): divergence's yardstick
    diverged: int = 0  # consecutive diverged batches just before this step (never in a checkpoint)
    stream: Any = None  # training straight from the models: the BufferedBatches it trains from
    sink: Any = None  # --save-store: the StoreSink the harvested rows go to
    data_state: Any = None  # a finished run resumed with no stream: its checkpoint's data position

    @property
    def is_main(self) -> bool:
        return parallel.is_main(self.ctx)

    def state(self) -> dict:
        """The trainer state a checkpoint keeps (state.json)."""
        st = {"step": self.step, "skipped": self.skipped, "bad_run": self.bad_run, "first_fvu": self.first_fvu,
              "config": dataclasses.asdict(self.cfg)}
        if self.stream is not None:  # the data position: rebuilt on resume (checkpoint.save writes the tensors)
            st["data"], st["_data_tensors"] = self.stream.state()
        elif self.data_state is not None:
            st["data"], st["_data_tensors"] = self.data_state
        return st


def _prepare_out(cfg: TrainConfig, then=None) -> Path:
    """The run folder: created, refused if it holds a run (unless --resume), or cleared
    (--overwrite); ``then()`` runs between the checks and the folder's creation."""
    out, has_run = _check_out(cfg)
    if then is not None:
        then()
    return _make_out(cfg, out, has_run)


def _check_out(cfg: TrainConfig) -> tuple[Path, bool]:
    """The run folder and whether it holds a run; TrainError when this config may not use it.
    Writes nothing (a sweep checks every run's folder before it touches any)."""
    if cfg.out is None:
        if cfg.resume:
            raise TrainError("--resume needs --out: the run folder to continue")
        cfg.out = os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise TrainError(f"--out {out} exists and is not a directory")
    has_ckpt = out.is_dir() and checkpoint.find_checkpoint(out) is not None
    has_run = has_ckpt or (out / "crosscoder").exists()
    if cfg.resume and not has_ckpt and not cfg.resume_if_exists:
        raise TrainError(f"--resume: no checkpoint in {out} to continue (--resume-if-exists starts fresh when there is none)")
    if has_run and not ((has_ckpt and (cfg.resume or cfg.resume_if_exists)) or cfg.overwrite):
        raise TrainError(f"{out} already holds a run: pass --resume to continue it or --overwrite to replace it")
    return out, has_run


def _make_out(cfg: TrainConfig, out: Path, has_run: bool) -> Path:
    """Create the checked run folder, first clearing the run it holds under --overwrite."""
    if has_run and cfg.overwrite:
        for name in ("checkpoint", "checkpoint.old", "checkpoint.tmp", "crosscoder", "crosscoder.tmp", "tensorboard"):
            shutil.rmtree(out / name, ignore_errors=True)
        for name in ("metrics.jsonl", "summary.json"):
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _build_model(cfg: TrainConfig, data: DataSource, device: torch.device) -> Crosscoder:
    """The freshly initialised Crosscoder (seeded by the caller), scaled as the data."""
    model = Crosscoder(
        data.widths,
        cfg.n_features,
        cfg.activation,
        k=cfg.k,
        aux_k=cfg.aux_k,
        aux_coef=cfg.aux_coef,
        l1_coef=cfg.l1_coef,
        l0_coef=cfg.l0_coef,
        jumprelu_bandwidth=cfg.jumprelu_bandwidth,
        jumprelu_init_threshold=cfg.jumprelu_init_threshold,
        dec_init_norm=cfg.dec_init_norm,
        dead_tokens=cfg.dead_tokens,
        source_names=data.source_names,
        device=torch.device("cpu") if cfg.parallel == "features" else device,  # wrap moves each rank's slice
        # fp32 master weights always; --dtype bfloat16 makes the forward compute in bf16
        compute_dtype=None if cfg.dtype == "float32" else cfg.dtype,
    )
    if data.scales is not None:
        model.input_scale.copy_(torch.as_tensor(data.scales, dtype=torch.float32))
    return model


def wrap(model: Crosscoder, ctx: DistContext | None) -> nn.Module:
    """The module this rank trains: ``model`` itself, its data-parallel replica or its slice."""
    if ctx is None:
        return model
    if ctx.mode == "data":
        return DataParallelCrosscoder(model, ctx)
    return FeatureParallelCrosscoder(model, ctx)


def _make_optimizer(model: nn.Module, cfg: TrainConfig) -> AdamInBackward:
    """Adam (fused where the device has it) stepped inside backward, so only one [F, D] gradient
    is ever alive (fastxc.core.optim). Under --parallel data its hooks run after the model's own
    gradient-averaging hooks (registered first), so each rank steps with the averaged gradient."""
    return AdamInBackward(model.parameters(), lr=cfg.lr, betas=(0.9, 0.999))


def _start(cfg: TrainConfig) -> _Run:
    """Validate ``cfg``, join the process group, open the data and the run folder, and build the
    model and optimizer."""
    cfg.validate()
    device = resolve_device(cfg.device)  # DeviceError (a ValueError): one line
    ctx = parallel.setup(cfg.parallel, device)
    if ctx is not None:
        device = ctx.device
    loggers.check_available(cfg)
    # (open_data(cfg) as such: tests replace it with a one-argument function)
    data = _open_models(cfg, cfg.parsed_widths(), ctx, device) if cfg.on_the_fly else open_data(cfg)
    sink, run = [], None

    def open_sink() -> None:  # --save-store: checked (and created) only once the run folder passed
        if cfg.save_store is not None and data.models is not None:
            from fastxc.data.harvest import StoreSink

            sink.append(StoreSink.open(data.models.plan, cfg.save_store, cfg.overwrite))

    try:
        out = parallel.from_main(lambda: _prepare_out(cfg, open_sink), ctx)
        run = _Run(cfg, ctx, device, data, out, None, None, sink=sink[0] if sink else None)
        if data.models is not None:
            resuming = cfg.resume or cfg.resume_if_exists
            _start_stream(run, checkpoint.find_checkpoint(out) if resuming else None)
            data = run.data = data._replace(scales=data.models.scales)
    except BaseException as e:
        if run is None and sink and sink[0] is not None:
            sink[0].fail(e)
        _close_stream(run, data, e)
        raise
    torch.manual_seed(cfg.seed)
    run.model = wrap(_build_model(cfg, data, device), ctx)
    run.opt = _make_optimizer(run.model, cfg)
    return run


def _close_stream(run: "_Run | None", data: DataSource, error: BaseException | None = None) -> None:
    """Stop the producer thread and free the models' hooks. With --save-store and no error
    the producer first finishes the store's rows and the store gets its manifest; after an
    error a store without a finished shard is removed."""
    stream, sink = (run.stream, run.sink) if run is not None else (None, None)
    if stream is not None:
        run.stream = None
        stream.close(wait_for_sink=error is None)
    if sink is not None:
        run.sink = None
        if error is not None:
            sink.fail(error)
        else:
            sink.finish()
    if error is not None and data.models is not None:
        data.models.close()


def _restore(run: _Run) -> None:
    """--resume: load the run folder's checkpoint (either format) and drop the metric lines
    after it; otherwise start metrics.jsonl afresh."""
    metrics = run.out / "metrics.jsonl"
    # (_prepare_out refused --resume without a checkpoint, unless --resume-if-exists)
    ckpt = checkpoint.find_checkpoint(run.out) if run.cfg.resume or run.cfg.resume_if_exists else None
    if ckpt is None:
        if run.is_main:
            metrics.unlink(missing_ok=True)
        return
    meta = checkpoint.load_checkpoint(ckpt, run.model, run.opt)
    run.step, run.skipped, run.bad_run = meta["step"], meta["skipped"], meta["bad_run"]
    run.first_fvu = meta.get("first_fvu")
    if run.is_main:
        _truncate_metrics(metrics, run.step)
    log.info("resumed from %s at step %d", ckpt, run.step)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines written after the checkpoint we resume from (they will be redone)."""
    if not path.exists():
        return
    keep = []
    for ln in path.read_text().splitlines():
        try:
            rec = json.loads(ln)
        except ValueError:  # a line torn by a full disk or a kill mid-write
            continue
        if rec["step"] <= step:
            keep.append(ln)
    path.write_text("".join(ln + "\n" for ln in keep))


# ---------------------------------------------------------------------------- training
class TrainResult(NamedTuple):
    model: Crosscoder
    out: Path
    summary: dict


def train(cfg: TrainConfig) -> TrainResult:
    """Run training as configured; returns the model, the output folder and the summary
    (model None and summary empty on ranks other than 0)."""
    run = _start(cfg)
    try:
        _restore(run)
    except BaseException as e:
        _close_stream(run, run.data, e)
        raise
    print(f"fastxc: training a {cfg.activation} crosscoder, widths {run.data.widths}, F={cfg.n_features}"
          + (f", k={cfg.k}" if cfg.activation in ("topk", "batchtopk") else "") + f" on {run.data.description}", file=sys.stderr)
    if run.is_main and (why := cfg.aux_k_warning()):
        print(f"warning: {why}", file=sys.stderr)
    names = run.data.source_names or [str(i) for i in range(len(run.data.widths))]
    run.backends = loggers.MetricLoggers(cfg, run.out, run.step, names) if run.is_main else None
    try:
        _run_steps(run)
        return _finish(run)
    except BaseException as e:
        _close_stream(run, run.data, e)
        if isinstance(e, OSError) and checkpoint.is_disk_full(e):  # metrics.jsonl, summary.json
            raise checkpoint.write_error(e, f"the run's files in {run.out}", run.out) from e
        raise
    finally:
        if run.backends is not None:
            run.backends.close()


@contextlib.contextmanager
def _hooks_removed(opt):
    try:
        yield
    finally:
        if isinstance(opt, AdamInBackward):
            opt.remove()


def _run_steps(run: _Run) -> None:
    """Steps run.step .. cfg.steps: train, log, checkpoint (skipping non-finite batches)."""
    cfg = run.cfg
    if run.data.models is not None:  # this rank's rows, drawn from its shuffle buffer
        batches = parallel.agree_finite(run.stream, run.ctx) if run.stream is not None else iter(())
    else:
        batches = parallel.batches(run.data.batches, cfg.batch_size, cfg.seed, run.step, run.ctx)
    run.model.train()
    bar = _progress(cfg, run.step) if run.is_main else _NoBar()
    # the in-backward optimizer's hooks come off the model when the loop ends, however it ends
    with open(run.out / "metrics.jsonl" if run.is_main else os.devnull, "a") as file, _hooks_removed(run.opt), \
            contextlib.closing(bar):
        metrics = _MetricsLog(file, bar, cfg, run.is_main, run.backends)
        while run.step < cfg.steps:
            _step_on(run, _to_device(next(batches), run.device), metrics, bar)
            if run.stream is not None:  # tokens harvested (this rank's) beside the steps trained
                bar.set_description_str(f"train [{run.stream.taken:,} tok harvested]", refresh=False)


def _step_on(run: _Run, x: torch.Tensor, metrics: _MetricsLog, bar) -> None:
    """Step run.step on batch x (on run.device): train (or skip a non-finite batch), then log
    and checkpoint when due. A sweep calls it for each of its runs with the same x."""
    cfg = run.cfg
    if not torch.isfinite(x).all():
        _skip_batch(run)
        bar.update(1)
        return
    run.bad_run = 0
    lr, l1, res = _train_step(run, x)
    run.step += 1
    if res is not None:
        metrics.add(res)
    bar.update(1)
    if run.step % cfg.log_every == 0 or run.step == cfg.steps:
        metrics.write(run, lr, l1)
    # no checkpoint of a diverged model: the last good one stays for --resume
    if cfg.checkpoint_every and run.step % cfg.checkpoint_every == 0 and run.step < cfg.steps and not run.diverged:
        checkpoint.save(run.out, run.model, run.opt, run.ctx, run.state())


def _skip_batch(run: _Run) -> None:
    """Count a non-finite batch as a step without training; TrainError after too many in a row."""
    run.skipped += 1
    run.bad_run += 1
    if run.bad_run >= run.cfg.max_bad_batches:
        raise TrainError(
            f"{run.bad_run} consecutive batches held NaN/Inf (last at step {run.step}); the data is broken — check the store"
        )
    run.step += 1


# A batch whose worst source FVU exceeds this many times the untrained model's (about 1:
# predicting zero) has diverged: its reconstruction error is orders of magnitude above the data's
# variance, which no model that is learning produces (lr 1e6 reaches FVU 1e28 within one step).
DIVERGED_FVU_FACTOR = 100.0


def _lr_scales(run: _Run) -> list[float]:
    """Per optimizer group (one per parameter) the multiplier of the scheduled lr: 1, except
    the jumprelu log-thresholds (--jumprelu-threshold-lr-scale)."""
    thr = getattr(run.model, "log_threshold", None)
    return [run.cfg.jumprelu_threshold_lr_scale if thr is not None and p is thr else 1.0 for p in run.opt.params]


def _train_step(run: _Run, x: torch.Tensor):
    """One optimizer step on batch x at the schedules' values -> (lr, l1 coefficient, output);
    the output is None when the loss was non-finite and the step was skipped."""
    lr = lr_at(run.cfg, run.step)
    for group, scale in zip(run.opt.param_groups, _lr_scales(run)):
        group["lr"] = lr * scale
    l1 = l1_at(run.cfg, run.step)
    res = run.model(x, l1_coef=l1, l0_coef=l0_at(run.cfg, run.step))
    loss, fvu = torch.stack([res.loss.detach().float(), res.fvu.detach().float().max()]).tolist()  # one sync
    finite = math.isfinite(loss) and math.isfinite(fvu)
    if run.first_fvu is None and finite:
        run.first_fvu = fvu
    _check_divergence(run, finite, loss, fvu)
    if not finite:  # no update: a non-finite gradient would poison Adam's state
        run.skipped += 1
        return lr, l1, None
    run.opt.zero_grad(set_to_none=True)
    res.loss.backward()
    run.opt.step()
    return lr, l1, res


def _check_divergence(run: _Run, finite: bool, loss: float, fvu: float) -> None:
    """Count diverged batches (a non-finite loss, or FVU DIVERGED_FVU_FACTOR x the untrained
    model's): a ``warning:`` line at the first of a run of them, TrainError at --max-bad-batches."""
    start = max(1.0, run.first_fvu or 1.0)
    if finite and fvu <= DIVERGED_FVU_FACTOR * start:
        run.diverged = 0
        return
    run.diverged += 1
    what = f"loss {loss:.3g}" if not finite else f"FVU {fvu:.3g}, over {DIVERGED_FVU_FACTOR:g}x the untrained model's {start:.3g}"
    if run.diverged == 1 and run.is_main:
        print(f"warning: training diverged at step {run.step} ({what}); try a lower --lr "
              f"(stopping after {run.cfg.max_bad_batches} such batches in a row, --max-bad-batches)", file=sys.stderr)
    if run.diverged >= run.cfg.max_bad_batches:
        ckpt = checkpoint.find_checkpoint(run.out)
        kept = f"the last good checkpoint is {ckpt}" if ckpt is not None else "no checkpoint was written"
        raise TrainError(f"training diverged: {run.diverged} batches in a row up to step {run.step} ({what}); "
                         f"{kept}; try a lower --lr")


def _finish(run: _Run) -> TrainResult:
    """The final checkpoint; then on rank 0 the whole model, saved and evaluated; leave the group."""
    checkpoint.save(run.out, run.model, run.opt, run.ctx, run.state())
    _close_stream(run, run.data)  # --save-store: the store is finished here
    model = checkpoint.full_model(run.model, run.ctx, run.out / "checkpoint")  # None on ranks other than 0
    summary = _conclude(run, model) if model is not None else {}
    if run.data.models is not None:
        run.data.models.close()
    parallel.shutdown(run.ctx)
    return TrainResult(model, run.out, summary)


def _conclude(run: _Run, model: Crosscoder) -> dict:
    """Rank 0, after the final checkpoint: save the whole ``model`` to crosscoder/, evaluate it,
    write summary.json (and the NRN histogram to the --log backends); returns the summary."""
    checkpoint.save_model(run.out, model)
    summary = evaluate(model, run.data, run.cfg)
    summary.update(steps=run.step, skipped_batches=run.skipped)
    _write_json(run.out / "summary.json", {k: v for k, v in summary.items() if not k.startswith("_")})
    if run.backends is not None and "_nrn" in summary:
        run.backends.histogram("nrn", summary["_nrn"], run.step)
    return summary


def _write_json(path: Path, obj: dict) -> None:
    """``path`` replaced whole (temporary file and rename): never a half-written JSON."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=2))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------- metrics
class _MetricsLog:
    """The step outputs since the last metrics line, written as one JSON line of their means
    (and sent to the --log backends)."""

    def __init__(self, file: TextIO, bar, cfg: TrainConfig, is_main: bool, backends: loggers.MetricLoggers | None = None,
                 label: str = ""):
        self.file, self.bar, self.cfg, self.is_main, self.backends = file, bar, cfg, is_main, backends
        self.label = label  # a sweep's run name, before each printed metrics line
        self.window: list[dict] = []
        self.t_last, self.tokens = time.perf_counter(), 0

    def add(self, res) -> None:
        self.tokens += self.cfg.batch_size  # the global batch (under --parallel data x is this rank's rows)
        self.window.append({"loss": res.loss.item(), "mse": res.mse.tolist(), "fvu": res.fvu.tolist(), "l0": res.l0.item()})

    def write(self, run: _Run, lr: float, l1: float) -> None:
        now = time.perf_counter()
        rec = _summarise_window(self.window, run.step, run.step * self.cfg.batch_size, self.tokens / max(now - self.t_last, 1e-9))
        rec.update(lr=lr, l1_coef=l1 if self.cfg.activation == "relu" else None, skipped=run.skipped,
                   dead=int(run.model.dead_mask().sum()))
        if self.cfg.activation == "jumprelu":
            rec["l0_coef"] = l0_at(self.cfg, run.step - 1)
        self.file.write(json.dumps(rec) + "\n")
        self.file.flush()
        if self.backends is not None:
            self.backends.log(rec)
        self.bar.set_postfix(loss=f"{rec['loss']:.4g}", fvu="/".join(f"{v:.3f}" for v in rec["fvu"]), l0=f"{rec['l0']:.1f}")
        if not self.cfg.progress and self.is_main:
            print(self.label + _format_metrics(rec), file=sys.stderr)
        self.window, self.t_last, self.tokens = [], now, 0


def _summarise_window(window: list[dict], step: int, tokens: int, tok_s: float) -> dict:
    n = max(len(window), 1)

    def mean(key: str) -> float:
        return sum(w[key] for w in window) / n

    def vec(key: str) -> list[float]:
        return [sum(w[key][i] for w in window) / n for i in range(len(window[0][key]))] if window else []

    return {"step": step, "tokens": tokens, "loss": mean("loss"), "mse": vec("mse"), "fvu": vec("fvu"), "l0": mean("l0"), "tokens_per_s": tok_s}


def _format_metrics(rec: dict) -> str:
    fvu = " ".join(f"{v:.4f}" for v in rec["fvu"])
    return f"step {rec['step']:>7} loss {rec['loss']:.4g} fvu [{fvu}] l0 {rec['l0']:.1f} dead {rec['dead']} {rec['tokens_per_s']:.0f} tok/s"


class _NoBar:
    def update(self, n=1):
        pass

    def set_description_str(self, desc=None, refresh=True):
        pass

    def set_postfix(self, **kw):
        pass

    def close(self):
        pass


def _progress(cfg: TrainConfig, start: int):
    if not cfg.progress:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=cfg.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)


# ---------------------------------------------------------------------------- evaluation
@torch.no_grad()
def _eval_pass(model: Crosscoder, data: DataSource, cfg: TrainConfig):
    """Encode and decode cfg.eval_batches fresh batches (non-finite ones dropped) ->
    (inputs [N, D], reconstructions [N, D], fired [F] bool, mean L0, batches used)."""
    device = model.W_dec.device
    # A different seed gives batches in another order (for a store) or unseen rows (synthetic).
    it = data.batches(cfg.batch_size, seed=cfg.seed + 1, start=0)
    xs, rs, fired, l0 = [], [], torch.zeros(model.n_features, dtype=torch.bool, device=device), 0.0
    for _ in range(cfg.eval_batches):
        x = model.flatten_input(_to_device(next(it), device))
        if not torch.isfinite(x).all():
            continue
        f = model.encode(x)
        xs.append(x)
        rs.append(model.decode(f))
        fired |= (f > 0).any(dim=0)
        l0 += float((f > 0).sum(dim=1).float().mean())
    if not xs:
        raise TrainError("every evaluation batch held NaN/Inf")
    return torch.cat(xs), torch.cat(rs), fired, l0 / len(xs)


@torch.no_grad()
def evaluate(model: Crosscoder, data: DataSource, cfg: TrainConfig) -> dict:
    """Per-source FVU and L0 on fresh batches (eval mode), NRN histogram and classes of live features."""
    model.eval()
    try:
        x, recon, fired, l0 = _eval_pass(model, data, cfg)
    finally:
        model.train()
    summary: dict = {"fvu": model.fvu(x, recon).tolist(), "l0": l0, "live_features": int(fired.sum()),
                     "n_features": model.n_features, "source_names": model.source_names}
    if model.n_sources >= 2:
        nrn = relative_norms(model, 0, 1).nrn[fired.cpu()]
        cls = classify(nrn)
        summary["classes"] = {name: int((cls == i).sum()) for i, name in enumerate(CLASS_NAMES)}
        summary["nrn_mean"] = float(nrn.nanmean()) if nrn.numel() else float("nan")
        summary["nrn_histogram"] = torch.histc(nrn[~torch.isnan(nrn)], bins=10, min=0, max=1).int().tolist()
        summary["_nrn_text"] = text_histogram(nrn)
        summary["_nrn"] = nrn.tolist()
    if data.truth is not None:
        from fastxc.data.synthetic import recovery_report

        summary.update(recovery_report(model, data.truth))
    return summary
