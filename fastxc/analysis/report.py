"""One static HTML page with the analyses' plots and tables (opens from disk, no server).

It reads the output folders of the analysis commands (any subset):

    diff/       diff.json, nrn_hist.png, features.jsonl      (python -m fastxc.analysis.diff)
    reasoning/  reasoning.json, reasoning_nrn.png            (python -m fastxc.analysis.reasoning)
    ablate/     ablate.json, ablate.png                      (python -m fastxc.analysis.ablate)
    steer/      steer.json, steer.png                        (python -m fastxc.analysis.steer)
    geometry/   geometry.json, geometry_pca*.png             (python -m fastxc.analysis.geometry)
    eval/       eval.json                                    (python -m fastxc.analysis.evaluate)

Images are embedded as base64 by default (one self-contained file); ``--link`` copies them into
``<name>_files/`` beside the page and references them relatively instead. The top features are
shown with their top-activating contexts, each token shaded by the feature's activation.
CLI: ``python -m fastxc.analysis.report --runs ROOT --out report.html`` (ROOT holds the folders above).
"""
from __future__ import annotations

import argparse
import base64
import html
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Sequence

from fastxc.analysis.hooks import AnalysisError, read_json

SECTIONS = ("eval", "diff", "reasoning", "ablate", "steer", "geometry")
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left}img{max-width:100%;border:1px solid #eee;margin:.4em 0}
.ctx{font-family:ui-monospace,Menlo,monospace;font-size:.85em;white-space:pre-wrap;overflow-wrap:anywhere;margin:.15em 0}
.gen{font-family:ui-monospace,Menlo,monospace;font-size:.85em;white-space:pre-wrap;overflow-wrap:anywhere;text-align:left}
.tok{border-radius:2px}.focus{outline:1px solid #c00}.muted{color:#777;font-size:.9em}
#missing{background:#fee;border:1px solid #c00;padding:.5em}
"""
# Once the page has loaded, count the images the browser could not show (a linked page moved
# without its _files folder) and say so at the top; body[data-images] records "ok" or the
# count, which the headless-browser test reads.
_CHECK_IMAGES = """<script>
window.addEventListener("load", function () {
  var bad = Array.prototype.filter.call(document.images, function (im) { return !(im.complete && im.naturalWidth > 0); });
  document.body.setAttribute("data-images", bad.length ? "missing:" + bad.length : "ok");
  if (bad.length) {
    var p = document.createElement("p");
    p.id = "missing";
    p.textContent = bad.length + " image(s) could not be loaded: keep the page beside its _files folder.";
    document.body.insertBefore(p, document.body.firstChild);
  }
});
</script>"""


def _esc(s) -> str:
    return html.escape(str(s), quote=True)


def _num(v, fmt="{:.3f}") -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return fmt.format(v)
    return _esc(v)


class _Images:
    """Turns a PNG path into an ``<img>`` tag: embedded (data URI) or copied beside the page."""

    def __init__(self, page: Path, link: bool):
        self.link = link
        self.dir = page.with_name(page.stem + "_files")
        self.n = 0

    def tag(self, png: Path, alt: str) -> str:
        if not png.is_file():
            return ""
        if not self.link:
            data = base64.b64encode(png.read_bytes()).decode()
            return f'<img src="data:image/png;base64,{data}" alt="{_esc(alt)}">'
        self.dir.mkdir(parents=True, exist_ok=True)
        self.n += 1
        name = f"{self.n:02d}_{png.name}"
        shutil.copyfile(png, self.dir / name)
        return f'<img src="{_esc(self.dir.name)}/{_esc(name)}" alt="{_esc(alt)}">'


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1, left_last: bool = False) -> str:
    """Cells are HTML already (escape before); the first ``left`` columns (and the last one with
    ``left_last``) are left-aligned."""
    n = len(header)

    def is_left(j: int) -> bool:
        return j < left or (left_last and j == n - 1)

    th = "".join(f'<th class="l">{_esc(h)}</th>' if is_left(j) else f"<th>{_esc(h)}</th>" for j, h in enumerate(header))
    body = "".join("<tr>" + "".join(f'<td class="l">{c}</td>' if is_left(j) else f"<td>{c}</td>" for j, c in enumerate(r))
                   + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def context_html(ctx: dict) -> str:
    """A token context with each token shaded by activation (the focus token outlined)."""
    acts = ctx.get("acts") or [0.0] * len(ctx["tokens"])
    peak = max(max(acts), 1e-9)
    parts = []
    for j, (t, a) in enumerate(zip(ctx["tokens"], acts)):
        alpha = max(0.0, min(1.0, a / peak))
        cls = "tok focus" if j == ctx.get("focus") else "tok"
        parts.append(f'<span class="{cls}" style="background:rgba(230,80,40,{alpha:.2f})" title="{a:.3f}">{_esc(t)}</span>')
    return f'<div class="ctx">{"".join(parts)}</div>'


def _eval_section(d: Path, img: _Images) -> str:
    r = read_json(d / "eval.json")
    rows = [[_esc(n), _num(r["clean"][i], "{:.4f}"), _num(r["spliced"][i], "{:.4f}"), _num(r["zero"][i], "{:.4f}"),
             _num(r["frac_recovered"][i], "{:.4f}")] for i, n in enumerate(r["sources"])]
    s = _table(["model", "CE clean", "CE spliced", "CE zero-ablated", "fraction of loss recovered"], rows)
    if "store" in r:
        st = r["store"]
        s += _table(["metric"] + list(r["sources"]), [["FVU"] + [_num(v, "{:.4f}") for v in st["fvu"]]])
        s += f'<p class="muted">L0 {st["l0"]:.2f} on {st["rows"]} store rows{"" if st.get("held_out") else " (training store)"}; ' \
             f'{r["n_tokens"]} tokens in {r["n_sequences"]} sequences, layer {r["layer"]}.</p>'
    return s


def _diff_section(d: Path, img: _Images, max_features: int = 20) -> str:
    r = read_json(d / "diff.json")
    a, b = r["sources"]
    c = r["classes"]
    s = (f"<p>{r['live_features']} live features of {r['n_features']}; mean NRN {_num(r['nrn_mean'])} "
         f"(NRN = |{_esc(b)}| / (|{_esc(a)}| + |{_esc(b)}|), L{r['ord']} norms). Classes: shared {c['shared']}, "
         f"only-{_esc(a)} {c['only-A']}, only-{_esc(b)} {c['only-B']}.</p>")
    s += img.tag(d / "nrn_hist.png", "NRN histogram")
    feats = d / "features.jsonl"
    if feats.is_file():
        recs = [json.loads(l) for l in feats.read_text().splitlines() if l.strip()]
        for group, title in (("top", f"Top features (most {b}-specific)"), ("bottom", f"Bottom features (most {a}-specific)")):
            g = [x for x in recs if x.get("group") == group][:max_features]
            if not g:
                continue
            s += f"<h3>{_esc(title)}</h3>"
            rows = []
            for x in g:
                ctxs = "".join(context_html(cx) for cx in x.get("contexts", [])[:3]) or '<span class="muted">no contexts</span>'
                note = f'<div class="muted">{_esc(x["annotation"])}</div>' if x.get("annotation") else ""
                rows.append([str(x["feature"]), _num(x["nrn"]), _num(x.get("cosine")), _num(x.get("freq"), "{:.4f}"),
                             _num(x.get("mean_act")), note + ctxs])
            s += _table(["feature", "NRN", "cosine", "freq", "mean act", "top-activating contexts"], rows, left=1,
                        left_last=True)
    return s


def _reasoning_section(d: Path, img: _Images) -> str:
    r = read_json(d / "reasoning.json")
    rows = [[_esc(name), _esc(", ".join(v["markers"])), str(v["n_positions"]), str(len(v["active"])),
             _num(v["nrn_mean"]), _num(v["frac_nrn_gt_0.5"], "{:.2f}")] for name, v in r["categories"].items()]
    s = f"<p>Features active at positions {_esc(r['at'])} the markers.</p>"
    s += _table(["category", "markers", "positions", "active features", "mean NRN", "NRN > 0.5"], rows, left=2)
    return s + img.tag(d / "reasoning_nrn.png", "NRN of features per reasoning category")


def _ablate_section(d: Path, img: _Images) -> str:
    r = read_json(d / "ablate.json")
    s = img.tag(d / "ablate.png", "ablation")
    for res in r["results"]:
        rows = [[_esc(name), str(v["n_features"])] + [_num(x, "{:+.3f}") for x in v["delta"]] for name, v in res["sets"].items()]
        s += f"<h3>{_esc(res['category'])} ({res['n_positions']} positions)</h3>"
        s += _table(["feature set", "features"] + [f"logit change, {n}" for n in res["sources"]], rows, left=1)
    return s


def _frac(v) -> str:
    return "not judged" if v is None else _num(v, "{:.2f}")


def _steer_section(d: Path, img: _Images) -> str:
    r = read_json(d / "steer.json")
    sweep = r["sweep"]
    cats = list(sweep[0]["rate"]) if sweep else []
    unit = r.get("unit", {})
    rows = [[_num(x["multiple"], "{:g}"), _num(x["alpha"]), _num(x["mean_think_tokens"], "{:.1f}"),
             _frac(x["coherence"]["closed"]), _frac(x["coherence"]["answered"]), _frac(x["coherence"]["correct"])]
            + [f'{_num(x["rate"][c], "{:.4f}")} ({_num(x["text_rate"][c], "{:.4f}")})' for c in cats] for x in sweep]
    s = f"<p>Steering {_esc(r['steered_model'])} at layer {r['layer']} with {_esc(r['direction'])}.</p>"
    s += (f"<p>Strength: {_esc(unit.get('label', 'multiple'))}; alpha = multiple x {_num(unit.get('value'))}. "
          f"Markers are counted as tokens of the generated ids (in brackets: occurrences in the text). "
          f"Answers {_esc(r.get('correctness', ''))}.</p>")
    s += _table(["multiple", "alpha", "thinking tokens", "closed", "answered", "correct"]
                + [f"{c} / token" for c in cats], rows, left=0)
    s += img.tag(d / "steer.png", "steering sweep")
    if sweep and sweep[0]["samples"]:
        base, top = sweep[0], sweep[-1]
        rows = [[_esc(base["samples"][j]["prompt"])] + [f'<div class="gen">{_esc(x["samples"][j]["text"])}</div>'
                                                       for x in (base, top)]
                for j in range(min(3, len(base["samples"])))]
        s += _table(["prompt", f"x{base['multiple']:g}", f"x{top['multiple']:g}"], rows, left=3)
    return s


def _geometry_section(d: Path, img: _Images) -> str:
    r = read_json(d / "geometry.json")
    s = ""
    for name, bad in r.get("degenerate", {}).items():
        for c, why in bad.items():
            s += f'<p class="muted">{_esc(c)} skipped for {_esc(name)}: {_esc(why)}.</p>'
    for k, per in r["median"].items():
        rows = [[_esc(c)] + ["skipped" if v is None else _num(v) for v in m.values()] for c, m in per.items()]
        s += f"<h3>PCA {k}D: median parallelogram loss</h3>" + _table(["class"] + list(r["models"]), rows)
        s += img.tag(d / f"geometry_pca{k}.png", f"parallelogram loss PCA {k}D")
    return s


_BUILDERS = {"eval": ("Spliced-in evaluation", _eval_section), "diff": ("Model diff: relative decoder norms", _diff_section),
             "reasoning": ("Reasoning categories", _reasoning_section), "ablate": ("Feature ablation", _ablate_section),
             "steer": ("Steering", _steer_section), "geometry": ("Feature geometry", _geometry_section)}


def build_report(folders: dict[str, str | Path], out: str | Path, title: str = "fastxc report", link: bool = False) -> Path:
    """Write the HTML page from the given analysis folders ({section: folder}); returns its path."""
    out = Path(out)
    unknown = set(folders) - set(SECTIONS)
    if unknown:
        raise AnalysisError(f"unknown report section(s) {sorted(unknown)}; known: {', '.join(SECTIONS)}")
    present = {k: Path(v) for k, v in folders.items() if v is not None}
    for k, p in present.items():
        if not p.is_dir():
            raise FileNotFoundError(f"no {k} output folder: {p}")
    if not present:
        raise AnalysisError("nothing to report: no analysis output folder found")
    out.parent.mkdir(parents=True, exist_ok=True)
    img = _Images(out, link)
    body = [f"<h1>{_esc(title)}</h1>"]
    toc = []
    for key in SECTIONS:
        if key not in present:
            continue
        name, fn = _BUILDERS[key]
        toc.append(f'<li><a href="#{key}">{_esc(name)}</a></li>')
        body.append(f'<section id="{key}"><h2>{_esc(name)}</h2>{fn(present[key], img)}</section>')
    body.insert(1, f"<ul>{''.join(toc)}</ul>")
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_esc(title)}</title>'
            f"<style>{_CSS}</style>{_CHECK_IMAGES}</head><body>{''.join(body)}</body></html>\n")
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, out)
    return out


def find_sections(root: str | Path) -> dict[str, Path]:
    """The analysis folders under ``root`` (named as in SECTIONS, or holding their JSON)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no such folder: {root}")
    marker = {"eval": "eval.json", "diff": "diff.json", "reasoning": "reasoning.json", "ablate": "ablate.json",
              "steer": "steer.json", "geometry": "geometry.json"}
    found = {}
    for key, fname in marker.items():
        for cand in (root / key, root):
            if (cand / fname).is_file():
                found[key] = cand
                break
    return found


def build_parser() -> argparse.ArgumentParser:
    """The flags of ``fastxc report``."""
    from fastxc.core.cli import Parser

    p = Parser(prog="fastxc report", description="One static HTML page from the analyses' outputs.")
    p.add_argument("--runs", default=None, help="folder holding eval/ diff/ reasoning/ ablate/ steer/ geometry/")
    for key in SECTIONS:
        p.add_argument(f"--{key}", default=None, help=f"the {key} output folder (overrides --runs)")
    p.add_argument("--out", default="report.html", help="HTML file to write")
    p.add_argument("--title", default="fastxc report", help="page title")
    p.add_argument("--link", action="store_true", help="copy images beside the page instead of embedding them")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from fastxc.analysis.inputs import run_cli

    args = build_parser().parse_args(argv)

    def body() -> int:
        folders = find_sections(args.runs) if args.runs else {}
        for key in SECTIONS:
            if getattr(args, key):
                folders[key] = Path(getattr(args, key))
        out = build_report(folders, args.out, args.title, args.link)
        print(f"wrote {out} ({', '.join(k for k in SECTIONS if k in folders)})")
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
