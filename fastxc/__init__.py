"""fastxc: fast sparse crosscoders for model diffing.

Layers, lowest first (README, "Layout"): ``fastxc.kernels`` (torch + triton only) ->
``fastxc.core`` (the Crosscoder, its optimizer, decoder norms, the CLI contract) ->
``fastxc.data`` (activation store, harvest, model loading) -> ``fastxc.train`` ->
``fastxc.analysis`` -> ``fastxc.organism`` and the ``fastxc`` command (``fastxc.cli``).

``Crosscoder`` is imported on first use, so ``import fastxc`` itself loads no torch (entry
points pin CPU numerics before torch starts: ``fastxc.core.numerics``).

``pip install fastxc`` is the kernels (torch and numpy); ``pip install 'fastxc[all]'`` the rest.
Under ``python -m fastxc...`` a kernels-only install stops here with one error line.
"""
import sys as _sys

if _sys.argv[:1] == ["-m"]:
    # Python is importing the packages of a `python -m` module (argv[0] is "-m" only then): if it
    # is a fastxc command, check its packages are installed before any of its imports run
    from fastxc.core.cli import require_full_install_for_dash_m

    require_full_install_for_dash_m()
del _sys

__all__ = ["Crosscoder", "CrosscoderOutput"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in __all__:
        from fastxc.core import crosscoder

        return getattr(crosscoder, name)
    raise AttributeError(f"module 'fastxc' has no attribute {name!r}")
