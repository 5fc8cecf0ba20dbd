"""The shared part of export and import: the error and warning types, the in-memory ``Bundle``
of files a format consists of, its atomic write, and the dispatch by format name."""
from __future__ import annotations

import json
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastxc.core.crosscoder import CONFIG_VERSION, Crosscoder

FORMATS = ("saelens", "dictionary_learning")


class InteropError(ValueError):
    """A model the target format cannot express, or a folder that is not in the format it was
    said to be; the message names the part. Raised before anything is written."""


class InteropWarning(UserWarning):
    """The closest equivalent was written; the message says what differs."""


@dataclass
class Bundle:
    """The files of one exported folder, in memory: safetensors files (name -> tensors) and
    JSON files (name -> object). Built completely before anything touches the disk."""

    tensors: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    json: dict[str, dict] = field(default_factory=dict)

    def write(self, out: str | os.PathLike, overwrite: bool = False) -> Path:
        return write_folder(out, self._fill, overwrite)

    def _fill(self, tmp: Path) -> None:
        from fastxc.core.files import save_safetensors

        for name, tensors in self.tensors.items():
            save_safetensors({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp / name)
        for name, obj in self.json.items():
            (tmp / name).write_text(json.dumps(obj, indent=2) + "\n")


def write_folder(out: str | os.PathLike, fill, overwrite: bool = False) -> Path:
    """Create folder ``out`` by calling ``fill(tmp)`` on a temporary sibling and renaming it into
    place, so a failure (or a kill) never leaves a half-written ``out``. A non-empty ``out`` is
    refused unless ``overwrite``; then it is swapped out and removed only after the new one is
    in place."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InteropError(f"{out} exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise InteropError(f"{out} exists and is not empty; pass --overwrite (overwrite=True) to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        fill(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def as_crosscoder(cc: Crosscoder | str | os.PathLike) -> Crosscoder:
    """A Crosscoder, or the folder of one (``Crosscoder.save``), loaded on the CPU."""
    if isinstance(cc, Crosscoder):
        return cc
    return Crosscoder.load(cc, device="cpu")


def warn_compute_dtype(cc: Crosscoder, target: str) -> None:
    """Targets compute in the weights' dtype: say so when fastxc would have computed in bf16."""
    if cc.compute_dtype is not None:
        warnings.warn(f"the crosscoder computes in {str(cc.compute_dtype).removeprefix('torch.')} over "
                      f"{str(cc.W_dec.dtype).removeprefix('torch.')} weights; {target} computes in the weights' "
                      f"dtype, so its codes differ from fastxc's at bf16 rounding", InteropWarning, stacklevel=3)


def crosscoder_config(cfg: dict, widths: list[int], n_features: int, where: str) -> dict:
    """A fastxc config carried in an exported folder, checked against the tensors found there;
    returns the constructor keyword arguments."""
    cfg = dict(cfg)
    version = cfg.pop("version", None)
    if version != CONFIG_VERSION:
        raise InteropError(f"{where}: fastxc config version {version}, this fastxc reads version {CONFIG_VERSION}")
    if [int(w) for w in cfg.get("widths", [])] != widths or int(cfg.get("n_features", -1)) != n_features:
        raise InteropError(f"{where}: the fastxc config (widths {cfg.get('widths')}, n_features "
                           f"{cfg.get('n_features')}) does not match the weights (widths {widths}, {n_features} features)")
    return cfg


def build_crosscoder(cfg: dict, W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor,
                     input_scale: torch.Tensor, threshold: float | None = None) -> Crosscoder:
    """A Crosscoder with config ``cfg`` holding exactly these tensors (copied, not recomputed)."""
    try:
        cc = Crosscoder(**cfg, dtype=W_dec.dtype, device="cpu")
    except (TypeError, ValueError) as e:
        raise InteropError(f"the imported model does not make a fastxc crosscoder: {e}") from None
    with torch.no_grad():
        for name, t in (("W_enc", W_enc), ("b_enc", b_enc), ("W_dec", W_dec), ("b_dec", b_dec)):
            getattr(cc, name).copy_(t)
        cc.input_scale.copy_(input_scale)
        if threshold is not None:
            cc.threshold.fill_(threshold)
    return cc


def export_crosscoder(cc: Crosscoder | str | os.PathLike, fmt: str, out: str | os.PathLike, *,
                      overwrite: bool = False, **options) -> Path:
    """Write crosscoder ``cc`` (or the folder of one) to folder ``out`` in format ``fmt`` (one of
    FORMATS). ``options``: saelens takes ``model_name`` and ``hook_name`` (SAELens metadata).
    InteropError (nothing written) when the format cannot express the model."""
    from fastxc.interop import dictionary_learning, saelens

    if fmt not in FORMATS:
        raise InteropError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    model = as_crosscoder(cc)
    bundle = saelens.to_saelens(model, **options) if fmt == "saelens" else dictionary_learning.to_dictionary_learning(model, **options)
    return bundle.write(out, overwrite)


def import_crosscoder(fmt: str, src: str | os.PathLike) -> Crosscoder:
    """Read folder ``src`` in format ``fmt`` into a fastxc Crosscoder (CPU)."""
    from fastxc.interop import dictionary_learning, saelens

    if fmt not in FORMATS:
        raise InteropError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    src = Path(src)
    if not src.exists():
        raise FileNotFoundError(f"not found: {src}")
    return saelens.from_saelens(src) if fmt == "saelens" else dictionary_learning.from_dictionary_learning(src)


def import_to_folder(fmt: str, src: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """``import_crosscoder`` then ``Crosscoder.save`` into ``out`` (atomically; see write_folder)."""
    cc = import_crosscoder(fmt, src)
    return write_folder(out, cc.save, overwrite)
