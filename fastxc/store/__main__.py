"""``python -m fastxc.store info|validate [--checksums] DIR``: inspect or check an activation store.

    info DIR                   rows, sources, widths, dtype, shards, scales, size on disk
    info --json DIR            the same as one JSON object
    validate DIR               manifest, version and every shard file's size
    validate --checksums DIR   ... and every shard file's sha256 (progress bar on stderr)

A bad store prints one ``error: ...`` line naming the file (and its shard) and exits with 2.
The library is ``fastxc.data.store`` (``open_store``, ``verify_checksums``).
"""
from __future__ import annotations

import json
import sys
from typing import Sequence

from fastxc.core.cli import Parser, report
from fastxc.data.store import MANIFEST, FORMAT, META_FILES, StoreReader, open_store, verify_checksums


def build_parser() -> Parser:
    p = Parser(prog="fastxc store", description=__doc__.split("\n")[0])
    p.add_argument("command", choices=["info", "validate"], help="what to do")
    p.add_argument("store", help="activation store directory")
    p.add_argument("--checksums", action="store_true", help="validate: also check every shard file's sha256")
    p.add_argument("--json", action="store_true", help="info: print one JSON object")
    p.add_argument("--no-progress", action="store_true", help="validate --checksums: no progress bar")
    return p


def store_info(r: StoreReader) -> dict:
    """The store's metadata as a JSON-ready dict (what ``info`` prints)."""
    m = r.manifest
    shards = m["shards"]
    files = [f for s in shards for f in s["files"].values()]
    data_bytes = sum(int(f["bytes"]) for f in files)
    side = [k for k in META_FILES if all(k in s["files"] for s in shards)]
    return {
        "path": str(r.path),
        "format": f"{FORMAT} v{m['version']}",
        "rows": len(r),
        "n_sources": r.n_sources,
        "widths": r.widths,
        "dtype": r.dtype,
        "shards": len(shards),
        "rows_per_shard": max(int(s["rows"]) for s in shards),
        "shard_files": len(files),
        "bytes": data_bytes + (r.path / MANIFEST).stat().st_size,
        "side_arrays": side,
        "sources": [{"name": s.get("name"), "model": s.get("model"), "revision": s.get("revision"),
                     "layer": s.get("layer"), "width": s.get("width"), "scale": s.get("scale"),
                     "mean_norm": s.get("mean_norm")} for s in m["sources"]],
        "tokenizer": m.get("tokenizer"),
        "datasets": m.get("datasets") or [],
        "seed": m.get("seed"),
        "dropped_outliers": m.get("dropped_outliers", 0),
    }


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def _print_info(info: dict) -> None:
    print(f"store     {info['path']}  ({info['format']})")
    print(f"rows      {info['rows']}")
    print(f"sources   {info['n_sources']}, widths {info['widths']}")
    print(f"dtype     {info['dtype']}")
    print(f"shards    {info['shards']} (up to {info['rows_per_shard']} rows each), {info['shard_files']} shard files")
    print(f"size      {_human_bytes(info['bytes'])} on disk ({info['bytes']} bytes, manifest included)")
    print(f"side      {', '.join(info['side_arrays']) or 'none'}")
    for i, s in enumerate(info["sources"]):
        where = ", ".join(f"{k} {s[k]}" for k in ("model", "revision", "layer") if s[k] is not None)
        print(f"  [{i}] {s['name']}: width {s['width']}, scale {s['scale']:.6g}, mean norm "
              f"{s['mean_norm']:.6g}" + (f", {where}" if where else ""))
    if info["tokenizer"]:
        print(f"tokenizer {info['tokenizer']}")
    for d in info["datasets"]:
        print(f"dataset   {json.dumps(d)}")
    if info["seed"] is not None:
        print(f"seed      {info['seed']}")
    print(f"dropped   {info['dropped_outliers']} outlier positions")


def main(argv: Sequence[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)  # bad flags: "error: ..." and exit status 2
    if args.command == "info" and (args.checksums or args.no_progress):
        p.error("--checksums and --no-progress apply to validate")
    if args.command == "validate" and args.json:
        p.error("--json applies to info")
    try:
        r = open_store(args.store)  # manifest, version and shard sizes are checked here
        if args.command == "info":
            info = store_info(r)
            if args.json:
                print(json.dumps(info, indent=1))
            else:
                _print_info(info)
            return 0
        n_files = sum(len(s["files"]) for s in r.manifest["shards"])
        if args.checksums:
            n_hashed = verify_checksums(r, progress=not args.no_progress)
            print(f"ok: {r.path}: {len(r)} rows in {len(r.manifest['shards'])} shards; {n_files} files, "
                  f"sizes and sha256 ({n_hashed} checksums) match the manifest")
        else:
            print(f"ok: {r.path}: {len(r)} rows in {len(r.manifest['shards'])} shards; {n_files} files, "
                  f"sizes match the manifest (--checksums to verify the contents)")
        return 0
    except (ValueError, OSError) as e:  # StoreError is a ValueError
        return report(e)


if __name__ == "__main__":
    sys.exit(main())
