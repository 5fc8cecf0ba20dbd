"""fastxc.kernels: fused crosscoder / SAE kernels (depends on torch; triton for the GPU path).

Every op takes a sparse code as (vals [B, k], idx [B, k] int) and parameters in feature-major
layout (W_enc [F, D], W_dec [F, D], like nn.Linear.weight). Dispatch happens per call: CUDA
tensors run the Triton kernels, CPU tensors the fastest CPU path, and
``FASTXC_BACKEND=reference|triton|cpu`` (or ``backend=`` on each op) forces one; the Triton
kernels run on CPU tensors under ``TRITON_INTERPRET=1``.

    from fastxc.kernels import topk_encode, sparse_decode, crosscoder_loss
    vals, idx = topk_encode(x, W_enc, b_enc, k=32)
    out = crosscoder_loss(vals, idx, W_dec, b_dec, x, widths=[512, 512])
    out.loss.backward()

One module per op: its math (module docstring), CPU path, autograd Function and plain-torch
reference (``<op>_ref``; ``fastxc.kernels.reference`` gathers them); its Triton kernels sit in
``triton_<op>.py``, imported only when a call takes the Triton backend, so the package imports
and runs on the CPU where triton is not installed:

    encode.py     topk_encode, relu_encode (the encoder GEMM with the selection fused)
    batchtopk.py  batchtopk_encode, update_threshold
    decode.py     sparse_decode, and the gather-sum / gather-dot / scatter-by-feature
                  primitives every op's forward and backward are built from
    loss.py       crosscoder_loss (fused decode + per-source MSE / FVU + penalty), source_mse
    penalty.py    decoder_norms, decoder_norm_penalty, dense_decoder_norm_penalty
                  (no kernel of its own: decode.py's scatter with a penalty epilogue)
    triton_encode.py, triton_decode.py, triton_loss.py   the Triton kernels and their launchers;
                  each lists its kernels, dtypes and launch configs in ``AOT_CASES``
    aot.py        ``python -m fastxc.kernels.aot``: compiles every kernel x config x dtype for
                  sm_80 / sm_90a with Triton's compiler (no GPU needed) and reports registers,
                  spills, shared memory, tensor-core instructions and occupancy

Block-size names mean the same in every kernel: BLOCK_M batch rows, BLOCK_N features of an
encoder GEMM tile, BLOCK_K the GEMM reduction tile (over D), BLOCK_D columns of D, BLOCK_F
features per program, BLOCK_CODE entries of one code row, BLOCK_NNZ entries of the
feature-sorted (CSR) code, BLOCK_TOPK top-k candidates kept per GEMM tile and row.
"""
from ._dispatch import BackendError
from ._pool import empty_cache
from .batchtopk import batchtopk_encode, update_threshold
from .decode import sparse_decode
from .encode import relu_encode, topk_encode
from .loss import LossOutput, crosscoder_loss, source_mse
from .penalty import decoder_norm_penalty, decoder_norms, dense_decoder_norm_penalty

__all__ = [
    "BackendError", "LossOutput", "batchtopk_encode", "crosscoder_loss", "decoder_norm_penalty",
    "decoder_norms", "dense_decoder_norm_penalty", "empty_cache", "relu_encode", "source_mse", "sparse_decode",
    "topk_encode", "update_threshold",
]
