"""The study's stages: organism, store, crosscoders, analyses, stability, study.json.

Every analysis runs through its own command's ``main(argv)`` with the command's defaults (the
protocol the README quotes), so ``study.json`` holds what a user gets by running the commands
by hand; the study then reads their JSON outputs back and gathers the numbers.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

from fastxc.organism.build import file_sha256

# The study's acceptance (issue 14), evaluated per crosscoder run (study.json "acceptance"):
ACCEPTANCE = {
    "ablation": 'ablating the NRN > 0.5 features active before "Wait" drops distilled\'s "Wait" '
                "logit by at least 3x the size of base's change",
    "wait_feature": 'the feature most active right before "Wait" fires at >= 80% of those positions '
                    "and its NRN is in the top 5% of live features",
    "steer_picks_wait_feature": "steer --feature auto:self-reflection picks that feature",
    "steering": 'at <= 4x its mean activation, "Wait" tokens per generated token >= 3x unsteered '
                "with </think> closed on >= 50% of questions",
}
ABLATION_RATIO = 3.0
WAIT_FIRE_RATE = 0.8
WAIT_NRN_QUANTILE = 0.95
STEER_MAX_MULTIPLE = 4.0
STEER_RATE_RATIO = 3.0
STEER_MIN_CLOSED = 0.5
WAIT_CATEGORY = "self-reflection"
SEED003_MULTIPLES = "0,1,2,4"  # the seed-003 experiment: multiples of base's difference of means
SEED003_CONTROLS = 3  # matched-norm random directions per steered model
SEED003_RATIO = 2.0
RELU_FLAGS = ("--activation", "relu")  # the seed study's crosscoder: ReLU + decoder-norm-weighted L1
NRN_SET = "nrn>0.5"
ORGANISM_KEY_FILE = "organism-key"  # the cache key of the organism a study folder was made from


class StudyError(RuntimeError):
    """A stage failed (its command's own error line was printed above)."""


@dataclasses.dataclass
class StudyConfig:
    out: Path
    organism_seed: int = 0
    crosscoder_seeds: tuple[int, ...] = (0, 1, 2)
    n_questions: int = 50  # held-out questions for the organism's own evaluation
    max_new_tokens: int = 160
    progress: bool = True
    analyses: tuple[str, ...] = ("eval", "diff", "reasoning", "ablate", "steer")
    compare_relu: bool = True  # also the seed study's ReLU + decoder-norm L1 crosscoder (first seed)
    seed003: bool = True  # base's difference-of-means direction steering both models, with controls
    k: int | None = None  # the TopK crosscoders' k (None: fastxc train's default)
    distill_steps: int | None = None  # the organism's fine-tuning steps (None: the organism's default)


# ------------------------------------------------------------------------------ hashes
def tree_sha256(folder: str | Path) -> str:
    """One sha256 over every file under ``folder``: relative path and content, in path order.

    Equal for two folders exactly when they hold the same files with the same bytes.
    """
    root = Path(folder)
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        h.update(p.relative_to(root).as_posix().encode() + b"\0" + file_sha256(p).encode() + b"\n")
    return h.hexdigest()


# ------------------------------------------------------------------------------ stages
def _say(msg: str) -> None:
    print(f"study: {msg}", flush=True)


def _command(main: Callable[[list[str]], int], argv: list[str], what: str) -> None:
    rc = main(argv)
    if rc:
        raise StudyError(f"{what} failed (exit {rc}): {' '.join(shlex.quote(a) for a in argv)}")


def _read(path: Path) -> dict:
    return json.loads(path.read_text())


def organism_config(cfg: StudyConfig):
    """The ``OrganismConfig`` a study runs on: the default one of its seed, with its overrides."""
    from fastxc.organism.build import OrganismConfig

    extra = {} if cfg.distill_steps is None else {"distill_steps": cfg.distill_steps}
    return OrganismConfig(seed=cfg.organism_seed, **extra)


def _organism_stage(cfg: StudyConfig, ocfg):
    """The built (or cached) organism of ``ocfg`` and its stage record for study.json."""
    from fastxc.organism.build import load_organism, reproduces

    org = load_organism(ocfg, progress=cfg.progress)
    stage = {"key": ocfg.key(), "path": str(org.root), "sha256": org.info.get("sha256"),
             "reproduces_recorded": reproduces(org)}
    return org, stage


def _organism_eval(cfg: StudyConfig, org, out: Path) -> dict:
    """Markers, coherence and answer accuracy of both organism models (``fastxc organism --eval``)."""
    path = out / "organism_eval.json"
    if path.is_file():
        return _read(path)
    from fastxc.analysis.inputs import write_json
    from fastxc.organism.evaluate import heldout_answers, heldout_questions, marker_report, sample, wait_detection

    qs, answers = heldout_questions(org, cfg.n_questions), heldout_answers(org, cfg.n_questions)
    res = {"n_questions": len(qs), "max_new_tokens": cfg.max_new_tokens, "temperature": 0.7}
    for name in ("base", "distilled"):
        r = marker_report(sample(getattr(org, name), qs, seed=cfg.organism_seed,
                                 max_new_tokens=cfg.max_new_tokens), answers=answers)
        res[name] = dataclasses.asdict(r)
    # teacher-forced on the held-out traces: P("Wait") after a slipped step vs a correct one
    with open(org.root / "corpus" / "heldout_traces.jsonl") as f:
        texts = [json.loads(line)["text"] for line in f]
    for name in ("base", "distilled"):
        after_slip, after_correct = wait_detection(getattr(org, name), texts)
        res[name]["p_wait_after_slip"], res[name]["p_wait_after_correct"] = after_slip, after_correct
    write_json(path, res)
    return res


def _train(store: Path, run: Path, seed: int, progress: bool, flags: Sequence[str] = (),
           k: int | None = None) -> None:
    """The default crosscoder config (with ``flags``; ``k``: a TopK run's k other than the
    default) on ``store`` into ``run`` (resumed if a checkpoint is there)."""
    from fastxc.train import main as train_main

    if k is not None:
        flags = (*flags, "--k", str(k))
    if (run / "summary.json").is_file() and (run / "crosscoder" / "model.safetensors").is_file():
        if k is not None:  # a finished run of another k is not this study's crosscoder
            have = json.loads((run / "crosscoder" / "config.json").read_text()).get("k")
            if have != k:
                raise StudyError(f"{run} holds a crosscoder with k {have}, not {k}: choose another --out")
        return
    argv = ["--store", str(store), "--out", str(run), "--seed", str(seed), "--resume-if-exists", *flags]
    _command(train_main, argv + ([] if progress else ["--no-progress"]), f"training crosscoder seed {seed}")


def _analyses(cfg: StudyConfig, cc: Path, store: Path, questions: Path, an: Path, geometry: bool,
              only: Sequence[str] | None = None) -> None:
    from fastxc.analysis import ablate, diff, evaluate, geometry as geom, reasoning, steer

    common = ["--crosscoder", str(cc), "--store", str(store)]
    jobs = {
        "eval": (evaluate.main, []),
        "diff": (diff.main, ["--latent-scaling"]),
        "reasoning": (reasoning.main, []),
        "ablate": (ablate.main, []),
        "steer": (steer.main, ["--prompts", str(questions), "--suffix", " <think>",
                               "--feature", f"auto:{WAIT_CATEGORY}", "--max-new-tokens", str(cfg.max_new_tokens)]),
    }
    if geometry:
        jobs["geometry"] = (geom.main, [])
    for name, (main, extra) in jobs.items():
        if name != "geometry" and name not in (cfg.analyses if only is None else only):
            continue
        out = an / name
        if (out / f"{name}.json").is_file():
            continue
        t0 = time.perf_counter()
        _command(main, common + extra + ["--out", str(out)], name)
        _say(f"  {name} ({time.perf_counter() - t0:.0f} s)")


# ------------------------------------------------------------------------------ figures
def _wait_feature(cc_dir: Path, store: Path, tokenizer: Path) -> dict:
    from transformers import AutoTokenizer

    from fastxc.core.crosscoder import Crosscoder
    from fastxc.data.store import open_store
    from fastxc.organism.check import wait_feature_report, wait_token_id

    tok = AutoTokenizer.from_pretrained(str(tokenizer))
    rep = wait_feature_report(Crosscoder.load(cc_dir), open_store(store), wait_token_id(tok))
    return dataclasses.asdict(rep)


def _steer_figures(steer: dict) -> dict:
    sweep = steer["sweep"]
    base = next(s for s in sweep if s["multiple"] == 0)
    r0 = base["rate"][WAIT_CATEGORY]
    rows = [{"multiple": s["multiple"], "alpha": s["alpha"], "wait_rate": s["rate"][WAIT_CATEGORY],
             "wait_rate_text": s["text_rate"][WAIT_CATEGORY],
             "ratio": (s["rate"][WAIT_CATEGORY] / r0) if r0 > 0 else None,
             "mean_think_tokens": s["mean_think_tokens"], **s["coherence"]} for s in sweep]
    return {"direction": steer["direction"], "unit": steer["unit"], "rows": rows}


def _ablation_figures(ablate: dict) -> dict:
    res = next(r for r in ablate["results"] if r["category"] == WAIT_CATEGORY)
    s = res["sets"][NRN_SET]
    return {"n_features": s["n_features"], "clean_logit": res["clean_logit"], "delta": s["delta"],
            "delta_sem": s["delta_sem"], "sources": res["sources"],
            "top_sets": {k: {"n_features": v["n_features"], "delta": v["delta"]}
                         for k, v in res["sets"].items() if k != NRN_SET}}


def _run_figures(run: Path, store: Path, tokenizer: Path) -> dict:
    an = run / "analysis"
    fig: dict = {"crosscoder_sha256": file_sha256(run / "crosscoder" / "model.safetensors"),
                 "train_summary": _read(run / "summary.json")}
    if (an / "eval" / "eval.json").is_file():
        ev = _read(an / "eval" / "eval.json")
        fig["eval"] = {k: ev[k] for k in ("sources", "frac_recovered", "clean", "spliced", "zero", "n_tokens")
                       if k in ev}
        fig["eval"]["store"] = ev.get("store")
    if (an / "diff" / "diff.json").is_file():
        d = _read(an / "diff" / "diff.json")
        fig["diff"] = {k: d.get(k) for k in ("n_features", "live_features", "nrn_mean", "classes",
                                               "nrn_histogram_20", "latent_scaling")}
    if (an / "reasoning" / "reasoning.json").is_file():
        r = _read(an / "reasoning" / "reasoning.json")
        fig["reasoning"] = {c: {"n_positions": v.get("n_positions"), "top_active": v.get("active", [])[:10]}
                            for c, v in r["categories"].items()}
    if (an / "ablate" / "ablate.json").is_file():
        fig["ablate"] = _ablation_figures(_read(an / "ablate" / "ablate.json"))
    if (an / "steer" / "steer.json").is_file():
        fig["steer"] = _steer_figures(_read(an / "steer" / "steer.json"))
    fig["wait_feature"] = _wait_feature(run / "crosscoder", store, tokenizer)
    return fig


def plot_nrn_comparison(hists: dict[str, list[int]], path: Path) -> None:
    """NRN histograms (20 bins over [0, 1], live features) of several crosscoders on one plot."""
    from fastxc.analysis.inputs import pyplot, savefig

    fig, ax = pyplot().subplots(figsize=(7, 4))
    centres = [0.025 + 0.05 * i for i in range(20)]
    for label, h in hists.items():
        ax.step(centres, [max(c, 0.5) for c in h], where="mid", label=label)
    ax.set(xlabel="NRN = distilled / (base + distilled) decoder norm", ylabel="live features (log)",
           yscale="log", xlim=(0, 1))
    ax.legend(fontsize=8)
    savefig(fig, path, title="NRN histograms: TopK vs ReLU + L1 (spikes at 0 and 1: L1 artefacts?)")


def _seed003(cfg: StudyConfig, cc: Path, store: Path, questions: Path, out: Path) -> dict:
    """Seed 003's experiment: base's difference-of-means direction before "Wait" (base's
    activations, no crosscoder feature) added to distilled and to base, each beside
    ``SEED003_CONTROLS`` random directions of the same norm. Returns per model the rows of
    ``steer``'s control summary, or the error that stopped it (e.g. an empty direction)."""
    import contextlib
    import io

    from fastxc.analysis import steer

    res: dict = {"direction": f"difference of means before {WAIT_CATEGORY} markers in base",
                 "multiples": SEED003_MULTIPLES, "controls": SEED003_CONTROLS}
    for model in ("b", "a"):  # distilled, then base
        name = "distilled" if model == "b" else "base"
        dest = out / f"steer-{name}"
        if not (dest / "steer.json").is_file():
            err = io.StringIO()
            argv = ["--crosscoder", str(cc), "--store", str(store), "--prompts", str(questions),
                    "--suffix", " <think>", "--diff-means", WAIT_CATEGORY, "--direction-from", "a",
                    "--steer", model, "--multiples", SEED003_MULTIPLES, "--random-controls", str(SEED003_CONTROLS),
                    "--max-new-tokens", str(cfg.max_new_tokens), "--out", str(dest)]
            with contextlib.redirect_stderr(err):
                rc = steer.main(argv)
            if rc:
                res[name] = {"error": err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else f"exit {rc}"}
                _say(f"  seed 003, steering {name}: {res[name]['error']}")
                continue
        got = _read(dest / "steer.json")
        res[name] = {"unit": got["unit"], "summary": [
            {"multiple": r["multiple"], "wait_rate": r["rate"][WAIT_CATEGORY],
             "controls_wait_rate": r["controls_rate"][WAIT_CATEGORY],
             "over_controls": r["over_controls"][WAIT_CATEGORY]} for r in got["controls"]["summary"]]}
    return res


def seed003_holds(res: dict) -> bool | None:
    """Base's direction raises "Wait" in distilled >= SEED003_RATIO x more than the random
    directions do at some multiple <= 4, while in base at that multiple it raises it no more than
    they do (None: the experiment could not run)."""
    if "summary" not in res.get("distilled", {}) or "summary" not in res.get("base", {}):
        return None
    base = {r["multiple"]: r for r in res["base"]["summary"]}
    for r in res["distilled"]["summary"]:
        b = base.get(r["multiple"])
        if 0 < r["multiple"] <= STEER_MAX_MULTIPLE and b is not None and r["over_controls"] is not None \
                and r["over_controls"] >= SEED003_RATIO and b["wait_rate"] <= b["controls_wait_rate"]:
            return True
    return False


def acceptance(fig: dict) -> dict[str, bool | None]:
    """The study's yes/no checks (``ACCEPTANCE``) for one crosscoder run (None: not measured)."""
    out: dict[str, bool | None] = dict.fromkeys(ACCEPTANCE)
    if "ablate" in fig:
        d_base, d_dist = fig["ablate"]["delta"]
        out["ablation"] = -d_dist >= ABLATION_RATIO * abs(d_base)
    w = fig["wait_feature"]
    out["wait_feature"] = w["fire_rate"] >= WAIT_FIRE_RATE and w["nrn_quantile"] >= WAIT_NRN_QUANTILE
    if "steer" in fig:
        feats = fig["steer"]["direction"]
        out["steer_picks_wait_feature"] = feats == f"features [{w['feature']}] of distilled"
        out["steering"] = any(
            0 < r["multiple"] <= STEER_MAX_MULTIPLE and r["ratio"] is not None
            and r["ratio"] >= STEER_RATE_RATIO and r["closed"] >= STEER_MIN_CLOSED
            for r in fig["steer"]["rows"])
    return out


# ------------------------------------------------------------------------------ the study
def run_study(cfg: StudyConfig, argv: Sequence[str] | None = None) -> dict:
    """Run (or continue) the study into ``cfg.out``; returns the contents of study.json."""
    from fastxc.analysis import report as report_cmd
    from fastxc.analysis.inputs import write_json
    from fastxc.analysis.stability import plot_stability, stability, summary_lines
    from fastxc.core import numerics
    from fastxc.core.crosscoder import Crosscoder
    from fastxc.organism.default import default_store

    import torch

    import fastxc

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    _say(f"organism seed {cfg.organism_seed}, crosscoder seeds {list(cfg.crosscoder_seeds)} -> {out}")
    # Everything in --out is made from one organism: a study of another is refused, not mixed in.
    ocfg, key_file = organism_config(cfg), out / ORGANISM_KEY_FILE
    have = key_file.read_text().strip() if key_file.is_file() else None
    if have is not None and have != ocfg.key():
        raise StudyError(f"{out} holds a study of organism {have}, not {ocfg.key()}: choose another --out")
    if have is None:
        key_file.write_text(ocfg.key() + "\n")
    org, org_stage = _organism_stage(cfg, ocfg)
    _say(f"organism {org.root} (recorded weights: {org_stage['reproduces_recorded']})")
    store = default_store(progress=cfg.progress, config=ocfg)
    stages = {"organism": org_stage, "store": {"path": str(store), "sha256": tree_sha256(store)},
              "crosscoders": {}}
    _say(f"store {store}")
    org_eval = _organism_eval(cfg, org, out)
    questions = org.root / "corpus" / "heldout_traces.jsonl"

    runs: dict[str, dict] = {}
    for i, seed in enumerate(cfg.crosscoder_seeds):
        run = out / f"crosscoder-seed{seed}"
        t0 = time.perf_counter()
        _train(store, run, seed, cfg.progress, k=cfg.k)
        _say(f"crosscoder seed {seed} trained ({time.perf_counter() - t0:.0f} s); analyses:")
        _analyses(cfg, run / "crosscoder", store, questions, run / "analysis", geometry=i == 0)
        _command(report_cmd.main, ["--runs", str(run / "analysis"), "--out", str(run / "report.html")], "report")
        fig = _run_figures(run, store, org.tokenizer)
        fig["acceptance"] = acceptance(fig)
        stages["crosscoders"][str(seed)] = fig["crosscoder_sha256"]
        runs[str(seed)] = fig

    first = out / f"crosscoder-seed{cfg.crosscoder_seeds[0]}"
    (out / "report.html").write_bytes((first / "report.html").read_bytes())
    relu = None
    if cfg.compare_relu:
        seed = cfg.crosscoder_seeds[0]
        run = out / f"relu-l1-seed{seed}"
        _train(store, run, seed, cfg.progress, RELU_FLAGS)
        _say(f"ReLU + decoder-norm L1 crosscoder, seed {seed}; analyses:")
        _analyses(cfg, run / "crosscoder", store, questions, run / "analysis", geometry=False, only=("eval", "diff"))
        relu = _run_figures(run, store, org.tokenizer)
        relu["flags"] = list(RELU_FLAGS)
        stages["crosscoders"][f"relu-l1-{seed}"] = relu["crosscoder_sha256"]
        plot_nrn_comparison({f"TopK (default), seed {seed}": runs[str(seed)]["diff"]["nrn_histogram_20"],
                             f"ReLU + decoder-norm L1, seed {seed}": relu["diff"]["nrn_histogram_20"]},
                            out / "nrn_topk_vs_relu.png")
    geometry = _read(first / "analysis" / "geometry" / "geometry.json")

    seed003 = None
    if cfg.seed003:
        _say("seed 003: base's difference of means before \"Wait\", steering distilled and base, with controls")
        seed003 = _seed003(cfg, first / "crosscoder", store, questions, out / "seed003")
        seed003["holds"] = seed003_holds(seed003)

    stab = None
    if len(cfg.crosscoder_seeds) > 1:
        labels = [f"seed{s}" for s in cfg.crosscoder_seeds]
        ccs = [Crosscoder.load(out / f"crosscoder-seed{s}" / "crosscoder") for s in cfg.crosscoder_seeds]
        extra = [{k: bool(v) for k, v in runs[str(s)]["acceptance"].items() if v is not None}
                 for s in cfg.crosscoder_seeds]
        rep = stability(ccs, labels, extra_conclusions=extra)
        (out / "stability").mkdir(exist_ok=True)
        plot_stability(rep, out / "stability" / "stability.png")
        stab = {k: v for k, v in rep.items() if not k.startswith("_")}
        write_json(out / "stability" / "stability.json", stab)
        for line in summary_lines(rep):
            _say("  " + line)

    study = {
        "command": "python -m fastxc.study " + " ".join(shlex.quote(a) for a in (argv or [])),
        "fastxc_version": getattr(fastxc, "__version__", None),
        "torch_version": torch.__version__,
        "numerics_pinned": numerics.is_pinned(),
        "organism_seed": cfg.organism_seed,
        "crosscoder_seeds": list(cfg.crosscoder_seeds),
        "stages": stages,
        "organism": {"config": dataclasses.asdict(ocfg), "eval": org_eval},
        "runs": runs,
        "geometry": geometry,
        "stability": stab,
        "relu_l1": relu,
        "seed003": seed003,
        "acceptance": {"checks": ACCEPTANCE,
                       "holds": {k: sum(bool(r["acceptance"][k]) for r in runs.values()) for k in ACCEPTANCE},
                       "runs": len(runs)},
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    write_json(out / "study.json", study)
    for line in summary_lines_study(study):
        _say(line)
    _say(f"wrote {out / 'study.json'}, {out / 'report.html'}")
    return study


def summary_lines_study(study: dict) -> list[str]:
    """A few lines per crosscoder run: the figures the acceptance reads."""
    lines = []
    oe = study["organism"]["eval"]
    for name in ("base", "distilled"):
        r = oe[name]
        lines.append(f"organism {name}: {1000 * r['marker_rate']:.1f} markers per 1k tokens, </think> "
                     f"closed {100 * r['close_rate']:.0f}%, correct {100 * (r['correct_rate'] or 0):.0f}%; "
                     f"P(Wait) after a slip {r['p_wait_after_slip']:.3g}, after a correct step "
                     f"{r['p_wait_after_correct']:.3g}")
    for seed, r in study["runs"].items():
        w = r["wait_feature"]
        line = (f"crosscoder seed {seed}: pre-Wait feature #{w['feature']} fires {100 * w['fire_rate']:.1f}%, "
                f"NRN {w['nrn']:.3f} (above {100 * w['nrn_quantile']:.1f}%)")
        if "ablate" in r:
            a = r["ablate"]
            line += f"; ablation ({a['n_features']} features) base {a['delta'][0]:+.2f} distilled {a['delta'][1]:+.2f}"
        if "eval" in r:
            line += f"; loss recovered {', '.join(f'{x:.4f}' for x in r['eval']['frac_recovered'])}"
        lines.append(line)
        if "steer" in r:
            lines.append("  steering: " + ", ".join(
                f"x{row['multiple']:g} {row['ratio']:.1f}x closed {100 * row['closed']:.0f}%"
                for row in r["steer"]["rows"] if row["ratio"] is not None))
        lines.append("  acceptance: " + ", ".join(f"{k} {'yes' if v else 'no' if v is not None else '-'}"
                                                 for k, v in r["acceptance"].items()))
    s3 = study.get("seed003")
    if s3:
        for name in ("distilled", "base"):
            r = s3.get(name, {})
            if "error" in r:
                lines.append(f"seed 003, {name}: {r['error']}")
            elif "summary" in r:
                lines.append(f"seed 003, {name}: " + ", ".join(
                    f"x{row['multiple']:g} {row['wait_rate']:.4f} vs {row['controls_wait_rate']:.4f}/tok"
                    for row in r["summary"]))
        lines.append(f"seed 003 holds: {s3.get('holds')}")
    return lines
