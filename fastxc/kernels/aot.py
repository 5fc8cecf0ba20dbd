"""Ahead-of-time compile report of every Triton kernel of fastxc.kernels (no GPU needed).

    python -m fastxc.kernels.aot [--arch sm_80,sm_90a] [--json FILE] [--main-only] [--jobs N]
                                 [--kernel NAME ...]

Discovers the kernels from the ``AOT_CASES`` registries of the package's modules
(``_registry.py``), compiles each kernel x launch config x dtype x arch with Triton's own
compiler (``triton.compile(ASTSource(...), target=GPUTarget("cuda", cap, 32))``: TTIR -> TTGIR
-> LLVM -> PTX -> cubin), runs the ``ptxas`` Triton itself uses (shipped in the wheel) with
``-v`` on the PTX, and prints one row per compile: registers per thread, spill store / load
bytes, shared memory per block (Triton's dynamic allocation + ptxas's static), tensor-core
instructions in the PTX (``mma.sync`` / ``wgmma.mma_async``) and occupancy (resident warps per
SM from registers, shared memory and num_warps; the architecture limits are in ``ARCHS``).

A row "fits" when it compiled, spills nothing and its shared memory is within the per-block
limit; the exit status is 1 when any row does not. ``main`` sets TRITON_INTERPRET=0 before
triton is imported (the interpreter replaces the JIT functions with Python ones) and compiles
in worker processes; ``registry_problems`` and ``compile_one`` need a process started so.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import multiprocessing
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass

# per-SM / per-block limits (CUDA C Programming Guide, compute capabilities table): 64K 32-bit
# registers and 64 resident warps per SM on both; shared memory 164 KB per SM / 163 KB per
# block (sm_80), 228 KB / 227 KB (sm_90); the driver reserves 1 KB per resident block.
KB = 1024
ARCHS = {
    "sm_80": {"cap": 80, "regs_sm": 65536, "warps_sm": 64, "blocks_sm": 32, "smem_sm": 164 * KB,
              "smem_block": 163 * KB},
    "sm_90a": {"cap": 90, "regs_sm": 65536, "warps_sm": 64, "blocks_sm": 32, "smem_sm": 228 * KB,
               "smem_block": 227 * KB},
}
ARCHS["sm_90"] = ARCHS["sm_90a"]  # Triton compiles capability 90 for sm_90a
SMEM_RESERVED = 1 * KB
_TC = re.compile(r"^\s*(?:@!?%p\d+\s+)?(wgmma\.mma_async|mma\.sync)\S*", re.MULTILINE)


@dataclass
class Job:
    module: str
    kernel: str
    config: str
    dtype: str
    arch: str


@dataclass
class Row:
    kernel: str
    config: str
    dtype: str
    arch: str
    ok: bool = False
    error: str = ""
    regs: int = 0
    spill_store: int = 0
    spill_load: int = 0
    smem: int = 0  # bytes per block: Triton's dynamic shared memory + ptxas's static smem
    smem_limit: int = 0
    gemm: bool = False  # a tensor-core GEMM kernel (AotCase.gemm)
    tc: int = 0  # tensor-core instructions in the PTX
    mma: str = ""  # which: "wgmma", "mma" or ""
    num_warps: int = 0
    num_stages: int = 0
    warps_sm: int = 0  # resident warps per SM
    occupancy: float = 0.0  # warps_sm / 64
    seconds: float = 0.0

    @property
    def fits(self) -> bool:
        return self.ok and self.spill_store == 0 and self.spill_load == 0 and self.smem <= self.smem_limit


# ----------------------------------------------------------------------------- discovery
def kernel_modules() -> list[str]:
    """Every module of fastxc.kernels that declares AOT_CASES (imported to find out)."""
    import fastxc.kernels as pkg

    out = []
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name == "aot":
            continue
        name = f"{pkg.__name__}.{info.name}"
        if hasattr(importlib.import_module(name), "AOT_CASES"):
            out.append(name)
    return out


def cases(module: str):
    return importlib.import_module(module).AOT_CASES


def jobs(archs, main_only: bool, kernels=None) -> list[Job]:
    """Every (kernel, config, dtype, arch) of the registries (main configs / dtypes only with
    main_only), optionally only the named kernels."""
    out = []
    for mod in kernel_modules():
        for case in cases(mod):
            if kernels and case.name not in kernels:
                continue
            dtypes = (case.main_dtypes or case.dtypes) if main_only else case.dtypes
            for cfg in case.configs:
                if main_only and not cfg.main:
                    continue
                for dt in dtypes:
                    for arch in archs:
                        out.append(Job(mod, case.name, cfg.name, dt, arch))
    return out


def registry_problems() -> list[str]:
    """What the registries miss, as sentences (empty: complete). Checks, over every module of
    fastxc.kernels: each ``@triton.jit`` function launched (``name[grid](...)`` anywhere in the
    package's sources, or wrapped by ``triton.autotune``) is in an AOT_CASES; every other one is
    a helper called by a registered kernel; each autotune config of a kernel is one of its
    registered configs."""
    import pathlib

    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    import fastxc.kernels as pkg

    src = "\n".join(p.read_text() for p in pathlib.Path(pkg.__path__[0]).glob("*.py"))
    registered, jits, tuners = {}, {}, []
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
        for case in getattr(mod, "AOT_CASES", ()):
            registered.setdefault(case.name, []).append(case)
        for obj in vars(mod).values():
            if isinstance(obj, JITFunction) and obj.__module__ == mod.__name__:
                jits[obj.__name__] = obj
            elif isinstance(obj, Autotuner):
                tuners.append(obj)
    problems = []
    tuned = {t.fn.__name__ for t in tuners}
    for name, fn in jits.items():
        launched = re.search(rf"\b{name}\[", src) is not None or name in tuned
        if name in registered:
            continue
        if launched:
            problems.append(f"{name} is launched but in no AOT_CASES")
        elif not any(re.search(rf"\b{name}\(", cs[0].kernel.src) for cs in registered.values()):
            problems.append(f"{name} is a @triton.jit function neither launched nor called by a "
                            "registered kernel")
    for t in tuners:
        kcases = registered.get(t.fn.__name__)
        if kcases is None:
            continue  # reported above
        for c in t.configs:
            want = (dict(c.kwargs), c.num_warps, c.num_stages)
            if not any(all(r.constexprs.get(k) == v for k, v in want[0].items())
                       and (r.num_warps, r.num_stages) == want[1:] for kc in kcases for r in kc.configs):
                problems.append(f"{t.fn.__name__}: autotune config {c} is not registered")
    return problems


# ----------------------------------------------------------------------------- one compile
def occupancy(regs: int, smem: int, num_warps: int, arch: str) -> int:
    """Resident warps per SM: registers (allocated per warp in units of 256), shared memory
    (+1 KB reserved per block), and the warp / block limits of the SM."""
    lim = ARCHS[arch]
    regs_warp = math.ceil(max(regs, 1) * 32 / 256) * 256
    by_regs = (lim["regs_sm"] // regs_warp) // num_warps
    by_smem = lim["smem_sm"] // (smem + SMEM_RESERVED) if smem + SMEM_RESERVED > 0 else lim["blocks_sm"]
    by_warps = lim["warps_sm"] // num_warps
    blocks = min(by_regs, by_smem, by_warps, lim["blocks_sm"])
    return blocks * num_warps


def parse_ptxas(log: str) -> dict:
    """Registers, spill bytes and static shared memory from ``ptxas -v`` output."""
    regs = [int(m) for m in re.findall(r"Used (\d+) registers", log)]
    st = [int(m) for m in re.findall(r"(\d+) bytes spill stores", log)]
    ld = [int(m) for m in re.findall(r"(\d+) bytes spill loads", log)]
    sm = [int(m) for m in re.findall(r"(\d+) bytes smem", log)]
    if not regs:
        raise RuntimeError(f"no register count in the ptxas output:\n{log}")
    return {"regs": max(regs), "spill_store": sum(st), "spill_load": sum(ld), "smem": max(sm, default=0)}


def run_ptxas(ptx: str, arch: str) -> dict:
    """Assemble ``ptx`` with the ptxas Triton uses for this arch, with Triton's flags and -v."""
    from triton.backends.nvidia.compiler import get_ptxas

    try:
        ptxas = get_ptxas(ARCHS[arch]["cap"]).path
    except TypeError:  # triton < 3.5: one ptxas for every arch, get_ptxas() takes no argument
        ptxas = get_ptxas().path
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        p = subprocess.run([ptxas, "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}",
                            src, "-o", os.path.join(d, "k.cubin")], capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"ptxas failed ({p.returncode}): {p.stderr.strip()}")
    return parse_ptxas(p.stderr + p.stdout)


def compile_one(job: Job) -> Row:
    """Compile one job with Triton for its arch and measure it (runs in a worker process)."""
    import triton
    from triton.backends.compiler import GPUTarget

    row = Row(job.kernel, job.config, job.dtype, job.arch, smem_limit=ARCHS[job.arch]["smem_block"])
    t0 = time.perf_counter()
    try:
        # a kernel may have several cases (configs per dtype group): the one with this job's
        case, cfg = next((c, f) for c in cases(job.module) for f in c.configs
                         if c.name == job.kernel and job.dtype in c.dtypes and f.name == job.config)
        row.gemm = case.gemm
        row.num_warps, row.num_stages = cfg.num_warps, cfg.num_stages
        fn = case.kernel
        consts = {**case.constexprs(job.dtype), **cfg.constexprs}
        sig = dict(case.signature(job.dtype))
        for a in fn.arg_names:  # every argument: a runtime type or a constexpr
            if a in consts:
                sig[a] = "constexpr"
            elif a not in sig:
                raise KeyError(f"{job.kernel}: argument {a!r} has no type in the registry")
        sig = {a: sig[a] for a in fn.arg_names}
        src = triton.compiler.ASTSource(fn, sig, consts)
        k = triton.compile(src, target=GPUTarget("cuda", ARCHS[job.arch]["cap"], 32),
                           options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
        ptx = k.asm["ptx"]
        res = run_ptxas(ptx, job.arch)
        row.regs, row.spill_store, row.spill_load = res["regs"], res["spill_store"], res["spill_load"]
        row.smem = int(k.metadata.shared) + res["smem"]
        kinds = _TC.findall(ptx)
        row.tc = len(kinds)
        row.mma = "wgmma" if "wgmma.mma_async" in kinds else ("mma" if kinds else "")
        row.warps_sm = occupancy(row.regs, row.smem, cfg.num_warps, job.arch)
        row.occupancy = row.warps_sm / ARCHS[job.arch]["warps_sm"]
        row.ok = True
    except Exception as e:  # a failed compile is a row of the report, not a crash
        msg = f"{type(e).__name__}: {e}".strip().splitlines()
        row.error = " | ".join(m.strip() for m in msg if m.strip())[:300]
    row.seconds = round(time.perf_counter() - t0, 2)
    return row


# ----------------------------------------------------------------------------- report
def table(rows: list[Row]) -> str:
    """The report as a markdown table."""
    head = ("| kernel | config | dtype | arch | result | regs | spill st/ld B | smem KiB (limit) "
            "| tensor-core instr | warps/SM (occupancy) |")
    out = [head, "|" + "---|" * 10]
    for r in rows:
        if r.ok:
            res = "ok" if r.fits else "DOES NOT FIT"
            out.append(f"| {r.kernel} | {r.config} | {r.dtype} | {r.arch} | {res} | {r.regs} "
                       f"| {r.spill_store}/{r.spill_load} | {r.smem / KB:.1f} ({r.smem_limit // KB}) "
                       f"| {r.tc}{' ' + r.mma if r.mma else ''} | {r.warps_sm} ({r.occupancy:.0%}) |")
        else:
            out.append(f"| {r.kernel} | {r.config} | {r.dtype} | {r.arch} | ERROR: {r.error} "
                       "| | | | | |")
    return "\n".join(out)


def run(archs, main_only=False, n_jobs=None, kernels=None) -> list[Row]:
    """Compile every job (in ``n_jobs`` worker processes) -> rows in job order."""
    todo = jobs(archs, main_only, kernels)
    n_jobs = max(1, min(n_jobs or os.cpu_count() or 1, len(todo) or 1))
    if n_jobs == 1:
        return [compile_one(j) for j in todo]
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters: TRITON_INTERPRET=0 from here
    with ProcessPoolExecutor(n_jobs, mp_context=ctx) as ex:
        return list(ex.map(compile_one, todo))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastxc.kernels.aot", description=__doc__.split("\n\n")[0],
                                 allow_abbrev=False)
    ap.add_argument("--arch", default="sm_80,sm_90a", help="comma-separated: sm_80, sm_90a (default: both)")
    ap.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    ap.add_argument("--main-only", action="store_true",
                    help="only the main config and dtypes of each kernel (the quick check)")
    ap.add_argument("--jobs", type=int, default=None, help="worker processes (default: the CPU count)")
    ap.add_argument("--kernel", action="append", default=None, help="only this kernel (repeatable)")
    a = ap.parse_args(argv)
    # before triton is imported in this process or its workers: real JIT functions, not the
    # interpreter's (set here, not at import, so importing this module changes nothing)
    os.environ["TRITON_INTERPRET"] = "0"
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without its warning
    archs = [s.strip() for s in a.arch.split(",") if s.strip()]
    bad = [s for s in archs if s not in ARCHS]
    if bad:
        ap.error(f"--arch {','.join(bad)}: expected some of {', '.join(ARCHS)}")
    if "triton" in sys.modules and os.environ.get("_FASTXC_AOT_CHILD") is None:
        # triton was imported before this module set TRITON_INTERPRET=0: run in a fresh process
        import triton.knobs as knobs

        if knobs.runtime.interpret:
            env = dict(os.environ, TRITON_INTERPRET="0", _FASTXC_AOT_CHILD="1")
            return subprocess.call([sys.executable, "-m", "fastxc.kernels.aot", *(argv or sys.argv[1:])],
                                   env=env)
    t0 = time.perf_counter()
    rows = run(archs, a.main_only, a.jobs, a.kernel)
    print(table(rows))
    bad_rows = [r for r in rows if not r.fits]
    print(f"\n{len(rows)} compiles in {time.perf_counter() - t0:.0f} s: {len(rows) - len(bad_rows)} fit, "
          f"{len(bad_rows)} do not (compile error, spills or shared memory over the limit)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump([dict(asdict(r), fits=r.fits) for r in rows], f, indent=1)
    return 1 if bad_rows else 0


if __name__ == "__main__":
    sys.exit(main())
