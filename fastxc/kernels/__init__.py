"""fastxc.kernels: fused crosscoder / SAE kernels (depends on torch; triton for the GPU path).

Every op takes a sparse code as (vals [..., k], idx [..., k] int; idx -1 marks a padding entry,
ignored) and its weight as [F, D]: row-major (W_enc like nn.Linear(D, F).weight), or the ``.T``
view of a row-major [D, F] tensor (a W_dec that is nn.Linear(F, D).weight, SAELens' W_enc). The
strides tell the two apart and both are read in place on every backend; the weight's gradient
comes back in its own layout, so the [D, F] parameter receives it without a copy. Pass
``layout="df"`` to say the tensor given is itself [D, F] (needed when D == F, where shapes cannot
tell). Dense inputs are [..., D] (flattened and restored; losses average over every leading
position); b_enc may be None. Ids outside [0, F) other than -1 are a ValueError on CPU tensors; on
CUDA they are not checked, since that would cost a device sync per call. Dispatch happens per call: CUDA
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
                  primitives every op's forward and backward are built from; also the layout /
                  code helpers (weight_view, flat_code) every op uses
    loss.py       crosscoder_loss (fused decode + per-source MSE / FVU + penalty), source_mse
    penalty.py    decoder_norms, decoder_norm_penalty, dense_decoder_norm_penalty
                  (no kernel of its own: decode.py's scatter with a penalty epilogue)
    codes.py      to_dense, to_sparse, code_l0: sparse (vals, idx) <-> dense [..., F] codes
    auxk.py       auxk_loss (AuxK of the dead features on the sparse path), auxk_residual_loss
    jumprelu.py   jumprelu_encode (JumpReLU with a straight-through threshold gradient; keeps the
                  band below theta in the code), jumprelu_l0 (the L0 loss with its estimate)
    constraints.py  unit_norm_decoder_, remove_parallel_grad_ (in place, around the optimizer step)
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
from .auxk import auxk_loss, auxk_residual_loss
from .batchtopk import batchtopk_encode, update_threshold
from .codes import code_l0, to_dense, to_sparse
from .constraints import remove_parallel_grad_, unit_norm_decoder_
from .decode import sparse_decode
from .encode import relu_encode, topk_encode
from .jumprelu import JumpReLUCode, jumprelu_encode, jumprelu_l0
from .loss import LossOutput, crosscoder_loss, source_mse
from .penalty import decoder_norm_penalty, decoder_norms, dense_decoder_norm_penalty

__all__ = [
    "auxk_loss", "auxk_residual_loss", "BackendError", "batchtopk_encode", "code_l0",
    "crosscoder_loss", "decoder_norm_penalty", "decoder_norms", "dense_decoder_norm_penalty",
    "empty_cache", "jumprelu_encode", "jumprelu_l0", "JumpReLUCode", "LossOutput", "relu_encode",
    "remove_parallel_grad_", "source_mse", "sparse_decode", "to_dense", "to_sparse", "topk_encode",
    "unit_norm_decoder_", "update_threshold",
]
