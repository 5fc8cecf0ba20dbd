"""fastxc.kernels: fused crosscoder / SAE kernels (depends on torch and triton only).

Every op takes a sparse code as (vals [B, k], idx [B, k] int) and parameters in feature-major
layout (W_enc [F, D], W_dec [F, D], like nn.Linear.weight). Dispatch happens per call: CUDA
tensors run the Triton kernels, CPU tensors the fastest CPU path, and
``FASTXC_BACKEND=reference|triton|cpu`` (or ``backend=`` on each op) forces one; the Triton
kernels run on CPU tensors under ``TRITON_INTERPRET=1``. ``fastxc.kernels.reference`` holds
the plain-torch reference of each op.

    from fastxc.kernels import topk_encode, sparse_decode, crosscoder_loss
    vals, idx = topk_encode(x, W_enc, b_enc, k=32)
    out = crosscoder_loss(vals, idx, W_dec, b_dec, x, widths=[512, 512])
    out.loss.backward()
"""
from ._dispatch import BackendError
from ._pool import empty_cache
from .batchtopk import batchtopk_encode, update_threshold
from .loss import (crosscoder_loss, decoder_norm_penalty, decoder_norms,
                   dense_decoder_norm_penalty, source_mse)
from .reference import LossOutput
from .sparse_decode import sparse_decode
from .topk_encode import relu_encode, topk_encode

__all__ = [
    "BackendError", "LossOutput", "batchtopk_encode", "crosscoder_loss", "decoder_norm_penalty",
    "decoder_norms", "dense_decoder_norm_penalty", "empty_cache", "relu_encode", "source_mse", "sparse_decode",
    "topk_encode", "update_threshold",
]
