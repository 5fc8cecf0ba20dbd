"""Train a crosscoder: ``python -m fastxc.train [flags]`` or ``fastxc.train.main(argv)``.

Config precedence: dataclass defaults < ``--config file.json|yaml`` < command-line flags.
Data: ``--store DIR`` (an activation store), ``--source synthetic`` (planted features), or,
with neither, the embedded default. Outputs in ``--out``:

    crosscoder/        the trained model (Crosscoder.load)
    checkpoint/        the latest checkpoint (model, optimizer, trainer state; --resume)
    metrics.jsonl      one JSON line every --log-every steps
    summary.json       the final evaluation (per-source FVU, L0, NRN classes)
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import torch

from fastxc.train import distributed as dist_
from fastxc.core.cli import Parser, report
from fastxc.core.optim import AdamInBackward
from fastxc.core.crosscoder import ACTIVATIONS, Crosscoder
from fastxc.core.norms import CLASS_NAMES, classify, relative_norms, text_histogram

log = logging.getLogger("fastxc.train")

CHECKPOINT_VERSION = 1


class TrainError(RuntimeError):
    """A training run that cannot go on (bad config, bad data, diverged); one-line message."""


def _doc(text: str, **kw) -> Any:
    return field(metadata={"help": text}, **kw)


@dataclass
class TrainConfig:
    """Everything a training run needs. Each field is also a ``--flag`` (underscores -> dashes)."""

    # data
    store: str | None = _doc("activation store directory to train from", default=None)
    source: str | None = _doc("'synthetic' for the planted-feature source; default: the embedded default", default=None)
    widths: str | None = _doc("expected source widths, comma-separated; checked against the data (synthetic: sets them)", default=None)
    # model
    activation: str = _doc(f"one of {', '.join(ACTIVATIONS)}", default="topk")
    # k = 16 of 1024 suits the embedded default (two 128-wide sources): at k = 32 the feature that
    # fires before "Wait" also absorbs shared line-break directions and leans less to the
    # distilled model on some organism seeds (NRN 0.60 against 0.78 at k = 16, seed 1).
    k: int = _doc("active features per row (topk, batchtopk)", default=16)
    n_features: int = _doc("dictionary size F", default=1024)
    aux_k: int = _doc("AuxK dead-feature loss size (0: off)", default=0)
    aux_coef: float = _doc("AuxK loss weight", default=1.0 / 32.0)
    l1_coef: float = _doc("decoder-norm-weighted L1 coefficient (relu)", default=1.0)
    l1_warmup_frac: float = _doc("fraction of steps over which the L1 coefficient warms up from 0 (relu)", default=0.05)
    dec_init_norm: float = _doc("per-source decoder row norm at init", default=0.1)
    dead_tokens: int = _doc("a feature silent for this many tokens counts as dead", default=1_000_000)
    # optimisation
    steps: int = _doc("training steps", default=2000)
    batch_size: int = _doc("rows per step", default=512)
    lr: float = _doc("Adam learning rate", default=1e-3)
    warmup_frac: float = _doc("fraction of steps of linear LR warm-up", default=0.02)
    decay_frac: float = _doc("final fraction of steps of linear LR decay to 0", default=0.2)
    seed: int = _doc("seed for init and data order", default=0)
    max_bad_batches: int = _doc("stop after this many consecutive batches with NaN/Inf", default=10)
    # runtime and outputs
    out: str | None = _doc("output directory (default: a new runs/<date-time>/ folder)", default=None)
    resume: bool = _doc("continue from the checkpoint in --out", default=False)
    overwrite: bool = _doc("replace an existing run in --out instead of refusing", default=False)
    log_every: int = _doc("steps between metric lines", default=100)
    checkpoint_every: int = _doc("steps between checkpoints (0: only at the end)", default=500)
    eval_batches: int = _doc("batches in the final evaluation", default=8)
    device: str = _doc("torch device", default="cpu")
    parallel: str = _doc("under torchrun: 'data' (ranks split each batch's rows) or 'features' (ranks split the dictionary); 'none': one process", default="none")
    progress: bool = _doc("show a progress bar", default=True)
    # synthetic source
    synthetic_shared: int = _doc("synthetic: planted shared features", default=32)
    synthetic_unique: int = _doc("synthetic: planted features unique to each source", default=32)
    synthetic_noise: float = _doc("synthetic: noise norm per source", default=0.05)

    def validate(self) -> None:
        """Raise TrainError with one clear line on a bad value."""
        if self.activation not in ACTIVATIONS:
            raise TrainError(f"--activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")
        if self.n_features <= 0:
            raise TrainError(f"--n-features must be positive, got {self.n_features}")
        if self.activation != "relu" and not 0 < self.k <= self.n_features:
            raise TrainError(f"--k must satisfy 0 < k <= n_features ({self.n_features}), got {self.k}")
        if not 0 <= self.aux_k <= self.n_features:
            raise TrainError(f"--aux-k must satisfy 0 <= aux_k <= n_features ({self.n_features}), got {self.aux_k}")
        for name in ("steps", "batch_size", "log_every", "eval_batches", "max_bad_batches", "dead_tokens"):
            if getattr(self, name) <= 0:
                raise TrainError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.checkpoint_every < 0:
            raise TrainError(f"--checkpoint-every must be >= 0, got {self.checkpoint_every}")
        for name in ("lr", "l1_coef", "aux_coef", "dec_init_norm"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0) or (name in ("lr", "dec_init_norm") and v == 0):
                raise TrainError(f"--{name.replace('_', '-')} must be a finite positive number, got {v}")
        for name in ("warmup_frac", "decay_frac", "l1_warmup_frac"):
            if not 0 <= getattr(self, name) <= 1:
                raise TrainError(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(self, name)}")
        if self.warmup_frac + self.decay_frac > 1:
            raise TrainError("--warmup-frac + --decay-frac must be <= 1")
        if self.source not in (None, "synthetic", "default"):
            raise TrainError(f"--source must be 'synthetic' (or omitted), got {self.source!r}")
        if self.store and self.source == "synthetic":
            raise TrainError("give either --store or --source synthetic, not both")
        if self.resume and self.overwrite:
            raise TrainError("--resume and --overwrite contradict each other")
        if self.parallel not in dist_.PARALLEL_MODES:
            raise TrainError(f"--parallel must be one of {', '.join(dist_.PARALLEL_MODES)}, got {self.parallel!r}")
        self.parsed_widths()

    def parsed_widths(self) -> list[int] | None:
        if self.widths is None:
            return None
        try:
            w = [int(v) for v in str(self.widths).replace(" ", "").split(",") if v]
        except ValueError:
            raise TrainError(f"--widths must be comma-separated integers, got {self.widths!r}") from None
        if not w or any(v <= 0 for v in w):
            raise TrainError(f"--widths must be positive integers, got {self.widths!r}")
        return w


# ---------------------------------------------------------------------------- CLI
def _bool(v: str) -> bool:
    if v.lower() in ("1", "true", "yes", "on"):
        return True
    if v.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {v!r}")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="python -m fastxc.train",
        description="Train a sparse crosscoder. With no arguments: the embedded default, offline.",
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument("--config", help="JSON or YAML file of config fields (flags override it)")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        helptext = f"{f.metadata['help']} (default: {default})"
        if isinstance(default, bool):
            if default:
                p.add_argument(flag, type=_bool, metavar="BOOL", help=helptext)
                p.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, action="store_false", help=f"turn off {flag}")
            else:
                p.add_argument(flag, action="store_true", help=helptext)
        else:
            typ = {int: int, float: float}.get(type(default), str)
            p.add_argument(flag, type=typ, help=helptext)
    return p


def load_config_file(path: str) -> dict:
    """Read a JSON or YAML dict of config fields (dashes or underscores)."""
    p = Path(path)
    if not p.is_file():
        raise TrainError(f"config file {path} does not exist")
    text = p.read_text()
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:
        raise TrainError(f"config file {path} cannot be parsed: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise TrainError(f"config file {path} must hold a mapping of fields")
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in names:
            raise TrainError(f"config file {path}: unknown field {key!r}")
        out[name] = value
    return out


def parse_config(argv: Sequence[str] | None) -> TrainConfig:
    args = vars(build_parser().parse_args(argv))
    values: dict = {}
    if "config" in args:
        values.update(load_config_file(args.pop("config")))
    values.update(args)
    cfg = TrainConfig(**values)
    cfg.validate()
    return cfg


# ---------------------------------------------------------------------------- data
class DataSource(NamedTuple):
    widths: list[int]
    batches: Any  # callable(batch_size, seed, start) -> iterator of [B, D] or [B, n, d] tensors
    scales: Any  # [n_sources] normalisation multipliers applied to the data (None: 1)
    description: str
    source_names: list[str] | None


def open_data(cfg: TrainConfig) -> DataSource:
    want = cfg.parsed_widths()
    store_path = cfg.store
    if store_path is not None:
        from fastxc.data.store import open_store

        reader = open_store(store_path)
        if len(reader) == 0:
            raise TrainError(f"store {store_path} is empty")
        widths = list(reader.widths)
        if want is not None and want != widths:
            raise TrainError(f"--widths {want} do not match the store's widths {widths} ({store_path})")
        return DataSource(widths, reader.batches, reader.scales, f"store {store_path} ({len(reader)} rows)", list(reader.source_names))

    from fastxc.data.synthetic import PlantedSource

    widths = want or [64, 64]
    src = PlantedSource(widths, n_shared=cfg.synthetic_shared, n_unique=cfg.synthetic_unique, noise=cfg.synthetic_noise, seed=cfg.seed)
    names = ["A", "B"] if len(widths) == 2 else None
    return DataSource(widths, src.batches, None, f"synthetic planted source (widths {widths}, seed {cfg.seed})", names)


# ---------------------------------------------------------------------------- schedule
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
    warm = cfg.l1_warmup_frac * cfg.steps
    return cfg.l1_coef * (min(1.0, (step + 1) / warm) if warm > 0 else 1.0)


# ---------------------------------------------------------------------------- checkpoints
def _make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> AdamInBackward:
    """Adam (fused where the device has it) stepped inside backward, so only one [F, D] gradient
    is ever alive (fastxc.core.optim). Under --parallel data its hooks run after the model's own
    gradient-averaging hooks (registered first), so each rank steps with the averaged gradient."""
    return AdamInBackward(model.parameters(), lr=cfg.lr, betas=(0.9, 0.999))


@contextlib.contextmanager
def _hooks_removed(opt):
    try:
        yield
    finally:
        if isinstance(opt, AdamInBackward):
            opt.remove()


def save_checkpoint(out: Path, model: Crosscoder, opt: torch.optim.Optimizer, state: dict) -> None:
    """Write ``out/checkpoint`` atomically: build it beside, then swap directories."""
    from safetensors.torch import save_file

    tmp, final, old = out / "checkpoint.tmp", out / "checkpoint", out / "checkpoint.old"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save(tmp / "model")
    sd = opt.state_dict()
    tensors = {f"state.{pid}.{name}": v.detach().contiguous().cpu() for pid, st in sd["state"].items() for name, v in st.items()}
    tensors["rng.torch"] = torch.get_rng_state()
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    meta = {"version": CHECKPOINT_VERSION, "param_groups": sd["param_groups"], **state}
    (tmp / "state.json").write_text(json.dumps(meta, indent=2))
    for p in tmp.rglob("*"):
        if p.is_file():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
    # final -> old, tmp -> final, drop old: at every instant one complete checkpoint exists.
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _save_checkpoint_any(out: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, ctx, state: dict) -> None:
    """save_checkpoint for every rank: sharded under --parallel features, rank 0's copy under data."""
    if ctx is not None and ctx.mode == "features":
        dist_.save_checkpoint(out, model, opt, state, ctx, CHECKPOINT_VERSION)
    elif dist_.is_main(ctx):
        save_checkpoint(out, model, opt, state)
    dist_.barrier(ctx)


def find_checkpoint(out: Path) -> Path | None:
    for name in ("checkpoint", "checkpoint.old"):  # .old survives a crash between the two renames
        p = out / name
        if (p / "state.json").is_file():
            return p
    return None


def load_checkpoint(path: Path, model: Crosscoder, opt: torch.optim.Optimizer) -> dict:
    from safetensors.torch import load_file

    meta = json.loads((path / "state.json").read_text())
    if meta.get("version") != CHECKPOINT_VERSION:
        raise TrainError(f"{path}: checkpoint version {meta.get('version')} is not {CHECKPOINT_VERSION}")
    saved = Crosscoder.load(path / "model", device=model.W_dec.device)
    if saved.config() != model.config():
        diff = {k: (saved.config()[k], v) for k, v in model.config().items() if saved.config().get(k) != v}
        raise TrainError(f"{path}: checkpoint does not match this run's model config: {diff}")
    model.load_state_dict(saved.state_dict())
    tensors = load_file(str(path / "optimizer.safetensors"))
    state: dict = {}
    for key, v in tensors.items():
        if key.startswith("state."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = v.to(model.W_dec.device) if name != "step" else v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
    return meta


# ---------------------------------------------------------------------------- training
class TrainResult(NamedTuple):
    model: Crosscoder
    out: Path
    summary: dict


def _to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    return x.to(device=device, dtype=torch.float32, non_blocking=True)


def _prepare_out(cfg: TrainConfig) -> Path:
    if cfg.out is None:
        if cfg.resume:
            raise TrainError("--resume needs --out: the run folder to continue")
        cfg.out = os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise TrainError(f"--out {out} exists and is not a directory")
    has_run = out.is_dir() and (find_checkpoint(out) is not None or (out / "crosscoder").exists())
    if has_run and not (cfg.resume or cfg.overwrite):
        raise TrainError(f"{out} already holds a run: pass --resume to continue it or --overwrite to replace it")
    if has_run and cfg.overwrite:
        for name in ("checkpoint", "checkpoint.old", "checkpoint.tmp", "crosscoder"):
            shutil.rmtree(out / name, ignore_errors=True)
        for name in ("metrics.jsonl", "summary.json"):
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    return out


def train(cfg: TrainConfig) -> TrainResult:
    """Run training as configured; returns the model, the output folder and the summary."""
    cfg.validate()
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainError("--device cuda requested but no CUDA device is available")
    ctx = dist_.setup(cfg.parallel, device)  # None unless --parallel data|features
    main = dist_.is_main(ctx)
    if ctx is not None:
        device = ctx.device
    data = open_data(cfg)
    out = dist_.from_main(lambda: _prepare_out(cfg), ctx)
    torch.manual_seed(cfg.seed)
    model = Crosscoder(
        data.widths,
        cfg.n_features,
        cfg.activation,
        k=cfg.k,
        aux_k=cfg.aux_k,
        aux_coef=cfg.aux_coef,
        l1_coef=cfg.l1_coef,
        dec_init_norm=cfg.dec_init_norm,
        dead_tokens=cfg.dead_tokens,
        source_names=data.source_names,
        device=torch.device("cpu") if cfg.parallel == "features" else device,  # dist_.wrap moves each rank's slice
    )
    if data.scales is not None:
        model.input_scale.copy_(torch.as_tensor(data.scales, dtype=torch.float32))
    model = dist_.wrap(model, ctx)
    opt = _make_optimizer(model, cfg)

    step, skipped, bad_run = 0, 0, 0
    metrics_path = out / "metrics.jsonl"
    if cfg.resume:
        ckpt = find_checkpoint(out)
        if ckpt is None:
            log.warning("--resume: no checkpoint in %s, starting from scratch", out)
            if main:
                metrics_path.unlink(missing_ok=True)
        else:
            if ctx is not None or dist_.is_sharded_checkpoint(ckpt):
                meta = dist_.load_checkpoint(ckpt, model, opt, CHECKPOINT_VERSION)
            else:
                meta = load_checkpoint(ckpt, model, opt)
            step, skipped, bad_run = meta["step"], meta["skipped"], meta["bad_run"]
            if main:
                _truncate_metrics(metrics_path, step)
            log.info("resumed from %s at step %d", ckpt, step)
    elif main:
        metrics_path.unlink(missing_ok=True)

    print(f"fastxc: training a {cfg.activation} crosscoder, widths {data.widths}, F={cfg.n_features}"
          + (f", k={cfg.k}" if cfg.activation != "relu" else "") + f" on {data.description}", file=sys.stderr)
    batches: Iterator = dist_.batches(data.batches, cfg.batch_size, cfg.seed, step, ctx)
    model.train()
    bar = _progress(cfg, step) if main else _NoBar()
    t_last, tokens_last = time.perf_counter(), 0
    window: list[dict] = []
    # the in-backward optimizer's hooks come off the model when the loop ends, however it ends
    with open(metrics_path if main else os.devnull, "a") as metrics_file, _hooks_removed(opt):
        while step < cfg.steps:
            x = _to_device(next(batches), device)
            if not torch.isfinite(x).all():
                skipped += 1
                bad_run += 1
                if bad_run >= cfg.max_bad_batches:
                    raise TrainError(
                        f"{bad_run} consecutive batches held NaN/Inf (last at step {step}); the data is broken — check the store"
                    )
                step += 1
                bar.update(1)
                continue
            bad_run = 0
            lr = lr_at(cfg, step)
            for group in opt.param_groups:
                group["lr"] = lr
            l1 = l1_at(cfg, step)
            res = model(x, l1_coef=l1)
            if not torch.isfinite(res.loss):
                raise TrainError(f"loss became {res.loss.item()} at step {step}; try a lower --lr")
            opt.zero_grad(set_to_none=True)
            res.loss.backward()
            opt.step()
            step += 1
            tokens_last += cfg.batch_size  # the global batch (under --parallel data x is this rank's rows)
            window.append({"loss": res.loss.item(), "mse": res.mse.tolist(), "fvu": res.fvu.tolist(), "l0": res.l0.item()})
            bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.steps:
                now = time.perf_counter()
                rec = _summarise_window(window, step, step * cfg.batch_size, tokens_last / max(now - t_last, 1e-9))
                rec.update(lr=lr, l1_coef=l1 if cfg.activation == "relu" else None, skipped=skipped, dead=int(model.dead_mask().sum()))
                metrics_file.write(json.dumps(rec) + "\n")
                metrics_file.flush()
                bar.set_postfix(loss=f"{rec['loss']:.4g}", fvu="/".join(f"{v:.3f}" for v in rec["fvu"]), l0=f"{rec['l0']:.1f}")
                if not cfg.progress and main:
                    print(_format_metrics(rec), file=sys.stderr)
                window, t_last, tokens_last = [], now, 0
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps:
                _save_checkpoint_any(out, model, opt, ctx, {"step": step, "skipped": skipped, "bad_run": bad_run, "config": dataclasses.asdict(cfg)})
    bar.close()
    _save_checkpoint_any(out, model, opt, ctx, {"step": step, "skipped": skipped, "bad_run": bad_run, "config": dataclasses.asdict(cfg)})
    model = dist_.full_model(model, ctx, out / "checkpoint")  # the whole Crosscoder on rank 0, None elsewhere
    summary: dict = {}
    if model is not None:
        model.save(out / "crosscoder")
        summary = evaluate(model, data, cfg)
        summary.update(steps=step, skipped_batches=skipped)
        (out / "summary.json").write_text(json.dumps({k: v for k, v in summary.items() if not k.startswith("_")}, indent=2))
    dist_.shutdown(ctx)
    return TrainResult(model, out, summary)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines written after the checkpoint we resume from (they will be redone)."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
    path.write_text("".join(ln + "\n" for ln in keep))


def _summarise_window(window: list[dict], step: int, tokens: int, tok_s: float) -> dict:
    n = max(len(window), 1)
    mean = lambda key: sum(w[key] for w in window) / n  # noqa: E731
    vec = lambda key: [sum(w[key][i] for w in window) / n for i in range(len(window[0][key]))] if window else []  # noqa: E731
    return {"step": step, "tokens": tokens, "loss": mean("loss"), "mse": vec("mse"), "fvu": vec("fvu"), "l0": mean("l0"), "tokens_per_s": tok_s}


def _format_metrics(rec: dict) -> str:
    fvu = " ".join(f"{v:.4f}" for v in rec["fvu"])
    return f"step {rec['step']:>7} loss {rec['loss']:.4g} fvu [{fvu}] l0 {rec['l0']:.1f} dead {rec['dead']} {rec['tokens_per_s']:.0f} tok/s"


class _NoBar:
    def update(self, n=1):
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


@torch.no_grad()
def evaluate(model: Crosscoder, data: DataSource, cfg: TrainConfig) -> dict:
    """Per-source FVU and L0 on fresh batches (eval mode), NRN histogram and classes of live features."""
    model.eval()
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
    model.train()
    if not xs:
        raise TrainError("every evaluation batch held NaN/Inf")
    fvu = model.fvu(torch.cat(xs), torch.cat(rs)).tolist()
    summary: dict = {"fvu": fvu, "l0": l0 / len(xs), "live_features": int(fired.sum()), "n_features": model.n_features,
                     "source_names": model.source_names}
    if model.n_sources >= 2:
        nrn = relative_norms(model, 0, 1).nrn[fired.cpu()]
        cls = classify(nrn)
        summary["classes"] = {name: int((cls == i).sum()) for i, name in enumerate(CLASS_NAMES)}
        summary["nrn_mean"] = float(nrn.nanmean()) if nrn.numel() else float("nan")
        summary["nrn_histogram"] = torch.histc(nrn[~torch.isnan(nrn)], bins=10, min=0, max=1).int().tolist()
        summary["_nrn_text"] = text_histogram(nrn)
    return summary


def print_summary(result: TrainResult, file=sys.stdout) -> None:
    s = result.summary
    names = s["source_names"]
    print(f"\nOutputs in {result.out}/: crosscoder/ (Crosscoder.load), metrics.jsonl, summary.json, checkpoint/", file=file)
    print("FVU per source: " + ", ".join(f"{n} {v:.4f}" for n, v in zip(names, s["fvu"])), file=file)
    print(f"L0: {s['l0']:.2f}   live features: {s['live_features']} / {s['n_features']}   skipped batches: {s['skipped_batches']}", file=file)
    if "classes" in s:
        a, b = names[0], names[1]
        print(f"NRN = |{b}| / (|{a}| + |{b}|) of live features (0: only {a}, 1: only {b}), mean {s['nrn_mean']:.3f}:", file=file)
        print(s["_nrn_text"], file=file)
        c = s["classes"]
        print(f"classes: shared {c['shared']}, only-{a} {c['only-A']}, only-{b} {c['only-B']}", file=file)


def main(argv: Sequence[str] | None = None, default_store: Callable[[bool], str] | None = None,
         next_commands: Callable[[Path], list[str]] | None = None) -> int:
    """CLI entry point; returns the process exit code.

    With neither --store nor --source, ``default_store(progress)`` names the store to train on
    (``fastxc.cli`` passes the organism's; without one the planted synthetic source is used),
    and ``next_commands(out)`` lists the commands printed after the run.
    """
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        try:
            cfg = parse_config(argv)
        except SystemExit as e:  # argparse: --help (0) or a bad flag (2, message already printed)
            return int(e.code or 0)
        embedded = cfg.store is None and cfg.source is None
        if embedded and default_store is not None:
            cfg = dataclasses.replace(cfg, store=default_store(cfg.progress))
        result = train(cfg)
    except KeyboardInterrupt:
        print("error: interrupted; continue with --resume", file=sys.stderr)
        return 130
    except (TrainError, ValueError, FileNotFoundError, NotADirectoryError, PermissionError, OSError) as e:
        return report(e)
    if result.summary:  # empty on ranks other than 0
        print_summary(result)
        if embedded and next_commands is not None:
            print("\nNext, try:", *next_commands(result.out), sep="\n  ")
    return 0
