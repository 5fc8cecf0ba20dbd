"""Harvest residual-stream activations from Hugging Face causal LMs into an activation store.

    python -m fastxc.data.harvest --model-a BASE --model-b FINETUNED \\
        --dataset traces.jsonl:0.5 --dataset general.jsonl:0.5 --tokens 1000000 --out acts/

Pipeline (every step deterministic, so a killed run resumes to the identical store):

1. datasets: each ``--dataset SPEC`` (``path_or_id[@config][#split][:proportion]``, split
   ``train`` unless given) is a stream of texts read with ``datasets`` (streaming; local
   .json/.jsonl/.parquet/.txt files, local dataset folders or hub ids; line-based local files
   are read line by line here, so that a bad line is named or, with ``skip_bad_lines``,
   skipped and counted). Each document is tokenized without special tokens, cut into chunks of
   ``context_length - 1`` tokens (``context_length`` when the tokenizer has no BOS) and each
   chunk gets the BOS token in front. The mixer takes the next chunk from the dataset that is
   furthest below its share of the tokens so far, so the proportions hold to within one chunk.
2. models (loaded, and their decoder layers found, by ``fastxc.data.models``, as the analyses
   do): all models must share the tokenizer (same vocabulary; the error names the first
   differing id). Each batch of chunks (right-padded) runs through every model; a forward
   pre-hook on decoder layer L captures the layer's *input* (the residual stream entering
   layer L, i.e. ``output_hidden_states[L]``), and the hook of the deepest captured layer
   raises, so the layers above it are never run.
3. filtering: BOS and pad positions are not stored; a position where any source's norm is
   more than ``outlier_factor`` x the median norm of that source in the batch is dropped and
   counted (the attention-sink positions of real models reach 100x the median).
4. writing: rows [R, D] (sources concatenated) go to shards of about ``shard_tokens`` rows,
   each written atomically with its token ids, document ids, positions and dataset index;
   after each shard ``harvest-state.json`` records the progress. The manifest (with the
   per-source normalisation scales) is written last.

Resume: rerun the same command. Completed shards are kept, the data stream is replayed up to
the recorded batch (tokenization only, no forward passes), and harvesting continues. A harvest
that fails before its first shard leaves nothing behind. Running out of data before ``tokens``
rows is an error (the folder stays unfinished and resumable) unless ``allow_short``.
"""
from __future__ import annotations

import argparse
import codecs
import hashlib
import json
import logging
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import numpy as np
import torch
from torch import nn

from fastxc.core.cli import Parser, report
from fastxc.core.device import resolve_device
from fastxc.data.models import (config_dims, decoder_layers, hub_unavailable, load_config,
                                load_model, load_tokenizer, pad_batch, resolve_dtype)
from fastxc.data.store import MANIFEST, ShardWriter, StoreError, atomic_write_json, build_manifest, canonical_dtype

log = logging.getLogger("fastxc.data.harvest")

STATE = "harvest-state.json"
STATE_VERSION = 1
DEFAULT_SHARD_TOKENS = 1 << 16


class HarvestError(ValueError):
    """Bad harvest input (models, tokenizers, datasets, layers, output folder)."""


# ------------------------------------------------------------------------------------- datasets
@dataclass(frozen=True)
class DatasetSpec:
    """One ``--dataset`` entry: where the texts come from and its share of the tokens."""

    spec: str
    path: str
    proportion: float
    config: str | None = None  # the hub dataset's configuration (subset), e.g. "default"
    split: str = "train"


def _config_and_split(spec: str, path: str) -> tuple[str, str | None, str]:
    """``"org/name@cfg#test"`` -> ("org/name", "cfg", "test"); a path that exists is taken whole."""
    if Path(path).exists():
        return path, None, "train"
    split, config = "train", None
    head, sep, tail = path.rpartition("#")
    if sep:
        if not head or not tail:
            raise HarvestError(f"dataset {spec!r}: '#' must sit between the dataset and a split name")
        path, split = head, tail
    head, sep, tail = path.rpartition("@")
    if sep:
        if not head or not tail:
            raise HarvestError(f"dataset {spec!r}: '@' must sit between the dataset and a config name")
        path, config = head, tail
    return path, config, split


def parse_dataset_specs(specs: Sequence[str]) -> list[DatasetSpec]:
    """``["a.jsonl:0.3", "org/name@cfg#validation:0.7"]`` -> specs with proportions summing to 1.

    Without any proportion the datasets share equally; giving some but not all is an error.
    """
    if not specs:
        raise HarvestError("no dataset given (use --dataset PATH_OR_ID[:PROPORTION])")
    parsed: list[tuple[str, str, float | None]] = []
    for s in specs:
        path, prop = s, None
        head, sep, tail = s.rpartition(":")
        if sep and head:
            try:
                prop = float(tail)
                path = head
            except ValueError:
                pass
        if prop is not None and (not math.isfinite(prop) or prop <= 0):
            raise HarvestError(f"dataset {s!r}: the proportion must be a positive number")
        parsed.append((s, *_config_and_split(s, path), prop))
    if len(parsed) > 255:  # the per-row dataset index is stored as uint8
        raise HarvestError(f"at most 255 datasets, got {len(parsed)}")
    given = [p for *_, p in parsed if p is not None]
    if given and len(given) != len(parsed):
        raise HarvestError("give a proportion for every dataset or for none "
                           f"(got {', '.join(s for s, *_ in parsed)})")
    props = given if given else [1.0] * len(parsed)
    total = sum(props)
    return [DatasetSpec(s, p, w / total, c, sp) for (s, p, c, sp, _), w in zip(parsed, props)]


_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text", ".text": "text"}


@dataclass
class BadLines:
    """Lines of one dataset file skipped by ``skip_bad_lines`` (not UTF-8, or not a JSON object)."""

    count: int = 0
    first: int | None = None  # line number (1-based) of the first one


def utf8_error(raw: bytes) -> str | None:
    """Why the line ``raw`` is not UTF-8 ("not valid UTF-8 (byte 0xff at column 5)"), or None."""
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})"
    return None


def _line_kind(p: Path) -> str | None:
    """"text" or "json" for a file read line by line here; None for one left to ``datasets``
    (parquet, and a .json file holding one JSON document rather than JSON lines)."""
    ext = p.suffix.lower()
    if ext in (".txt", ".text"):
        return "text"
    if ext == ".jsonl":
        return "json"
    if ext == ".json":
        with open(p, "rb") as f:
            for raw in f:  # JSON lines iff the first non-blank line is a JSON object by itself
                if raw.strip():
                    try:
                        line = raw.lstrip(codecs.BOM_UTF8).decode("utf-8")
                    except UnicodeDecodeError:
                        return "json"  # a bad line: named (or skipped) by the line reader
                    try:
                        return "json" if isinstance(json.loads(line), dict) else None
                    except ValueError:  # not JSON on its own: one document over many lines
                        return None
    return None


def _line_records(path: str, kind: str, skip_bad_lines: bool = False, bad: BadLines | None = None) -> Iterator[dict]:
    """The records of a JSON-lines or text file, as ``datasets`` reads them (the same records
    in the same order: a text file gives one ``{"text": line}`` per line, blank ones included;
    a JSON-lines file one record per non-blank line), but one line at a time, so that a line
    that is not UTF-8 (or not a JSON object) is named, by file and line number, or skipped
    and counted in ``bad`` with ``skip_bad_lines``."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            why = utf8_error(raw)
            line = raw.decode("utf-8") if why is None else ""
            if why is None and kind == "text":
                line = line[:-1] if line.endswith("\n") else line
                line = line[:-1] if line.endswith("\r") else line
                for piece in line.split("\r"):  # text mode reads a lone \r as a line end too
                    yield {"text": piece}
                continue
            if why is None:
                if n == 1:
                    line = line.lstrip("\ufeff")  # a UTF-8 byte order mark, as datasets drops it
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except ValueError as e:
                    why = f"not valid JSON ({getattr(e, 'msg', e)})"
                else:
                    if isinstance(rec, dict):
                        yield rec
                        continue
                    why = f"not a JSON object but {type(rec).__name__}"
            if not skip_bad_lines:
                raise HarvestError(f"dataset {path}, line {n}: {why}; fix the line or pass --skip-bad-lines")
            if bad is not None:
                bad.count += 1
                bad.first = n if bad.first is None else bad.first


def _first_bad_utf8_line(path: Path) -> str | None:
    """"line N: ..." for the first line of ``path`` that is not UTF-8, or None."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            why = utf8_error(raw)
            if why is not None:
                return f"line {n}: {why}"
    return None


def _hub_error(path: str) -> str | None:
    """Why the hub dataset ``path`` cannot be streamed now (offline, hub unreachable), or None."""
    why = hub_unavailable()
    if why is None:
        return None
    return (f"cannot load dataset {path}: {why}, and a hub dataset is streamed from the hub; "
            "download it while online and pass its local folder or files")


def load_text_dataset(path: str, config: str | None = None, split: str = "train", *,
                      skip_bad_lines: bool = False, bad: BadLines | None = None):
    """An iterable ``datasets`` dataset (streaming) for a local file/folder or a hub id.

    Local .jsonl / .txt files (and .json files of JSON lines) are read line by line here
    (``_line_records``): a bad line is named by number, or skipped with ``skip_bad_lines``
    and counted in ``bad``. A hub id fails at once when offline or when the hub does not answer.
    """
    import datasets

    p = Path(path)
    try:
        if p.is_file():
            ext = "".join(p.suffixes[-1:]).lower()
            if ext not in _BUILDERS:
                raise HarvestError(f"dataset {path}: unknown file type {ext!r}; use .json, .jsonl, .parquet or .txt")
            if config is not None or split != "train":
                raise HarvestError(f"dataset {path}: a single file has no config or split to choose")
            if p.stat().st_size == 0:  # datasets would say "StopIteration" (or log schema errors)
                raise HarvestError(f"dataset {path} is empty")
            kind = _line_kind(p)
            if kind is not None:
                # a datasets IterableDataset, so that shuffle() is datasets' own seeded buffer
                return datasets.IterableDataset.from_generator(
                    _line_records, gen_kwargs={"path": str(p), "kind": kind, "skip_bad_lines": skip_bad_lines,
                                               "bad": bad})
            return datasets.load_dataset(_BUILDERS[ext], data_files=str(p), split="train", streaming=True)
        if p.is_dir():
            return datasets.load_dataset(str(p), config, split=split, streaming=True)
        if p.suffix.lower() in _BUILDERS or path.startswith((".", "/", "~")):
            raise HarvestError(f"dataset file not found: {path}")
        hub = _hub_error(path)
        if hub is not None:
            raise HarvestError(hub)
        return datasets.load_dataset(path, config, split=split, streaming=True)
    except HarvestError:
        raise
    except Exception as e:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ...)
        raise HarvestError(_dataset_failure(path, e, "load")) from e


def _dataset_failure(path: str, e: BaseException, verb: str) -> str:
    """One line for an exception ``datasets`` raised opening or reading ``path``: an empty file
    and a line that is not UTF-8 are named as such (datasets says only "StopIteration" or
    "'utf-8' codec can't decode byte 0xff in position 4")."""
    p = Path(path)
    if p.is_file() and p.stat().st_size == 0:
        return f"dataset {path} is empty"
    chain, c = [], e
    while c is not None and len(chain) < 8:
        chain.append(c)
        c = c.__cause__ or c.__context__
    if any(isinstance(c, UnicodeDecodeError) or "utf-8" in str(c).lower() for c in chain):
        files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else []
        for f in files:
            where = _first_bad_utf8_line(f)
            if where is not None:
                return f"dataset {path}, {where}" if f == p else f"dataset {path}: {f}, {where}"
    if isinstance(e, StopIteration):
        return f"dataset {path} is empty (no records)"
    text = str(e).strip().splitlines()
    return f"cannot {verb} dataset {path}: {type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def iter_texts(spec: DatasetSpec, text_field: str, seed: int = 0, shuffle_buffer: int = 0, *,
               skip_bad_lines: bool = False, bad: BadLines | None = None) -> Iterator[tuple[int, str]]:
    """(record index, text) of every record of the dataset, in stream order (optionally
    shuffled through a seeded buffer). Records with an empty text are skipped; with
    ``skip_bad_lines`` so are undecodable lines of line-based files (counted in ``bad``)."""
    ds = load_text_dataset(spec.path, spec.config, spec.split, skip_bad_lines=skip_bad_lines, bad=bad)
    if shuffle_buffer > 0:
        ds = ds.shuffle(seed=seed, buffer_size=shuffle_buffer)
    for i, rec in enumerate(_reading(ds, spec.path)):
        if text_field not in rec:
            raise HarvestError(f"dataset {spec.path}: record {i} has no field {text_field!r} "
                               f"(fields: {', '.join(map(str, rec))}); pass --text-field")
        text = rec[text_field]
        if text is None:
            continue
        if not isinstance(text, str):
            raise HarvestError(f"dataset {spec.path}: field {text_field!r} of record {i} is "
                               f"{type(text).__name__}, not text")
        if text:
            yield i, text


def _reading(ds, path: str) -> Iterator[dict]:
    """The records of ``ds``; an error ``datasets`` raises while reading -> one HarvestError line."""
    it = iter(ds)
    while True:
        try:
            rec = next(it)
        except StopIteration:
            return
        except HarvestError:
            raise
        except Exception as e:
            raise HarvestError(_dataset_failure(path, e, "read")) from e
        yield rec


def check_dataset(spec: DatasetSpec, text_field: str, skip_bad_lines: bool = False) -> None:
    """Open the dataset and read its first record: a missing file, an empty dataset or a
    missing text field fails here, before any model is loaded."""
    ds = load_text_dataset(spec.path, spec.config, spec.split, skip_bad_lines=skip_bad_lines)
    first = next(_reading(ds, spec.path), None)
    if first is None:
        raise HarvestError(f"dataset {spec.path} is empty (no records)")
    if text_field not in first:
        raise HarvestError(f"dataset {spec.path}: no field {text_field!r} (fields: {', '.join(map(str, first))}); "
                           "pass --text-field")


@dataclass
class Chunk:
    """One model input sequence: ``ids`` (BOS first when the tokenizer has one) taken from
    document ``doc`` of dataset ``dataset``, starting at token ``start`` of the document."""

    dataset: int
    doc: int
    start: int
    ids: list[int]


def iter_chunks(texts: Iterator[tuple[int, str]], tokenizer, context_length: int, dataset: int,
                split_special_tokens: bool = False) -> Iterator[Chunk]:
    """Chunks of each document; ``split_special_tokens`` tokenizes special-token strings in the
    text as plain text (so only regular-vocabulary ids occur)."""
    bos = tokenizer.bos_token_id
    kw = {"split_special_tokens": True} if split_special_tokens else {}
    step = context_length - (1 if bos is not None else 0)
    if step <= 0:
        raise HarvestError(f"context_length must be > 1, got {context_length}")
    for doc, text in texts:
        ids = tokenizer(text, add_special_tokens=False, **kw)["input_ids"]
        for s in range(0, len(ids), step):
            part = ids[s:s + step]
            yield Chunk(dataset, doc, s, ([bos] if bos is not None else []) + part)


def mix_chunks(streams: Sequence[Iterator[Chunk]], proportions: Sequence[float],
               exhausted: list[int] | None = None) -> Iterator[Chunk]:
    """Interleave chunk streams so that dataset i holds ~proportions[i] of the tokens: always
    take from the dataset with the smallest tokens_i / p_i (ties: lowest index). Stops when a
    dataset runs out (the mix would no longer hold); its index is appended to ``exhausted``."""
    taken = [0] * len(streams)
    while True:
        i = min(range(len(streams)), key=lambda j: (taken[j] / proportions[j], j))
        c = next(streams[i], None)
        if c is None:
            log.info("dataset %d is exhausted; stopping the harvest there (the mix holds)", i)
            if exhausted is not None:
                exhausted.append(i)
            return
        taken[i] += len(c.ids)
        yield c


def iter_batches(chunks: Iterator[Chunk], batch_size: int) -> Iterator[list[Chunk]]:
    batch: list[Chunk] = []
    for c in chunks:
        batch.append(c)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


# --------------------------------------------------------------------------------------- models
class _StopForward(Exception):
    """Raised by the hook of the deepest captured layer: the rest of the forward is skipped."""


class LayerCapture:
    """Forward pre-hooks that capture the input of the given decoder layers.

    ``run(input_ids, attention_mask)`` -> {layer: hidden [b, T, d] float32 on CPU}; with
    ``stop=True`` the forward ends at the deepest captured layer.
    """

    def __init__(self, model: nn.Module, layers: Sequence[int], stop: bool = True):
        self.model = model
        self.layers = sorted(set(int(l) for l in layers))
        self.stop = stop
        self.out: dict[int, torch.Tensor] = {}
        mods = decoder_layers(model)
        for l in self.layers:
            if not 0 <= l < len(mods):
                raise HarvestError(f"layer {l} is out of range: the model has {len(mods)} decoder layers "
                                   f"(valid 0..{len(mods) - 1})")
        deepest = self.layers[-1]
        self.handles = [mods[l].register_forward_pre_hook(self._hook(l, stop and l == deepest), with_kwargs=True)
                        for l in self.layers]

    def _hook(self, layer: int, raise_after: bool):
        def hook(module, args, kwargs):
            hs = args[0] if args else kwargs["hidden_states"]
            self.out[layer] = hs.detach().to("cpu", torch.float32, copy=True)
            if raise_after:
                raise _StopForward

        return hook

    @torch.inference_mode()
    def run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[int, torch.Tensor]:
        self.out = {}
        try:
            self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _StopForward:
            pass
        missing = [l for l in self.layers if l not in self.out]
        if missing:
            raise HarvestError(f"the forward pass never reached layer(s) {missing}")
        return self.out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def _special_ids(tok) -> set[int]:
    """Ids of the tokenizer's special tokens (added special tokens and the named ones)."""
    ids = {i for i, t in getattr(tok, "added_tokens_decoder", {}).items() if getattr(t, "special", False)}
    return ids | {i for i in getattr(tok, "all_special_ids", []) if i is not None}


def check_tokenizers(tokenizers: Sequence[Any], names: Sequence[str], ignore_special_tokens: bool = False) -> None:
    """Raise HarvestError naming the first token id on which two tokenizers disagree.

    With ``ignore_special_tokens`` only the regular vocabulary must match (special tokens may
    differ, as between Qwen2.5-Math and DeepSeek-R1-Distill-Qwen); the harvest then tokenizes
    with the first tokenizer, splitting special-token strings into regular tokens, and BOS is
    used only if every tokenizer gives its id the same token.
    """
    ref = {i: t for t, i in tokenizers[0].get_vocab().items()}
    for tok, name in zip(tokenizers[1:], names[1:]):
        other = {i: t for t, i in tok.get_vocab().items()}
        skip = (_special_ids(tokenizers[0]) | _special_ids(tok)) if ignore_special_tokens else set()
        for i in sorted((set(ref) | set(other)) - skip):
            a, b = ref.get(i), other.get(i)
            if a != b:
                hint = "" if ignore_special_tokens else " (if only special tokens differ: --ignore-special-tokens)"
                raise HarvestError(
                    f"tokenizers differ: token id {i} is {a!r} in {names[0]} but {b!r} in {name}; "
                    f"the models must share a vocabulary{hint}")
        if ignore_special_tokens:
            bos = tokenizers[0].bos_token_id
            if bos is not None and ref.get(bos) != other.get(bos):
                raise HarvestError(f"the BOS token of {names[0]} (id {bos}, {ref.get(bos)!r}) is {other.get(bos)!r} in "
                                   f"{name}; put a model whose tokenizer has no BOS, or the same BOS, first")
            continue
        for attr in ("bos_token_id", "pad_token_id"):
            if getattr(tokenizers[0], attr) != getattr(tok, attr):
                raise HarvestError(f"tokenizers differ: {attr} is {getattr(tokenizers[0], attr)} in {names[0]} "
                                   f"but {getattr(tok, attr)} in {name}")


def tokenizer_info(tok) -> dict:
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    return {"name_or_path": str(getattr(tok, "name_or_path", "")), "class": type(tok).__name__,
            "vocab_size": len(vocab), "bos_token_id": tok.bos_token_id, "pad_token_id": tok.pad_token_id,
            "vocab_sha256": hashlib.sha256(json.dumps(vocab).encode()).hexdigest()}


# -------------------------------------------------------------------------------------- harvest
def _source_names(models: Sequence[str], layer_lists: Sequence[Sequence[int]]) -> list[str]:
    bases = [Path(m.rstrip("/")).name or m for m in models]
    if len(set(bases)) < len(bases):
        bases = [f"{chr(ord('A') + i) if i < 26 else i}:{b}" for i, b in enumerate(bases)]
    names = []
    for b, ls in zip(bases, layer_lists):
        for l in ls:
            names.append(f"{b}@L{l}" if len(ls) > 1 else b)
    return names


def _batch_meta(batch: list[Chunk], T: int, has_bos: bool) -> dict[str, torch.Tensor]:
    """Per-position dataset, document and in-document position, each [b, T]."""
    b = len(batch)
    ds = torch.zeros(b, T, dtype=torch.long)
    doc = torch.zeros(b, T, dtype=torch.long)
    pos = torch.zeros(b, T, dtype=torch.long)
    off = 1 if has_bos else 0
    for r, c in enumerate(batch):
        ds[r] = c.dataset
        doc[r] = c.doc
        pos[r] = c.start + torch.arange(T) - off  # BOS sits at -1 (never stored)
    return {"dataset": ds, "doc": doc, "pos": pos}


def _check_settings(models: list[str], datasets: Sequence[str], tokens: int, batch_size: int, outlier_factor: float,
                    store_dtype: str, model_dtype: str, revisions: Sequence[str | None] | None,
                    shard_tokens: int | None) -> tuple[str, list[DatasetSpec], list[str | None], int]:
    """Check the scalar settings (nothing is opened) -> (store dtype, dataset specs, revisions, shard rows)."""
    if not models:
        raise HarvestError("no model given")
    if int(tokens) <= 0:
        raise HarvestError(f"tokens must be > 0, got {tokens}")
    if int(batch_size) <= 0:
        raise HarvestError(f"batch_size must be > 0, got {batch_size}")
    if outlier_factor < 0:
        raise HarvestError(f"outlier_factor must be >= 0, got {outlier_factor}")
    dtype = canonical_dtype(store_dtype)
    resolve_dtype(model_dtype)
    specs = parse_dataset_specs(datasets)
    revisions = list(revisions) if revisions is not None else [None] * len(models)
    if len(revisions) != len(models):
        raise HarvestError(f"{len(revisions)} revisions for {len(models)} models")
    shard_rows = int(shard_tokens or DEFAULT_SHARD_TOKENS)
    if shard_rows <= 0:
        raise HarvestError(f"shard_tokens must be > 0, got {shard_tokens}")
    return dtype, specs, revisions, shard_rows


def _plan_sources(models: list[str], revisions: list[str | None], layer: int | None, layers: Sequence[int] | None,
                  source_names: Sequence[str] | None) -> tuple[list[list[int]], list[int], list[dict]]:
    """From the model configs (no weights loaded): (layers of each model, source widths, source records)."""
    cfgs = [load_config(m, r) for m, r in zip(models, revisions)]
    dims = [config_dims(c) for c in cfgs]  # (width, n_layers) of each model
    if layers is not None:
        layer_lists = [sorted(set(int(l) for l in layers))] * len(models)
    else:
        layer_lists = [[int(layer) if layer is not None else n // 2] for _, n in dims]
    for m, (_, n), ls in zip(models, dims, layer_lists):
        for l in ls:
            if not 0 <= l < n:
                raise HarvestError(f"layer {l} is out of range for {m}: it has {n} layers")
    widths = [w for (w, _), ls in zip(dims, layer_lists) for _ in ls]
    if len(widths) < 2:
        raise HarvestError("a crosscoder needs >= 2 sources: give two models, or several --layers")
    names = list(source_names) if source_names is not None else _source_names(models, layer_lists)
    if len(names) != len(widths):
        raise HarvestError(f"{len(names)} source names for {len(widths)} sources")
    per_source = [(m, r, c, l) for m, r, c, ls in zip(models, revisions, cfgs, layer_lists) for l in ls]
    sources = [{"name": names[k], "model": m, "revision": r or getattr(c, "_commit_hash", None), "layer": l}
               for k, (m, r, c, l) in enumerate(per_source)]
    return layer_lists, widths, sources


def _open_out(out: Path, config: dict, overwrite: bool) -> dict | None:
    """Prepare the output folder: None when it already holds this harvest, else the progress to
    resume from (harvest-state.json, or a fresh start); stray shard files are removed.

    ``overwrite`` starts afresh whatever the folder holds (a finished store or an unfinished
    harvest, with these settings or others): the settings do not cover the datasets' content,
    so it is also how to redo a harvest after editing its data files."""
    state_path, man_path = out / STATE, out / MANIFEST
    if man_path.exists():
        try:
            old = json.loads(man_path.read_text()).get("harvest_config")
        except (OSError, json.JSONDecodeError):
            old = None
        if old == config and not overwrite:
            state_path.unlink(missing_ok=True)  # killed between the manifest and this cleanup
            log.info("%s already holds this harvest; nothing to do", out)
            return None
        if not overwrite:
            raise HarvestError(f"{out} already holds a store with other settings; choose another --out "
                               "or pass --overwrite")
        man_path.unlink()
        state_path.unlink(missing_ok=True)
    elif overwrite and state_path.exists():
        log.info("--overwrite: discarding the unfinished harvest in %s", out)
        state_path.unlink()
    st = {"version": STATE_VERSION, "config": config, "shards": [], "batches": 0, "rows": 0, "dropped": 0}
    if state_path.exists():
        try:
            st = json.loads(state_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise HarvestError(f"{state_path} is unreadable ({e}); remove {out} and start again") from e
        if st.get("version") != STATE_VERSION or st.get("config") != config:
            raise HarvestError(f"{out} holds an unfinished harvest with other settings; rerun that exact "
                               "command to finish it, choose another --out, or pass --overwrite to replace it")
        for rec in st["shards"]:
            for f in rec["files"].values():
                p = out / f["path"]
                if not p.exists() or p.stat().st_size != f["bytes"]:
                    raise StoreError(f"{p} does not match {state_path}; remove {out} and start again")
        log.info("resuming %s at batch %d (%d shards, %d rows)", out, st["batches"], len(st["shards"]), st["rows"])
    elif out.exists() and any(not _is_temporary(p) for p in out.iterdir()) and not overwrite:
        # A folder holding only our temporaries is one a kill stopped before its first state file
        raise HarvestError(f"{out} exists and is not an unfinished harvest; choose an empty folder")
    out.mkdir(parents=True, exist_ok=True)
    keep = {f["path"] for rec in st["shards"] for f in rec["files"].values()}
    for p in out.iterdir():  # half-written temporaries and shards past the recorded progress
        if _is_temporary(p) or (p.name.startswith("shard-") and p.name not in keep):
            p.unlink()
    return st


def _is_temporary(p: Path) -> bool:
    """A half-written file of ours (a shard, or the state/manifest before its rename)."""
    return p.name.startswith((".shard-", f".{STATE}.tmp-", f".{MANIFEST}.tmp-"))


def _discard_unfinished(out: Path, created: bool) -> None:
    """Undo a harvest that stopped before finishing any shard: its progress file and shard
    files go (and the folder, when this run created it), so nothing half-made is left and the
    same command, or any other, simply starts again."""
    if not out.is_dir():
        return
    (out / STATE).unlink(missing_ok=True)
    for p in out.iterdir():
        if _is_temporary(p) or p.name.startswith("shard-"):
            p.unlink(missing_ok=True)
    if created and not any(out.iterdir()):
        out.rmdir()


def _drop_outliers(x: torch.Tensor, meta: dict[str, np.ndarray], offsets: Sequence[int],
                   factor: float) -> tuple[torch.Tensor, dict[str, np.ndarray], int]:
    """Drop rows of x [R, D] where a source's norm exceeds ``factor`` x its median over the rows
    -> (kept x, kept meta, rows dropped)."""
    norms = torch.stack([x[:, offsets[i]:offsets[i + 1]].norm(dim=1) for i in range(len(offsets) - 1)], 1)
    med = norms.median(dim=0).values
    ok = ((norms <= factor * med) | (med <= 0)).all(dim=1)
    return x[ok], {k: v[ok.numpy()] for k, v in meta.items()}, int((~ok).sum())


def batch_rows(batch: list[Chunk], caps: Sequence[LayerCapture], tokenizer, device: str
               ) -> tuple[torch.Tensor, dict[str, np.ndarray]]:
    """One batch of chunks through every model -> rows [R, D] float32 (sources concatenated,
    in the order of ``caps`` and their layers) and their side arrays ([R] each: tokens,
    dataset, doc, pos), BOS and pad positions left out."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    bos = tokenizer.bos_token_id
    ids, mask = pad_batch([c.ids for c in batch], pad_id)
    hidden = []
    for cap in caps:
        got = cap.run(ids.to(device), mask.to(device))
        hidden.extend(got[l] for l in cap.layers)
    valid = mask.bool()
    if bos is not None:
        valid &= ids != bos
    x = torch.cat([h[valid] for h in hidden], dim=1)  # [R, D]
    meta = {k: v[valid].numpy() for k, v in _batch_meta(batch, ids.shape[1], bos is not None).items()}
    meta["tokens"] = ids[valid].numpy()
    return x, meta


class ActivationBatch(NamedTuple):
    """The rows one model batch gave: ``index`` (its number in the stream, from 0), ``x`` [R, D]
    float32 after the outlier filter (None when its forward pass was skipped), their side
    arrays and the number of outlier rows dropped."""

    index: int
    x: torch.Tensor | None
    meta: dict[str, np.ndarray]
    dropped: int


def iter_activations(plan: "HarvestPlan", caps: Sequence[LayerCapture], device: str, *, skip: int = 0,
                     seen: "_StreamLog | None" = None, forward: Callable[[int], bool] | None = None
                     ) -> Iterator[ActivationBatch]:
    """The activation stream of a harvest: one ActivationBatch per model batch, from batch
    ``skip`` on (the earlier ones replayed by tokenization only). ``forward(i)`` False skips
    the models for batch i (yielded with ``x`` None): a resumed consumer rebuilds only the
    batches it still holds rows of. ``fastxc.data.harvest.harvest`` writes this stream to a
    store; ``fastxc.data.buffer`` trains from it."""
    offsets = plan.offsets
    factor = plan.config["outlier_factor"]
    batches = _batch_stream(plan.specs, plan.tokenizer, plan.config, skip=skip, seen=seen,
                            skip_bad_lines=plan.skip_bad_lines)
    for i, batch in enumerate(batches, skip):
        if forward is not None and not forward(i):
            yield ActivationBatch(i, None, {}, 0)
            continue
        x, meta = batch_rows(batch, caps, plan.tokenizer, device)
        dropped = 0
        if factor > 0 and x.shape[0]:
            x, meta, dropped = _drop_outliers(x, meta, offsets, factor)
        yield ActivationBatch(i, x, meta, dropped)


class _Harvester:
    """Writes the kept rows of the activation stream to shards, recording the progress in
    harvest-state.json after every shard (so a kill loses at most one shard)."""

    def __init__(self, out: Path, state: dict, widths: Sequence[int], dtype: str):
        self.state_path, self.state = out / STATE, state
        self.writer = ShardWriter(out, widths, dtype)
        self.pending: list[tuple[torch.Tensor, dict[str, np.ndarray]]] = []
        self.n_pending = 0

    def save_state(self) -> None:
        atomic_write_json(self.state_path, self.state)

    def add(self, x: torch.Tensor, meta: dict[str, np.ndarray], shard_rows: int) -> None:
        """Queue rows for the next shard; write it once ``shard_rows`` rows are queued."""
        if x.shape[0]:
            self.pending.append((x, meta))
            self.n_pending += x.shape[0]
        if self.n_pending >= shard_rows:
            self.flush()

    def flush(self) -> None:
        """Write the queued rows as the next shard and record it (nothing queued: nothing done)."""
        if not self.n_pending:
            return
        self.state["rows"] += self.n_pending
        x = torch.cat([p[0] for p in self.pending])
        meta = {k: np.concatenate([p[1][k] for p in self.pending]) for k in self.pending[0][1]}
        self.state["shards"].append(self.writer.write_shard(len(self.state["shards"]), x, meta))
        self.pending, self.n_pending = [], 0
        self.save_state()

    def done(self, tokens: int) -> bool:
        return self.state["rows"] + self.n_pending >= tokens

    def take(self, item: ActivationBatch, tokens: int, shard_rows: int, bar=None) -> None:
        """Queue the rows of the stream's next model batch, cut at ``tokens`` rows in all."""
        st = self.state
        x, meta = item.x, item.meta
        st["dropped"] += item.dropped
        take = min(x.shape[0], int(tokens) - st["rows"] - self.n_pending)
        if take < x.shape[0]:
            x = x[:take]
            meta = {k: v[:take] for k, v in meta.items()}
        st["batches"] += 1
        if bar is not None:
            bar.update(take)
        self.add(x, meta, shard_rows)

    def run(self, stream: Iterator[ActivationBatch], tokens: int, shard_rows: int, bar=None) -> None:
        """Harvest batches until ``tokens`` rows are written or the data runs out."""
        self.save_state()  # from here on the folder reads as an unfinished harvest, resumable at any moment
        while not self.done(tokens):
            item = next(stream, None)  # lazily: no forward pass past the last row needed
            if item is None:
                break
            self.take(item, tokens, shard_rows, bar)
        self.flush()


@dataclass
class _StreamLog:
    """What reading the datasets met: bad lines skipped per dataset, the dataset that ran out."""

    bad: list[BadLines]
    exhausted: list[int]


def _batch_stream(specs: Sequence[DatasetSpec], tok, config: dict, skip: int,
                  seen: _StreamLog | None = None, skip_bad_lines: bool = False) -> Iterator[list[Chunk]]:
    """The mixed chunk batches of the datasets, the first ``skip`` batches (done before a resume)
    replayed: tokenization only. The replay rereads the same lines, so ``seen`` counts the same
    bad lines as an uninterrupted run."""
    streams = [iter_chunks(iter_texts(s, config["text_field"], config["seed"], config["shuffle_buffer"],
                                      skip_bad_lines=skip_bad_lines, bad=seen.bad[k] if seen else None), tok,
                           config["context_length"], k, split_special_tokens=config.get("ignore_special_tokens", False))
               for k, s in enumerate(specs)]
    batches = iter_batches(mix_chunks(streams, [s.proportion for s in specs], seen.exhausted if seen else None),
                           config["batch_size"])
    for _ in range(skip):
        if next(batches, None) is None:
            break
    return batches


def _write_manifest(out: Path, config: dict, state: dict, specs: Sequence[DatasetSpec], widths: Sequence[int],
                    sources: list[dict], tok, seen: _StreamLog) -> None:
    """Finish the store: the manifest (rows per dataset counted from the shards; a short store
    and the bad lines skipped recorded), written last, then the progress file removed."""
    ds_rows = np.zeros(len(specs), dtype=np.int64)
    for rec in state["shards"]:
        counts = np.bincount(np.fromfile(out / rec["files"]["dataset"]["path"], dtype=np.uint8), minlength=len(specs))
        ds_rows += counts[:len(specs)]
    manifest = build_manifest(
        widths=widths, dtype=config["store_dtype"], shards=state["shards"], sources=sources,
        tokenizer=tokenizer_info(tok),
        datasets=[{"spec": s.spec, "path": s.path, "config": s.config, "split": s.split, "proportion": s.proportion,
                   "rows": int(r), **({"bad_lines_skipped": b.count} if b.count else {})}
                  for s, r, b in zip(specs, ds_rows, seen.bad)],
        seed=config["seed"], dropped_outliers=int(state["dropped"]), outlier_factor=config["outlier_factor"],
        context_length=config["context_length"], text_field=config["text_field"], model_dtype=config["model_dtype"],
        harvest_config=config,
    )
    if state["rows"] < config["tokens"]:  # only with allow_short: the store says it is short
        manifest["short"] = {"requested_tokens": int(config["tokens"]), "harvested_tokens": int(state["rows"]),
                             "exhausted_datasets": [specs[i].spec for i in seen.exhausted]}
    atomic_write_json(out / MANIFEST, manifest)
    (out / STATE).unlink(missing_ok=True)


@dataclass
class HarvestPlan:
    """A checked harvest, before any model weight is loaded: the models and their captured
    layers, the datasets, the tokenizer, the sources (width, name) and ``config``, the
    harvest's identity (what a store's manifest records as ``harvest_config``)."""

    models: list[str]
    revisions: list[str | None]
    specs: list[DatasetSpec]
    tokenizer: Any
    layer_lists: list[list[int]]
    widths: list[int]
    sources: list[dict]
    config: dict
    skip_bad_lines: bool = False

    @property
    def offsets(self) -> list[int]:
        """Column offsets of the sources in a row [D]: [0, d_0, d_0 + d_1, ...]."""
        return [0] + np.cumsum(self.widths).tolist()

    def load_models(self, device: str) -> list[LayerCapture]:
        """Each model loaded on ``device`` with its layers' capture hooks (``remove()`` them)."""
        return [LayerCapture(load_model(m, device, self.config["model_dtype"], r), ls)
                for m, r, ls in zip(self.models, self.revisions, self.layer_lists)]


def plan_harvest(models: Sequence[str], datasets: Sequence[str], tokens: int, layer: int | None = None,
                 layers: Sequence[int] | None = None, context_length: int = 128, batch_size: int = 8,
                 store_dtype: str = "bfloat16", model_dtype: str = "float32", text_field: str = "text",
                 seed: int = 0, *, outlier_factor: float = 10.0, shard_tokens: int | None = None,
                 source_names: Sequence[str] | None = None, revisions: Sequence[str | None] | None = None,
                 shuffle_buffer: int = 0, ignore_special_tokens: bool = False,
                 skip_bad_lines: bool = False) -> HarvestPlan:
    """Check the settings, the datasets (first record) and the tokenizers, and read the model
    configs (no weights): the HarvestPlan (arguments as ``harvest``). HarvestError on bad input."""
    models = [str(m) for m in models]
    dtype, specs, revisions, shard_rows = _check_settings(models, datasets, tokens, batch_size, outlier_factor,
                                                          store_dtype, model_dtype, revisions, shard_tokens)
    for spec in specs:  # fail on a bad dataset before any model is loaded
        check_dataset(spec, text_field, skip_bad_lines)
    toks = [load_tokenizer(m, r) for m, r in zip(models, revisions)]
    check_tokenizers(toks, models, ignore_special_tokens)
    tok = toks[0]
    layer_lists, widths, sources = _plan_sources(models, revisions, layer, layers, source_names)
    config = {  # the harvest's identity: a rerun with an equal config resumes or is a no-op
        "models": models, "revisions": revisions, "layers": layer_lists, "source_names": [s["name"] for s in sources],
        "datasets": [s.spec for s in specs], "tokens": int(tokens), "context_length": int(context_length),
        "batch_size": int(batch_size), "store_dtype": dtype, "model_dtype": model_dtype,
        "text_field": text_field, "seed": int(seed), "outlier_factor": float(outlier_factor),
        "shard_tokens": shard_rows, "shuffle_buffer": int(shuffle_buffer),
        "tokenizer_vocab_sha256": tokenizer_info(tok)["vocab_sha256"],
    }
    if ignore_special_tokens:  # only in the config when set: older stores keep their fingerprint
        config["ignore_special_tokens"] = True
    # skip_bad_lines and allow_short are not settings: the rows up to a bad line are the same with
    # or without skipping, so a harvest stopped by one continues when rerun with --skip-bad-lines
    return HarvestPlan(models, revisions, specs, tok, layer_lists, widths, sources, config, skip_bad_lines)


class StoreSink:
    """Writes an activation stream (``iter_activations``) into a store folder exactly as
    ``harvest`` does: ``open`` it (None: the folder already holds this harvest), ``take`` the
    stream's batches in order until ``done``, then ``finish``. A stream that starts past batch
    0 (a resumed run) is fine as long as it starts at or before ``next_batch``: earlier batches
    are ignored."""

    def __init__(self, plan: HarvestPlan, out: Path, state: dict, created: bool):
        self.plan, self.out, self.created = plan, out, created
        self.tokens = int(plan.config["tokens"])
        self.shard_rows = int(plan.config["shard_tokens"])
        self.writer = _Harvester(out, state, plan.widths, plan.config["store_dtype"])
        self.seen = _StreamLog([BadLines() for _ in plan.specs], [])
        self.next_batch = int(state["batches"])  # the first model batch the store needs (the rest are done)

    @classmethod
    def open(cls, plan: HarvestPlan, out: str | os.PathLike, overwrite: bool = False) -> "StoreSink | None":
        out = Path(out)
        created = not out.exists()
        state = _open_out(out, plan.config, overwrite)
        if state is None:
            return None
        sink = cls(plan, out, state, created)
        sink.writer.save_state()  # from here on the folder reads as an unfinished harvest, resumable
        return sink

    @property
    def done(self) -> bool:
        return self.writer.done(self.tokens)

    def take(self, item: ActivationBatch, bar=None) -> None:
        if self.done or item.index < self.writer.state["batches"]:
            return
        if item.index > self.writer.state["batches"]:  # a gap would shift every later row
            raise HarvestError(f"the store in {self.out} needs model batch {self.writer.state['batches']} next, "
                               f"got batch {item.index}")
        self.writer.take(item, self.tokens, self.shard_rows, bar)

    def fail(self, e: BaseException) -> BaseException:
        """After an error: an unfinished store without a shard is removed; the error to raise."""
        st = self.writer.state
        if not st["shards"]:
            _discard_unfinished(self.out, self.created)
        elif isinstance(e, HarvestError):
            return HarvestError(f"{e} ({len(st['shards'])} finished shard(s) are kept in {self.out}: rerun the same "
                                "command to continue, or pass --overwrite to start again)")
        return e

    def finish(self, allow_short: bool = False) -> Path:
        """Write the last shard and the manifest (HarvestError if the data ran out before
        ``tokens`` rows, unless ``allow_short``)."""
        self.writer.flush()
        st, specs = self.writer.state, self.plan.specs
        if st["rows"] == 0:
            raise self.fail(HarvestError("no activations harvested: the datasets gave no tokens"))
        if st["rows"] < self.tokens:
            ran_out = ", ".join(specs[i].spec for i in self.seen.exhausted) or "a dataset"
            if not allow_short:
                # Kept unfinished (no manifest, so never read as a store), resumable: --allow-short
                # finishes it without repeating a forward pass.
                raise HarvestError(
                    f"harvested {st['rows']} of {self.tokens} requested tokens: {ran_out} ran out; {self.out} is left "
                    "unfinished (no manifest): rerun with --allow-short to keep these tokens as the store, or give "
                    "more data or fewer --tokens with --overwrite")
            # the manifest records it ("short") and the command prints it as a warning
            log.info("harvested %d of %d requested tokens: %s ran out (--allow-short)", st["rows"], self.tokens, ran_out)
        _write_manifest(self.out, self.plan.config, st, specs, self.plan.widths, self.plan.sources,
                        self.plan.tokenizer, self.seen)
        return self.out


def harvest(models: Sequence[str], out: str | os.PathLike, datasets: Sequence[str], tokens: int,
            layer: int | None = None, layers: Sequence[int] | None = None, context_length: int = 128,
            batch_size: int = 8, store_dtype: str = "bfloat16", device: str = "cpu",
            model_dtype: str = "float32", text_field: str = "text", seed: int = 0, progress: bool = True,
            *, outlier_factor: float = 10.0, shard_tokens: int | None = None,
            source_names: Sequence[str] | None = None, revisions: Sequence[str | None] | None = None,
            shuffle_buffer: int = 0, overwrite: bool = False, ignore_special_tokens: bool = False,
            skip_bad_lines: bool = False, allow_short: bool = False) -> Path:
    """Harvest the residual stream of ``models`` into a store at ``out``; returns its path.

    Args:
        models: n >= 1 Hugging Face ids or local folders (n >= 2 sources in total: several
            models, or several ``layers`` of one model).
        out: store directory (created; rerunning the same call resumes or returns at once).
        datasets: ``path_or_id[:proportion]`` specs.
        tokens: rows (token positions) to store, after dropping BOS/pad/outliers.
        layer: decoder layer whose input is captured (default: n_layers // 2 of each model).
        layers: several layers of every model, each one a source (overrides ``layer``).
        context_length: tokens per model input sequence, BOS included.
        batch_size: sequences per forward pass.
        store_dtype: bfloat16 (default), float16, float32 or float8_e4m3fn.
        device / model_dtype: where and in which dtype the models run.
        text_field: the dataset field holding the text.
        seed: seeds the document shuffle (when ``shuffle_buffer`` > 0); kept in the manifest.
        outlier_factor: drop positions with a source norm > factor x that source's median
            norm in the batch (0 disables).
        shard_tokens: rows per shard (default 65536); a shard is the unit of resume.
        source_names: names of the sources (default: model folder names, with @L<layer>).
        revisions: hub revision of each model.
        shuffle_buffer: documents in the streaming shuffle buffer (0: stream order).
        overwrite: start afresh whatever ``out`` holds (a store or an unfinished harvest).
        ignore_special_tokens: require only the regular vocabularies to match (see
            ``check_tokenizers``).
        skip_bad_lines: skip (and count, in the manifest's datasets) lines of .jsonl / .txt
            files that are not UTF-8 or not a JSON object, instead of stopping at the first.
        allow_short: when the datasets run out before ``tokens`` rows, finish the store with
            what there is (marked ``short`` in the manifest) instead of raising HarvestError.

    A harvest that stops with an error before finishing a shard leaves nothing behind; one that
    stops later keeps its finished shards (rerun the same command to continue).
    """
    plan = plan_harvest(models, datasets, tokens, layer, layers, context_length, batch_size, store_dtype, model_dtype,
                        text_field, seed, outlier_factor=outlier_factor, shard_tokens=shard_tokens,
                        source_names=source_names, revisions=revisions, shuffle_buffer=shuffle_buffer,
                        ignore_special_tokens=ignore_special_tokens, skip_bad_lines=skip_bad_lines)
    sink = StoreSink.open(plan, out, overwrite)
    if sink is None:
        return Path(out)
    state = sink.writer.state
    try:
        caps = plan.load_models(device)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=int(tokens), initial=state["rows"], unit="tok", desc="harvest", dynamic_ncols=True)
        try:
            stream = iter_activations(plan, caps, device, skip=state["batches"], seen=sink.seen)
            sink.writer.run(stream, sink.tokens, sink.shard_rows, bar)
        finally:
            if bar is not None:
                bar.close()
            for c in caps:
                c.remove()
    except BaseException as e:
        err = sink.fail(e)
        if err is e:
            raise
        raise err from e
    return sink.finish(allow_short)


# ------------------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="fastxc harvest",
               description="Harvest residual-stream activations of HF models into a fastxc store.")
    p.add_argument("--model-a", help="first model (hub id or local folder)")
    p.add_argument("--model-b", help="second model (hub id or local folder)")
    p.add_argument("--model", action="append", default=[], help="further models (repeatable; n >= 2 in total)")
    p.add_argument("--layer", type=int, default=None, help="decoder layer whose input is captured (default: half depth)")
    p.add_argument("--layers", default=None, help="several layers of each model as sources, e.g. 2,4,6")
    p.add_argument("--dataset", action="append", default=[], metavar="SPEC",
                   help="path_or_id[@config][#split][:proportion]; repeat to mix (e.g. traces.jsonl:0.5 "
                        "org/corpus@default#train:0.5); split defaults to train")
    p.add_argument("--text-field", default="text", help="dataset field with the text")
    p.add_argument("--skip-bad-lines", action="store_true",
                   help="skip and count lines of .jsonl/.txt files that are not UTF-8 or not a JSON object "
                        "(default: stop at the first, naming its file and line)")
    p.add_argument("--tokens", type=int, required=True, help="token positions to store")
    p.add_argument("--allow-short", action="store_true",
                   help="if the datasets run out before --tokens, keep the shorter store (a warning) "
                        "instead of failing")
    p.add_argument("--out", required=True, help="store directory")
    p.add_argument("--context-length", type=int, default=128, help="tokens per model input sequence, BOS included")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    p.add_argument("--dtype", "--store-dtype", dest="store_dtype", default="bfloat16",
                   help="store dtype: bfloat16 (default), float16, float32, fp8 (e4m3, per-row scale)")
    p.add_argument("--device", default="auto", help="torch device: auto (CUDA when available, else cpu), cpu, cuda, cuda:N")
    p.add_argument("--model-dtype", default="float32", help="dtype the models run in: float32 (default), bfloat16, float16")
    p.add_argument("--seed", type=int, default=0, help="seed of the document shuffle (with --shuffle-buffer)")
    p.add_argument("--outlier-factor", type=float, default=10.0,
                   help="drop positions with a norm > factor x the median (0: keep all)")
    p.add_argument("--shard-tokens", type=int, default=None, help=f"rows per shard (default {DEFAULT_SHARD_TOKENS})")
    p.add_argument("--shuffle-buffer", type=int, default=0, help="streaming document shuffle buffer (0: off)")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh whatever --out holds (a store or an unfinished harvest)")
    p.add_argument("--ignore-special-tokens", action="store_true",
                   help="require only the regular vocabularies to match (special tokens may differ)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # bad flags: "error: ..." and exit status 2
    models = [m for m in (args.model_a, args.model_b) if m] + list(args.model)
    try:
        layers = None
        if args.layers:
            try:
                layers = [int(x) for x in args.layers.split(",") if x.strip()]
            except ValueError:
                raise HarvestError(f"--layers must be comma-separated integers, got {args.layers!r}") from None
        path = harvest(models, args.out, args.dataset, args.tokens, layer=args.layer, layers=layers,
                       context_length=args.context_length, batch_size=args.batch_size,
                       store_dtype=args.store_dtype, device=str(resolve_device(args.device)), model_dtype=args.model_dtype,
                       text_field=args.text_field, seed=args.seed, progress=not args.no_progress,
                       outlier_factor=args.outlier_factor, shard_tokens=args.shard_tokens,
                       shuffle_buffer=args.shuffle_buffer, overwrite=args.overwrite,
                       ignore_special_tokens=args.ignore_special_tokens, skip_bad_lines=args.skip_bad_lines,
                       allow_short=args.allow_short)
    except (ValueError, OSError) as e:  # HarvestError / StoreError are ValueErrors
        return report(e)
    m = json.loads((path / MANIFEST).read_text())
    short = m.get("short")
    if short:
        print(f"warning: harvested {short['harvested_tokens']} of {short['requested_tokens']} requested tokens: "
              f"{', '.join(short['exhausted_datasets']) or 'a dataset'} ran out (--allow-short)", file=sys.stderr)
    for d in m.get("datasets", []):
        if d.get("bad_lines_skipped"):
            print(f"warning: skipped {d['bad_lines_skipped']} bad line(s) of {d['path']} (--skip-bad-lines)",
                  file=sys.stderr)
    print(f"store: {path}  ({m['n_rows']} tokens, sources {[s['name'] for s in m['sources']]}, "
          f"widths {m['widths']}, dtype {m['dtype']}, {m['dropped_outliers']} outlier positions dropped)")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sys.exit(main())
