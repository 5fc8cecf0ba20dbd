"""science-of-finetuning's ``dictionary_learning`` crosscoders: ``CrossCoder`` (ReLU) and
``BatchTopKCrossCoder`` (dictionary_learning/dictionary.py).

Their state dict, for L sources ("layers") of equal width d and F features::

    encoder.weight [L, d, F]   encoder.bias [F]   decoder.weight [L, F, d]   decoder.bias [L, d]
    code_normalization_id []   target_rms []      activation_mean [L, d]     activation_std [L, d]
    activation_global_scale [L]                   (BatchTopKCrossCoder: k [] int, threshold [])

and forward (the activation normaliser with mean 0, as written here):

    x_n   = x * activation_global_scale[l]                          (no normaliser: x)
    pre   = sum_l x_n[:, l] @ encoder.weight[l] + encoder.bias
    f     = relu(pre)            BatchTopK at inference: relu(pre) * (relu(pre) * c > threshold)
    recon = (f @ decoder.weight[l] + decoder.bias[l]) / (activation_global_scale[l] + 1e-8)

c is the code normalisation (per-feature decoder norms unless "NONE"); export writes "NONE", so
the codes and the threshold mean what they mean in fastxc, and fastxc's ``input_scale`` becomes
``activation_global_scale`` (the +1e-8 of its denormaliser is the one difference: relative
1e-8 / scale). The format has no per-row TopK crosscoder and needs equal widths: those are
refused. Written: ``model.safetensors`` (the state dict), ``config.json`` (the constructor
arguments: ``CrossCoder.from_pretrained(folder, from_hub=True)`` reads both) and ``fastxc.json``
(the fastxc config, so the import back is exact). Import also reads a dictionary_learning
training folder (``model_final.pt`` + ``config.json``) or a ``.pt`` / ``.safetensors`` file, and
folds a non-zero normaliser mean and any code normalisation but "DECOUPLED" into the weights.
"""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import torch

from fastxc.core.crosscoder import Crosscoder
from fastxc.interop.convert import (Bundle, InteropError, InteropWarning, build_crosscoder, crosscoder_config,
                                    warn_compute_dtype)

WEIGHTS, CONFIG, SIDECAR, TRAINED = "model.safetensors", "config.json", "fastxc.json", "model_final.pt"
# dictionary_learning's CodeNormalization enum (values from enum.auto())
CODE_NORMALIZATION = {"CROSSCODER": 1, "SAE": 2, "MIXED": 3, "NONE": 4, "DECOUPLED": 5}
SIDECAR_FORMAT = "fastxc-dictionary-learning"


def to_dictionary_learning(cc: Crosscoder) -> Bundle:
    """The dictionary_learning folder of a relu or batchtopk crosscoder of equal source widths."""
    if len(set(cc.widths)) != 1:
        raise InteropError(f"dictionary_learning's CrossCoder needs equal source widths (its tensors are "
                           f"[num_layers, activation_dim, ...]); this crosscoder's widths are {cc.widths}")
    if cc.activation == "jumprelu":
        raise InteropError("dictionary_learning's CrossCoder has no per-feature thresholds: a jumprelu crosscoder "
                           "cannot be exported to it (SAELens's jumprelu takes a 1-source one)")
    if cc.activation == "topk":
        raise InteropError("dictionary_learning has no per-row TopK crosscoder (BatchTopKCrossCoder selects k x batch "
                           "entries over a batch, or by a threshold): a topk crosscoder cannot be exported to it")
    threshold = None
    if cc.activation == "batchtopk":
        threshold = float(cc.threshold)
        if threshold < 0:
            raise InteropError("the batchtopk crosscoder has no inference threshold yet (train it first)")
    warn_compute_dtype(cc, "dictionary_learning")
    L, d, F = cc.n_sources, cc.widths[0], cc.n_features
    W_enc, b_enc, W_dec, b_dec = (p.detach().cpu() for p in (cc.W_enc, cc.b_enc, cc.W_dec, cc.b_dec))
    scale = cc.input_scale.detach().cpu().float()
    normaliser = not bool((scale == 1).all())
    if normaliser:
        # dictionary_learning uses the saved activation_global_scale buffer; mean 0 and a std it
        # would turn into the same scale (target_rms / sqrt(sum std^2)) keep the buffers coherent
        mean = torch.zeros(L, d)
        std = (1.0 / (scale.double() * math.sqrt(d))).float()[:, None].expand(L, d).contiguous()
        global_scale = scale.clone()
    else:  # no normaliser: dictionary_learning's "absent" marker is NaN
        mean = torch.full((L, d), float("nan"))
        std = torch.full((L, d), float("nan"))
        global_scale = torch.ones(L)
    state = {
        "encoder.weight": W_enc.view(F, L, d).permute(1, 2, 0).contiguous(),
        "encoder.bias": b_enc.contiguous(),
        "decoder.weight": W_dec.view(F, L, d).transpose(0, 1).contiguous(),
        "decoder.bias": b_dec.view(L, d).contiguous(),
        "code_normalization_id": torch.tensor(CODE_NORMALIZATION["NONE"]),
        "target_rms": torch.tensor(1.0),
        "activation_mean": mean,
        "activation_std": std,
        "activation_global_scale": global_scale,
    }
    config = {"activation_dim": d, "dict_size": F, "num_layers": L, "code_normalization": "NONE", "target_rms": 1.0}
    dict_class = "CrossCoder"
    if threshold is not None:
        dict_class = "BatchTopKCrossCoder"
        state["k"] = torch.tensor(cc.k, dtype=torch.int32)
        state["threshold"] = cc.threshold.detach().cpu().float().clone()
        config["k"] = cc.k
    sidecar = {"format": SIDECAR_FORMAT, "version": 1, "dict_class": dict_class, "config": cc.config()}
    return Bundle(tensors={WEIGHTS: state}, json={CONFIG: config, SIDECAR: sidecar})


def _read(src: Path) -> tuple[dict[str, torch.Tensor], dict, dict | None, Path]:
    """(state dict, constructor config, fastxc sidecar or None, weights path) of a folder or file."""
    folder = src if src.is_dir() else src.parent
    if src.is_dir():
        for name in (WEIGHTS, TRAINED):
            if (src / name).is_file():
                weights = src / name
                break
        else:
            raise FileNotFoundError(f"not a dictionary_learning folder: {src} has no {WEIGHTS} or {TRAINED}")
    else:
        weights = src
    try:
        if weights.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(weights))
        else:  # a torch.save'd state dict; weights_only: no code runs while reading it
            state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors / torch raise their own error types
        raise InteropError(f"{weights}: cannot read the state dict ({str(e).splitlines()[0] if str(e) else e})") from None
    if not isinstance(state, dict):
        raise InteropError(f"{weights}: not a state dict")
    state = {k.split("_orig_mod.")[-1]: v for k, v in state.items()}  # torch.compile'd models
    config, sidecar = {}, None
    for name in (CONFIG, SIDECAR):
        p = folder / name
        if p.is_file():
            try:
                obj = json.loads(p.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise InteropError(f"{p}: not valid JSON ({e})") from None
            if name == SIDECAR:
                sidecar = obj if obj.get("format") == SIDECAR_FORMAT else None
            else:  # the hub config, or a training run's {"trainer": {...}}
                config = obj.get("trainer", obj) if isinstance(obj, dict) else {}
    return state, config, sidecar, weights


def _code_norm_weights(kind: str, W_dec: torch.Tensor, config: dict) -> torch.Tensor:
    """[F]: dictionary_learning's code normalisation per feature; W_dec [L, F, d]."""
    per_layer = W_dec.double().norm(dim=2)  # [L, F]
    if kind == "CROSSCODER":
        return per_layer.sum(dim=0)
    sae = per_layer.pow(2).sum(dim=0).sqrt()
    if kind == "SAE":
        return sae
    a_sae, a_cc = config.get("code_normalization_alpha_sae", 1.0), config.get("code_normalization_alpha_cc", 0.1)
    return sae * float(1.0 if a_sae is None else a_sae) + per_layer.sum(dim=0) * float(0.1 if a_cc is None else a_cc)


def from_dictionary_learning(src: Path) -> Crosscoder:
    """A fastxc crosscoder from a dictionary_learning CrossCoder / BatchTopKCrossCoder."""
    state, config, sidecar, weights = _read(src)
    need = ("encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias")
    missing = [k for k in need if k not in state]
    if missing:
        raise InteropError(f"{weights}: not a dictionary_learning crosscoder state dict (missing {', '.join(missing)})")
    enc, b_enc, dec, dbias = (state[k] for k in need)
    if enc.dim() != 3:
        raise InteropError(f"{weights}: encoder.weight has shape {tuple(enc.shape)}, expected [num_layers, d, F]")
    L, d, F = enc.shape
    if dec.shape != (L, F, d) or b_enc.shape != (F,) or dbias.shape != (L, d):
        raise InteropError(f"{weights}: shapes do not fit one crosscoder (encoder.weight {tuple(enc.shape)}, decoder.weight "
                           f"{tuple(dec.shape)}, encoder.bias {tuple(b_enc.shape)}, decoder.bias {tuple(dbias.shape)}); "
                           "a decoder with other layers than the encoder is not expressible in fastxc")
    batchtopk = "threshold" in state or "k" in state or config.get("dict_class") == "BatchTopKCrossCoder"
    if "code_normalization_id" in state:
        by_id = {v: k for k, v in CODE_NORMALIZATION.items()}
        kind = by_id.get(int(state["code_normalization_id"]))
    else:
        kind = str(config.get("code_normalization") or "CROSSCODER").upper()
        if "code_normalization" not in config:
            warnings.warn(f"{weights}: no code normalisation recorded; assuming CROSSCODER, as dictionary_learning "
                          "does", InteropWarning, stacklevel=2)
    if kind not in CODE_NORMALIZATION:
        raise InteropError(f"{weights}: unknown code normalisation {kind!r}")
    if kind == "DECOUPLED":
        raise InteropError(f"{weights}: DECOUPLED code normalisation (per-layer codes and thresholds) is not "
                           "expressible in fastxc, whose code is one value per feature")
    threshold = None
    if batchtopk:
        thr = state.get("threshold", torch.tensor(-1.0))
        if thr.numel() != 1:
            raise InteropError(f"{weights}: per-layer thresholds are not expressible in fastxc")
        threshold = float(thr)
        if threshold < 0:
            warnings.warn(f"{weights}: the BatchTopK threshold is unset ({threshold}); the imported crosscoder "
                          "needs training before inference", InteropWarning, stacklevel=2)

    # fastxc layout: feature-major [F, L*d], sources concatenated
    W_enc = enc.permute(2, 0, 1).reshape(F, L * d)
    W_dec = dec.transpose(0, 1).reshape(F, L * d)
    b_dec = dbias.reshape(L * d)
    mean, std = state.get("activation_mean"), state.get("activation_std")
    normaliser = mean is not None and std is not None and not bool(mean.isnan().any() or std.isnan().any())
    scale = torch.ones(L)
    if normaliser:
        scale = state["activation_global_scale"].float().reshape(L)
        if bool(mean.ne(0).any()):
            # x_n = (x - m) * g: the shift goes into the biases (b_enc - (m*g) @ W_enc, b_dec + m*g)
            mg = (mean.double() * scale.double()[:, None]).reshape(L * d)
            b_enc = (b_enc.double() - W_enc.double() @ mg).to(b_enc.dtype)
            b_dec = (b_dec.double() + mg).to(b_dec.dtype)
    if kind != "NONE":
        # codes scaled by c (and BatchTopK's threshold compared with relu(pre) * c): fold c
        c = _code_norm_weights(kind, dec, config)
        c = torch.where(c > 0, c, torch.ones_like(c))
        W_enc = (W_enc.double() * c[:, None]).to(W_enc.dtype)
        b_enc = (b_enc.double() * c).to(b_enc.dtype)
        W_dec = (W_dec.double() / c[:, None]).to(W_dec.dtype)

    if sidecar is not None:
        kwargs = crosscoder_config(sidecar["config"], [d] * L, F, str(src))
    else:
        k = int(state["k"]) if "k" in state else int(config.get("k") or min(32, F))
        kwargs = {"widths": [d] * L, "n_features": F, "activation": "batchtopk" if batchtopk else "relu", "k": min(k, F)}
    if (kwargs.get("activation") == "batchtopk") != batchtopk:
        raise InteropError(f"{src}: the fastxc config says {kwargs.get('activation')} but the state dict is a "
                           f"{'BatchTopKCrossCoder' if batchtopk else 'CrossCoder'}")
    return build_crosscoder(kwargs, W_enc, b_enc, W_dec, b_dec, scale, threshold)
