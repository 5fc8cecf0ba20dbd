"""fastxc: fast sparse crosscoders for model diffing.

Layers, lowest first (README, "Layout"): ``fastxc.kernels`` (torch + triton only) ->
``fastxc.core`` (the Crosscoder, its optimizer, decoder norms, the CLI contract) ->
``fastxc.data`` (activation store, harvest, model loading) -> ``fastxc.train`` ->
``fastxc.analysis`` -> ``fastxc.organism`` and the ``fastxc`` command (``fastxc.cli``).

``Crosscoder`` is imported on first use, so ``import fastxc`` itself loads no torch (entry
points pin CPU numerics before torch starts: ``fastxc.core.numerics``).
"""
__all__ = ["Crosscoder", "CrosscoderOutput"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in __all__:
        from fastxc.core import crosscoder

        return getattr(crosscoder, name)
    raise AttributeError(f"module 'fastxc' has no attribute {name!r}")
