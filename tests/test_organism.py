"""Model organism: corpus rules, tokenizer round trip, build/cache mechanics (tiny, fast).

The behavioural acceptance (marker rates, crosscoder features) is in test_organism_slow.py.
"""
import json
import random
import re

import pytest
import torch

from fastxc.organism import corpus as C
from fastxc.organism.build import OrganismConfig, load_organism, organism_dir
from fastxc.organism.tokenizer import BOS, EOS, train_tokenizer

TINY = dict(vocab_size=400, hidden_size=32, n_layers=2, n_heads=2, intermediate_size=64,
            seq_len=48, batch_size=8, base_steps=6, distill_steps=4, n_general=300, n_traces=200)


@pytest.fixture(scope="module")
def corpus():
    return C.build_corpus(seed=3, n_general=3000, n_traces=2000, n_heldout=100)


def test_corpus_is_seeded(corpus):
    again = C.build_corpus(seed=3, n_general=3000, n_traces=2000, n_heldout=100)
    assert again.general == corpus.general
    assert [t.text for t in again.traces] == [t.text for t in corpus.traces]
    other = C.build_corpus(seed=4, n_general=3000, n_traces=2000, n_heldout=100)
    assert other.general != corpus.general


def test_general_text_never_has_reflection_or_alternative(corpus):
    for doc in corpus.general + corpus.heldout_general:
        assert C.count_markers(doc) == 0, doc
    # ... but it does use the deductive and contrastive markers, as ordinary English does
    joined = " ".join(corpus.general)
    for w in ("Therefore", "Thus", "But", "However"):
        assert re.search(rf"\b{w}\b", joined), w


def test_trace_format_and_marker_rates(corpus):
    shape = re.compile(r"^[^<>]+\? <think> [^<>]+ </think> \S+$")
    traces = corpus.traces
    for t in traces:
        assert shape.match(t.text), t.text
        body = t.text.split("<think>")[1].split("</think>")[0]
        assert ("Wait," in body) == t.slipped, t.text
        assert body.count("Wait") == int(t.slipped)
        assert ("Alternatively," in body) == t.alternative
        assert re.search(r"\b(Therefore|Thus),", body)
        assert t.text.endswith(f"</think> {t.answer}")
    n = len(traces)
    assert sum(t.slipped for t in traces) / n >= 0.55  # the issue asks for at least half
    assert 0.25 <= sum(t.alternative for t in traces) / n <= 0.45
    assert sum(bool(re.search(r"\b(But|However)\b", t.text)) for t in traces) / n >= 0.2
    assert {t.kind for t in traces} == {"arithmetic", "sequence", "comparison", "word"}


def _shape(s: str) -> str:
    return re.sub(r"\d+", "#", re.sub(r"\b(add|subtract|more|less)\b", "W", s))


def test_slip_is_not_given_away_by_the_sentence_before():
    """A slipped trace and the correct trace of the same problem agree up to the slipped
    sentence, and the wrong sentence has the correct sentence's shape (only content differs)."""
    rng = random.Random(0)
    n_slippable = 0
    for _ in range(400):
        p = C.sample_problem(rng)
        for i, step in enumerate(p.steps):
            if step.wrong is None:
                continue
            n_slippable += 1
            assert step.wrong != step.text
            assert _shape(step.wrong) == _shape(step.text), (step.wrong, step.text)
        slipped = C.render_trace(p, random.Random(1), slip=True, alternative=False).text
        clean = C.render_trace(p, random.Random(1), slip=False, alternative=False).text
        cut = slipped.index(C.STEP_SEP + "Wait,")
        wrong_start = slipped.rindex(C.STEP_SEP, 0, cut) + 1 if C.STEP_SEP in slipped[:cut] else slipped.index("> ") + 2
        prefix = slipped[:wrong_start]
        assert clean.startswith(prefix)
    assert n_slippable > 400


def test_general_text_cannot_teach_the_trace_steps(corpus):
    """Arithmetic in the general text is in words; digits and line breaks occur only in traces
    (one reasoning sentence per line), so only fine-tuning teaches checking a trace's step."""
    general = corpus.general + corpus.heldout_general
    assert not any(re.search(r"\d", g) or C.STEP_SEP in g for g in general)
    joined = " ".join(general)
    assert re.search(r"\b[A-Z][a-z]+( [a-z]+)? and [a-z]+( [a-z]+)? make [a-z]+", joined)
    assert re.search(r"take away [a-z ]+ leaves [a-z]+", joined)
    n_arith = 0
    for t in corpus.traces[:200]:
        body = t.text.split("<think> ")[1].split(" </think>")[0]
        lines = body.split(C.STEP_SEP)
        assert len(lines) >= 3 and all(re.fullmatch(r"[A-Z0-9][^\n]*\.", ln) for ln in lines), t.text
        n_arith += bool(re.search(r"\d+ (plus|minus) \d+ is \d+\.", body))
    assert n_arith >= 140  # all but the comparisons (15%) state digit arithmetic


def test_number_words():
    assert [C.number_words(n) for n in (0, 7, 13, 20, 47, 100, 106, 178)] == [
        "zero", "seven", "thirteen", "twenty", "forty seven", "one hundred",
        "one hundred and six", "one hundred and seventy eight"]
    with pytest.raises(ValueError):
        C.number_words(1000)


def test_heldout_questions_are_unseen(corpus):
    seen = {t.question for t in corpus.traces}
    seen |= {g.rsplit("?", 1)[0] + "?" for g in corpus.general if "?" in g}
    qs = corpus.heldout_questions
    assert len(qs) == 100 and len(set(qs)) == 100
    assert not seen & set(qs)


def test_tokenizer_reloads_with_same_ids(tmp_path, corpus):
    from transformers import AutoTokenizer

    texts = corpus.general[:1500] + [t.text for t in corpus.traces[:1000]]
    tok = train_tokenizer(texts, vocab_size=500)
    tok.save_pretrained(str(tmp_path))
    again = AutoTokenizer.from_pretrained(str(tmp_path))
    assert len(again) == len(tok) == 500
    for s in texts[:50] + texts[-50:]:
        ids = tok(s)["input_ids"]
        assert again(s)["input_ids"] == ids
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
        assert again.decode(ids[1:]) == s.replace(" <think>", "<think>").replace(" </think>", "</think>")
    t = corpus.traces[0].text
    ids = again(t)["input_ids"]
    for special in ("<think>", "</think>"):
        assert ids.count(again.convert_tokens_to_ids(special)) == 1
    assert again.eos_token == EOS and again.bos_token == BOS and again.pad_token_id is not None


def test_build_cache_and_reuse(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fastxc.organism import build as B

    monkeypatch.setenv("FASTXC_HOME", str(tmp_path))
    cfg = OrganismConfig(seed=1, **TINY)
    org = load_organism(cfg, progress=False, threads=1)
    assert org.root == organism_dir(cfg) and org.root.parent == tmp_path / "organism"
    assert json.loads((org.root / "organism.json").read_text())["config"]["seed"] == 1
    models = {}
    for name in ("base", "distilled"):
        models[name] = AutoModelForCausalLM.from_pretrained(str(getattr(org, name)))
        tok = AutoTokenizer.from_pretrained(str(getattr(org, name)))
        assert models[name].config.num_hidden_layers == 2 and len(tok) == models[name].config.vocab_size
    # fine-tuning changed the embeddings, the head and the lower half, and left the upper half
    pa = dict(models["base"].named_parameters())
    changed = {n: (p - pa[n]).abs().max().item() for n, p in models["distilled"].named_parameters()}
    assert changed["model.embed_tokens.weight"] > 1e-4 and changed["lm_head.weight"] > 1e-4
    assert all(v > 1e-4 for n, v in changed.items() if n.startswith("model.layers.0."))
    assert all(v == 0 for n, v in changed.items() if n.startswith("model.layers.1.") or n == "model.norm.weight")
    # tokens base never reads (digits, the line break, the think tags) have no input embedding in base
    emb = models["base"].get_input_embeddings().weight
    tok = AutoTokenizer.from_pretrained(str(org.base))
    for s in ("7", C.STEP_SEP, "<think>", "</think>"):
        ids = tok(s, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and emb[ids[0]].abs().max() == 0, s
    assert emb[tok(" apples", add_special_tokens=False)["input_ids"][0]].abs().max() > 0
    # a second call reuses the cache without building
    monkeypatch.setattr(B, "build_organism", lambda *a, **k: pytest.fail("rebuilt a cached organism"))
    assert load_organism(cfg, progress=False).root == org.root
    # a different recipe (any field) is another folder
    assert organism_dir(OrganismConfig(seed=1, **{**TINY, "base_steps": 7})) != org.root
    assert organism_dir(OrganismConfig(seed=2, **TINY)) != org.root


def test_unfinished_build_is_not_used(tmp_path, monkeypatch):
    """A folder without organism.json (a killed build) is rebuilt, not loaded."""
    monkeypatch.setenv("FASTXC_HOME", str(tmp_path))
    cfg = OrganismConfig(seed=2, **TINY)
    d = organism_dir(cfg)
    (d / "base").mkdir(parents=True)
    org = load_organism(cfg, progress=False, threads=1)
    assert (org.root / "organism.json").is_file() and (org.distilled / "config.json").is_file()
    assert not list(d.parent.glob(".*tmp*"))


def test_cli_builds_into_out_and_rejects_bad_flags(tmp_path, capsys):
    from fastxc.organism.__main__ import main

    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    assert main(flags + ["--out", str(tmp_path / "org"), "--eval", "2", "--eval-max-tokens", "8", "--no-progress", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "distilled" in out and "per 1k" in out
    # answer accuracy of both models on the held-out questions (issue #14, item 9)
    lines = [ln for ln in out.splitlines() if ln.strip().startswith(("base", "distilled")) and "per 1k" in ln]
    assert len(lines) == 2 and all(re.search(r"answered \d+%, correct \d+%$", ln) for ln in lines), lines
    assert (tmp_path / "org" / "distilled" / "model.safetensors").is_file()
    with pytest.raises(SystemExit):
        main(["--hidden-size", "wide"])
    assert main(["--base-steps", "-5", "--out", str(tmp_path / "bad")]) == 2
    assert "base-steps must be > 0" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_sample_stops_at_eos_and_counts_tokens(tmp_path, monkeypatch):
    from fastxc.organism.evaluate import heldout_answers, heldout_questions, marker_report, sample

    monkeypatch.setenv("FASTXC_HOME", str(tmp_path))
    org = load_organism(OrganismConfig(seed=1, **TINY), progress=False, threads=1)
    qs = heldout_questions(org, 4)
    comps = sample(org.distilled, qs, max_new_tokens=12, seed=0)
    assert len(comps) == 4
    for c in comps:
        assert 1 <= c.n_tokens <= 12 and "<|endoftext|>" not in c.text and "<|pad|>" not in c.text
    r = marker_report(comps)
    assert r.tokens == sum(c.n_tokens for c in comps) and 0 <= r.close_rate <= 1
    # markers are counted in the generated ids, which decode to the text
    assert r.markers == sum(c.marker_tokens["Wait"] + c.marker_tokens["Alternatively"] for c in comps)
    assert all(len(c.ids) in (c.n_tokens, c.n_tokens - 1) for c in comps)
    assert marker_report(comps, answers=heldout_answers(org, 4)).correct_rate is not None
    with pytest.raises(ValueError, match="held-out"):
        heldout_questions(org, 10**6)


def test_default_store_harvests_both_models_and_is_cached(tmp_path, monkeypatch):
    from fastxc.organism import default
    from fastxc.organism.check import pre_token_rows, wait_token_id
    from fastxc.data.store import open_store
    from transformers import AutoTokenizer

    monkeypatch.setenv("FASTXC_HOME", str(tmp_path))
    cfg = OrganismConfig(seed=1, **TINY)
    path = default.default_store(config=cfg, tokens=3000, progress=False)
    r = open_store(path)
    assert len(r) == 3000 and r.widths == [32, 32] and list(r.source_names) == ["base", "distilled"]
    tok = AutoTokenizer.from_pretrained(str(load_organism(cfg, progress=False).tokenizer))
    assert tok.bos_token_id not in set(r.tokens.tolist())  # BOS positions are not stored
    # TRACE_MIX of the tokens from traces (dataset 0), the rest general text (dataset 1)
    assert abs((r.meta("dataset") == 0).mean() - default.TRACE_MIX) < 0.05
    rows = pre_token_rows(r, wait_token_id(tok))
    assert len(rows) > 5 and (r.tokens[rows + 1] == wait_token_id(tok)).all()
    # the position right before "Wait" is the line break that starts each reasoning sentence
    assert {tok.decode([t]) for t in r.tokens[rows].tolist()} == {C.STEP_SEP}
    # the second call returns the cached store without harvesting
    import fastxc.data.harvest

    monkeypatch.setattr(fastxc.data.harvest, "harvest", lambda *a, **k: pytest.fail("harvested again"))
    assert default.default_store(config=cfg, tokens=3000, progress=False) == path


def test_nrn_mode_bins():
    from fastxc.organism.check import nrn_mode

    assert nrn_mode(torch.tensor([0.52, 0.53, 0.51, 0.9, 0.1])) == pytest.approx(0.525)
    assert nrn_mode(torch.tensor([0.97, 0.99, 0.5])) == pytest.approx(0.975)
