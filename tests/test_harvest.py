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

from fastxc import harvest as H
from fastxc import store as S
from fastxc.harvest import HarvestError, harvest
from fastxc.store import StoreError, open_store

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
