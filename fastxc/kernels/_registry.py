"""The ahead-of-time compile registry of the Triton kernels (read by ``fastxc.kernels.aot``).

Every Triton module of the package (``triton_<op>.py``) lists in a module-level ``AOT_CASES``
each ``@triton.jit`` kernel it launches, with the argument types of each dtype it runs in and
every launch configuration the code really uses (the autotune configs, the fixed block sizes).
``tests/test_aot.py`` checks that no launched kernel is missing from the registry.

Plain Python: importing this module needs neither triton nor a GPU.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

# Pointer / scalar type names as Triton's signatures spell them.
TL = {"fp32": "fp32", "bf16": "bf16", "fp16": "fp16"}


@dataclass(frozen=True)
class Config:
    """One launch configuration: constexpr block sizes, num_warps, num_stages.

    main: part of the quick check (``--main-only``): the config the default shapes launch.
    """

    name: str
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int
    main: bool = False


@dataclass(frozen=True)
class AotCase:
    """One launched kernel: its JIT function, its argument types per dtype and its configs.

    dtypes: the dtype variants it runs in (names of the form ``fp32-ieee``, ``fp32-tf32``,
    ``bf16``, ``fp16``, or a mix such as ``x-fp32/w-bf16``);
    signature(dtype) -> {arg: type} for every runtime argument ("*fp32", "i32", ...);
    constexprs(dtype) -> {arg: value} for the dtype-dependent constexprs (precision, upcast);
    gemm: a tensor-core GEMM (the AOT test expects mma / wgmma instructions in bf16, fp16 and
    TF32); main_dtypes: the dtypes of the quick check (default: all).
    """

    kernel: Any
    dtypes: tuple[str, ...]
    signature: Callable[[str], dict[str, str]]
    configs: tuple[Config, ...]
    constexprs: Callable[[str], dict[str, Any]] = field(default=lambda dtype: {})
    gemm: bool = False
    main_dtypes: tuple[str, ...] | None = None

    @property
    def name(self) -> str:
        return self.kernel.__name__


def config_name(constexprs: dict[str, Any], num_warps: int, num_stages: int) -> str:
    """A short config label: the constexprs (BLOCK_ shortened) then w<warps> s<stages>."""
    parts = [f"{k.removeprefix('BLOCK_')}{v}" for k, v in constexprs.items()]
    return "-".join(parts + [f"w{num_warps}", f"s{num_stages}"])


def from_triton_configs(configs, extra: dict[str, Any] | None = None, main_index: int = 0):
    """Registry configs from a list of ``triton.Config`` (an autotune list), each merged with
    the fixed constexprs ``extra``; the one at ``main_index`` is the main config."""
    out = []
    for i, c in enumerate(configs):
        cx = dict(c.kwargs, **(extra or {}))
        out.append(Config(config_name(cx, c.num_warps, c.num_stages), cx, c.num_warps,
                          c.num_stages, main=i == main_index))
    return tuple(out)
