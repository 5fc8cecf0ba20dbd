"""The activation store: a directory of memory-mapped shards plus a versioned JSON manifest.

Layout of a store directory::

    manifest.json              written last (atomically); a store without it is incomplete
    shard-00000.acts           [rows, D] activations in the store dtype (D = sum of widths)
    shard-00000.rscale         [rows, n_sources] float32 dequantisation scales (fp8 stores only)
    shard-00000.tokens         [rows] int32 token ids            (when tokens are kept)
    shard-00000.doc            [rows] int64 document ids         (when harvested)
    shard-00000.pos            [rows] int32 position in the document
    shard-00000.dataset        [rows] uint8 index of the dataset the row came from

Every file is written to a temporary name, fsync'ed and renamed, so a file under its final name
is always complete; the manifest records each file's size and sha256, sizes are checked on open
and checksums on demand (``reader.validate(checksums=True)``, ``verify_checksums(path)``).

Activations are stored raw (as the model produced them). The manifest keeps one normalisation
multiplier per source, ``scale_i = sqrt(d_i) / E||x_i||`` (mean over the stored rows), and the
reader multiplies by it, so the training data has ``E||x_i|| = sqrt(d_i)`` for every source.

Reading: ``open_store(path).batches(B, seed, start)`` yields shuffled float32 batches. The order
is a keyed pseudo-random permutation of all N rows per epoch (a Feistel network with cycle
walking), computed for each batch from (seed, batch index) alone: it shuffles across shards,
needs no O(N) permutation in memory, and resuming at batch i is ``start=i``. Rows are gathered
from the memory-mapped shards by ``fastxc._C.gather_shards`` (C++, OpenMP, GIL released), which
also converts the dtype and applies the scales, on a background thread that keeps a few batches
ready.
"""
from __future__ import annotations

import atexit
import errno
import hashlib
import json
import math
import os
import queue
import sys
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from fastxc import _C

FORMAT = "fastxc-store"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DTYPES = ("bfloat16", "float16", "float32", "float8_e4m3fn")
DTYPE_ALIASES = {
    "bf16": "bfloat16", "bfloat16": "bfloat16",
    "fp16": "float16", "float16": "float16", "half": "float16",
    "fp32": "float32", "float32": "float32", "float": "float32",
    "fp8": "float8_e4m3fn", "e4m3": "float8_e4m3fn", "float8_e4m3fn": "float8_e4m3fn",
}
# numpy view of each store dtype on disk (numpy has no bf16 / fp8)
_NP_STORAGE = {"bfloat16": np.uint16, "float16": np.uint16, "float32": np.float32, "float8_e4m3fn": np.uint8}
_TORCH = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
          "float8_e4m3fn": torch.float8_e4m3fn}
FP8_MAX = 448.0  # largest finite float8_e4m3fn
# Side files kept beside the activations: name -> numpy dtype.
META_FILES = {"tokens": np.int32, "doc": np.int64, "pos": np.int32, "dataset": np.uint8}
# Rows per shard when the caller does not say: 2**16 rows of two 1536-wide bf16 sources is
# 400 MB, large enough that a 2.5 TB store has ~6000 shards (open file limits), small enough
# that a killed harvest loses little work.
DEFAULT_SHARD_ROWS = 1 << 16


class StoreError(ValueError):
    """A store that cannot be read or written; the message names the file."""


class StoreNotFoundError(StoreError, FileNotFoundError):
    """The store path (or a file it lists) does not exist."""


def canonical_dtype(dtype: str | torch.dtype | None) -> str:
    """'bf16' / torch.bfloat16 / ... -> one of DTYPES ('bfloat16' when None)."""
    if dtype is None:
        return "bfloat16"
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    key = str(dtype).lower()
    if key not in DTYPE_ALIASES:
        raise StoreError(f"unknown store dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPE_ALIASES[key]


# --------------------------------------------------------------------------------------------
# Atomic file writing
# --------------------------------------------------------------------------------------------
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _write_chunks(f, chunks) -> None:
    # Indirection point so tests can simulate a full disk (ENOSPC) mid-file.
    for c in chunks:
        f.write(c)


def atomic_write_bytes(path: Path, chunks: Sequence[bytes | memoryview], sha: bool = True) -> dict:
    """Write ``chunks`` to ``path`` via tmp + fsync + rename. Returns {path, bytes, sha256}.

    On any error (a full disk included) the temporary file is removed and nothing appears under
    ``path``; ENOSPC becomes a StoreError that says so.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    h = hashlib.sha256() if sha else None
    n = 0
    views = []
    for c in chunks:
        mv = memoryview(c).cast("B")
        views.append(mv)
        n += mv.nbytes
        if h is not None:
            h.update(mv)
    try:
        with open(tmp, "wb") as f:
            _write_chunks(f, views)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        try:
            tmp.unlink()
        except OSError:
            pass
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StoreError(f"disk full while writing {path}: free space and run again "
                             f"(files already complete are kept; the store stays consistent)") from e
        raise StoreError(f"cannot write {path}: {e.strerror or e}") from e
    _fsync_dir(path.parent)
    return {"path": path.name, "bytes": n, "sha256": h.hexdigest() if h is not None else None}


def atomic_write_json(path: Path, obj: Any) -> dict:
    text = json.dumps(obj, indent=1, sort_keys=False) + "\n"
    return atomic_write_bytes(path, [text.encode()])


def sha256_file(path: Path, chunk: int = 1 << 24, on_chunk=None) -> str:
    """sha256 of a file read in ``chunk``-byte pieces; ``on_chunk(n)`` is called after each."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
            if on_chunk is not None:
                on_chunk(len(b))
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Encoding rows into the store dtype
# --------------------------------------------------------------------------------------------
def encode_rows(x: torch.Tensor, dtype: str, offsets: Sequence[int]) -> tuple[np.ndarray, np.ndarray | None]:
    """float rows [R, D] -> (storage array [R, D] in the numpy view of ``dtype``, row scales).

    Rounding is torch's (round to nearest even). For fp8 each (row, source) segment is divided
    by amax / 448 first, and that factor is returned as row scales [R, n_sources] float32.
    """
    x = x.detach().to("cpu", torch.float32).contiguous()
    if dtype == "float32":
        return x.numpy().copy(), None
    if dtype in ("bfloat16", "float16"):
        return x.to(_TORCH[dtype]).view(torch.int16).numpy().view(np.uint16), None
    n_src = len(offsets) - 1
    rscale = torch.empty(x.shape[0], n_src, dtype=torch.float32)
    q = torch.empty(x.shape, dtype=torch.float8_e4m3fn)
    for i in range(n_src):
        seg = x[:, offsets[i]:offsets[i + 1]]
        amax = seg.abs().amax(dim=1) if seg.shape[1] else torch.zeros(x.shape[0])
        s = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
        rscale[:, i] = s
        q[:, offsets[i]:offsets[i + 1]] = (seg / s[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.view(torch.uint8).numpy(), rscale.numpy()


def decode_rows(raw: np.ndarray, dtype: str, rscale: np.ndarray | None, offsets: Sequence[int]) -> np.ndarray:
    """Inverse of encode_rows (reference path in numpy/torch; the reader uses fastxc._C)."""
    t = torch.from_numpy(np.ascontiguousarray(raw))
    if dtype == "float32":
        return t.numpy().astype(np.float32, copy=True)
    if dtype in ("bfloat16", "float16"):
        return t.view(torch.int16).view(_TORCH[dtype]).float().numpy()
    x = t.view(torch.float8_e4m3fn).float()
    for i in range(len(offsets) - 1):
        x[:, offsets[i]:offsets[i + 1]] *= torch.from_numpy(rscale[:, i:i + 1])
    return x.numpy()


def segment_norm_sums(x: torch.Tensor, offsets: Sequence[int]) -> list[float]:
    """Sum over rows of ||x_i|| for each source i (float64), x [R, D] float."""
    x64 = x.double()
    return [float(x64[:, offsets[i]:offsets[i + 1]].norm(dim=1).sum()) for i in range(len(offsets) - 1)]


# --------------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------------
class ShardWriter:
    """Writes shard files into a store directory; the caller writes the manifest at the end.

    ``write_shard(index, rows, meta)`` encodes and writes one shard atomically and returns its
    manifest record (file sizes and checksums, and per-source norm sums of the values as stored,
    from which the normalisation scales are computed).
    """

    def __init__(self, path: str | os.PathLike, widths: Sequence[int], dtype: str):
        self.path = Path(path)
        self.widths = [int(w) for w in widths]
        self.offsets = [0] + list(np.cumsum(self.widths).tolist())
        self.dtype = canonical_dtype(dtype)

    def write_shard(self, index: int, x: torch.Tensor, meta: dict[str, np.ndarray] | None = None) -> dict:
        """x [R, D] float (R > 0); meta: name -> [R] array for names in META_FILES."""
        if x.ndim != 2 or x.shape[1] != self.offsets[-1] or x.shape[0] == 0:
            raise StoreError(f"shard {index}: expected rows [R>0, {self.offsets[-1]}], got {tuple(x.shape)}")
        raw, rscale = encode_rows(x, self.dtype, self.offsets)
        stored = torch.from_numpy(decode_rows(raw, self.dtype, rscale, self.offsets))
        stem = f"shard-{index:05d}"
        files = {"acts": atomic_write_bytes(self.path / f"{stem}.acts", [raw])}
        if rscale is not None:
            files["rscale"] = atomic_write_bytes(self.path / f"{stem}.rscale", [rscale])
        for name, arr in (meta or {}).items():
            if name not in META_FILES:
                raise StoreError(f"unknown side file {name!r}")
            a = np.ascontiguousarray(np.asarray(arr).astype(META_FILES[name], casting="unsafe"))
            if a.shape != (x.shape[0],):
                raise StoreError(f"shard {index}: {name} must have shape [{x.shape[0]}], got {a.shape}")
            files[name] = atomic_write_bytes(self.path / f"{stem}.{name}", [a])
        return {"rows": int(x.shape[0]), "files": files, "norm_sums": segment_norm_sums(stored, self.offsets)}


def scales_from_shards(shards: Sequence[dict], widths: Sequence[int]) -> tuple[list[float], list[float]]:
    """(scales, mean norms) per source from the shards' norm sums; scale = sqrt(d)/E||x||."""
    n = sum(s["rows"] for s in shards)
    sums = np.zeros(len(widths), dtype=np.float64)
    for s in shards:  # fixed order: the result is bit-identical however the shards were made
        sums += np.asarray(s["norm_sums"], dtype=np.float64)
    means = sums / max(n, 1)
    scales = [float(math.sqrt(w) / m) if m > 0 else 1.0 for w, m in zip(widths, means)]
    return scales, [float(m) for m in means]


def build_manifest(*, widths: Sequence[int], dtype: str, shards: Sequence[dict], sources: Sequence[dict],
                   **extra: Any) -> dict:
    """The manifest dict (see module docstring); ``sources`` entries get width/scale filled in."""
    scales, means = scales_from_shards(shards, widths)
    srcs = []
    for i, (w, s) in enumerate(zip(widths, sources)):
        d = {"name": f"source{i}", "model": None, "revision": None, "layer": None}
        d.update(s)
        d.update({"width": int(w), "scale": scales[i], "mean_norm": means[i]})
        srcs.append(d)
    n = int(sum(s["rows"] for s in shards))
    m = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "dtype": canonical_dtype(dtype),
        "n_rows": n,
        "n_tokens": n,
        "widths": [int(w) for w in widths],
        "sources": srcs,
        "shards": list(shards),
        "tokenizer": None,
        "datasets": [],
        "seed": None,
        "dropped_outliers": 0,
    }
    m.update(extra)
    return m


def _as_float_rows(a: Any, name: str) -> torch.Tensor:
    if isinstance(a, np.ndarray):
        if a.dtype not in (np.float16, np.float32, np.float64):
            raise StoreError(f"{name}: activations must be float16/32/64 or bfloat16, got {a.dtype}")
        return torch.from_numpy(a)
    if isinstance(a, torch.Tensor):
        if not a.is_floating_point():
            raise StoreError(f"{name}: activations must be floating point, got {a.dtype}")
        return a.detach().cpu()
    raise StoreError(f"{name}: expected a numpy array or torch tensor, got {type(a).__name__}")


def write_store(path: str | os.PathLike, acts: Any, tokens: Any = None, source_names: Sequence[str] | None = None,
                dtype: str | torch.dtype | None = None, *, shard_rows: int | None = None,
                overwrite: bool = False, sources: Sequence[dict] | None = None, **manifest_extra: Any) -> Path:
    """Write activations to a new store directory and return its path.

    Args:
        path: directory to create (must not hold a store unless ``overwrite``).
        acts: [N, n, d] (numpy or torch, fp32/fp16/bf16) or a list of n arrays [N, d_i]
            (unequal widths allowed).
        tokens: optional [N] token ids kept beside the rows.
        source_names: n names (default source0, source1, ...).
        dtype: store dtype, bfloat16 (default), float16, float32 or float8_e4m3fn ('fp8').
        shard_rows: rows per shard (default DEFAULT_SHARD_ROWS).
        sources: optional per-source manifest fields (model, revision, layer, ...).
        manifest_extra: further manifest fields (tokenizer, datasets, seed, ...).
    """
    path = Path(path)
    dtype = canonical_dtype(dtype)
    if isinstance(acts, (list, tuple)):
        parts = [_as_float_rows(a, f"acts[{i}]") for i, a in enumerate(acts)]
        if not parts or any(p.ndim != 2 for p in parts):
            raise StoreError("acts: a list must hold n >= 1 arrays of shape [N, d_i]")
        if len({p.shape[0] for p in parts}) != 1:
            raise StoreError(f"acts: sources differ in row count: {[p.shape[0] for p in parts]}")
        widths = [p.shape[1] for p in parts]
        n_rows = parts[0].shape[0]
    else:
        a = _as_float_rows(acts, "acts")
        if a.ndim != 3:
            raise StoreError(f"acts: expected [N, n_sources, d] or a list of [N, d_i], got shape {tuple(a.shape)}")
        n_rows, n_src, d = a.shape
        parts = [a[:, i, :] for i in range(n_src)]
        widths = [d] * n_src
    if n_rows == 0:
        raise StoreError(f"{path}: refusing to write an empty store (0 rows)")
    if any(w <= 0 for w in widths):
        raise StoreError(f"acts: every source needs width > 0, got {widths}")
    n_src = len(widths)
    if source_names is not None and len(source_names) != n_src:
        raise StoreError(f"source_names has {len(source_names)} names for {n_src} sources")
    if sources is not None and len(sources) != n_src:
        raise StoreError(f"sources has {len(sources)} entries for {n_src} sources")
    tok = None
    if tokens is not None:
        tok = np.asarray(tokens.cpu() if isinstance(tokens, torch.Tensor) else tokens)
        if tok.shape != (n_rows,):
            raise StoreError(f"tokens must have shape [{n_rows}], got {tok.shape}")
    if shard_rows is None:
        shard_rows = DEFAULT_SHARD_ROWS
    if shard_rows <= 0:
        raise StoreError(f"shard_rows must be > 0, got {shard_rows}")

    if (path / MANIFEST).exists() and not overwrite:
        raise StoreError(f"{path / MANIFEST} already exists; pass overwrite=True to replace the store")
    path.mkdir(parents=True, exist_ok=True)
    if (path / MANIFEST).exists():
        # Remove the manifest first: until the new one lands the directory reads as incomplete.
        (path / MANIFEST).unlink()
        _fsync_dir(path)
        for f in path.glob("shard-*"):
            f.unlink()

    writer = ShardWriter(path, widths, dtype)
    shards = []
    for k, lo in enumerate(range(0, n_rows, shard_rows)):
        hi = min(lo + shard_rows, n_rows)
        x = torch.cat([p[lo:hi].float() for p in parts], dim=1)
        meta = {"tokens": tok[lo:hi]} if tok is not None else None
        shards.append(writer.write_shard(k, x, meta))
    srcs = [dict(s) for s in sources] if sources is not None else [{} for _ in widths]
    for i, s in enumerate(srcs):
        if source_names is not None:
            s["name"] = str(source_names[i])
    manifest = build_manifest(widths=widths, dtype=dtype, shards=shards, sources=srcs, **manifest_extra)
    atomic_write_json(path / MANIFEST, manifest)
    return path


# --------------------------------------------------------------------------------------------
# Shuffle: a keyed permutation of [0, N) per epoch, evaluated pointwise
# --------------------------------------------------------------------------------------------
def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser, elementwise on uint64 (wrapping arithmetic)."""
    z = z ^ (z >> np.uint64(30))
    z = z * np.uint64(0xBF58476D1CE4E5B9)
    z = z ^ (z >> np.uint64(27))
    z = z * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def permute(idx: np.ndarray, n: int, key: int, rounds: int = 6) -> np.ndarray:
    """A bijection of [0, n) applied to ``idx`` (int64 [m]), keyed by ``key``: ``fastxc._C``'s
    loop, which gives the same ids as ``permute_reference`` about 4x faster."""
    return _C.permute(np.asarray(idx, dtype=np.int64), int(n), int(key) & 0xFFFFFFFFFFFFFFFF, int(rounds))


def permute_reference(idx: np.ndarray, n: int, key: int, rounds: int = 6) -> np.ndarray:
    """A bijection of [0, n) applied to ``idx`` (int64), keyed by ``key`` (numpy reference).

    Balanced Feistel network on the smallest even-bit domain 2**(2h) >= n, with cycle walking
    (re-apply until the value lands inside [0, n); the domain is < 4n so that takes < 4 rounds
    on average). Batch i of the reader uses positions i*B .. i*B+B-1, so its rows depend on
    (seed, i) only and need O(B) work and memory however large the store.
    """
    if n <= 1:
        return np.zeros_like(idx)
    bits = max(2, int(n - 1).bit_length())
    bits += bits & 1
    h = bits // 2
    mask = np.uint64((1 << h) - 1)
    kbase = _mix64(np.array([key & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))[0]
    keys = [_mix64(np.array([(int(kbase) + r + 1) & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))[0]
            for r in range(rounds)]
    x = idx.astype(np.uint64)
    out = np.empty_like(x)
    todo = np.arange(len(x))
    with np.errstate(over="ignore"):
        while len(todo):
            v = x[todo]
            left, right = v >> np.uint64(h), v & mask
            for k in keys:
                left, right = right, left ^ (_mix64(right ^ k) & mask)
            v = (left << np.uint64(h)) | right
            inside = v < np.uint64(n)
            out[todo[inside]] = v[inside]
            x[todo[~inside]] = v[~inside]
            todo = todo[~inside]
    return out.astype(np.int64)


def batch_rows(n: int, batch_size: int, seed: int, i: int) -> np.ndarray:
    """Global row ids of batch ``i`` [batch_size] int64 (epoch e uses the permutation keyed by
    (seed, e); a batch may straddle two epochs). Sorted, for read locality: order within a
    batch does not matter to training."""
    pos = np.arange(i * batch_size, (i + 1) * batch_size, dtype=np.int64)
    epoch, r = np.divmod(pos, n)
    out = np.empty_like(pos)
    for e in np.unique(epoch):
        sel = epoch == e
        key = (int(seed) * 0x9E3779B97F4A7C15 + int(e)) & 0xFFFFFFFFFFFFFFFF
        out[sel] = permute(r[sel], n, key)
    out.sort()
    return out


# --------------------------------------------------------------------------------------------
# Reader
# --------------------------------------------------------------------------------------------
@dataclass
class _Shard:
    rows: int
    acts: np.ndarray  # memmap [rows, D]
    rscale: np.ndarray | None  # memmap [rows, n_sources] (fp8)
    meta_paths: dict[str, Path]


def _ensure_fd_limit(n_maps: int, where: Path) -> None:
    """Each memory map keeps a file descriptor (Python's mmap holds a dup): a 2.5 TB store of
    400 MB shards maps ~6000 files, above the usual soft limit of 1024. Raise the soft limit
    towards the hard one when needed."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on POSIX
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = n_maps + 256  # headroom for everything else the process opens
    if soft != resource.RLIM_INFINITY and soft < need:
        new = need if hard == resource.RLIM_INFINITY else min(hard, need)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        except (ValueError, OSError):
            new = soft
        if new < need:
            raise StoreError(f"{where}: the store has {n_maps} shard files to map but the open-file limit is "
                             f"{new} (hard limit {hard}); raise it (ulimit -n) or write larger shards")


_READAHEAD_FRACTION_OF_RAM = 0.5


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: assume the store is not cached
        return 0


class StoreReader:
    """Read access to a store (see module docstring). Use ``open_store(path)``."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise StoreNotFoundError(f"store not found: {self.path}")
        if not self.path.is_dir():
            raise StoreError(f"{self.path} is not a store directory")
        mpath = self.path / MANIFEST
        if not mpath.exists():
            raise StoreError(f"{mpath} is missing: not a store, or an incomplete one (an interrupted "
                             "harvest: rerun the same command to finish it)")
        try:
            m = json.loads(mpath.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise StoreError(f"{mpath} is not valid JSON: {e}") from e
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            raise StoreError(f"{mpath} is not a fastxc store manifest (format != {FORMAT!r})")
        if m.get("version") != FORMAT_VERSION:
            raise StoreError(f"{mpath}: store format version {m.get('version')!r}, this fastxc reads "
                             f"version {FORMAT_VERSION}")
        self.manifest = m
        try:
            self.dtype = canonical_dtype(m["dtype"])
            self.widths = [int(w) for w in m["widths"]]
            self.source_names = [str(s["name"]) for s in m["sources"]]
            self.scales = np.asarray([s["scale"] for s in m["sources"]], dtype=np.float32)
            shard_recs = m["shards"]
            n_rows = int(m["n_rows"])
        except (KeyError, TypeError, ValueError) as e:
            raise StoreError(f"{mpath}: malformed manifest ({e!r})") from e
        if len(self.widths) != len(self.source_names):
            raise StoreError(f"{mpath}: {len(self.widths)} widths but {len(self.source_names)} sources")
        self.n_sources = len(self.widths)
        self.offsets = [0] + list(np.cumsum(self.widths).tolist())
        self.d_total = self.offsets[-1]
        if n_rows == 0 or not shard_recs:
            raise StoreError(f"{mpath}: the store is empty (0 rows)")
        if sum(int(s["rows"]) for s in shard_recs) != n_rows:
            raise StoreError(f"{mpath}: shard rows do not add up to n_rows={n_rows}")
        self._n = n_rows
        self._col_scale = np.repeat(self.scales, self.widths).astype(np.float32)
        self._seg = np.asarray(self.offsets, dtype=np.int64)
        self.validate(checksums=False)
        _ensure_fd_limit(len(shard_recs) * (2 if self.dtype == "float8_e4m3fn" else 1), mpath)
        self._shards = [self._map_shard(rec) for rec in shard_recs]
        self._starts = np.cumsum([0] + [s.rows for s in self._shards]).astype(np.int64)
        self._tokens_cache: np.ndarray | None = None
        # Read-ahead (MADV_WILLNEED on the next batch's rows) pays off only for a store the page
        # cache cannot hold; on a cached store it is one wasted syscall per row (measured: it
        # made the prefetching iterator 2x slower than a plain gather on a 2 GiB cached store).
        acts_bytes = sum(s.acts.nbytes for s in self._shards)
        self.readahead = acts_bytes > _READAHEAD_FRACTION_OF_RAM * _physical_memory()

    # -- properties ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._n

    def __repr__(self) -> str:
        return (f"StoreReader({str(self.path)!r}, rows={self._n}, sources={self.source_names}, "
                f"widths={self.widths}, dtype={self.dtype}, shards={len(self._shards)})")

    @property
    def equal_widths(self) -> bool:
        return len(set(self.widths)) == 1

    @property
    def tokens(self) -> np.ndarray | None:
        """Token id of every row, int32 [N] (None when the store keeps none)."""
        return self.meta("tokens")

    def meta(self, name: str) -> np.ndarray | None:
        """A side array over all rows ('tokens', 'doc', 'pos', 'dataset'), or None if absent."""
        if name not in META_FILES:
            raise StoreError(f"unknown side array {name!r}; choose from {', '.join(META_FILES)}")
        if not all(name in s.meta_paths for s in self._shards):
            return None
        if name == "tokens" and self._tokens_cache is not None:
            return self._tokens_cache
        arr = np.concatenate([np.fromfile(s.meta_paths[name], dtype=META_FILES[name]) for s in self._shards])
        if name == "tokens":
            self._tokens_cache = arr
        return arr

    # -- validation ---------------------------------------------------------------------------
    def _expected_bytes(self, kind: str, rows: int) -> int:
        if kind == "acts":
            return rows * self.d_total * np.dtype(_NP_STORAGE[self.dtype]).itemsize
        if kind == "rscale":
            return rows * self.n_sources * 4
        return rows * np.dtype(META_FILES[kind]).itemsize

    def validate(self, checksums: bool = False, progress: bool = False) -> int:
        """Check every shard file exists with the size the manifest gives (and, with
        ``checksums=True``, its sha256; ``progress``: a tqdm bar over the bytes hashed, on
        stderr). Raises StoreError naming the first bad file and its shard; returns the number
        of files whose checksum was verified (0 without ``checksums``)."""
        to_hash = []  # sizes first (cheap), then the checksums of every file
        for k, rec in enumerate(self.manifest["shards"]):
            files = rec.get("files", {})
            if "acts" not in files:
                raise StoreError(f"{self.path / MANIFEST}: shard {k} lists no activation file")
            if self.dtype == "float8_e4m3fn" and "rscale" not in files:
                raise StoreError(f"{self.path / MANIFEST}: fp8 shard {k} lists no row-scale file")
            for kind, f in files.items():
                p = self.path / f["path"]
                if kind != "rscale" and kind != "acts" and kind not in META_FILES:
                    raise StoreError(f"{self.path / MANIFEST}: unknown file kind {kind!r} in shard {k}")
                if not p.exists():
                    raise StoreNotFoundError(f"shard file missing: {p}")
                size = p.stat().st_size
                want = self._expected_bytes(kind, int(rec["rows"]))
                if size != want or size != int(f["bytes"]):
                    raise StoreError(f"shard file {p} has {size} bytes, the manifest expects {f['bytes']} "
                                     f"({rec['rows']} rows): truncated or corrupted")
                if checksums and f.get("sha256"):
                    to_hash.append((k, p, f["sha256"], size))
        if to_hash:
            _check_sha256(to_hash, progress)
        return len(to_hash)

    def _map_shard(self, rec: dict) -> _Shard:
        rows = int(rec["rows"])
        files = rec["files"]
        acts = np.memmap(self.path / files["acts"]["path"], dtype=_NP_STORAGE[self.dtype], mode="r",
                         shape=(rows, self.d_total))
        rscale = None
        if "rscale" in files:
            rscale = np.memmap(self.path / files["rscale"]["path"], dtype=np.float32, mode="r",
                               shape=(rows, self.n_sources))
        meta = {k: self.path / f["path"] for k, f in files.items() if k in META_FILES}
        return _Shard(rows, acts, rscale, meta)

    # -- reading ------------------------------------------------------------------------------
    def locate(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global row ids [B] -> (shard ids int32 [B], local row ids int64 [B])."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self._n):
            raise IndexError(f"row ids must lie in [0, {self._n}), got min {rows.min()} max {rows.max()}")
        shard = np.searchsorted(self._starts, rows, side="right").astype(np.int32) - 1
        return shard, rows - self._starts[shard]

    def _gather(self, rows: np.ndarray, normalise: bool = True, threads: int = 0) -> torch.Tensor:
        """Rows -> float32 [len(rows), D]; ``threads`` caps the C++ gather's OpenMP team (0: all)."""
        shard, local = self.locate(rows)
        out = torch.empty(len(rows), self.d_total, dtype=torch.float32)
        col = self._col_scale if normalise else np.ones(self.d_total, dtype=np.float32)
        _C.gather_shards([s.acts for s in self._shards], shard, local, out.numpy(), self.dtype, col,
                         [s.rscale for s in self._shards] if self.dtype == "float8_e4m3fn" else None,
                         self._seg, threads)
        return out

    def _shape(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], self.n_sources, self.widths[0]) if self.equal_widths else x

    def read_rows(self, rows: Sequence[int] | np.ndarray, normalise: bool = True) -> torch.Tensor:
        """Rows by global id, float32: [len, n, d] (equal widths) or [len, D]. Normalised by the
        per-source scales unless ``normalise=False`` (then the activations as harvested)."""
        return self._shape(self._gather(np.asarray(rows, dtype=np.int64).reshape(-1), normalise))

    def batch_rows(self, batch_size: int, seed: int, i: int) -> np.ndarray:
        """The global row ids of batch ``i`` of ``batches(batch_size, seed)``."""
        return batch_rows(self._n, batch_size, seed, i)

    def batches(self, batch_size: int, seed: int = 0, start: int = 0, prefetch: int = 2) -> "BatchIterator":
        """Infinite iterator of shuffled normalised float32 batches [B, n, d] (equal widths) or
        [B, D]. Batch i depends on (seed, i) only: resume with ``start=i``. ``prefetch`` batches
        are gathered ahead on a background thread (0: gather on the caller's thread)."""
        if int(batch_size) <= 0:
            raise StoreError(f"batch_size must be > 0, got {batch_size}")
        if int(start) < 0:
            raise StoreError(f"start must be >= 0, got {start}")
        return BatchIterator(self, int(batch_size), int(seed), int(start), int(prefetch))

    def _willneed(self, rows: np.ndarray) -> None:
        shard, local = self.locate(rows)
        _C.willneed([s.acts for s in self._shards], shard, local)


def open_store(path: str | os.PathLike) -> StoreReader:
    """Open a store directory for reading (validates version and shard sizes)."""
    return StoreReader(path)


def verify_checksums(path: str | os.PathLike | StoreReader, progress: bool = True) -> int:
    """Open the store at ``path`` (manifest, version, shard sizes) and check every shard file's
    sha256 against the manifest, with a tqdm progress bar over the bytes on stderr when
    ``progress``. Returns the number of files verified; raises StoreError (StoreNotFoundError
    for a missing path or file) naming the first bad file and its shard."""
    reader = path if isinstance(path, StoreReader) else StoreReader(path)
    return reader.validate(checksums=True, progress=progress)


def _check_sha256(files: Sequence[tuple[int, Path, str, int]], progress: bool) -> None:
    """files: (shard index, path, expected sha256, bytes); StoreError at the first mismatch."""
    from tqdm.auto import tqdm

    total = sum(f[3] for f in files)
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="checksums",
              disable=not progress, file=sys.stderr, dynamic_ncols=True) as bar:
        for k, p, want, _ in files:
            if sha256_file(p, on_chunk=bar.update) != want:
                raise StoreError(f"checksum mismatch in {p} (shard {k}): the file is corrupted")


_LIVE_ITERATORS: "weakref.WeakSet[BatchIterator]" = weakref.WeakSet()


@atexit.register
def _close_live_iterators() -> None:
    # A daemon prefetch thread still inside the C++ gather when the interpreter finalises
    # would be torn down mid-OpenMP-region (std::terminate): stop them all first.
    for it in list(_LIVE_ITERATORS):
        it.close()


PREFETCH_GATHER_THREADS = 1  # OpenMP threads of the prefetch thread's gathers


def _prefetch_worker(reader: StoreReader, batch_size: int, seed: int, i: int, q: queue.Queue,
                     stop: threading.Event) -> None:
    """Background thread: gather batch i, i+1, ... into ``q`` until ``stop`` is set. It holds no
    reference to the iterator, so dropping the iterator closes it (``__del__``)."""

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    try:
        nxt = reader.batch_rows(batch_size, seed, i)
        while not stop.is_set():
            rows = nxt
            nxt = reader.batch_rows(batch_size, seed, i + 1)
            if reader.readahead:
                reader._willneed(nxt)  # start the disk reads of the following batch now
            # One gather thread: a second OpenMP team beside the trainer's threads oversubscribes
            # the cores (its idle threads spin), which slowed a page-cached store's training
            # steps by ~20% on 2 cores; a cached batch gathers in well under a step with one
            # thread, and a store on disk is kept ahead by the willneed read-ahead.
            if not put(reader._shape(reader._gather(rows, threads=PREFETCH_GATHER_THREADS))):
                return
            i += 1
    except BaseException as e:  # hand the error to the consumer instead of dying silently
        put(e)


class BatchIterator:
    """Iterator over ``reader.batches(...)``; ``position`` is the index of the next batch it
    returns (save it in a checkpoint and pass it back as ``start``). ``close()`` stops the
    prefetch thread (also done on garbage collection and at exit)."""

    def __init__(self, reader: StoreReader, batch_size: int, seed: int, start: int, prefetch: int):
        self.reader, self.batch_size, self.seed = reader, batch_size, seed
        self.position = start
        self._thread = None
        if prefetch > 0:
            self._q: queue.Queue = queue.Queue(maxsize=prefetch)
            self._stop = threading.Event()
            self._thread = threading.Thread(target=_prefetch_worker, daemon=True, name="fastxc-store-prefetch",
                                            args=(reader, batch_size, seed, start, self._q, self._stop))
            self._thread.start()
            _LIVE_ITERATORS.add(self)

    def __iter__(self) -> "BatchIterator":
        return self

    def __next__(self) -> torch.Tensor:
        if self._thread is None:
            r = self.reader
            x = r._shape(r._gather(r.batch_rows(self.batch_size, self.seed, self.position)))
        else:
            x = self._q.get()
            if isinstance(x, BaseException):
                self.close()
                raise x
        self.position += 1
        return x

    def close(self) -> None:
        """Stop the prefetch thread (idempotent). After close, next() gathers synchronously."""
        t = self._thread
        if t is not None:
            self._stop.set()
            t.join(timeout=30)
            self._thread = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
