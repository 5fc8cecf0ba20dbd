"""The crosscoder module: a sparse autoencoder over the concatenated activations of n sources.

Math (sources concatenated, source i has width d_i, D = sum d_i, F features):

    pre    = x @ W_enc.T + b_enc                     x [B, D], W_enc [F, D], pre [B, F]
    f      = act(pre)                                relu | topk | batchtopk | jumprelu     f [B, F]
    recon  = f @ W_dec + b_dec                       W_dec [F, D], recon [B, D]
    loss   = sum_i mean_b ||recon_i - x_i||^2        per-source squared error
           + l1_coef * mean_b sum_k f_k * sum_i ||W_dec[k, src_i]||_2      (relu only, seed eq. 5)
           + l0_coef * mean_b sum_k H(pre_k - theta_k)                      (jumprelu only)
           + aux_coef * AuxK                          (topk / batchtopk with aux_k > 0)

jumprelu: f = pre * H(pre - theta), theta = exp(log_threshold) [F] learned with the
straight-through estimates of Rajamanoharan et al. 2024 (``fastxc.kernels.jumprelu``; bandwidth
``jumprelu_bandwidth``). AuxK's math lives in ``fastxc.kernels.auxk``.

Both weight matrices are stored feature-major ([F, D], row k is feature k), like
``nn.Linear.weight``: every gradient of a sparse code is then a scatter into whole rows, written
once, with no transposed copy. This file is the plain-torch *reference*; the fused kernels in
``fastxc.kernels`` are tested against it.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from fastxc import kernels as K
from fastxc.kernels import _dispatch
from fastxc.kernels.auxk import auxk_loss, auxk_loss_from_pre
from fastxc.kernels.auxk import auxk_residual_loss as _auxk_residual_loss
from fastxc.kernels.jumprelu import jumprelu_encode, jumprelu_l0, jumprelu_ref

ACTIVATIONS = ("relu", "topk", "batchtopk", "jumprelu")
# jumprelu defaults, from bench/sweep_jumprelu.py (planted source, seeds 0 and 1, threshold lr
# x10; worst seed MMCS / recovered at cos >= 0.9 / L0): l0 0.03, bandwidth 0.2, init 0.1 or
# 0.03: 0.998 / 1.00 / 3.8; bandwidth 0.05: 0.981 / 0.96 / 5.1; l0 0.01 (bw 0.05): 0.946 / 0.83 / 8.6
JUMPRELU_L0_COEF = 0.03
JUMPRELU_BANDWIDTH = 0.2
JUMPRELU_INIT_THRESHOLD = 0.1
# relu through fastxc.kernels only while codes are sparse: each active entry costs ~4 gathered
# row operations of width D, the dense path ~5 GEMMs whatever the density (bench/bench_step.py:
# sparse 3.3x faster at L0 = 0.5% of F; at F=256 with half the features active it was 2.7x
# slower). Denser codes take the dense path for the next RELU_DENSE_STEPS calls, then re-probe.
RELU_SPARSE_MAX_FRAC = 1 / 32
RELU_DENSE_STEPS = 100
CONFIG_VERSION = 1
# compute dtypes a crosscoder's forward can run in (``compute_dtype``), by name
COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def compute_dtype_of(value) -> torch.dtype | None:
    """``compute_dtype`` as given (None, a torch dtype or a name: "float32", "bfloat16", also
    "fp32", "bf16") -> a torch dtype, or None; ValueError with one line otherwise."""
    if value is None or isinstance(value, torch.dtype):
        if value is not None and value not in COMPUTE_DTYPES.values():
            raise ValueError(f"compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {value}")
        return value
    name = {"fp32": "float32", "bf16": "bfloat16"}.get(str(value).lower(), str(value).lower())
    if name.startswith("torch."):
        name = name[len("torch."):]
    if name not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {value!r}")
    return COMPUTE_DTYPES[name]


class CrosscoderOutput:
    """What ``Crosscoder.forward`` returns. Scalars are 0-dim tensors.

    recon     same shape as the input: [B, D] or [B, n, d]
    code      [B, F] dense feature activations (differentiable). The fused path keeps the code
              sparse, ``vals``/``idx`` [B, m], and makes the dense one only when ``code`` is
              read, so a training step holds no [B, F] tensor
    loss      total loss that training backpropagates: sum(mse) + sparsity + aux_coef * aux
    mse       [n_sources] mean over the batch of ||recon_i - x_i||^2
    fvu       [n_sources] fraction of variance unexplained per source (detached)
    sparsity  l1_coef * decoder-norm-weighted L1 (relu), l0_coef * L0 (jumprelu), else 0
    aux       AuxK loss before aux_coef (0 when off or no dead features)
    l0        mean number of active features per row (detached)
    """

    __slots__ = ("recon", "_code", "loss", "mse", "fvu", "sparsity", "aux", "l0", "vals", "idx", "n_features")

    def __init__(self, recon: Tensor, code: Tensor | None, loss: Tensor, mse: Tensor, fvu: Tensor,
                 sparsity: Tensor, aux: Tensor, l0: Tensor, vals: Tensor | None = None,
                 idx: Tensor | None = None, n_features: int | None = None):
        if code is None and (vals is None or idx is None or n_features is None):
            raise ValueError("CrosscoderOutput needs the dense code or (vals, idx, n_features)")
        self.recon, self._code, self.loss, self.mse, self.fvu = recon, code, loss, mse, fvu
        self.sparsity, self.aux, self.l0 = sparsity, aux, l0
        self.vals, self.idx, self.n_features = vals, idx, n_features

    @property
    def code(self) -> Tensor:
        if self._code is None:
            # scatter_add, not scatter: relu pads rows with (id 0, value 0) entries, which must
            # not overwrite a real value of feature 0
            v = self.vals
            self._code = v.new_zeros(v.shape[0], self.n_features).scatter_add(1, self.idx, v)
        return self._code


def auxk_residual_loss(e_hat: Tensor, err: Tensor, denom: Tensor | None = None) -> Tensor:
    """The AuxK loss of the dead features' reconstruction e_hat [B, D] of the residual
    x - recon = -err [B, D] (err = recon - x, as ``ForwardStep`` holds it); the math is
    ``fastxc.kernels.auxk.auxk_residual_loss``'s (``denom``: None for this batch's residual
    variance; data parallel passes the global batch's)."""
    return _auxk_residual_loss(e_hat, -err, denom)


@dataclass
class ForwardStep:
    """One forward's main-path results for x2 [B, D]: recon2, err = recon2 - x2 [B, D], mse [n],
    loss (sum(mse) + sparsity; AuxK is added to it later), sparsity, active [B, F] or [B, m]
    (entries > 0), and the code: dense f [B, F] with pre [B, F], or sparse (vals, idx) [B, m]."""

    recon2: Tensor
    err: Tensor
    mse: Tensor
    loss: Tensor
    sparsity: Tensor
    active: Tensor
    pre: Tensor | None = None
    f: Tensor | None = None
    vals: Tensor | None = None
    idx: Tensor | None = None

    def fired(self, n_features: int) -> Tensor:
        """[n_features] bool: the features active in some row."""
        if self.f is not None:
            return self.active.any(dim=0)
        fired = torch.zeros(n_features, dtype=torch.bool, device=self.active.device)
        fired[self.idx[self.active]] = True
        return fired

    def recon_as(self, x: Tensor) -> Tensor:
        """recon2 in the input's shape ([B, D] or [B, n, d]) and dtype (a bf16 compute's
        reconstruction of fp32 inputs is handed back in fp32)."""
        r = self.recon2 if self.recon2.dtype == x.dtype else self.recon2.to(x.dtype)
        return r.view_as(x) if x.dim() == 3 else r


def _checked_args(widths, n_features, activation, k, aux_k, dec_init_norm, source_names, jumprelu=(0.0, 1.0, 1.0)):
    """Crosscoder's arguments validated (ValueError with one clear line) -> (widths as ints,
    n_features as int, dec_init_norm as one float per source)."""
    widths = [int(w) for w in widths]
    if len(widths) < 1 or any(w <= 0 for w in widths):
        raise ValueError(f"widths must be a non-empty list of positive ints, got {widths}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    n_features = int(n_features)
    if n_features <= 0:
        raise ValueError(f"n_features must be positive, got {n_features}")
    if activation in ("topk", "batchtopk") and not 0 < int(k) <= n_features:
        raise ValueError(f"k must satisfy 0 < k <= n_features ({n_features}), got {k}")
    if not 0 <= int(aux_k) <= n_features:
        raise ValueError(f"aux_k must satisfy 0 <= aux_k <= n_features ({n_features}), got {aux_k}")
    l0_coef, bandwidth, init_threshold = (float(v) for v in jumprelu)
    if not l0_coef >= 0:
        raise ValueError(f"l0_coef must be >= 0, got {l0_coef}")
    if not (bandwidth > 0 and init_threshold > 0):
        raise ValueError(f"jumprelu_bandwidth and jumprelu_init_threshold must be > 0, got {bandwidth} and {init_threshold}")
    norms = [float(dec_init_norm)] * len(widths) if isinstance(dec_init_norm, (int, float)) else [float(v) for v in dec_init_norm]
    if len(norms) != len(widths):
        raise ValueError(f"dec_init_norm has {len(norms)} values for {len(widths)} sources")
    if source_names is not None and len(source_names) != len(widths):
        raise ValueError(f"source_names has {len(source_names)} names for {len(widths)} sources")
    return widths, n_features, norms


class Crosscoder(nn.Module):
    """Sparse crosscoder over ``len(widths)`` sources.

    Args:
        widths: width of each source, e.g. ``[1536, 1536]`` (two models) or ``[512, 768]``.
        n_features: dictionary size F.
        activation: ``"topk"`` (k largest of relu(pre) per row), ``"batchtopk"`` (k*B largest
            over the batch in training; a running threshold at inference) or ``"relu"``
            (trained with the decoder-norm-weighted L1 penalty) or ``"jumprelu"`` (pre * (pre > theta),
            a learned threshold per feature, trained with an L0 penalty; Rajamanoharan et al. 2024).
        k: active features per row for topk / batchtopk.
        aux_k: features in the AuxK dead-feature loss (0 turns it off).
        aux_coef: weight of the AuxK loss in ``loss``.
        l1_coef: weight of the decoder-norm-weighted L1 (relu). Training may warm it up by
            passing ``l1_coef=`` to ``forward``.
        l0_coef: weight of the L0 penalty (jumprelu); ``forward(l0_coef=)`` overrides it per call.
        jumprelu_bandwidth: eps of the straight-through threshold gradients (jumprelu), in
            pre-activation units.
        jumprelu_init_threshold: every feature's threshold at init (jumprelu); the parameter is
            ``log_threshold`` [F] (theta = exp(log_threshold) stays positive).
        dec_init_norm: L2 norm of each source's slice of each decoder row at init (a float, or
            one per source).
        dead_tokens: a feature that has not fired for this many training tokens is dead
            (AuxK target and the trainer's dead-feature count).
        threshold_momentum: EMA momentum of the batchtopk running threshold.
        source_names: optional names, e.g. ``["base", "distilled"]``.
        dtype: dtype of the parameters (the master weights the optimizer updates).
        compute_dtype: dtype the forward computes in (mixed precision), or None: the
            parameters' dtype. ``torch.bfloat16`` (or "bfloat16") with fp32 parameters: each
            forward casts the weights once to bf16 and the encoder and decoder GEMMs take bf16
            operands (the input is cast too); the loss is accumulated in fp32 against the
            input as given, and the gradients flow back through the casts onto the fp32
            parameters, so the optimizer keeps fp32 weights and fp32 Adam state. ``recon``
            comes back in the input's dtype; the code (``vals``, ``code``) in the compute
            dtype. Part of ``config()`` (so checkpoints and ``load`` keep it) when set.

    Example:
        >>> cc = Crosscoder([64, 64], n_features=256, activation="topk", k=8)
        >>> out = cc(torch.randn(32, 2, 64))
        >>> out.recon.shape, out.code.shape
        (torch.Size([32, 2, 64]), torch.Size([32, 256]))
    """

    def __init__(
        self,
        widths: Sequence[int],
        n_features: int,
        activation: str = "topk",
        k: int = 32,
        *,
        aux_k: int = 0,
        aux_coef: float = 1.0 / 32.0,
        l1_coef: float = 1.0,
        dec_init_norm: float | Sequence[float] = 0.1,
        dead_tokens: int = 10_000_000,
        threshold_momentum: float = 0.01,
        source_names: Sequence[str] | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        compute_dtype: torch.dtype | str | None = None,
        l0_coef: float = JUMPRELU_L0_COEF,
        jumprelu_bandwidth: float = JUMPRELU_BANDWIDTH,
        jumprelu_init_threshold: float = JUMPRELU_INIT_THRESHOLD,
    ):
        super().__init__()
        widths, n_features, norms = _checked_args(widths, n_features, activation, k, aux_k, dec_init_norm, source_names,
                                                  (l0_coef, jumprelu_bandwidth, jumprelu_init_threshold))
        self.widths = widths
        self.offsets = [0]
        for w in widths:
            self.offsets.append(self.offsets[-1] + w)
        self.n_sources = len(widths)
        self.d_total = self.offsets[-1]
        self.n_features = n_features
        self.activation = activation
        self.k = int(k)
        self.aux_k = int(aux_k)
        self.aux_coef = float(aux_coef)
        self.l1_coef = float(l1_coef)
        self.l0_coef = float(l0_coef)
        self.jumprelu_bandwidth = float(jumprelu_bandwidth)
        self.jumprelu_init_threshold = float(jumprelu_init_threshold)
        self.dec_init_norm = norms
        self.dead_tokens = int(dead_tokens)
        self.threshold_momentum = float(threshold_momentum)
        self.source_names = list(source_names) if source_names is not None else [f"source{i}" for i in range(len(widths))]

        # fastxc.kernels backend for the training forward: None = per call from the device and
        # FASTXC_BACKEND; "reference" = the plain-torch path below (what the kernels are tested
        # against). Not part of config(): it is a runtime choice, not a model property.
        self.backend: str | None = None
        # relu: the sparse path pays per active entry, the dense one per feature; steps whose
        # widest code row exceeds RELU_SPARSE_MAX_FRAC of F run densely (re-probed now and then)
        self._relu_dense_until = 0
        self._calls = 0
        # mixed precision: None (compute in the parameters' dtype) or the dtype the forward casts
        # the weights and inputs to; the casts of one forward are made once (_cast_cache)
        cd = compute_dtype_of(compute_dtype)
        self.compute_dtype: torch.dtype | None = None if cd == dtype else cd
        self._cast_cache: dict | None = None

        factory = {"dtype": dtype, "device": device}
        self.W_enc = nn.Parameter(torch.empty(n_features, self.d_total, **factory))
        self.b_enc = nn.Parameter(torch.zeros(n_features, **factory))
        self.W_dec = nn.Parameter(torch.empty(n_features, self.d_total, **factory))
        self.b_dec = nn.Parameter(torch.zeros(self.d_total, **factory))
        if activation == "jumprelu":  # registered last: the other activations' parameters keep their order
            self.log_threshold = nn.Parameter(torch.empty(n_features, **factory))
        # batchtopk's running threshold; negative means "not yet measured".
        self.register_buffer("threshold", torch.tensor(-1.0, dtype=torch.float32, device=device))
        # Per-source multiplier the training inputs were scaled by (store normalisation), kept
        # with the model so analysis of raw activations uses the same scale.
        self.register_buffer("input_scale", torch.ones(self.n_sources, dtype=torch.float32, device=device))
        # Training tokens since each feature last fired (dead-feature statistics and AuxK).
        self.register_buffer("tokens_since_fired", torch.zeros(n_features, dtype=torch.int64, device=device))
        self.reset_parameters()

    # ------------------------------------------------------------------ init and shapes
    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Random decoder directions with each source slice at ``dec_init_norm``; W_enc = W_dec.

        The encoder starts as the decoder's transpose (in the math's [D, F] layout; here both
        are [F, D], so it is a copy), which puts every feature's encoder on its own decoder
        direction and avoids dead features at the start.
        """
        w = torch.randn(self.W_dec.shape, generator=generator, dtype=torch.float32, device=self.W_dec.device)
        for i in range(self.n_sources):
            s = slice(self.offsets[i], self.offsets[i + 1])
            w[:, s] *= self.dec_init_norm[i] / w[:, s].norm(dim=1, keepdim=True).clamp_min(1e-12)
        self.W_dec.copy_(w)
        self.W_enc.copy_(w)
        self.b_enc.zero_()
        self.b_dec.zero_()
        if self.activation == "jumprelu":
            self.log_threshold.fill_(math.log(self.jumprelu_init_threshold))
        self.threshold.fill_(-1.0)
        self.tokens_since_fired.zero_()

    def flatten_input(self, x: Tensor) -> Tensor:
        """[B, D] or [B, n, d] (equal widths) -> [B, D]; raises ValueError on a shape mismatch."""
        if x.dim() == 3:
            if x.shape[1] != self.n_sources or any(w != x.shape[2] for w in self.widths):
                raise ValueError(
                    f"input of shape {tuple(x.shape)} does not match the crosscoder's widths {self.widths}"
                    f" (expected [B, {self.n_sources}, d] with equal widths, or [B, {self.d_total}])"
                )
            return x.reshape(x.shape[0], self.d_total)
        if x.dim() != 2 or x.shape[1] != self.d_total:
            raise ValueError(
                f"input of shape {tuple(x.shape)} does not match the crosscoder's widths {self.widths}"
                f" (expected [B, {self.d_total}] or [B, n, d])"
            )
        return x

    def split(self, x2: Tensor) -> list[Tensor]:
        """[B, D] -> the n per-source views [B, d_i]."""
        return [x2[:, self.offsets[i] : self.offsets[i + 1]] for i in range(self.n_sources)]

    # ------------------------------------------------------------------ pieces
    def decoder_norms(self) -> Tensor:
        """[F, n_sources]: L2 norm of each source's slice of each decoder row."""
        if all(w == self.widths[0] for w in self.widths):
            return self.W_dec.view(self.n_features, self.n_sources, self.widths[0]).norm(dim=-1)
        return torch.stack([p.norm(dim=1) for p in self.split(self.W_dec)], dim=1)

    # ------------------------------------------------------------------ mixed precision
    def weight(self, name: str) -> Tensor:
        """Parameter ``name`` as the forward computes with it: the parameter itself, or (with a
        ``compute_dtype``) its differentiable cast, made once per forward call, so the
        gradients of every use reach the parameter through one cast."""
        p = getattr(self, name)
        cd = self.compute_dtype
        if cd is None or p.dtype == cd:
            return p
        cache = self._cast_cache
        if cache is None:
            return p.to(cd)
        if name not in cache:
            cache[name] = p.to(cd)
        return cache[name]

    def to_compute(self, t: Tensor) -> Tensor:
        """An activation as the GEMMs take it: cast to ``compute_dtype`` (when set)."""
        cd = self.compute_dtype
        return t if cd is None or t.dtype == cd else t.to(cd)

    def accum(self, t: Tensor) -> Tensor:
        """A compute-dtype result as the loss and the collectives take it: fp32 (when a
        ``compute_dtype`` is set; otherwise unchanged)."""
        return t if self.compute_dtype is None or t.dtype == torch.float32 else t.float()

    # ------------------------------------------------------------------ pieces
    def pre_activation(self, x: Tensor) -> Tensor:
        """x [B, D] or [B, n, d] -> pre [B, F] = x @ W_enc.T + b_enc (in the compute dtype)."""
        x2 = self.flatten_input(x)
        return torch.addmm(self.weight("b_enc"), self.to_compute(x2), self.weight("W_enc").t())

    def activate(self, pre: Tensor) -> Tensor:
        """pre [B, F] -> dense code f [B, F] for the configured activation.

        batchtopk selects k*B over the batch while training and applies the running threshold
        (a JumpReLU with one threshold) in eval mode, so inference needs no batch.
        """
        if self.activation == "relu":
            return torch.relu(pre)
        if self.activation == "jumprelu":
            return jumprelu_ref(pre, self.jumprelu_threshold(), self.jumprelu_bandwidth)
        if self.activation == "topk":
            vals, idx = pre.topk(self.k, dim=-1, sorted=False)
            return torch.zeros_like(pre).scatter(-1, idx, torch.relu(vals))
        if not self.training:
            return pre * (pre > self.inference_threshold()).to(pre.dtype)
        flat = torch.relu(pre).flatten()
        n_keep = min(self.k * pre.shape[0], flat.numel())
        vals, idx = flat.topk(n_keep, sorted=False)
        code = torch.zeros_like(flat).scatter(0, idx, vals).view_as(pre)
        K.update_threshold(self.threshold, vals, self.threshold_momentum)
        return code

    def jumprelu_threshold(self) -> Tensor:
        """jumprelu: theta = exp(log_threshold) [F] float32 (differentiable)."""
        return self.log_threshold.float().exp()

    def inference_threshold(self) -> float:
        """batchtopk's running threshold as a float; RuntimeError while it is unmeasured."""
        thr = self.threshold.item()
        if thr < 0:
            raise RuntimeError("batchtopk crosscoder has no running threshold yet: train it (or call .train()) first")
        return thr

    def encode(self, x: Tensor) -> Tensor:
        """x [B, D] or [B, n, d] -> dense code f [B, F] (in x's dtype)."""
        f = self.activate(self.pre_activation(x))
        return f if f.dtype == x.dtype or self.compute_dtype is None else f.to(x.dtype)

    def decode(self, f: Tensor) -> Tensor:
        """f [B, F] -> recon [B, D] = f @ W_dec + b_dec (in f's dtype; computed in the compute dtype)."""
        recon = torch.addmm(self.weight("b_dec"), self.to_compute(f), self.weight("W_dec"))
        return recon if recon.dtype == f.dtype or self.compute_dtype is None else recon.to(f.dtype)

    def sparsity_penalty(self, f: Tensor, dec_norms: Tensor | None = None) -> Tensor:
        """mean_b sum_k f[b,k] * sum_i ||W_dec[k, src_i]||_2 (seed paper eq. 5, without lambda)."""
        if dec_norms is None:
            dec_norms = self.decoder_norms()
        return (self.accum(f) @ dec_norms.sum(dim=1)).mean()

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor, l1_coef: float | None = None, l0_coef: float | None = None) -> CrosscoderOutput:
        """x [B, D] or [B, n, d] -> CrosscoderOutput (recon in the input's shape). ``l1_coef`` /
        ``l0_coef``: this call's relu L1 / jumprelu L0 coefficient (None: the model's).

        Runs the fused sparse ops of ``fastxc.kernels`` unless the backend (``self.backend``
        or ``FASTXC_BACKEND``) is ``"reference"``, which takes the plain-torch path. The
        distributed trainer's modules run this same forward: their collectives live in the
        hooks it calls (``activate``/``sparse_code``, ``decode``/``sparse_loss``,
        ``batch_statistics``, ``auxk``, ``output``).
        """
        x2 = self.flatten_input(x)
        self._calls += 1
        self._cast_cache = None if self.compute_dtype is None else {}
        try:
            step = self.fused_step(x2, l1_coef, l0_coef) if self.use_fused(x2) else self.dense_step(x2, l1_coef, l0_coef)
            stats = self.batch_statistics(step)
            aux = step.loss.new_zeros(())
            if self.uses_auxk():
                aux = self.auxk(x2, step, stats)
                step.loss = step.loss + self.aux_coef * aux
            return self.output(x, x2, step, aux, stats)
        finally:
            self._cast_cache = None  # the casts live on in the autograd graph only

    def dense_step(self, x2: Tensor, l1_coef: float | None, l0_coef: float | None = None) -> ForwardStep:
        """The plain-torch path: x2 [B, D] -> ForwardStep with the dense code f [B, F]."""
        pre, f, recon2, err, mse, loss, sparsity = self.dense_loss(x2, l1_coef, l0_coef)
        return ForwardStep(recon2, err, mse, loss, sparsity, active=f > 0, pre=pre, f=f)

    def fused_step(self, x2: Tensor, l1_coef: float | None, l0_coef: float | None = None) -> ForwardStep:
        """The fused path: x2 [B, D] -> ForwardStep with the code kept sparse, (vals, idx) [B, m];
        no dense [B, F] tensor takes part in backward."""
        code = self.sparse_code(x2)
        vals, idx = code[0], code[1]
        loss, recon2, mse, sparsity = self.sparse_loss(vals, idx, x2, l1_coef)
        if self.activation == "jumprelu":  # code.pre: the entries' pre-activations, band included
            sparsity = self.l0_penalty(code.pre, idx, l0_coef)
            loss = loss + sparsity
        err = self.accum(recon2) - self.accum(x2)
        return ForwardStep(recon2, err, mse, loss, sparsity, active=vals > 0, vals=vals, idx=idx)

    def dense_loss(self, x2: Tensor, l1_coef: float | None, l0_coef: float | None = None):
        """The plain-torch path: x2 [B, D] -> (pre [B, F], code f [B, F], recon2, err = recon2 - x2
        [B, D], mse [n], loss = sum(mse) + sparsity, sparsity (relu's decoder-norm L1, jumprelu's
        L0 term, else 0))."""
        pre = torch.addmm(self.weight("b_enc"), self.to_compute(x2), self.weight("W_enc").t())
        f = self.activate(pre)
        recon2 = self.decode(f)
        err = self.accum(recon2) - self.accum(x2)
        mse, loss, sparsity = self.loss_terms(err, l1_coef, lambda: self.sparsity_penalty(f))
        if self.activation == "jumprelu":
            sparsity = self.l0_penalty(pre, None, l0_coef)
            loss = loss + sparsity
        return pre, f, recon2, err, mse, loss, sparsity

    def l0_penalty(self, pre: Tensor, idx: Tensor | None, l0_coef: float | None) -> Tensor:
        """jumprelu: l0_coef * mean_b L0, for a sparse (pre, idx) [B, m] or a dense pre [B, F]
        (idx None); its straight-through gradient reaches log_threshold only."""
        coef = self.l0_coef if l0_coef is None else float(l0_coef)
        return coef * jumprelu_l0(pre.float(), idx, self.jumprelu_threshold(), self.jumprelu_bandwidth,
                                  backend=self.backend)

    def loss_terms(self, err: Tensor, l1_coef: float | None, penalty) -> tuple[Tensor, Tensor, Tensor]:
        """err = recon - x [B, D] -> (mse [n], loss = sum(mse) + sparsity, sparsity); penalty() gives
        the decoder-norm-weighted L1 as a mean over rows (called for relu only)."""
        mse = torch.stack([e.pow(2).sum(dim=1).mean() for e in self.split(err)])
        loss = mse.sum()
        sparsity = loss.new_zeros(())
        if self.activation == "relu":
            coef = self.l1_coef if l1_coef is None else float(l1_coef)
            sparsity = coef * penalty()
            loss = loss + sparsity
        return mse, loss, sparsity

    def use_fused(self, x2: Tensor) -> bool:
        """Whether this call takes the fused sparse ops (not the reference backend, and not a
        relu crosscoder in its dense phase: one whose code was too wide to pay off sparse)."""
        return _dispatch.choose(x2, backend=self.backend) != "reference" and not (
            self.activation in ("relu", "jumprelu") and self._calls < self._relu_dense_until)

    def sparse_code(self, x2: Tensor) -> tuple[Tensor, ...]:
        """x2 [B, D] -> the code as (vals, idx) [B, m] through the fused encode ops (batchtopk:
        over this batch while training, the running threshold at inference; jumprelu: a
        ``JumpReLUCode`` (vals, idx, pre), its band entries just below the threshold with vals 0)."""
        bk = self.backend
        xc, W_enc, b_enc = self.to_compute(x2), self.weight("W_enc"), self.weight("b_enc")
        if self.activation == "topk":
            vals, idx = K.topk_encode(xc, W_enc, b_enc, self.k, backend=bk)
        elif self.activation == "relu":
            vals, idx = K.relu_encode(xc, W_enc, b_enc, backend=bk)
            if idx.shape[1] > RELU_SPARSE_MAX_FRAC * self.n_features:
                self._relu_dense_until = self._calls + RELU_DENSE_STEPS
        elif self.activation == "jumprelu":
            code = jumprelu_encode(xc, W_enc, b_enc, self.jumprelu_threshold(), self.jumprelu_bandwidth, backend=bk)
            if code.idx.shape[1] > RELU_SPARSE_MAX_FRAC * self.n_features:  # as relu: too wide to pay off
                self._relu_dense_until = self._calls + RELU_DENSE_STEPS
            return code
        elif self.training:  # batchtopk
            vals, idx = K.batchtopk_encode(xc, W_enc, b_enc, self.k, backend=bk)
            K.update_threshold(self.threshold, vals, self.threshold_momentum)
        else:
            vals, idx = K.relu_encode(xc, W_enc, b_enc, threshold=self.inference_threshold(), backend=bk)
        return vals, idx

    def sparse_loss(self, vals: Tensor, idx: Tensor, x2: Tensor, l1_coef: float | None):
        """The fused loss of a sparse code -> (loss, recon2 [B, D], mse [n], sparsity): loss is
        sum(mse) (+ the relu decoder-norm penalty, whose mean over rows is ``sparsity``)."""
        coef = (self.l1_coef if l1_coef is None else float(l1_coef)) if self.activation == "relu" else 0.0
        # the target is x2 as given (fp32 under bf16 compute): the loss sums in fp32 either way
        out = K.crosscoder_loss(vals, idx, self.weight("W_dec"), self.weight("b_dec"), x2, self.widths, coef,
                                backend=self.backend)
        sparsity = coef * out.penalty / x2.shape[0] if self.activation == "relu" else out.loss.new_zeros(())
        return out.loss, out.recon, out.mse, sparsity

    @torch.no_grad()
    def count_fired(self, step: ForwardStep, n_rows: int | Tensor | None = None) -> Tensor:
        """Training: add the batch's rows to every feature's silence counter and reset those of
        the features that fired; returns the fired mask [F] (this module's features)."""
        fired = step.fired(self.W_enc.shape[0])
        self.tokens_since_fired.add_(step.err.shape[0] if n_rows is None else n_rows)
        self.tokens_since_fired.masked_fill_(fired, 0)
        return fired

    def batch_statistics(self, step: ForwardStep):
        """Hook after the main loss: the batch statistics (here the dead-feature counters while
        training); returns what ``auxk`` and ``output`` need from them (here nothing)."""
        if self.training:
            self.count_fired(step)
        return None

    def uses_auxk(self) -> bool:
        return self.aux_k > 0 and self.activation in ("topk", "batchtopk") and self.training

    def auxk(self, x2: Tensor, step: ForwardStep, denom: Tensor | None) -> Tensor:
        """The AuxK loss of this step (sparse or dense as the step); ``denom``: the residual
        variance to normalise by (None: this batch's; data parallel passes the global batch's)."""
        if step.pre is None:
            return self._aux_loss_sparse(x2, step.err, denom)
        return self.aux_loss(step.pre, step.err, denom)

    def output(self, x: Tensor, x2: Tensor, step: ForwardStep, aux: Tensor, stats) -> CrosscoderOutput:
        """Hook: the step's CrosscoderOutput with the metrics of this batch."""
        with torch.no_grad():
            fvu = self.fvu(x2, step.recon2)
            l0 = step.active.sum(dim=1).float().mean()
        return CrosscoderOutput(step.recon_as(x), step.f, step.loss, step.mse, fvu, step.sparsity, aux, l0,
                                vals=step.vals, idx=step.idx, n_features=self.W_enc.shape[0])

    def _aux_loss_sparse(self, x2: Tensor, err: Tensor, denom: Tensor | None = None) -> Tensor:
        """``aux_loss`` without the dense pre-activation: ``fastxc.kernels.auxk.auxk_loss`` (only
        the dead features' columns of the encoder GEMM, their code decoded sparsely)."""
        dead, k_aux = self._auxk_candidates()
        if k_aux == 0:
            return x2.new_zeros(())
        return auxk_loss(self.to_compute(x2), self.weight("W_enc"), self.weight("b_enc"), self.weight("W_dec"),
                         dead, k_aux, -err, denom, backend=self.backend)

    def dead_mask(self) -> Tensor:
        """[F] bool: features that have not fired in the last ``dead_tokens`` training tokens."""
        return self.tokens_since_fired >= self.dead_tokens

    def _auxk_candidates(self) -> tuple[Tensor, int]:
        """(dead mask [F], k_aux = min(aux_k, number of dead features)); k_aux 0: no AuxK."""
        dead = self.dead_mask()
        return dead, min(self.aux_k, int(dead.sum()))

    def aux_loss(self, pre: Tensor, err: Tensor, denom: Tensor | None = None) -> Tensor:
        """AuxK (Gao et al. 2024): the dead features' top-aux_k code reconstructs the residual.

        pre [B, F], err = recon - x [B, D]; see ``auxk_residual_loss`` (``denom``: as there).
        """
        dead, k_aux = self._auxk_candidates()
        if k_aux == 0:
            return pre.new_zeros(())
        return auxk_loss_from_pre(pre, self.weight("W_dec"), dead, k_aux, -err, denom)

    @torch.no_grad()
    def fvu(self, x: Tensor, recon: Tensor) -> Tensor:
        """[n_sources]: sum_b ||x_i - recon_i||^2 / sum_b ||x_i - mean_b x_i||^2 (x, recon [B, D])."""
        x2, r2 = self.flatten_input(x), self.flatten_input(recon)
        out = []
        for xi, ri in zip(self.split(x2.float()), self.split(r2.float())):
            var = (xi - xi.mean(dim=0)).pow(2).sum()
            out.append((xi - ri).pow(2).sum() / var.clamp_min(1e-12))
        return torch.stack(out)

    # ------------------------------------------------------------------ normalisation
    def normalize(self, x_raw: Tensor) -> Tensor:
        """Raw source activations [B, D] or [B, n, d] -> the scale the crosscoder was trained on."""
        x2 = self.flatten_input(x_raw)
        scale = torch.cat([self.input_scale[i].expand(w) for i, w in enumerate(self.widths)]).to(x2.dtype)
        return (x2 * scale).view_as(x_raw)

    def denormalize(self, x: Tensor) -> Tensor:
        """Inverse of ``normalize`` (e.g. for a reconstruction spliced back into a model)."""
        x2 = self.flatten_input(x)
        scale = torch.cat([self.input_scale[i].expand(w) for i, w in enumerate(self.widths)]).to(x2.dtype)
        return (x2 / scale).view_as(x)

    # ------------------------------------------------------------------ persistence
    def config(self) -> dict:
        """The constructor arguments, JSON-serialisable."""
        return {
            "version": CONFIG_VERSION,
            "widths": self.widths,
            "n_features": self.n_features,
            "activation": self.activation,
            "k": self.k,
            "aux_k": self.aux_k,
            "aux_coef": self.aux_coef,
            "l1_coef": self.l1_coef,
            "dec_init_norm": self.dec_init_norm,
            "dead_tokens": self.dead_tokens,
            "threshold_momentum": self.threshold_momentum,
            "source_names": self.source_names,
            # jumprelu's own arguments only for jumprelu, so that other configs stay what they were
            **({"l0_coef": self.l0_coef, "jumprelu_bandwidth": self.jumprelu_bandwidth,
                "jumprelu_init_threshold": self.jumprelu_init_threshold} if self.activation == "jumprelu" else {}),
            # only when set, so that an fp32 model's config (and file) is what it always was
            **({"compute_dtype": str(self.compute_dtype).removeprefix("torch.")} if self.compute_dtype is not None else {}),
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``path/config.json`` and ``path/model.safetensors`` (no pickle), atomically.

        Each file is written to a temporary name and renamed, so a crash never leaves a
        half-written model that loads; the weights get the mode the umask asks for.
        """
        from fastxc.core.files import save_safetensors

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        _atomic_write(path / "model.safetensors", lambda p: save_safetensors(tensors, p))
        cfg = json.dumps(self.config(), indent=2)
        _atomic_write(path / "config.json", lambda p: p.write_text(cfg))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str | None = None) -> Crosscoder:
        """Load a crosscoder written by ``save``. Raises FileNotFoundError / ValueError clearly."""
        from safetensors.torch import load_file

        path = Path(path)
        cfg_path, weights_path = path / "config.json", path / "model.safetensors"
        for p in (cfg_path, weights_path):
            if not p.is_file():
                raise FileNotFoundError(f"no crosscoder at {path}: missing {p.name}")
        try:
            cfg = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_path}: not valid JSON ({e})") from None
        version = cfg.pop("version", None)
        if version != CONFIG_VERSION:
            raise ValueError(f"{cfg_path}: config version {version}, this fastxc reads version {CONFIG_VERSION}")
        try:
            tensors = load_file(str(weights_path))
        except Exception as e:  # safetensors raises its own error types
            raise ValueError(f"{weights_path}: cannot read safetensors ({e})") from None
        dtype = tensors["W_dec"].dtype if "W_dec" in tensors else torch.float32
        model = cls(**cfg, dtype=dtype, device=device)
        missing, unexpected = model.load_state_dict(tensors, strict=False)
        if missing or unexpected:
            raise ValueError(f"{weights_path}: tensors do not match config (missing {missing}, unexpected {unexpected})")
        return model

    def extra_repr(self) -> str:
        extra = f", l0_coef={self.l0_coef}, bandwidth={self.jumprelu_bandwidth}" if self.activation == "jumprelu" else ""
        return f"widths={self.widths}, n_features={self.n_features}, activation={self.activation!r}, k={self.k}{extra}"


def _atomic_write(target: Path, write) -> None:
    """Call ``write(tmp_path)``, fsync, then rename over ``target``."""
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()

