"""The one place that loads a Hugging Face causal LM, its tokenizer and config, and finds the
model's decoder layers, so that the harvester and the analyses hook the same module of a model.

- ``load_model(name, device, dtype, revision)``: AutoModelForCausalLM in eval mode;
- ``load_tokenizer(name, revision)`` / ``load_config(name, revision)``;
- ``config_dims(cfg)`` -> (residual width, decoder layers); ``hidden_size(model)``;
- ``decoder_layers(model)``: the ModuleList of decoder blocks, whose ``hidden_states`` input
  is the residual stream that stores hold (``output_hidden_states[L]`` for layer L);
- ``pad_batch(seqs, pad_id)``: right-padded token batch for those models.

``name`` is a hub id (``org/name``, resolved from the local cache when offline) or a local
folder (``~`` expanded). Every failure is a one-line ``ModelError`` (a ValueError).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

MODEL_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}

# Attribute paths of the decoder layer list in the architectures transformers ships.
_LAYER_PATHS = (
    "model.layers",  # Llama, Qwen2, Mistral, Gemma, Phi3, ...
    "model.decoder.layers",  # OPT
    "transformer.h",  # GPT-2, GPT-J, Bloom, Falcon
    "gpt_neox.layers",  # Pythia
    "model.language_model.layers",  # multimodal wrappers
    "layers",
)


class ModelError(ValueError):
    """A model, tokenizer or config that cannot be loaded, or a model whose layers cannot be found."""


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _resolve(name: str | Path) -> str:
    """A local folder (``~`` expanded) or the hub id as given; a missing path-like name fails
    here, with a clearer message than the hub lookup it would otherwise become."""
    name = str(name)
    p = Path(name).expanduser()
    if p.exists():
        return str(p)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelError(f"cannot load model {name}: not found (not a local folder, nor a hub id like org/name)")
    return name


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"bf16"`` / ``"bfloat16"`` / torch.bfloat16 ... -> the torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in MODEL_DTYPES:
        raise ModelError(f"unknown model dtype {dtype!r}; choose float32, bfloat16 or float16")
    return MODEL_DTYPES[dtype]


def _from_pretrained(load: Callable[..., Any], name: str | Path, revision: str | None, what: str, **kw):
    """``load(path, revision=..., **kw)`` (a transformers ``from_pretrained``); a failure -> one-line ModelError."""
    path = _resolve(name)
    try:
        return load(path, **({"revision": revision} if revision else {}), **kw)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load {what}: {_first_line(e)}") from e


def load_model(name: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32",
               revision: str | None = None) -> nn.Module:
    """AutoModelForCausalLM from a hub id or a local folder, in eval mode on ``device``."""
    import transformers
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    torch_dtype = resolve_dtype(dtype)
    # transformers 5 renamed torch_dtype to dtype
    kw = {"dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype": torch_dtype}
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # one "Loading weights" bar per model is noise next to our one-line errors
    try:
        model = _from_pretrained(AutoModelForCausalLM.from_pretrained, name, revision, f"model {name}", **kw)
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    return model.to(device).eval()


def load_tokenizer(name: str | Path, revision: str | None = None):
    """The model's AutoTokenizer."""
    from transformers import AutoTokenizer

    return _from_pretrained(AutoTokenizer.from_pretrained, name, revision, f"the tokenizer of {name}")


def load_config(name: str | Path, revision: str | None = None):
    """The model's config (no weights loaded): checks widths and layers before the expensive load."""
    from transformers import AutoConfig

    return _from_pretrained(AutoConfig.from_pretrained, name, revision, f"model {name}")


def config_dims(cfg) -> tuple[int, int]:
    """(residual width, decoder layers) from a transformers config (a multimodal one: its text part)."""
    cfg = getattr(cfg, "text_config", None) or cfg
    width = next((getattr(cfg, n) for n in ("hidden_size", "n_embd", "d_model") if getattr(cfg, n, None)), None)
    layers = next((getattr(cfg, n) for n in ("num_hidden_layers", "n_layer", "num_layers") if getattr(cfg, n, None)), None)
    if width is None or layers is None:
        raise ModelError(f"cannot read the residual width / layer count of a {type(cfg).__name__}")
    return int(width), int(layers)


def hidden_size(model: nn.Module) -> int:
    """The residual width of a loaded model."""
    return config_dims(model.config)[0]


def _attr_path(obj: Any, path: str) -> Any:
    for attr in path.split("."):
        obj = getattr(obj, attr, None)
        if obj is None:
            return None
    return obj


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks of a causal LM: [n_layers] modules.

    Tried in order: a known attribute path whose list has the config's layer count; any
    ModuleList of that length; a known path with any non-empty list (a config that miscounts).
    """
    try:
        n = config_dims(model.config)[1]
    except (AttributeError, ModelError):
        n = None
    known = [m for m in (_attr_path(model, p) for p in _LAYER_PATHS) if isinstance(m, nn.ModuleList) and len(m)]
    if n is not None:
        for m in known + [m for _, m in model.named_modules() if isinstance(m, nn.ModuleList)]:
            if len(m) == n:
                return m
    if known:
        return known[0]
    raise ModelError(f"cannot find the decoder layer list of {type(model).__name__}")


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-pad token lists -> (input_ids [B, T] int64, attention_mask [B, T] int64).

    Right padding keeps position ids equal to token positions, and causal attention means the
    pads never influence a real position.
    """
    if not seqs:
        raise ValueError("no sequences to run")
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask
