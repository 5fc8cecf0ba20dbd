"""Harvesting from tiny Qwen2 / Llama models built from a config here (nothing downloaded)."""
import functools
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fastxc.data import harvest as H
from fastxc.data import store as S
from fastxc.data.harvest import HarvestError, harvest
from fastxc.data.models import decoder_layers
from fastxc.data.store import StoreError, open_store

WORDS_A = ("the cat sat on a mat and then it ran to the red house while a dog barked at birds "
           "near old trees").split()
WORDS_B = ("wait so two plus three is five therefore the answer is five but however we check "
           "again alternatively think step").split()


def build_tokenizer(path: Path, bos: bool = True, extra: tuple[str, ...] = ()):
    """A word-level tokenizer over WORDS_A + WORDS_B, saved as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>"] + (["<bos>"] if bos else [])
    vocab = {t: i for i, t in enumerate(specials + sorted(set(WORDS_A + WORDS_B)) + list(extra))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<bos>" if bos else None)
    fast.save_pretrained(str(path))
    return fast


def build_model(path: Path, arch: str, tok, hidden: int = 32, layers: int = 4, seed: int = 0,
                tok_kwargs: dict | None = None) -> Path:
    """A random tiny Llama or Qwen2 causal LM saved (with the tokenizer) to ``path``."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    kw = dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**kw))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**kw))
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


def model_pair(root):
    """Two tiny Llama models (seeds 1, 2) sharing one tokenizer under ``root``: {"a": dir, "b": dir}."""
    tok = build_tokenizer(root / "tok")
    return {"a": str(build_model(root / "a", "llama", tok, seed=1)),
            "b": str(build_model(root / "b", "llama", tok, seed=2))}


def write_jsonl(path: Path, words, n_docs: int, seed: int, field: str = "text") -> Path:
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for _ in range(n_docs):
            n = int(rng.integers(3, 40))
            f.write(json.dumps({field: " ".join(rng.choice(words, size=n)), "id": 1}) + "\n")
    return path


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """Tokenizers, tiny models and two jsonl datasets, built once for the module."""
    root = tmp_path_factory.mktemp("zoo")
    tok = build_tokenizer(root / "tok")
    tok_nobos = build_tokenizer(root / "tok_nobos", bos=False)
    z = {
        "root": root,
        "llama_a": build_model(root / "llama_a", "llama", tok, seed=1),
        "llama_b": build_model(root / "llama_b", "llama", tok, seed=2),
        "llama_wide": build_model(root / "llama_wide", "llama", tok, hidden=48, layers=6, seed=3),
        "qwen_a": build_model(root / "qwen_a", "qwen2", tok_nobos, seed=4),
        "qwen_b": build_model(root / "qwen_b", "qwen2", tok_nobos, seed=5),
        "ds_a": write_jsonl(root / "general.jsonl", WORDS_A, 60, seed=0),
        "ds_b": write_jsonl(root / "traces.jsonl", WORDS_B, 60, seed=1),
    }
    other = build_tokenizer(root / "tok_other", extra=("zebra",))
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # same size as tok, but ids 10 and 11 swapped: the error must name id 10
    v = tok.get_vocab()
    inv = {i: t for t, i in v.items()}
    inv[10], inv[11] = inv[11], inv[10]
    t2 = Tokenizer(models.WordLevel(vocab={t: i for i, t in inv.items()}, unk_token="<unk>"))
    t2.pre_tokenizer = pre_tokenizers.Whitespace()
    swapped = PreTrainedTokenizerFast(tokenizer_object=t2, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>")
    z["llama_swapped"] = build_model(root / "llama_swapped", "llama", swapped, seed=6)
    z["llama_bigger_vocab"] = build_model(root / "llama_bigger", "llama", other, seed=7)
    z["inv"] = inv
    return z


@functools.lru_cache(maxsize=8)
def _load(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()


def _hidden_states(model_dir: Path, ids: list[int], layer: int) -> torch.Tensor:
    m = _load(model_dir)
    with torch.no_grad():
        out = m(input_ids=torch.tensor([ids]), output_hidden_states=True)
    return out.hidden_states[layer][0]


# ------------------------------------------------------------------ stored == output_hidden_states
@pytest.mark.parametrize("arch", ["llama", "qwen"])
def test_activations_equal_hidden_states(tmp_path, zoo, arch):
    a, b = zoo[f"{arch}_a"], zoo[f"{arch}_b"]
    ctx = 16
    out = harvest([str(a), str(b)], tmp_path / "s", [str(zoo["ds_a"])], tokens=300, context_length=ctx,
                  batch_size=4, store_dtype="float32", progress=False, outlier_factor=0, shard_tokens=128)
    r = open_store(out)
    assert r.widths == [32, 32] and len(r) == 300 and len(r.manifest["shards"]) == 3
    assert [s["layer"] for s in r.manifest["sources"]] == [2, 2]  # half of 4 layers
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(a))
    has_bos = tok.bos_token_id is not None
    texts = [json.loads(l)["text"] for l in open(zoo["ds_a"])]
    x = r.read_rows(np.arange(len(r)), normalise=False)  # [N, 2, 32] raw activations
    # what training reads is x * scales; undoing the normalisation gives x back (to 1 ulp)
    undone = r.read_rows(np.arange(len(r))) / torch.from_numpy(r.scales)[None, :, None]
    torch.testing.assert_close(undone, x, rtol=2.4e-7, atol=0)
    doc, pos, toks = r.meta("doc"), r.meta("pos"), r.tokens
    step = ctx - has_bos
    checked = 0
    for d in np.unique(doc):
        if checked >= 60:
            break
        ids = tok(texts[d], add_special_tokens=False)["input_ids"]
        for c0 in range(0, len(ids), step):
            seq = ([tok.bos_token_id] if has_bos else []) + ids[c0:c0 + step]
            sel = np.nonzero((doc == d) & (pos >= c0) & (pos < c0 + step))[0]
            if not len(sel):
                continue
            for k, mdir in enumerate((a, b)):
                hs = _hidden_states(mdir, seq, 2)
                want = hs[pos[sel] - c0 + has_bos]
                # batched + padded forward vs this unpadded one: float32 summation order only
                torch.testing.assert_close(x[sel, k], want, rtol=1e-5, atol=1e-5)
            assert np.array_equal(toks[sel], np.asarray(ids)[pos[sel]])
            checked += len(sel)
    assert checked >= 60
    if has_bos:
        assert tok.bos_token_id not in set(toks.tolist())
    assert tok.pad_token_id not in set(toks.tolist())


def test_smoke_bf16_manifest(tmp_path, zoo):
    out = harvest([str(zoo["llama_a"]), str(zoo["llama_b"])], tmp_path / "s", [str(zoo["ds_a"])], tokens=200,
                  context_length=16, batch_size=4, progress=False, shard_tokens=64)
    r = open_store(out)
    m = r.manifest
    assert m["dtype"] == "bfloat16" and m["n_tokens"] == 200 and m["tokenizer"]["vocab_size"] > 10
    assert m["datasets"][0]["rows"] == 200 and m["seed"] == 0
    assert not (out / H.STATE).exists()
    r.validate(checksums=True)


# ------------------------------------------------------------------------------- sources and mix
def test_unequal_widths_and_default_layers(tmp_path, zoo):
    out = harvest([str(zoo["llama_a"]), str(zoo["llama_wide"])], tmp_path / "s", [str(zoo["ds_a"])], tokens=150,
                  context_length=16, batch_size=4, progress=False)
    r = open_store(out)
    assert r.widths == [32, 48]
    assert [s["layer"] for s in r.manifest["sources"]] == [2, 3]  # n_layers // 2 of each model
    assert [s["width"] for s in r.manifest["sources"]] == [32, 48]
    b = next(iter(r.batches(16, prefetch=0)))
    assert b.shape == (16, 80)
    x = r.read_rows(np.arange(len(r))).double()
    means = [x[:, :32].norm(dim=1).mean().item(), x[:, 32:].norm(dim=1).mean().item()]
    # the scales come from the norms of the values as stored (bf16-rounded), so normalised rows
    # have mean norm sqrt(d) up to float32 rounding: measured 2.7e-8 and 3.9e-8 relative
    np.testing.assert_allclose(means, [32 ** 0.5, 48 ** 0.5], rtol=1e-6)


def test_several_layers_of_one_model(tmp_path, zoo):
    out = harvest([str(zoo["llama_a"])], tmp_path / "s", [str(zoo["ds_a"])], tokens=40, layers=[3, 1],
                  context_length=16, batch_size=2, store_dtype="float32", progress=False, outlier_factor=0)
    r = open_store(out)
    assert [s["layer"] for s in r.manifest["sources"]] == [1, 3]
    assert r.source_names == ["llama_a@L1", "llama_a@L3"]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(zoo["llama_a"]))
    first = json.loads(open(zoo["ds_a"]).readline())["text"]
    ids = [tok.bos_token_id] + tok(first, add_special_tokens=False)["input_ids"][:15]
    sel = np.nonzero(r.meta("doc") == 0)[0]
    sel = sel[r.meta("pos")[sel] < 15]
    x = r.read_rows(sel, normalise=False)
    for k, layer in enumerate((1, 3)):
        want = _hidden_states(zoo["llama_a"], ids, layer)[r.meta("pos")[sel] + 1]
        torch.testing.assert_close(x[:, k], want, rtol=1e-5, atol=1e-5)


def test_forward_stops_after_deepest_layer(zoo):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(zoo["llama_wide"])).eval()
    layers = decoder_layers(m)
    assert len(layers) == 6
    ran = []
    hs = [l.register_forward_hook(lambda mod, a, o, i=i: ran.append(i)) for i, l in enumerate(layers)]
    head = m.lm_head.register_forward_hook(lambda *a: ran.append("head"))
    cap = H.LayerCapture(m, [2, 1])
    got = cap.run(torch.tensor([[3, 4, 5, 6]]), torch.ones(1, 4, dtype=torch.long))
    assert sorted(got) == [1, 2] and ran == [0, 1]  # layer 2 and everything above never ran
    cap.remove()
    ran.clear()
    m(input_ids=torch.tensor([[3, 4, 5, 6]]))
    assert ran == [0, 1, 2, 3, 4, 5, "head"]  # hooks removed: the full model runs again
    for h in hs + [head]:
        h.remove()
    with pytest.raises(HarvestError, match="layer 6 is out of range"):
        H.LayerCapture(m, [6])


def test_mixing_proportions(tmp_path, zoo):
    ctx = 16
    out = harvest([str(zoo["llama_a"]), str(zoo["llama_b"])], tmp_path / "s",
                  [f"{zoo['ds_a']}:0.3", f"{zoo['ds_b']}:0.7"], tokens=800, context_length=ctx, batch_size=4,
                  progress=False, outlier_factor=0)
    r = open_store(out)
    ds = r.meta("dataset")
    frac = np.bincount(ds, minlength=2) / len(ds)
    # the mixer keeps each dataset within one chunk (ctx - 1 stored tokens) of its share, and
    # the last batch is cut to the token budget (at most batch_size chunks)
    bound = (ctx - 1) * (1 + 4) / len(ds)
    assert abs(frac[1] - 0.7) <= bound, (frac, bound)
    assert [d["proportion"] for d in r.manifest["datasets"]] == [0.3, 0.7]
    assert [d["rows"] for d in r.manifest["datasets"]] == np.bincount(ds, minlength=2).tolist()
    # the stored tokens really come from each dataset's vocabulary
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(zoo["llama_a"]))
    only_b = set(tok.convert_tokens_to_ids(sorted(set(WORDS_B) - set(WORDS_A))))
    assert not (set(r.tokens[ds == 0].tolist()) & only_b)
    assert set(r.tokens[ds == 1].tolist()) <= only_b | set(tok.convert_tokens_to_ids(WORDS_A))


def test_parse_dataset_specs():
    s = H.parse_dataset_specs(["a.jsonl:1", "org/name:3"])
    assert [(x.path, x.proportion) for x in s] == [("a.jsonl", 0.25), ("org/name", 0.75)]
    assert [x.proportion for x in H.parse_dataset_specs(["a", "b"])] == [0.5, 0.5]
    with pytest.raises(HarvestError, match="every dataset or for none"):
        H.parse_dataset_specs(["a:0.5", "b"])
    with pytest.raises(HarvestError, match="positive"):
        H.parse_dataset_specs(["a:0"])
    s = H.parse_dataset_specs(["org/name@cfg#validation", "org/other#test", "org/x@c"])
    assert [(x.path, x.config, x.split) for x in s] == [("org/name", "cfg", "validation"),
                                                         ("org/other", None, "test"), ("org/x", "c", "train")]
    with pytest.raises(HarvestError, match="split name"):
        H.parse_dataset_specs(["org/name#"])


def test_dataset_config_and_split_are_read(tmp_path):
    """``DIR@config#split`` reads that config's split (a local folder laid out like a hub
    dataset, with its configs declared in the README, as on the hub)."""
    root = tmp_path / "corpus"
    for cfg in ("short", "long"):
        for split in ("train", "test"):
            (root / cfg).mkdir(parents=True, exist_ok=True)
            with open(root / cfg / f"{split}.jsonl", "w") as f:
                for i in range(3):
                    f.write(json.dumps({"text": f"{cfg} {split} {i}"}) + "\n")
    yaml = "".join(f"- config_name: {c}\n  data_files:\n"
                   + "".join(f"  - split: {sp}\n    path: {c}/{sp}.jsonl\n" for sp in ("train", "test"))
                   for c in ("short", "long"))
    (root / "README.md").write_text(f"---\nconfigs:\n{yaml}---\n")
    spec, = H.parse_dataset_specs([f"{root}@long#test"])
    assert [t for _, t in H.iter_texts(spec, "text")] == ["long test 0", "long test 1", "long test 2"]
    spec, = H.parse_dataset_specs([f"{root}@short"])
    assert [t for _, t in H.iter_texts(spec, "text")][0] == "short train 0"
    with pytest.raises(HarvestError, match="no config or split"):
        H.check_dataset(H.parse_dataset_specs([f"{root / 'long' / 'test.jsonl'}#test"])[0], "text")


def test_outlier_positions_dropped_and_counted(tmp_path, zoo):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(zoo["llama_a"]))
    cat = tok.convert_tokens_to_ids("cat")
    for name in ("llama_a", "llama_b"):
        m = AutoModelForCausalLM.from_pretrained(str(zoo[name]))
        with torch.no_grad():
            m.model.embed_tokens.weight[cat] *= 1000.0  # an attention-sink-like huge residual
        m.save_pretrained(str(tmp_path / name))
        tok.save_pretrained(str(tmp_path / name))
    ds = write_jsonl(tmp_path / "small.jsonl", WORDS_A, 15, seed=3)
    # tokens beyond the dataset: every position of every document is processed
    out = harvest([str(tmp_path / "llama_a"), str(tmp_path / "llama_b")], tmp_path / "s", [str(ds)],
                  tokens=10**6, layer=1, context_length=16, batch_size=4, progress=False, allow_short=True)
    r = open_store(out)
    assert r.manifest["short"]["requested_tokens"] == 10**6 and r.manifest["short"]["harvested_tokens"] == len(r)
    n_cat = sum(tok(json.loads(l)["text"], add_special_tokens=False)["input_ids"].count(cat) for l in open(ds))
    n_all = sum(len(tok(json.loads(l)["text"], add_special_tokens=False)["input_ids"]) for l in open(ds))
    assert n_cat >= 5
    assert r.manifest["dropped_outliers"] == n_cat and len(r) == n_all - n_cat
    assert cat not in set(r.tokens.tolist())
    out0 = harvest([str(tmp_path / "llama_a"), str(tmp_path / "llama_b")], tmp_path / "s0", [str(ds)],
                   tokens=10**6, layer=1, context_length=16, batch_size=4, progress=False, outlier_factor=0,
                   allow_short=True)
    r0 = open_store(out0)
    assert r0.manifest["dropped_outliers"] == 0 and len(r0) == n_all


# ------------------------------------------------------------------------------------- tokenizers
def test_tokenizer_mismatch_names_first_difference(tmp_path, zoo):
    with pytest.raises(HarvestError, match=rf"token id 10 is {zoo['inv'][11]!r} in .*llama_a but "
                                           rf"{zoo['inv'][10]!r} in .*llama_swapped"):
        harvest([str(zoo["llama_a"]), str(zoo["llama_swapped"])], tmp_path / "s", [str(zoo["ds_a"])], tokens=10,
                progress=False)
    n = len(zoo["inv"])
    with pytest.raises(HarvestError, match=rf"token id {n} is None in .*llama_a but 'zebra'"):
        harvest([str(zoo["llama_a"]), str(zoo["llama_bigger_vocab"])], tmp_path / "s", [str(zoo["ds_a"])],
                tokens=10, progress=False)
    assert not (tmp_path / "s").exists()  # refused before touching the disk


# ------------------------------------------------------------------------------ resume and safety
def _ref_args(zoo):
    return dict(models=[str(zoo["llama_a"]), str(zoo["llama_b"])],
                datasets=[f"{zoo['ds_a']}:0.5", f"{zoo['ds_b']}:0.5"], tokens=400, context_length=16,
                batch_size=4, shard_tokens=64)


def _cli(zoo, out) -> list[str]:
    a = _ref_args(zoo)
    argv = ["--model-a", a["models"][0], "--model-b", a["models"][1], "--tokens", str(a["tokens"]), "--out", str(out),
            "--context-length", "16", "--batch-size", "4", "--shard-tokens", "64", "--no-progress"]
    for d in a["datasets"]:
        argv += ["--dataset", d]
    return argv


def _digest(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


@pytest.fixture(scope="module")
def reference(zoo, tmp_path_factory):
    """An uninterrupted harvest: the store every interrupted run must reproduce exactly."""
    out = harvest(out=tmp_path_factory.mktemp("ref") / "s", progress=False, **_ref_args(zoo))
    d = _digest(out)
    assert len(open_store(out).manifest["shards"]) >= 5 and "manifest.json" in d
    return d


def test_resume_after_crash_is_identical(tmp_path, zoo, reference, monkeypatch):
    real = S.ShardWriter.write_shard
    calls = {"n": 0}

    def crash_on_third(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # what a Ctrl-C mid-harvest looks like
        return real(self, *a, **k)

    monkeypatch.setattr(S.ShardWriter, "write_shard", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        harvest(out=tmp_path / "s", progress=False, **_ref_args(zoo))
    monkeypatch.setattr(S.ShardWriter, "write_shard", real)
    with pytest.raises(StoreError, match=r"manifest.json is missing.*interrupted"):
        open_store(tmp_path / "s")  # an unfinished store is never served
    st = json.loads((tmp_path / "s" / H.STATE).read_text())
    assert len(st["shards"]) == 2
    harvest(out=tmp_path / "s", progress=False, **_ref_args(zoo))
    assert _digest(tmp_path / "s") == reference
    # a finished harvest rerun with the same settings is a no-op (and drops a state file left by
    # a kill between the manifest and its removal); other settings are refused
    (tmp_path / "s" / H.STATE).write_text("{}")
    harvest(out=tmp_path / "s", progress=False, **_ref_args(zoo))
    assert _digest(tmp_path / "s") == reference
    with pytest.raises(HarvestError, match="other settings"):
        harvest(out=tmp_path / "s", progress=False, **{**_ref_args(zoo), "tokens": 300})


def test_full_disk_then_resume(tmp_path, zoo, reference, monkeypatch):
    import errno

    real = S._write_chunks
    calls = {"n": 0}

    def full_disk(f, chunks):
        calls["n"] += 1
        if calls["n"] == 9:  # somewhere inside the third shard's files
            f.write(bytes(chunks[0])[:3])
            raise OSError(errno.ENOSPC, "No space left on device")
        real(f, chunks)

    monkeypatch.setattr(S, "_write_chunks", full_disk)
    with pytest.raises(StoreError, match="disk full while writing"):
        harvest(out=tmp_path / "s", progress=False, **_ref_args(zoo))
    monkeypatch.setattr(S, "_write_chunks", real)
    assert not any(p.name.startswith(".") for p in (tmp_path / "s").iterdir())  # no temporaries left
    st = json.loads((tmp_path / "s" / H.STATE).read_text())
    for rec in st["shards"]:  # what the state lists is complete
        for f in rec["files"].values():
            assert S.sha256_file(tmp_path / "s" / f["path"]) == f["sha256"]
    assert main_rc(_cli(zoo, tmp_path / "s")) == 0
    assert _digest(tmp_path / "s") == reference


def main_rc(argv) -> int:
    return H.main(argv)


def _run_cli(argv, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "fastxc.data.harvest", *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, **kw)


def _kill_after_shards(zoo, out: Path, n_shards: int) -> None:
    """Start the CLI, SIGKILL it once ``n_shards`` shards are complete (or it finished)."""
    p = _run_cli(_cli(zoo, out))
    deadline = time.time() + 300
    while p.poll() is None and time.time() < deadline:
        st = out / H.STATE
        try:
            if st.exists() and len(json.loads(st.read_text())["shards"]) >= n_shards:
                break
        except (json.JSONDecodeError, OSError):
            pass
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.communicate()


def test_sigkill_and_rerun_is_identical(tmp_path, zoo, reference):
    out = tmp_path / "s"
    _kill_after_shards(zoo, out, 2)
    assert not (out / "manifest.json").exists()
    assert H.main(_cli(zoo, out)) == 0  # the same command again (in-process: saves a start-up)
    assert _digest(out) == reference


def test_kill_before_the_first_state_file(tmp_path, zoo, reference):
    """A kill after the folder was made but before the first state file's rename leaves only
    that temporary behind: the same command starts afresh. A folder holding anything of the
    user's is still refused, and left as it was."""
    out = tmp_path / "s"
    out.mkdir()
    (out / f".{H.STATE}.tmp-4242").write_text('{"version"')
    assert H.main(_cli(zoo, out)) == 0
    assert _digest(out) == reference
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    (other / f".{H.STATE}.tmp-4242").write_text("")
    with pytest.raises(HarvestError, match="not an unfinished harvest"):
        harvest(out=other, progress=False, **_ref_args(zoo))
    assert sorted(p.name for p in other.iterdir()) == [f".{H.STATE}.tmp-4242", "notes.txt"]


def _moment_reached(out: Path, moment: str) -> bool:
    """Whether the harvest writing ``out`` has visibly reached ``moment``."""
    if moment == "start-up":  # the folder exists: the models are loading, no state written yet
        return out.exists()
    if moment == "tmp-file":  # a shard file half written
        return out.exists() and any(p.name.startswith(".shard-") for p in out.iterdir())
    if moment == "manifest":
        return (out / "manifest.json").exists()
    st = out / H.STATE
    try:
        return st.exists() and len(json.loads(st.read_text())["shards"]) >= int(moment.split("-")[1])
    except (json.JSONDecodeError, OSError):
        return False


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["start-up", "shards-0", "tmp-file", "shards-1", "shards-4", "manifest"])
def test_sigkill_at_many_moments(tmp_path, zoo, reference, moment):
    """SIGKILL at a given point (during start-up, before the first shard, mid-write, between
    shards, right after the manifest), then rerun the same command: identical store."""
    out = tmp_path / "s"
    p = _run_cli(_cli(zoo, out))
    deadline = time.time() + 300
    while p.poll() is None and time.time() < deadline and not _moment_reached(out, moment):
        time.sleep(0.002)
    p.send_signal(signal.SIGKILL)
    p.communicate()
    p = _run_cli(_cli(zoo, out))
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err.decode()
    assert _digest(out) == reference


# --------------------------------------------------------------------------------- errors and CLI
def test_harvested_store_corruption_detected(tmp_path, zoo):
    out = harvest([str(zoo["llama_a"]), str(zoo["llama_b"])], tmp_path / "s", [str(zoo["ds_a"])], tokens=100,
                  context_length=16, batch_size=4, progress=False, shard_tokens=40)
    p = out / "shard-00001.acts"
    b = bytearray(p.read_bytes())
    b[100] ^= 0x01
    p.write_bytes(bytes(b))
    with pytest.raises(StoreError, match=r"checksum mismatch in .*shard-00001\.acts"):
        open_store(out).validate(checksums=True)
    p.write_bytes(bytes(b[:-4]))
    with pytest.raises(StoreError, match=r"shard-00001\.acts has .* truncated"):
        open_store(out)


def test_cli_errors(tmp_path, zoo, capsys):
    a, b, ds = str(zoo["llama_a"]), str(zoo["llama_b"]), str(zoo["ds_a"])
    cases = [
        (["--model-a", str(tmp_path / "nope"), "--model-b", b], "nope: not found"),
        (["--model-a", a, "--model-b", b, "--dataset", str(tmp_path / "no.jsonl")], "dataset file not found"),
        (["--model-a", a, "--model-b", b, "--layer", "9"], "layer 9 is out of range"),
        (["--model-a", a, "--model-b", b, "--layers", "1,x"], "--layers must be"),
        (["--model-a", a, "--model-b", b, "--text-field", "body"], "no field 'body'"),
        (["--model-a", a, "--model-b", b, "--dtype", "int4"], "unknown store dtype"),
        (["--model-a", a], ">= 2 sources"),
        (["--model-a", a, "--model-b", str(zoo["llama_swapped"])], "tokenizers differ: token id 10"),
    ]
    for extra, msg in cases:
        argv = extra + ["--tokens", "20", "--out", str(tmp_path / "o"), "--no-progress"]
        if "--dataset" not in extra:
            argv += ["--dataset", ds]
        rc = H.main(argv)
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("error: ") and msg in err and "Traceback" not in err, (extra, err)
    assert not (tmp_path / "o" / "manifest.json").exists()
    # an unknown flag is named first (not the required flags it hides), in one line
    with pytest.raises(SystemExit) as e:
        H.main(["--model-a", a, "--bogus"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and "--bogus" in err and err.count("\n") == 1
    with pytest.raises(SystemExit) as e:
        H.main(["--model-a", a])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and "--tokens" in err and err.count("\n") == 1
    rc = H.main(["--model-a", a, "--model-b", b, "--dataset", ds, "--tokens", "30", "--out", str(tmp_path / "ok"),
                 "--no-progress", "--context-length", "16", "--dtype", "fp8"])
    assert rc == 0 and "30 tokens" in capsys.readouterr().out
    r = open_store(tmp_path / "ok")
    assert r.dtype == "float8_e4m3fn" and len(r) == 30


def test_ignore_special_tokens(tmp_path, zoo):
    """Vocabularies that differ only in special tokens (like Qwen2.5-Math vs R1-Distill-Qwen)."""
    tok = build_tokenizer(tmp_path / "tok_think")
    tok.add_special_tokens({"additional_special_tokens": ["<think>"]})
    think = build_model(tmp_path / "llama_think", "llama", tok, seed=8)
    ds = tmp_path / "t.jsonl"
    ds.write_text("\n".join(json.dumps({"text": f"the cat <think> so two plus three {i}"}) for i in range(20)) + "\n")
    models = [str(zoo["llama_a"]), str(think)]
    n = len(zoo["inv"])
    with pytest.raises(HarvestError, match=rf"token id {n} is None in .* but '<think>' in .*--ignore-special-tokens"):
        harvest(models, tmp_path / "s", [str(ds)], tokens=50, context_length=16, progress=False)
    # the first model's tokenizer (here the one with "<think>") tokenizes for all
    out = harvest(models[::-1], tmp_path / "s", [str(ds)], tokens=50, context_length=16, progress=False,
                  ignore_special_tokens=True)
    r = open_store(out)
    assert len(r) == 50 and r.manifest["harvest_config"]["ignore_special_tokens"] is True
    assert tok("<think>", add_special_tokens=False)["input_ids"] == [n]
    assert r.tokens.max() < n  # "<think>" was split into regular tokens, never its special id
    # the regular vocabularies must still agree
    with pytest.raises(HarvestError, match="token id 10"):
        harvest([str(zoo["llama_a"]), str(zoo["llama_swapped"])], tmp_path / "s2", [str(ds)], tokens=10,
                progress=False, ignore_special_tokens=True)
