"""What every analysis command shares: its inputs, their checks, and the CLI error contract.

``Inputs`` bundles a crosscoder, its store (optional for some commands), the models it was
trained on (one per source; Hugging Face ids or folders, by default the ones in the store
manifest) and the layer (by default the manifest's). ``open_inputs`` checks that they fit
together and raises ``AnalysisError`` with one line when they do not: a crosscoder whose widths
differ from the store's or from the models' residual widths, a layer the models do not have.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from fastxc.core.cli import Parser, report
from fastxc.core.device import resolve_device
from fastxc.core.crosscoder import Crosscoder
from fastxc.analysis.hooks import AnalysisError, check_layer
from fastxc.data.harvest import utf8_error
from fastxc.data.models import config_dims, hidden_size, load_config, load_model, load_tokenizer

log = logging.getLogger("fastxc.analysis.inputs")


@dataclass
class Inputs:
    """A crosscoder and what it was trained on. Models load lazily (``models()``)."""

    crosscoder: Crosscoder
    reader: object | None  # fastxc.data.store.StoreReader
    model_names: list[str | None]  # one per source; None: unknown (commands needing models fail)
    layer: int | None
    device: str = "cpu"
    _models: list | None = field(default=None, repr=False)
    _tokenizer: object | None = field(default=None, repr=False)

    @property
    def source_names(self) -> list[str]:
        return list(self.crosscoder.source_names)

    def models(self) -> list:
        """One eval-mode HF model per source, checked against the crosscoder's widths and layer."""
        if self._models is None:
            missing = [i for i, n in enumerate(self.model_names) if n is None]
            if len(self.model_names) != self.crosscoder.n_sources or missing:
                raise AnalysisError(
                    f"no model for crosscoder source(s) {missing or list(range(self.crosscoder.n_sources))}:"
                    " pass --model-a/--model-b or a store whose manifest names them")
            if self.layer is None:
                raise AnalysisError("no layer: pass --layer (the store manifest records none)")
            cc = self.crosscoder
            for i, name in enumerate(self.model_names):  # configs first: fail before loading weights
                width, n_layers = config_dims(load_config(name))
                if width != cc.widths[i]:
                    raise AnalysisError(
                        f"crosscoder source {i} ({cc.source_names[i]}) has width {cc.widths[i]} but {name} has residual "
                        f"width {width}: this crosscoder was not trained on these models")
                if not 0 <= self.layer < n_layers:
                    raise AnalysisError(f"layer {self.layer} out of range for {name} with {n_layers} decoder layers")
            loaded = [load_model(n, self.device) for n in self.model_names]
            for i, (m, name) in enumerate(zip(loaded, self.model_names)):
                check_models_fit(cc, [m], self.layer, first=i, names=[name])
            self._models = loaded
            if self._tokenizer is None:
                self._tokenizer = load_tokenizer(self.model_names[-1])
        return self._models

    def tokenizer(self):
        if self._tokenizer is None:
            if self._models is not None:
                raise AssertionError("unreachable: models() sets the tokenizer")
            src = tokenizer_source(self)
            if src is None:
                raise AnalysisError("no tokenizer: pass --model-a/--model-b or a store whose manifest names the models")
            self._tokenizer = load_tokenizer(src)
        return self._tokenizer


def tokenizer_source(inp: Inputs) -> str | None:
    if inp.reader is not None:
        tok = inp.reader.manifest.get("tokenizer")
        if isinstance(tok, str) and tok:
            return tok
        if isinstance(tok, dict):
            for key in ("path", "name", "name_or_path", "id"):
                if isinstance(tok.get(key), str):
                    return tok[key]
    known = [n for n in inp.model_names if n is not None]
    return known[-1] if known else None


def check_models_fit(cc: Crosscoder, models: Sequence, layer: int, first: int = 0,
                     names: Sequence[str] | None = None) -> None:
    """Raise AnalysisError unless model j's residual width equals source (first + j)'s width."""
    for j, m in enumerate(models):
        i = first + j
        name = names[j] if names else f"model {i}"
        w = hidden_size(m)
        if i >= cc.n_sources:
            raise AnalysisError(f"the crosscoder has {cc.n_sources} sources, no source for {name}")
        if w != cc.widths[i]:
            raise AnalysisError(
                f"crosscoder source {i} ({cc.source_names[i]}) has width {cc.widths[i]} but {name} has residual "
                f"width {w}: this crosscoder was not trained on these models")
        check_layer(m, layer, name)


def _manifest_sources(reader) -> tuple[list[str | None], list[int | None]]:
    srcs = reader.manifest.get("sources", [])
    return [s.get("model") for s in srcs], [s.get("layer") for s in srcs]


def open_inputs(crosscoder: str | Path | Crosscoder, store: str | Path | None = None,
                model_a: str | None = None, model_b: str | None = None, layer: int | None = None,
                device: str = "cpu", models: Sequence[str] | None = None) -> Inputs:
    """Load and cross-check a crosscoder, its store and model names. Models load lazily."""
    cc = crosscoder if isinstance(crosscoder, Crosscoder) else Crosscoder.load(crosscoder, device=device)
    cc.eval()
    reader = None
    if store is not None:
        from fastxc.data.store import open_store

        reader = open_store(store)
        if list(reader.widths) != list(cc.widths):
            raise AnalysisError(f"crosscoder widths {cc.widths} do not match the store's widths {list(reader.widths)} ({store})")
    names: list[str | None] = list(models) if models else [None] * cc.n_sources
    layers: list[int | None] = [None] * cc.n_sources
    if reader is not None:
        m_names, m_layers = _manifest_sources(reader)
        if len(m_names) == cc.n_sources:
            names = [n if n is not None else m for n, m in zip(names, m_names)]
            layers = m_layers
    if model_a is not None:
        names[0] = model_a
    if model_b is not None:
        if cc.n_sources < 2:
            raise AnalysisError("--model-b given but the crosscoder has a single source")
        names[1] = model_b
    known = {l for l in layers if l is not None}
    if len(known) > 1:
        raise AnalysisError(f"the store's sources come from different layers {sorted(known)}: a cross-layer "
                            "crosscoder; these analyses need one layer per model")
    store_layer = known.pop() if known else None
    if layer is None:
        layer = store_layer
    elif store_layer is not None and int(layer) != int(store_layer):
        raise AnalysisError(f"--layer {layer} differs from the layer the store (and so the crosscoder) was "
                            f"harvested at ({store_layer})")
    return Inputs(cc, reader, names, None if layer is None else int(layer), device)


# ---------------------------------------------------------------------------- CLI helpers
def parser(prog: str, description: str, store_required: bool = False) -> argparse.ArgumentParser:
    """An argparse parser with the inputs every analysis takes."""
    p = Parser(prog=prog, description=description)
    p.add_argument("--crosscoder", required=True, help="crosscoder folder (Crosscoder.save / train's OUT/crosscoder)")
    p.add_argument("--store", required=store_required, default=None, help="activation store the crosscoder was trained on")
    p.add_argument("--model-a", default=None, help="model of source 0 (HF id or folder; default: from the store manifest)")
    p.add_argument("--model-b", default=None, help="model of source 1 (default: from the store manifest)")
    p.add_argument("--layer", type=int, default=None, help="decoder layer whose input was harvested (default: manifest)")
    p.add_argument("--out", default=None,
                   help=f"output folder (plots and JSON; default: runs/{prog.replace(' ', '-')})")
    p.add_argument("--device", default="auto", help="torch device: auto (CUDA when available, else cpu), cpu, cuda, cuda:N")
    p.add_argument("--seed", type=int, default=0, help="seed for sampling positions / generation")
    return p


# flag (argparse dest) -> what it must name on disk before a command does any work
INPUT_PATHS = {"crosscoder": "crosscoder", "store": "folder", "eval_store": "folder", "prompts": "file",
               "data": "file", "categories": "file", "pairs": "file"}


def check_input_paths(args, kinds: dict[str, str] | None = None) -> None:
    """Fail at once, naming the flag and the path, when a file or folder an input flag names is
    missing: before any crosscoder, store or model is loaded (a missing --prompts file would
    otherwise surface only after the models have loaded and the direction is computed)."""
    for dest, kind in (kinds or INPUT_PATHS).items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        path, flag = Path(value).expanduser(), "--" + dest.replace("_", "-")
        if kind == "file" and not path.is_file():
            raise FileNotFoundError(f"{flag}: no such file: {path}")
        if kind != "file" and not path.is_dir():
            raise FileNotFoundError(f"{flag}: no such folder: {path}")
        if kind == "crosscoder" and not (path / "config.json").exists() and (path / "crosscoder" / "config.json").exists():
            raise AnalysisError(f"--crosscoder {path} is a training run, not a crosscoder folder: "
                                f"pass {path / 'crosscoder'}")


def inputs_from_args(args) -> Inputs:
    """The command's ``Inputs``: the device checked, then every input path (``check_input_paths``),
    then the crosscoder and store opened (models load later, on first use)."""
    device = str(resolve_device(args.device))
    check_input_paths(args)
    return open_inputs(args.crosscoder, args.store, args.model_a, args.model_b, args.layer, device)


def out_dir(args, default: str) -> Path:
    p = Path(args.out or default)
    p.mkdir(parents=True, exist_ok=True)
    return p


def write_json(path: Path, obj) -> Path:
    """Write JSON atomically (tmp + rename) so a crash never leaves half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, default=_json_default))
    os.replace(tmp, path)
    return path


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def run_cli(body: Callable[[], int]) -> int:
    """Run a command body; a bad input becomes one ``error: ...`` line and exit code 2."""
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        return body()
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, OSError, KeyError) as e:
        return report(e)


def savefig(fig, path: str | Path, title: str | None = None, title_size: float = 10,
            tight_layout: bool = True) -> Path:
    """Title the figure (when ``title`` is given), lay it out, save it as PNG atomically and close it."""
    path = Path(path)
    if title is not None:
        fig.suptitle(title, fontsize=title_size)
    if tight_layout:
        fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


# ---------------------------------------------------------------------------- activations
@torch.no_grad()
def source_activations(models: Sequence, layer: int, ids: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """Layer-``layer`` inputs of each model on one token batch: n tensors [B, T, d_i] (float32)."""
    from fastxc.analysis.hooks import capture_residual

    dev = next(models[0].parameters()).device
    return [capture_residual(m, layer, ids.to(dev), mask.to(dev)) for m in models]


@torch.no_grad()
def encode_raw(cc: Crosscoder, acts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Raw activations of every source (n tensors [B, T, d_i]) -> code [B, T, F].

    The raw activations are scaled by the crosscoder's ``input_scale`` first (the store's
    normalisation), as in training.
    """
    B, T = acts[0].shape[:2]
    x = torch.cat([a.reshape(B * T, -1) for a in acts], dim=1).to(cc.W_enc.dtype)
    return cc.encode(cc.normalize(x)).view(B, T, cc.n_features)


def decoder_slice(cc: Crosscoder, source: int, features: Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
    """Decoder rows of source ``source`` in *raw* model units: [F or len(features), d_i].

    A feature at activation a adds a * row to the normalised reconstruction, i.e.
    a * row / input_scale[source] to the model's residual stream.
    """
    if not 0 <= source < cc.n_sources:
        raise AnalysisError(f"source {source} out of range for a crosscoder with {cc.n_sources} sources")
    w = cc.W_dec.detach()[:, cc.offsets[source] : cc.offsets[source + 1]]
    if features is not None:
        idx = torch.as_tensor(features, dtype=torch.long, device=w.device)
        if idx.numel() and (idx.min() < 0 or idx.max() >= cc.n_features):
            raise AnalysisError(f"feature ids must lie in [0, {cc.n_features}), got {idx.tolist()}")
        w = w[idx]
    return w.float() / cc.input_scale[source].float()


def read_texts(path: str | Path, field: str = "text", limit: int | None = None) -> list[str]:
    """Texts from a .jsonl (one object per line, ``field``) or a plain text file (one per line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    out: list[str] = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            why = utf8_error(raw)  # decoded line by line, so that a bad byte is reported with its line
            if why is not None:
                raise AnalysisError(f"{path}:{n}: {why}")
            line = raw.decode("utf-8").rstrip("\r\n")
            if not line.strip():
                continue
            if path.suffix in (".jsonl", ".json"):
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise AnalysisError(f"{path}:{n}: not valid JSON ({e.msg})") from None
                if not isinstance(obj, dict) or field not in obj:
                    raise AnalysisError(f"{path}:{n}: no field {field!r}")
                out.append(str(obj[field]))
            else:
                out.append(line)
            if limit is not None and len(out) >= limit:
                break
    if not out:
        raise AnalysisError(f"{path}: no texts")
    return out
