"""Build script: the Python packages plus the optional C++ extension ``fastxc._C``.

``fastxc._C`` (csrc/) speeds up fastxc.kernels' fp32 CPU path; without it the kernels run their
torch CPU path (``fastxc/kernels/_cext.py``). So the extension never blocks an install: where no
C++ compiler works (none on PATH, ``CC=/nonexistent``, no Python headers) the build prints a
warning and installs the pure-Python package; ``FASTXC_NO_EXT=1`` skips it on purpose.
"""
import os
import sys

from setuptools import find_packages, setup


def _skip_extension() -> bool:
    return os.environ.get("FASTXC_NO_EXT", "0") not in ("", "0")


ext_modules = []
cmdclass = {}
if not _skip_extension():
    # pybind11 is a build requirement (pyproject.toml): pure Python, no compiler needed
    from pybind11.setup_helpers import Pybind11Extension, build_ext

    class OptionalBuildExt(build_ext):
        """build_ext that warns and goes on without an optional extension it cannot compile.

        setuptools' ``optional=True`` already skips the extension on distutils' error classes (a
        missing compiler among them: checked with setuptools 84.2, ``CC=/nonexistent`` and a PATH
        without g++); this also catches any other exception, so no compiler problem can fail the
        install, and its warning says what the missing extension means.
        """

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as e:  # noqa: BLE001 - any failure: go on without the extension
                if not ext.optional:
                    raise
                msg = " ".join(str(e).split()) or type(e).__name__
                print(f"warning: fastxc: the C++ extension {ext.name} was not built ({msg}); "
                      "fastxc.kernels uses its torch CPU path instead", file=sys.stderr)

    openmp = [] if sys.platform == "darwin" else ["-fopenmp"]
    ext_modules = [
        Pybind11Extension(
            "fastxc._C",
            sources=["csrc/fastxc_C.cpp", "csrc/cpu_kernels.cpp"],
            cxx_std=17,
            extra_compile_args=["-O3"] + openmp,
            extra_link_args=openmp,
            # optional: setuptools then skips copying the missing .so in editable installs
            optional=True,
        ),
    ]
    cmdclass = {"build_ext": OptionalBuildExt}

setup(
    packages=find_packages(include=["fastxc", "fastxc.*"]),
    package_data={"fastxc.analysis": ["*.json"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
