"""Mechanics of the analysis layer on a tiny world built in the test (nothing downloaded).

Two tiny Llama models (16-wide, 3 layers) share a word-level tokenizer; a store holds their
layer-1 inputs on random sentences; crosscoders are built by hand. The other analysis test
files import the fixtures' builders from here.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fastxc.core.crosscoder import Crosscoder

WORDS = ("Wait , . Therefore Thus But However Alternatively so we add is plus minus one two three four five "
         "he she him her king queen man woman big small hot cold dog dogs cat cats go went see saw").split()
SPECIALS = ["<pad>", "<bos>", "<eos>", "<think>", "</think>"]
WIDTH, LAYERS, LAYER = 16, 3, 1


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   additional_special_tokens=["<think>", "</think>"])


def make_model(seed: int, vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=WIDTH, intermediate_size=32, num_hidden_layers=LAYERS,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def build_world(root, n_seqs: int = 24, seq_len: int = 12):
    """Save two tiny models + tokenizer under ``root`` and harvest a store of their layer inputs."""
    from fastxc.analysis.hooks import capture_residual
    from fastxc.data.store import write_store

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tok = make_tokenizer()
    paths = []
    models = []
    for name, seed in (("base", 1), ("distilled", 2)):
        m = make_model(seed, len(tok))
        p = root / name
        m.save_pretrained(p)
        tok.save_pretrained(p)
        paths.append(str(p))
        models.append(m)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(len(SPECIALS), len(tok), (n_seqs, seq_len), generator=g)
    ids = torch.cat([torch.full((n_seqs, 1), tok.bos_token_id), ids], dim=1)
    mask = torch.ones_like(ids)
    acts = [capture_residual(m, LAYER, ids, mask)[:, 1:] for m in models]  # drop BOS like the harvester
    x = torch.stack([a.reshape(-1, WIDTH) for a in acts], dim=1)
    store = write_store(root / "store", x, tokens=ids[:, 1:].reshape(-1).numpy().astype(np.int32),
                        source_names=["base", "distilled"], dtype="float32",
                        sources=[{"model": paths[0], "layer": LAYER}, {"model": paths[1], "layer": LAYER}])
    return {"tok": tok, "models": models, "paths": paths, "store": store, "ids": ids, "acts": acts}


def identity_crosscoder(widths, scales=None) -> Crosscoder:
    """A relu crosscoder with F = 2D that reconstructs any input exactly: recon = relu(x) - relu(-x)."""
    D = sum(widths)
    cc = Crosscoder(widths, 2 * D, activation="relu", source_names=["base", "distilled"])
    eye = torch.eye(D)
    with torch.no_grad():
        cc.W_enc.copy_(torch.cat([eye, -eye]))
        cc.W_dec.copy_(torch.cat([eye, -eye]))
        cc.b_enc.zero_()
        cc.b_dec.zero_()
        if scales is not None:
            cc.input_scale.copy_(torch.as_tensor(scales))
    return cc.eval()


def random_crosscoder(widths, n_features=64, k=4, scales=None, seed=0) -> Crosscoder:
    torch.manual_seed(seed)
    cc = Crosscoder(widths, n_features, activation="topk", k=k, source_names=["base", "distilled"])
    if scales is not None:
        cc.input_scale.copy_(torch.as_tensor(scales))
    return cc.eval()


_SHARED: dict = {}


def shared_world() -> dict:
    """One tiny world per test session, shared by every analysis test module (read-only use)."""
    if "w" not in _SHARED:
        import atexit
        import shutil
        import tempfile
        from pathlib import Path

        root = Path(tempfile.mkdtemp(prefix="fastxc-analysis-"))
        atexit.register(shutil.rmtree, root, True)
        from fastxc.data.store import open_store

        w = build_world(root)
        w["reader"] = open_store(w["store"])
        _SHARED["w"] = w
    return _SHARED["w"]


@pytest.fixture(scope="module")
def world():
    return shared_world()


# ---------------------------------------------------------------------------- hooks
def test_identity_edit_leaves_logits_unchanged(world):
    from fastxc.analysis.hooks import edit_residual

    m, ids = world["models"][0], world["ids"][:4]
    clean = m(input_ids=ids).logits
    with edit_residual(m, LAYER, lambda h: h):
        same = m(input_ids=ids).logits
    torch.testing.assert_close(same, clean, rtol=0, atol=0)
    with edit_residual(m, LAYER, lambda h: h + 1.0):
        moved = m(input_ids=ids).logits
    assert (moved - clean).abs().max() > 1e-2, "an edit of the layer input must change the logits"
    after = m(input_ids=ids).logits  # the hook is gone after the block
    torch.testing.assert_close(after, clean, rtol=0, atol=0)


def test_capture_matches_hidden_states(world):
    from fastxc.analysis.hooks import capture_residual

    m, ids = world["models"][1], world["ids"][:3]
    hs = m(input_ids=ids, output_hidden_states=True).hidden_states  # hidden_states[L] = input of layer L
    torch.testing.assert_close(capture_residual(m, LAYER, ids), hs[LAYER], rtol=0, atol=0)


def test_store_contexts_rebuild_sequences(world):
    from fastxc.analysis.hooks import store_contexts
    from fastxc.data.store import open_store

    reader = open_store(world["store"])
    # row 12 + 5 is the 6th token of sequence 1 (12 tokens per sequence after BOS)
    ctx = store_contexts(reader, [17], max_len=6, prefix=[1])
    assert ctx == [[1] + world["ids"][1, 1:7].tolist()]


# ---------------------------------------------------------------------------- eval
def test_spliced_loss_exact_crosscoder_recovers_everything(world):
    from fastxc.analysis.evaluate import spliced_loss
    from fastxc.data.store import open_store

    reader = open_store(world["store"])
    cc = identity_crosscoder([WIDTH, WIDTH], reader.scales)
    seqs = world["ids"][:6].tolist()
    res = spliced_loss(cc, world["models"], world["tok"], LAYER, seqs, batch_size=4)
    for i in range(2):
        assert abs(res.spliced[i] - res.clean[i]) < 1e-5
        assert abs(res.zero[i] - res.clean[i]) > 1e-3  # random models: zeroing changes CE, in either direction
        assert abs(res.frac_recovered[i] - 1.0) < 1e-4
    assert res.n_tokens == 6 * 12


def test_spliced_loss_hand_check_with_random_crosscoder(world):
    """A lossy crosscoder: spliced CE equals a direct computation with the reconstruction spliced in."""
    from fastxc.analysis.inputs import encode_raw
    from fastxc.analysis.evaluate import spliced_loss
    from fastxc.analysis.hooks import edit_residual
    from fastxc.data.store import open_store

    reader = open_store(world["store"])
    cc = random_crosscoder([WIDTH, WIDTH], scales=reader.scales)
    ids = world["ids"][:2]
    res = spliced_loss(cc, world["models"], world["tok"], LAYER, ids.tolist())
    from fastxc.analysis.hooks import capture_residual

    full = [capture_residual(m, LAYER, ids) for m in world["models"]]
    code = encode_raw(cc, full)
    recon = cc.denormalize(cc.decode(code.view(-1, cc.n_features))).view(2, 13, -1)
    m = world["models"][1]

    def splice(h):
        h = h.clone()
        h[:, 1:] = recon[:, 1:, WIDTH:]
        return h

    with edit_residual(m, LAYER, splice), torch.no_grad():
        logits = m(input_ids=ids).logits
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    assert abs(res.spliced[1] - float(ce)) < 1e-5
    assert res.frac_recovered[1] < 0.999  # the random dictionary loses something


def test_store_metrics_exact_crosscoder(world):
    from fastxc.analysis.evaluate import store_metrics
    from fastxc.data.store import open_store

    reader = open_store(world["store"])
    cc = identity_crosscoder([WIDTH, WIDTH], reader.scales)
    m = store_metrics(cc, reader, n_rows=64, batch_size=32)
    assert max(m["fvu"]) < 1e-10 and m["rows"] == 64
    assert 0 < m["l0"] <= 2 * WIDTH


def test_eval_cli_writes_json_and_rejects_mismatch(world, tmp_path, capsys):
    from fastxc.analysis.evaluate import main
    from fastxc.data.store import open_store

    reader = open_store(world["store"])
    good = identity_crosscoder([WIDTH, WIDTH], reader.scales).save(tmp_path / "cc")
    rc = main(["--crosscoder", str(good), "--store", str(world["store"]), "--out", str(tmp_path / "o"),
               "--n-sequences", "4", "--context", "8", "--metric-rows", "32"])
    assert rc == 0
    res = json.loads((tmp_path / "o" / "eval.json").read_text())
    assert all(abs(f - 1) < 1e-4 for f in res["frac_recovered"])
    # a crosscoder for 24-wide models cannot run on 16-wide ones
    bad = identity_crosscoder([24, 24]).save(tmp_path / "bad")
    rc = main(["--crosscoder", str(bad), "--model-a", world["paths"][0], "--model-b", world["paths"][1],
               "--layer", str(LAYER), "--out", str(tmp_path / "o2")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and "width" in err and err.count("\n") == 1
    rc = main(["--crosscoder", str(bad), "--store", str(world["store"])])
    err = capsys.readouterr().err
    assert rc == 2 and "do not match the store" in err
    rc = main(["--crosscoder", str(good), "--store", str(world["store"]), "--layer", "7"])
    assert rc == 2 and "layer" in capsys.readouterr().err
    (tmp_path / "x.txt").write_text("one two three\n")  # input files are checked first (#16)
    rc = main(["--crosscoder", str(good), "--model-a", world["paths"][0], "--model-b", world["paths"][1],
               "--layer", "7", "--data", str(tmp_path / "x.txt")])
    assert rc == 2 and "out of range" in capsys.readouterr().err
