"""Training checkpoints: write, find, load, in either format.

Single process and data parallel (rank 0) write ``out/checkpoint/``: ``model/``
(Crosscoder.save), ``optimizer.safetensors`` (Adam state keyed ``state.<param id>.<name>``, and
the torch RNG state) and ``state.json`` (format version, optimizer param groups, trainer
state). Feature parallel writes ``checkpoint/rank{r}.safetensors`` (the rank's rows, its
optimizer state, the replicated tensors) plus ``manifest.json`` (world size, feature slices,
model config) and ``state.json``. ``load_checkpoint`` re-slices either format into any world
size; ``load_full_model(checkpoint)`` assembles the whole Crosscoder in one process.

Every writer builds ``checkpoint.tmp/`` beside and swaps it in (checkpoint -> checkpoint.old,
checkpoint.tmp -> checkpoint, drop checkpoint.old), so at every instant one complete
checkpoint exists; ``find_checkpoint`` also accepts ``checkpoint.old``. A write that fails
(a full disk) removes ``checkpoint.tmp/`` and raises a one-line TrainError naming the intact
checkpoint to resume from. Every .safetensors goes through ``fastxc.core.files.save_safetensors``,
so it gets the mode the umask asks for (0644 under umask 022), like the JSON beside it.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fastxc.core.crosscoder import Crosscoder
from fastxc.core.files import save_safetensors
from fastxc.train import parallel
from fastxc.train.config import TrainError
from fastxc.train.feature_parallel import FeatureParallelCrosscoder, feature_slices
from fastxc.train.parallel import DistContext, DistributedError, barrier

log = logging.getLogger("fastxc.train")

CHECKPOINT_VERSION = 1
SHARDED_FORMAT = "fastxc-feature-sharded"
SHARDED_VERSION = 1
# Order of the parameters in the optimizer (Crosscoder's registration order); a checkpoint's
# optimizer state is keyed by these names.
PARAM_NAMES = ("W_enc", "b_enc", "W_dec", "b_dec")
# Every parameter name an optimizer state may hold: jumprelu's log_threshold is registered last,
# so the others keep their ids.
OPT_PARAM_NAMES = PARAM_NAMES + ("log_threshold",)
# Tensors with one row per feature (split across ranks); everything else is replicated.
ROW_TENSORS = ("W_enc", "b_enc", "W_dec", "tokens_since_fired", "log_threshold")


# ---------------------------------------------------------------------------- writing
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def is_disk_full(e: BaseException) -> bool:
    """An OSError for a full disk or quota, or safetensors' wrapping of one (SafetensorError
    'I/O error: No space left on device (os error 28)')."""
    if isinstance(e, OSError):
        return e.errno in DISK_FULL
    text = str(e)
    return "No space left on device" in text or "Disk quota exceeded" in text


def write_error(e: BaseException, what: str, out: Path) -> TrainError:
    """The one-line TrainError for a failed write of ``what``, naming the checkpoint to resume from."""
    ckpt = find_checkpoint(out)
    if ckpt is not None:
        try:
            kept = f"the checkpoint of step {json.loads((ckpt / 'state.json').read_text())['step']} in {ckpt} is intact"
        except (OSError, ValueError, KeyError):
            kept = f"the checkpoint in {ckpt} is intact"
        hint = f"{kept}: free space and rerun with --resume"
    else:
        hint = "no checkpoint was written yet: free space and run again"
    if is_disk_full(e):
        return TrainError(f"disk full while writing {what}; {hint}")
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return TrainError(f"cannot write {what} ({reason}); {hint}")


def _write_failure(e: BaseException) -> bool:
    """A failure of the disk under a write (not a bug of ours): OSError or safetensors' error."""
    return isinstance(e, OSError) or type(e).__name__ == "SafetensorError"


def _fsync(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _swap_in(out: Path) -> Path:
    """checkpoint.tmp -> checkpoint, keeping checkpoint.old until the new one is in place."""
    tmp, final, old = out / "checkpoint.tmp", out / "checkpoint", out / "checkpoint.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def _write_state(tmp: Path, opt: torch.optim.Optimizer, state: dict) -> None:
    """state.json: format version, the optimizer's param groups and the trainer's ``state``."""
    meta = {"version": CHECKPOINT_VERSION, "param_groups": opt.state_dict()["param_groups"], **state}
    (tmp / "state.json").write_text(json.dumps(meta, indent=2))


def save_checkpoint(out: Path, model: Crosscoder, opt: torch.optim.Optimizer, state: dict,
                    extra: dict[str, dict[str, Tensor]] | None = None) -> None:
    """Write ``out/checkpoint`` (the single-process format) atomically; ``extra``: further
    safetensors files (name -> tensors), e.g. a shuffle buffer's slots."""
    tmp = out / "checkpoint.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save(tmp / "model")
        for name, tensors in (extra or {}).items():
            save_safetensors(tensors, tmp / name)
        sd = opt.state_dict()
        tensors = {f"state.{pid}.{name}": v.detach().contiguous().cpu() for pid, st in sd["state"].items() for name, v in st.items()}
        tensors["rng.torch"] = torch.get_rng_state()
        save_safetensors(tensors, tmp / "optimizer.safetensors")
        _write_state(tmp, opt, state)
        for p in tmp.rglob("*"):
            if p.is_file():
                _fsync(p)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)  # frees the space; the previous checkpoint is untouched
        if _write_failure(e):
            raise write_error(e, f"the checkpoint of step {state['step']} in {out}", out) from e
        raise
    _swap_in(out)


def save_model(out: Path, model: Crosscoder) -> Path:
    """``out/crosscoder`` (Crosscoder.save), built in ``crosscoder.tmp/`` and renamed into place,
    so a failed write leaves no half-written model."""
    tmp, final = out / "crosscoder.tmp", out / "crosscoder"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save(tmp)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if _write_failure(e):
            raise write_error(e, f"the trained model in {final}", out) from e
        raise
    shutil.rmtree(final, ignore_errors=True)  # a resumed finished run writes it again
    os.replace(tmp, final)
    return final


@torch.no_grad()
def sync_replicated(model: nn.Module, ctx: DistContext | None) -> float:
    """Give every rank rank 0's replicated tensors (b_dec, threshold); returns the largest
    difference there was. Every rank computes them from the same numbers, so it is 0 (checked
    by the tests on gloo); if a platform's kernels ever differ between ranks the checkpoint
    still holds one consistent model, and the difference is logged."""
    if ctx is None or ctx.world_size == 1:
        return 0.0
    worst = 0.0
    for name in ("b_dec", "threshold"):
        t = getattr(model, name)
        ref = t.detach().clone()
        dist.broadcast(ref, 0)
        diff = (t.float() - ref.float()).abs().max().reshape(1)
        parallel.all_reduce(diff, dist.ReduceOp.MAX)
        if diff.item() != 0:
            log.warning("replicated %s differed between ranks by %.3g; took rank 0's", name, diff.item())
            t.copy_(ref)
        worst = max(worst, diff.item())
    return worst


def _shard_tensors(model: FeatureParallelCrosscoder, opt: torch.optim.Optimizer) -> dict[str, Tensor]:
    """This rank's file: ``model.<tensor>``, ``opt.<param name>.<state>`` and ``rng.torch``."""
    tensors = {f"model.{k}": v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    names = dict(enumerate(OPT_PARAM_NAMES))
    for pid, st in opt.state_dict()["state"].items():
        for key, v in st.items():
            tensors[f"opt.{names[pid]}.{key}"] = v.detach().contiguous().cpu()
    tensors["rng.torch"] = torch.get_rng_state()
    return tensors


def save_sharded_checkpoint(out: Path, model: FeatureParallelCrosscoder, opt: torch.optim.Optimizer, state: dict,
                            ctx: DistContext, extra: dict[str, dict[str, Tensor]] | None = None) -> Path:
    """Write ``out/checkpoint`` from every rank (call on all ranks): rank{r}.safetensors each,
    then rank 0 writes manifest.json and state.json and swaps the directory in."""

    sync_replicated(model, ctx)
    tmp = out / "checkpoint.tmp"
    if ctx.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(ctx)
    path = tmp / f"rank{ctx.rank}.safetensors"
    try:
        save_safetensors(_shard_tensors(model, opt), path)
        _fsync(path)
    except Exception as e:
        # This rank stops; the others fail at the next collective. The previous checkpoint is
        # untouched (checkpoint.tmp is only swapped in once every rank has written).
        if _write_failure(e):
            raise write_error(e, f"the checkpoint of step {state['step']} in {out}", out) from e
        raise
    barrier(ctx)
    if ctx.is_main:
        manifest = {"format": SHARDED_FORMAT, "version": SHARDED_VERSION, "world_size": ctx.world_size,
                    "slices": feature_slices(model.n_features, ctx.world_size), "config": model.config()}
        try:
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
            _write_state(tmp, opt, state)
            for name, tensors in (extra or {}).items():
                save_safetensors(tensors, tmp / name)
            for p in (tmp / "manifest.json", tmp / "state.json", *(tmp / name for name in extra or {})):
                _fsync(p)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise write_error(e, f"the checkpoint of step {state['step']} in {out}", out) from e
        _swap_in(out)
    barrier(ctx)
    return out / "checkpoint"


def _data_files(state: dict, ctx: DistContext | None) -> tuple[dict, dict[str, dict[str, Tensor]]]:
    """The state without its data tensors, and the files they go to: ``data.safetensors``, or
    under --parallel data with several ranks every rank's (gathered to rank 0) in
    ``data.rank{r}.safetensors``, its JSON part in the list ``state["data"]``."""
    state = dict(state)
    tensors = state.pop("_data_tensors", None)
    if tensors is None:
        return state, {}
    if ctx is None or ctx.mode != "data" or ctx.world_size == 1:
        return state, {"data.safetensors": tensors}
    every = [None] * ctx.world_size
    dist.all_gather_object(every, (state["data"], tensors))
    state["data"] = [d for d, _ in every]
    return state, {f"data.rank{r}.safetensors": t for r, (_, t) in enumerate(every)}


def save(out: Path, model: nn.Module, opt: torch.optim.Optimizer, ctx: DistContext | None, state: dict) -> None:
    """The checkpoint of this run, called on every rank: sharded under --parallel features,
    rank 0's single-process copy otherwise (with every rank's data position)."""
    state, extra = _data_files(state, ctx)
    if ctx is not None and ctx.mode == "features":
        save_sharded_checkpoint(out, model, opt, state, ctx, extra)
    elif parallel.is_main(ctx):
        save_checkpoint(out, model, opt, state, extra)
    barrier(ctx)


# ---------------------------------------------------------------------------- reading
def find_checkpoint(out: Path) -> Path | None:
    for name in ("checkpoint", "checkpoint.old"):  # .old survives a crash between the two renames
        p = out / name
        if (p / "state.json").is_file():
            return p
    return None


def is_sharded_checkpoint(path: Path) -> bool:
    return (Path(path) / "manifest.json").is_file()


class _CheckpointReader:
    """Reads a checkpoint tensor by its name ("model.W_enc", "opt.W_enc.exp_avg", "rng.torch"),
    whole or by feature rows, from either checkpoint format."""

    def __init__(self, path: Path):
        self.path = path
        self.sharded = is_sharded_checkpoint(path)
        if self.sharded:
            self._open_sharded()
        else:
            self._open_single()

    def _open_sharded(self) -> None:
        from safetensors import safe_open

        man = self.path / "manifest.json"
        m = json.loads(man.read_text())
        if m.get("format") != SHARDED_FORMAT or m.get("version") != SHARDED_VERSION:
            raise DistributedError(f"{man}: not a {SHARDED_FORMAT} v{SHARDED_VERSION} manifest")
        self.config = m["config"]
        self.slices = [tuple(s) for s in m["slices"]]
        self.files = []
        for r in range(m["world_size"]):
            f = self.path / f"rank{r}.safetensors"
            if not f.is_file():
                raise FileNotFoundError(f"{self.path}: missing {f.name} (manifest names {m['world_size']} ranks)")
            self.files.append(safe_open(str(f), framework="pt"))
        self.keys = {k: k for k in self.files[0].keys()}

    def _open_single(self) -> None:
        """The single-process format: model/ + optimizer.safetensors, keys renamed to the sharded ones."""
        from safetensors import safe_open

        cfg_path = self.path / "model" / "config.json"
        if not cfg_path.is_file():
            raise FileNotFoundError(f"{self.path}: neither manifest.json nor model/config.json")
        self.config = json.loads(cfg_path.read_text())
        self.slices = [(0, self.config["n_features"])]
        model_f = safe_open(str(self.path / "model" / "model.safetensors"), framework="pt")
        self._opt = safe_open(str(self.path / "optimizer.safetensors"), framework="pt")
        self.files = [model_f]
        self.keys = {f"model.{k}": k for k in model_f.keys()}
        for k in self._opt.keys():
            if k.startswith("state."):
                _, pid, name = k.split(".", 2)
                self.keys[f"opt.{OPT_PARAM_NAMES[int(pid)]}.{name}"] = k
            else:
                self.keys[k] = k

    def _file(self, key: str, r: int = 0):
        if not self.sharded and not key.startswith("model."):
            return self._opt
        return self.files[r]

    def has(self, key: str) -> bool:
        return key in self.keys

    def full(self, key: str) -> Tensor:
        """A replicated tensor (from rank 0's file)."""
        return self._file(key).get_tensor(self.keys[key])

    def rows(self, key: str, lo: int, hi: int) -> Tensor:
        """Rows [lo, hi) of a per-feature tensor, assembled from the shards that hold them."""
        parts = []
        for r, (a, b) in enumerate(self.slices):
            s, e = max(a, lo), min(b, hi)
            if s < e:
                parts.append(self._file(key, r).get_slice(self.keys[key])[s - a : e - a])
        return torch.cat(parts)

    def get(self, key: str, lo: int, hi: int) -> Tensor:
        """Rows [lo, hi) of a per-feature tensor (its ``.step`` counter whole), else the whole tensor."""
        name = key.split(".")[1]
        if name in ROW_TENSORS and not key.endswith(".step"):
            return self.rows(key, lo, hi)
        return self.full(key)


def _optimizer_state(rd: _CheckpointReader, lo: int, hi: int, device: torch.device) -> dict:
    """{param id: {state name: tensor}} of features [lo, hi), on ``device`` (``step`` on the CPU)."""
    state: dict = {}
    for pid, pname in enumerate(OPT_PARAM_NAMES):
        for key in rd.keys:
            if key.startswith(f"opt.{pname}."):
                v = rd.get(key, lo, hi)
                state.setdefault(pid, {})[key.split(".", 2)[2]] = v if key.endswith(".step") else v.to(device)
    return state


def load_checkpoint(path: Path, model: nn.Module, opt: torch.optim.Optimizer, version: int = CHECKPOINT_VERSION) -> dict:
    """Restore model and optimizer from a checkpoint of either format into this rank's model
    (a FeatureParallelCrosscoder slice of any world size, or a whole Crosscoder) and the torch
    RNG state; returns the trainer state (state.json). TrainError on another version or config."""
    path = Path(path)
    meta = json.loads((path / "state.json").read_text())
    if meta.get("version") != version:
        raise TrainError(f"{path}: checkpoint version {meta.get('version')} is not {version}")
    rd = _CheckpointReader(path)
    had, has = rd.config.get("compute_dtype", "float32"), model.config().get("compute_dtype", "float32")
    if had != has:
        raise TrainError(f"{path}: the checkpoint was trained with --dtype {had}, this run has --dtype {has}; "
                         f"resume it with --dtype {had}")
    if rd.config != model.config():
        diff = {k: (rd.config.get(k), v) for k, v in model.config().items() if rd.config.get(k) != v}
        raise TrainError(f"{path}: checkpoint does not match this run's model config: {diff}")
    lo, hi = (model.lo, model.hi) if isinstance(model, FeatureParallelCrosscoder) else (0, model.n_features)
    device = model.W_dec.device
    model.load_state_dict({name: rd.get(f"model.{name}", lo, hi).to(device) for name in model.state_dict()})
    opt.load_state_dict({"state": _optimizer_state(rd, lo, hi, device), "param_groups": meta["param_groups"]})
    if rd.has("rng.torch"):
        torch.set_rng_state(rd.full("rng.torch"))
    return meta


def load_full_model(path: str | os.PathLike, device: torch.device | str | None = None) -> Crosscoder:
    """The whole Crosscoder from a checkpoint directory of either format (any world size), in
    one process: e.g. ``load_full_model("runs/x/checkpoint")`` for analysis."""
    rd = _CheckpointReader(Path(path))
    cfg = {k: v for k, v in rd.config.items() if k != "version"}
    model = Crosscoder(**cfg, dtype=rd.rows("model.W_dec", 0, 1).dtype, device=device)
    F = model.n_features
    model.load_state_dict({name: rd.get(f"model.{name}", 0, F) for name in model.state_dict()})
    return model


def full_model(model: nn.Module, ctx: DistContext | None, checkpoint: Path) -> Crosscoder | None:
    """The whole trained Crosscoder on rank 0 (None on other ranks); call on every rank.

    Feature parallel assembles it on rank 0's device from the final sharded ``checkpoint``
    (written just before): weights only, a quarter of what training held across the ranks."""
    if ctx is None:
        return model
    barrier(ctx)
    if not ctx.is_main:
        return None
    if ctx.mode == "data":
        cfg = {k: v for k, v in model.config().items() if k != "version"}
        plain = Crosscoder(**cfg, dtype=model.W_dec.dtype, device=model.W_dec.device)
        plain.load_state_dict(model.state_dict())
        return plain
    return load_full_model(checkpoint, device=ctx.device)
