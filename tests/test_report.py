"""The HTML report: well-formed structure, every section, every image present (embedded or linked).

A strict parser checks the page everywhere (tags balance, each <img> resolves to a PNG, the
feature contexts are shaded); where Debian's chromium is installed (.ci/run installs it) the page
is also loaded from disk in headless chromium, and the page's own image check must say "ok".
"""
from __future__ import annotations

import base64
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from test_analysis import LAYER, WIDTH, random_crosscoder, shared_world

VOID = {"meta", "img", "br", "hr", "link", "input"}
LONG_COMPLETION = "Wait" * 600


class _Checker(HTMLParser):
    def __init__(self):
        super().__init__()
        self.stack, self.errors, self.imgs, self.ids, self.tags = [], [], [], set(), []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "img":
            self.imgs.append(a.get("src", ""))
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"unbalanced </{tag}> (open: {self.stack[-3:]})")
        else:
            self.stack.pop()


def check_page(path: Path) -> _Checker:
    text = path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    c = _Checker()
    c.feed(text)
    c.close()
    assert not c.errors and not c.stack, (c.errors, c.stack)
    assert c.tags[:3] == ["html", "head", "meta"] and "body" in c.tags and "title" in c.tags
    for src in c.imgs:
        if src.startswith("data:"):
            assert src.startswith("data:image/png;base64,")
            assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
        else:
            assert not src.startswith(("/", "http")), "images must be relative"
            f = path.parent / src
            assert f.is_file() and f.read_bytes()[:4] == b"\x89PNG", src
    return c


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every analysis's output folder, made on the tiny world through the library functions."""
    from fastxc.analysis.ablate import ablate_category, plot_ablation
    from fastxc.analysis.inputs import open_inputs, write_json
    from fastxc.analysis.diff import diff_analysis
    from fastxc.analysis.evaluate import evaluate, store_sequences
    from fastxc.analysis.geometry import geometry_analysis
    from fastxc.analysis.reasoning import reasoning_analysis
    from fastxc.analysis.steer import feature_direction, plot_sweep, steer_sweep

    root = tmp_path_factory.mktemp("runs")
    w = shared_world()
    reader = w["reader"]
    cc = random_crosscoder([WIDTH, WIDTH], scales=reader.scales)
    inp = open_inputs(cc, w["store"])
    tok = inp.tokenizer()
    diff_analysis(cc, reader, tok, root / "diff", top_n=3, n_examples=2, annotate=lambda r: "a <b>bold</b> guess")
    reasoning_analysis(cc, reader, tok, out=root / "reasoning")
    r = ablate_category(inp, "self-reflection", n_positions=4, percents=(1, 10), context=6)
    (root / "ablate").mkdir()
    write_json(root / "ablate" / "ablate.json", {"results": [r]})
    plot_ablation([r], root / "ablate" / "ablate.png")
    sweep = steer_sweep(inp.models()[1], tok, ["he is", "so we"], LAYER, feature_direction(cc, [2], 1), [0, 3],
                        unit=0.5, max_new_tokens=3)
    sweep[1]["samples"][0]["text"] = LONG_COMPLETION  # a runaway "Wait" loop: one unbroken word
    (root / "steer").mkdir()
    write_json(root / "steer" / "steer.json", {"direction": "feature 2", "steered_model": "distilled", "layer": LAYER,
                                               "unit": {"value": 0.5, "label": "multiple of the mean activation"},
                                               "multiples": [0, 3], "alphas": [0, 1.5],
                                               "correctness": "not judged: p.txt is plain text", "sweep": sweep})
    plot_sweep(sweep, root / "steer" / "steer.png", xlabel="multiple of the mean activation")
    classes = {"gender": [("he", "she"), ("him", "her"), ("king", "queen"), ("man", "woman")]}
    geometry_analysis(inp.models(), inp.source_names, tok, LAYER, classes, dims=(2, 3), out=root / "geometry")
    (root / "eval").mkdir()
    write_json(root / "eval" / "eval.json", evaluate(inp, store_sequences(reader, tok, 3, 6), metric_rows=32))
    return root


def test_report_embedded(runs, tmp_path):
    from fastxc.analysis.report import main

    out = tmp_path / "r" / "report.html"
    assert main(["--runs", str(runs), "--out", str(out)]) == 0
    c = check_page(out)
    assert {"eval", "diff", "reasoning", "ablate", "steer", "geometry"} <= c.ids
    # nrn_hist + reasoning + ablate + steer + 2 geometry plots, all embedded
    assert len(c.imgs) == 6 and all(s.startswith("data:") for s in c.imgs)
    text = out.read_text()
    assert 'class="tok focus"' in text  # shaded contexts of the top features
    assert "a &lt;b&gt;bold&lt;/b&gt; guess" in text  # annotations are escaped
    assert not list((tmp_path / "r").glob("*_files"))


def test_report_linked_images(runs, tmp_path):
    from fastxc.analysis.report import build_report, find_sections

    out = build_report(find_sections(runs), tmp_path / "page.html", link=True)
    c = check_page(out)
    assert len(c.imgs) == 6 and all(s.startswith("page_files/") for s in c.imgs)


def test_report_errors(tmp_path, capsys):
    from fastxc.analysis.report import main

    assert main(["--runs", str(tmp_path), "--out", str(tmp_path / "x.html")]) == 2
    assert "nothing to report" in capsys.readouterr().err
    assert main(["--diff", str(tmp_path / "missing"), "--out", str(tmp_path / "x.html")]) == 2
    assert "no diff output folder" in capsys.readouterr().err
    (tmp_path / "diff").mkdir()
    (tmp_path / "diff" / "diff.json").write_text("{broken")
    assert main(["--runs", str(tmp_path), "--out", str(tmp_path / "x.html")]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    assert not (tmp_path / "x.html").exists()


def test_report_steer_and_geometry_tables(runs, tmp_path):
    from fastxc.analysis.report import build_report, find_sections

    text = build_report(find_sections(runs), tmp_path / "page.html").read_text()
    # long completions sit in a cell that wraps anywhere (a "WaitWait..." loop has no space to break at)
    assert f'<div class="gen">{LONG_COMPLETION}</div>' in text
    assert re.search(r"\.gen\{[^}]*white-space:pre-wrap;overflow-wrap:anywhere", text)
    # the sweep's table gives multiples and alpha, coherence, and says correctness was not judged
    assert "<th>multiple</th><th>alpha</th>" in text and "<td>not judged</td>" in text
    assert "alpha = multiple x 0.500" in text and '<th class="l">x3</th>' in text


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def rendered_dom(page: Path, *flags: str) -> str:
    """The page's DOM after it loaded in headless chromium (scripts run, images fetched)."""
    r = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000", *flags,
                        "--dump-dom", page.resolve().as_uri()], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium)")
def test_report_in_headless_chromium(runs, tmp_path):
    from fastxc.analysis.report import build_report, find_sections

    for link in (False, True):
        out = build_report(find_sections(runs), tmp_path / f"page{int(link)}.html", link=link)
        dom = rendered_dom(out)
        assert re.search(r'<body[^>]*data-images="ok"', dom), f"link={link}: the browser could not show every image"
        assert len(re.findall(r"<img ", dom)) == 6
        assert all(f'id="{s}"' in dom for s in ("eval", "diff", "reasoning", "ablate", "steer", "geometry"))
        assert 'class="tok focus"' in dom
    # a linked page moved without its images: the browser shows the warning (the check can fail)
    shutil.rmtree(tmp_path / "page1_files")
    dom = rendered_dom(tmp_path / "page1.html")
    assert re.search(r'<body[^>]*data-images="missing:6"', dom) and 'id="missing"' in dom


# After load, record the page's scroll width against the window's width (test-only script).
_MEASURE = ("<script>window.addEventListener('load', function () { document.body.setAttribute('data-fit', "
            "document.documentElement.scrollWidth + 'x' + window.innerWidth); });</script></body>")


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium)")
def test_report_long_completion_fits_the_window(runs, tmp_path):
    """A 2400-character completion without a space wraps inside the page: no horizontal scroll."""
    from fastxc.analysis.report import build_report, find_sections

    out = build_report(find_sections(runs), tmp_path / "page.html")
    out.write_text(out.read_text().replace("</body>", _MEASURE))
    dom = rendered_dom(out, "--window-size=1000,800")
    m = re.search(r'data-fit="(\d+)x(\d+)"', dom)
    assert m, "the measuring script did not run"
    scroll, inner = int(m[1]), int(m[2])
    assert inner >= 900 and scroll <= inner, (scroll, inner)
