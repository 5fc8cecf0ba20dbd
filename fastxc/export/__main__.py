"""``python -m fastxc.export``: a crosscoder to SAELens or dictionary_learning, and back.

    python -m fastxc.export --crosscoder runs/x/crosscoder --to saelens --out sae/
    python -m fastxc.export --crosscoder runs/x/crosscoder --to dictionary_learning --out dl/
    python -m fastxc.export --from dictionary_learning --in dl/ --out runs/x/imported   # import back

A model the target cannot express (two sources to SAELens, unequal widths or a per-row topk
crosscoder to dictionary_learning, ...) prints one ``error: ...`` line saying which part and
exits with 2; nothing is written. Where the closest equivalent is written, a ``warning: ...``
line says what differs. The conversions are ``fastxc.interop``.
"""
from __future__ import annotations

import sys
import warnings
from typing import Sequence

from fastxc.core.cli import Parser, report
from fastxc.interop import FORMATS, InteropWarning, export_crosscoder, import_to_folder


def build_parser() -> Parser:
    p = Parser(prog="fastxc export", description=__doc__.split("\n")[0])
    p.add_argument("--crosscoder", default=None, metavar="DIR", help="export: the crosscoder folder (Crosscoder.save)")
    p.add_argument("--to", choices=FORMATS, default=None, help="export: the target format")
    p.add_argument("--from", dest="from_format", choices=FORMATS, default=None,
                   help="import: the format of --in (writes a fastxc crosscoder folder to --out)")
    p.add_argument("--in", dest="src", default=None, metavar="PATH",
                   help="import: the folder (or dictionary_learning .pt / .safetensors file) to read")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--model-name", default=None, help="saelens: metadata.model_name")
    p.add_argument("--hook-name", default=None, help="saelens: metadata.hook_name (e.g. blocks.6.hook_resid_pre)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)  # bad flags: "error: ..." and exit status 2
    exporting = args.crosscoder is not None or args.to is not None
    importing = args.from_format is not None or args.src is not None
    if exporting == importing:
        p.error("give either --crosscoder DIR --to FORMAT (export) or --from FORMAT --in PATH (import)")
    if exporting and (args.crosscoder is None or args.to is None):
        p.error("export needs both --crosscoder and --to")
    if importing and (args.from_format is None or args.src is None):
        p.error("import needs both --from and --in")
    if (args.model_name or args.hook_name) and args.to != "saelens":
        p.error("--model-name and --hook-name apply to --to saelens")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", InteropWarning)
        try:
            if exporting:
                opts = {"model_name": args.model_name, "hook_name": args.hook_name} if args.to == "saelens" else {}
                out = export_crosscoder(args.crosscoder, args.to, args.out, overwrite=args.overwrite, **opts)
            else:
                out = import_to_folder(args.from_format, args.src, args.out, overwrite=args.overwrite)
        except (ValueError, OSError) as e:  # InteropError is a ValueError
            return report(e)  # the one error line; nothing was written
    _print_warnings(caught)
    if exporting:
        print(f"{args.to}: wrote {out} ({', '.join(sorted(f.name for f in out.iterdir()))})")
    else:
        print(f"crosscoder: wrote {out} (Crosscoder.load) from {args.from_format} {args.src}")
    return 0


def _print_warnings(caught) -> None:
    """InteropWarnings as ``warning: ...`` lines; any other warning as Python shows it."""
    for w in caught:
        if issubclass(w.category, InteropWarning):
            print(f"warning: {w.message}", file=sys.stderr)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)


if __name__ == "__main__":
    sys.exit(main())
