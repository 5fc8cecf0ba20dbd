"""fastxc: fast sparse crosscoders for model diffing.

Layers, lowest first: ``fastxc.kernels`` (torch + triton only), ``fastxc._C`` (C++),
then the Python layer (crosscoder, store, training, analysis).
"""
from fastxc.core.crosscoder import Crosscoder, CrosscoderOutput

__all__ = ["Crosscoder", "CrosscoderOutput"]
__version__ = "0.1.0"
