"""SAELens's on-disk SAE: a folder with ``cfg.json`` and ``sae_weights.safetensors``.

Read by ``sae_lens.SAE.load_from_disk(folder)`` (SAELens >= 6). Its tensors: ``W_enc`` [d_in,
d_sae], ``b_enc`` [d_sae], ``W_dec`` [d_sae, d_in], ``b_dec`` [d_in] (+ ``threshold`` [d_sae] for
jumprelu). Its forward, with ``apply_b_dec_to_input`` false and ``normalize_activations``
"none" (what is written here):

    pre = x @ W_enc + b_enc;   f = act(pre);   recon = f @ W_dec + b_dec

standard: act = relu; topk: the k largest of pre, relu'd; jumprelu: relu(pre) * (pre > threshold).
A fastxc crosscoder of one source maps onto it: relu -> standard, topk -> topk, batchtopk ->
jumprelu with its inference threshold in every entry (fastxc's batchtopk at inference is that
JumpReLU), jumprelu -> jumprelu with threshold = exp(log_threshold) per feature. Importing, a
jumprelu folder with one threshold for all features becomes a batchtopk crosscoder; per-feature
thresholds are read back only from a folder fastxc wrote (its metadata says jumprelu). fastxc's ``input_scale`` s (the store normalisation) is folded into the weights,
as SAELens's own ``fold_activation_norm_scaling_factor`` does, so the SAE reads raw
activations: W_enc * s, W_dec / s, b_dec / s. The fastxc config and s go into the metadata
(``metadata.fastxc``), so importing the folder back restores the crosscoder.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from fastxc.core.crosscoder import Crosscoder
from fastxc.interop.convert import (Bundle, InteropError, InteropWarning, build_crosscoder, crosscoder_config,
                                    warn_compute_dtype)

CFG, WEIGHTS = "cfg.json", "sae_weights.safetensors"
ARCHITECTURE = {"relu": "standard", "topk": "topk", "batchtopk": "jumprelu", "jumprelu": "jumprelu"}
# importing: jumprelu means batchtopk (one threshold) or jumprelu (per-feature), decided by the file
ACTIVATION = {"standard": "relu", "topk": "topk", "jumprelu": "batchtopk"}
# the cfg layout written here is SAELens 6's; its loader converts configs that say < 6 (or
# nothing) from the older layout, so the version is stated
SAELENS_VERSION = "6.0.0"


def to_saelens(cc: Crosscoder, *, model_name: str | None = None, hook_name: str | None = None) -> Bundle:
    """The SAELens folder of a 1-source crosscoder; InteropError for any other."""
    if cc.n_sources != 1:
        raise InteropError(f"SAELens holds a single-source SAE; this crosscoder has {cc.n_sources} sources "
                           f"({', '.join(cc.source_names)}): export it to dictionary_learning instead")
    threshold = None
    if cc.activation == "batchtopk":
        threshold = float(cc.threshold)
        if threshold < 0:
            raise InteropError("the batchtopk crosscoder has no inference threshold yet (train it first): "
                               "SAELens's jumprelu needs one")
    if cc.activation == "jumprelu":
        # the threshold compares with pre, which folding the input scale leaves unchanged
        threshold = cc.log_threshold.detach().cpu().exp()
    warn_compute_dtype(cc, "SAELens")
    W_enc, b_enc, W_dec, b_dec = (p.detach().cpu() for p in (cc.W_enc, cc.b_enc, cc.W_dec, cc.b_dec))
    scale = cc.input_scale.detach().cpu()[0]
    if scale != 1:  # fold the normalisation in: the SAE then reads raw activations
        W_enc, W_dec, b_dec = W_enc * scale.to(W_enc.dtype), W_dec / scale.to(W_dec.dtype), b_dec / scale.to(b_dec.dtype)
    tensors = {"W_enc": W_enc.t().contiguous(), "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    if isinstance(threshold, torch.Tensor):
        tensors["threshold"] = threshold.to(W_dec.dtype)
    elif threshold is not None:
        tensors["threshold"] = torch.full((cc.n_features,), threshold, dtype=W_dec.dtype)
    cfg = {
        "architecture": ARCHITECTURE[cc.activation],
        "d_in": cc.widths[0],
        "d_sae": cc.n_features,
        "dtype": str(W_dec.dtype).removeprefix("torch."),
        "device": "cpu",
        "apply_b_dec_to_input": False,  # fastxc does not subtract b_dec from the input
        "normalize_activations": "none",  # the store normalisation is folded into the weights
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": SAELENS_VERSION,
            "model_name": model_name,
            "hook_name": hook_name,
            "fastxc": {"config": cc.config(), "input_scale": float(scale)},
        },
    }
    if cc.activation == "topk":
        cfg.update({"k": cc.k, "rescale_acts_by_decoder_norm": False})
    return Bundle(tensors={WEIGHTS: tensors}, json={CFG: cfg})


def _read(src: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    cfg_path, w_path = src / CFG, src / WEIGHTS
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise FileNotFoundError(f"not a SAELens folder: {p} is missing")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InteropError(f"{cfg_path}: not valid JSON ({e})") from None
    try:
        tensors = load_file(str(w_path))
    except Exception as e:  # safetensors raises its own error types
        raise InteropError(f"{w_path}: cannot read safetensors ({e})") from None
    return cfg, tensors


def from_saelens(src: Path) -> Crosscoder:
    """A fastxc crosscoder from a SAELens folder (standard, topk or jumprelu with one threshold
    for all features). ``apply_b_dec_to_input`` is folded into b_enc and topk's
    ``rescale_acts_by_decoder_norm`` into the weights (the same function, up to rounding);
    anything else fastxc cannot compute is refused with InteropError."""
    cfg, t = _read(src)
    where = src / CFG
    # SAELens < 6 configs have no architecture (sae_lens.loading: handle_pre_6_0_config)
    arch = cfg.get("architecture") or ("topk" if cfg.get("activation_fn") == "topk" else "standard")
    if arch not in ACTIVATION:
        raise InteropError(f"{where}: SAELens architecture {arch!r} has no fastxc equivalent "
                           f"(fastxc imports {', '.join(ACTIVATION)})")
    for key in ("normalize_activations", "reshape_activations"):
        if cfg.get(key, "none") not in (None, "none"):
            raise InteropError(f"{where}: {key}={cfg[key]!r} is not expressible in fastxc (fold it into the "
                               "weights first, e.g. SAELens's fold_activation_norm_scaling_factor)")
    if cfg.get("finetuning_scaling_factor"):
        raise InteropError(f"{where}: finetuning_scaling_factor is not expressible in fastxc")
    want = {"W_enc", "b_enc", "W_dec", "b_dec"} | ({"threshold"} if arch == "jumprelu" else set())
    if set(t) != want:
        raise InteropError(f"{src / WEIGHTS}: expected tensors {sorted(want)}, found {sorted(t)}")
    W_enc, b_enc, W_dec, b_dec = t["W_enc"], t["b_enc"], t["W_dec"], t["b_dec"]
    d, F = W_enc.shape if W_enc.dim() == 2 else (-1, -1)
    if W_dec.shape != (F, d) or b_enc.shape != (F,) or b_dec.shape != (d,):
        raise InteropError(f"{src / WEIGHTS}: inconsistent shapes W_enc {tuple(W_enc.shape)}, b_enc "
                           f"{tuple(b_enc.shape)}, W_dec {tuple(W_dec.shape)}, b_dec {tuple(b_dec.shape)}")
    threshold = log_threshold = None
    activation = ACTIVATION[arch]
    if arch == "jumprelu":
        thr = t["threshold"]
        if thr.shape != (F,):
            raise InteropError(f"{src / WEIGHTS}: threshold has shape {tuple(thr.shape)}, expected [d_sae]=[{F}]")
        if bool((thr == thr[0]).all()) and float(thr[0]) >= 0:  # one threshold: fastxc's batchtopk at inference
            threshold = float(thr[0])
    W_enc = W_enc.t()  # [F, d], fastxc's feature-major layout
    if cfg.get("apply_b_dec_to_input", True):
        # pre = (x - b_dec) @ W_enc + b_enc = x @ W_enc + (b_enc - b_dec @ W_enc)
        b_enc = (b_enc.double() - W_enc.double() @ b_dec.double()).to(b_enc.dtype)
    if arch == "topk" and cfg.get("rescale_acts_by_decoder_norm"):
        # SAELens: pre * ||W_dec_k||, decoded as (f / ||W_dec_k||) @ W_dec: fold both
        n = W_dec.norm(dim=1)
        W_enc, b_enc, W_dec = W_enc * n[:, None], b_enc * n, W_dec / n[:, None]

    meta = cfg.get("metadata") or {}
    fx = meta.get("fastxc") if isinstance(meta, dict) else None
    if fx:  # a folder fastxc wrote: its config, and the normalisation to unfold
        kwargs = crosscoder_config(fx["config"], [d], F, str(where))
        scale = float(fx.get("input_scale", 1.0))
    else:
        k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")
        if k is None:
            k = min(32, F)
            if arch == "jumprelu":
                warnings.warn(f"the SAELens folder has no k (batchtopk's training batch size per row): set to {k}; "
                              "it matters only for further training", InteropWarning, stacklevel=2)
        k = int(k)
        kwargs = {"widths": [d], "n_features": F, "activation": activation, "k": k,
                  "source_names": [meta.get("hook_name") or "source0"] if isinstance(meta, dict) else None}
        scale = 1.0
    if arch == "jumprelu" and kwargs.get("activation") == "jumprelu" and bool((t["threshold"] > 0).all()):
        # a jumprelu crosscoder fastxc wrote: per-feature thresholds, theta = exp(log_threshold)
        activation, threshold, log_threshold = "jumprelu", None, t["threshold"].float().log()
    elif arch == "jumprelu" and threshold is None:
        # (a foreign SAE with per-feature thresholds maps onto fastxc's jumprelu too, but its
        # import is refused for now, as tests/test_export.py pins)
        raise InteropError(f"{src / WEIGHTS}: the jumprelu thresholds differ between features (or are "
                           "negative); fastxc's batchtopk has one threshold >= 0 for all features")
    if kwargs.get("activation") != activation:
        raise InteropError(f"{where}: architecture {arch} but the fastxc config says {kwargs.get('activation')}")
    if scale != 1:
        s = torch.tensor(scale, dtype=torch.float32)
        W_enc, W_dec, b_dec = W_enc / s.to(W_enc.dtype), W_dec * s.to(W_dec.dtype), b_dec * s.to(b_dec.dtype)
    cc = build_crosscoder(kwargs, W_enc, b_enc, W_dec, b_dec, torch.tensor([scale]), threshold)
    if log_threshold is not None:
        with torch.no_grad():
            cc.log_threshold.copy_(log_threshold)
    return cc
