"""The one place that loads a Hugging Face causal LM, its tokenizer and config, and finds the
model's decoder layers, so that the harvester and the analyses hook the same module of a model.

- ``load_model(name, device, dtype, revision)``: AutoModelForCausalLM in eval mode;
- ``load_tokenizer(name, revision)`` / ``load_config(name, revision)``;
- ``config_dims(cfg)`` -> (residual width, decoder layers); ``hidden_size(model)``;
- ``decoder_layers(model)``: the ModuleList of decoder blocks, whose ``hidden_states`` input
  is the residual stream that stores hold (``output_hidden_states[L]`` for layer L);
- ``pad_batch(seqs, pad_id)``: right-padded token batch for those models.

``name`` is a hub id (``org/name``) or a local folder (``~`` expanded). Every failure is a
one-line ``ModelError`` (a ValueError).

Hub ids and the network: with ``HF_HUB_OFFLINE=1`` (or ``TRANSFORMERS_OFFLINE=1``) a hub id is
read from the local Hugging Face cache only. Otherwise the hub is probed once per process
(``hub_unreachable``: one request, ``HUB_TIMEOUT`` seconds, no retries); when it does not
answer, a hub id is read from the local cache, and one that is not cached fails at once
instead of after a minute of retries.
"""
from __future__ import annotations

import os
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


HUB_TIMEOUT = 5.0  # seconds for the one probe of the hub
_hub_probes: dict[str, str | None] = {}  # endpoint -> None (answers) or why it does not


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` asks for no network (read now, so
    setting it after ``huggingface_hub`` was imported still counts)."""
    from huggingface_hub import constants

    flags = (os.environ.get(k, "").strip().upper() for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return bool(getattr(constants, "HF_HUB_OFFLINE", False)) or any(f in ("1", "ON", "YES", "TRUE") for f in flags)


def hub_endpoint() -> str:
    """The hub URL huggingface_hub downloads from (``HF_ENDPOINT``)."""
    from huggingface_hub import constants

    return str(constants.ENDPOINT)


def hub_unreachable(timeout: float = HUB_TIMEOUT) -> str | None:
    """None when the hub answers (any HTTP status), else why not ("Connection refused", ...).

    One HEAD request per endpoint and process through huggingface_hub's own session (so proxy
    settings apply), with a short timeout and no retries.
    """
    endpoint = hub_endpoint()
    if endpoint not in _hub_probes:
        from huggingface_hub.utils import get_session

        try:
            get_session().head(endpoint, timeout=timeout)
            _hub_probes[endpoint] = None
        except Exception as e:  # connection refused, DNS failure, timeout, TLS failure, ...
            _hub_probes[endpoint] = _first_line(e)
    return _hub_probes[endpoint]


def hub_unavailable() -> str | None:
    """Why the hub cannot be used now ("HF_HUB_OFFLINE is set", "the Hugging Face hub at URL
    is unreachable (...)"), or None when it answers."""
    if hub_offline():
        return "HF_HUB_OFFLINE is set"
    down = hub_unreachable()
    return None if down is None else f"the Hugging Face hub at {hub_endpoint()} is unreachable ({down})"


def is_local(name: str | Path) -> bool:
    """Whether ``name`` is an existing local path (else it is taken as a hub id)."""
    return Path(str(name)).expanduser().exists()


def _in_cache(repo_id: str, repo_type: str = "model") -> bool:
    from huggingface_hub import constants

    folder = f"{repo_type}s--" + repo_id.replace("/", "--")
    return (Path(constants.HF_HUB_CACHE) / folder).is_dir()


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
    """``load(path, revision=..., **kw)`` (a transformers ``from_pretrained``); a failure -> one-line ModelError.

    A hub id is read from the local cache only when offline or when the hub does not answer
    (see the module docstring), so a missing network costs one short probe, not retries.
    """
    path = _resolve(name)
    why_local = None if is_local(path) else hub_unavailable()
    if why_local is not None:
        kw["local_files_only"] = True
    try:
        return load(path, **({"revision": revision} if revision else {}), **kw)
    except (OSError, ValueError) as e:
        if why_local is not None and not _in_cache(path):
            raise ModelError(f"cannot load {what}: {why_local} and {path} is not in the local Hugging Face cache "
                             f"({_cache_dir()}); download it while online or pass a local folder") from e
        raise ModelError(f"cannot load {what}: {_first_line(e)}") from e


def _cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


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
