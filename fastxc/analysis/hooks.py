"""Hugging Face model plumbing shared by the analysis commands. Loading models and tokenizers
and finding the decoder layers live in ``fastxc.data.models``, shared with the harvester.

The crosscoder reads the *residual stream input of decoder layer L* (what the harvester stores):
the ``hidden_states`` argument of ``layers[L]``. Everything here works through forward
pre-hooks on that layer, so it needs no model-specific code beyond finding the layer list:

- ``capture_residual``: run models on a token batch and return their layer-L inputs [B, T, d]
  (the forward stops right after layer L's input is seen);
- ``edit_residual``: a context manager that replaces the layer-L input by ``fn(h)`` for every
  forward inside it (generation included: each decoding step passes through the hook).

Token sequences for a store row are rebuilt from the store's side arrays (``tokens``, ``doc``,
``pos``) by ``store_contexts``. ``AnalysisError`` and ``read_json`` (the analyses' JSON inputs)
live here too: a light module every analysis imports.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from fastxc.data.models import decoder_layers


class AnalysisError(ValueError):
    """Bad input to an analysis (mismatched widths, unknown layer, no marker found...)."""


def read_json(path: str | Path, what: str = "file"):
    """The JSON value in ``path``: FileNotFoundError ("no {what}: path") when it is missing,
    AnalysisError with the parser's message when it is not valid JSON."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no {what}: {p}")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise AnalysisError(f"{p}: not valid JSON ({e.msg})") from None


def check_layer(model: nn.Module, layer: int, name: str = "model") -> None:
    n = len(decoder_layers(model))
    if not 0 <= layer < n:
        raise AnalysisError(f"layer {layer} out of range for {name} with {n} decoder layers")


def _replace_hidden(args: tuple, kwargs: dict, new: Tensor) -> tuple[tuple, dict]:
    if args:
        return (new,) + tuple(args[1:]), kwargs
    kwargs = dict(kwargs)
    kwargs["hidden_states"] = new
    return args, kwargs


def _get_hidden(args: tuple, kwargs: dict) -> Tensor:
    return args[0] if args else kwargs["hidden_states"]


@contextlib.contextmanager
def edit_residual(model: nn.Module, layer: int, fn: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """Inside the block, layer ``layer`` sees ``fn(h)`` instead of its input h [B, T, d]."""
    check_layer(model, layer)

    def hook(_module, args, kwargs):
        h = _get_hidden(args, kwargs)
        return _replace_hidden(args, kwargs, fn(h))

    handle = decoder_layers(model)[layer].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


class _Stop(Exception):
    pass


@torch.no_grad()
def capture_residual(model: nn.Module, layer: int, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """The input of decoder layer ``layer`` [B, T, d] (float32) for a token batch [B, T].

    The forward is cut short after the layer's input is seen (an exception from the hook), so
    capturing at half depth costs half a forward.
    """
    check_layer(model, layer)
    out: list[Tensor] = []

    def hook(_module, args, kwargs):
        out.append(_get_hidden(args, kwargs).detach().float())
        raise _Stop

    handle = decoder_layers(model)[layer].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    return out[0]


def pad_id_of(tokenizer) -> int:
    for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
        v = getattr(tokenizer, name, None)
        if v is not None:
            return int(v)
    return 0


def bos_prefix(tokenizer) -> list[int]:
    """[bos] when the tokenizer prepends a BOS to encoded text (Llama style), else []."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return [int(bos)] if ids and ids[0] == bos else []


def special_mask(input_ids: Tensor, attention_mask: Tensor, tokenizer) -> Tensor:
    """[B, T] bool: positions the crosscoder never saw in training: BOS and padding.

    The harvester drops exactly these (BOS norms are outliers), so splicing and ablation leave
    them untouched.
    """
    skip = attention_mask == 0
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None:
        skip = skip | (input_ids == bos)
    return skip


def store_contexts(reader, rows: Sequence[int], max_len: int, prefix: Sequence[int] = ()) -> list[list[int]]:
    """Token ids of the document prefix ending at each store row (row included).

    Rows of one document are contiguous in a store; ``dataset`` / ``doc`` / ``pos`` side arrays,
    where the store has them, mark the boundaries (a row continues the previous one when its
    dataset and doc ids are the same and its position is one more). Without them the previous ``max_len - 1`` rows are used.
    ``prefix`` (e.g. the BOS the harvester dropped) is prepended to each context.
    """
    tokens = reader.tokens
    if tokens is None:
        raise AnalysisError(f"store {reader.path} keeps no token ids; re-harvest with tokens")
    cont = same_doc_next(reader)
    out = []
    for r in rows:
        r = int(r)
        lo = r
        while lo > 0 and r - lo + 1 < max_len and cont[lo - 1]:
            lo -= 1
        out.append(list(prefix) + tokens[lo : r + 1].astype(np.int64).tolist())
    return out


def same_doc_next(reader) -> np.ndarray:
    """[N] bool: row r+1 continues row r's document (last entry False)."""
    n = len(reader)
    ok = np.ones(n, dtype=bool)
    ok[-1] = False
    doc, pos, ds = reader.meta("doc"), reader.meta("pos"), reader.meta("dataset")
    if ds is not None:  # doc ids count per dataset
        ok[:-1] &= ds[1:] == ds[:-1]
    if doc is not None:
        ok[:-1] &= doc[1:] == doc[:-1]
    if pos is not None:
        ok[:-1] &= pos[1:] == pos[:-1] + 1
    return ok
