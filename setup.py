"""Build script: the Python packages plus the C++ extension ``fastxc._C``."""
import sys

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup

openmp = [] if sys.platform == "darwin" else ["-fopenmp"]

ext_modules = [
    Pybind11Extension(
        "fastxc._C",
        sources=["csrc/fastxc_C.cpp", "csrc/cpu_kernels.cpp"],
        cxx_std=17,
        extra_compile_args=["-O3"] + openmp,
        extra_link_args=openmp,
    ),
]

setup(
    packages=find_packages(include=["fastxc", "fastxc.*"]),
    package_data={"fastxc.analysis": ["*.json"]},
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext},
    zip_safe=False,
)
