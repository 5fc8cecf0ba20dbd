"""Plain-torch references of every op in ``fastxc.kernels``: readable first, fast second.

Each reference lives beside its op (``encode.py``, ``batchtopk.py``, ``decode.py``,
``loss.py``, ``penalty.py``, ``auxk.py``, ``jumprelu.py``, ``constraints.py``); this module gathers them under one name. They are the baseline
of the tests and of ``bench/``, and the path taken with ``FASTXC_BACKEND=reference``. Every
function is differentiable through ordinary autograd and works in any float dtype (float64 for
gradcheck).

Sparse codes are (vals [B, m], idx [B, m] int64): row b's code is
``sum_j vals[b, j] * e_{idx[b, j]}``; padding entries have vals 0 (their idx is arbitrary).
"""
from ._sources import offsets_of
from .auxk import auxk_code_ref, auxk_loss_ref
from .batchtopk import batchtopk_encode_ref, update_threshold
from .decode import sparse_decode_ref
from .encode import encode_pre_ref, pack_mask, relu_encode_ref, topk_encode_ref
from .constraints import remove_parallel_grad_ref, unit_norm_decoder_ref
from .jumprelu import jumprelu_encode_ref, jumprelu_l0_ref, jumprelu_ref
from .loss import LossOutput, crosscoder_loss_ref, source_mse_ref
from .penalty import decoder_norm_penalty_ref, decoder_norms_ref, dense_decoder_norm_penalty_ref

__all__ = [
    "auxk_code_ref", "auxk_loss_ref", "batchtopk_encode_ref", "crosscoder_loss_ref",
    "decoder_norm_penalty_ref", "decoder_norms_ref", "dense_decoder_norm_penalty_ref",
    "encode_pre_ref", "jumprelu_encode_ref", "jumprelu_l0_ref", "jumprelu_ref", "LossOutput",
    "offsets_of", "pack_mask", "relu_encode_ref", "remove_parallel_grad_ref", "source_mse_ref",
    "sparse_decode_ref", "topk_encode_ref", "unit_norm_decoder_ref", "update_threshold",
]
