"""bf16 mixed-precision training (--dtype bfloat16) against fp32: the planted source (fast) and
the embedded default's organism store (slow), compared on held-out rows."""
import json

import numpy as np
import pytest
import torch

from fastxc.train import TrainConfig, train


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_bf16_trains_like_fp32_on_the_planted_source(tmp_path):
    """200 steps on the planted source: bf16 lowers the loss as fp32 does and ends at the same
    held-out FVU (the final evaluation's batches are rows training never drew). Measured at
    seeds 0, 1, 2: relative FVU difference <= 0.47% per source (fp32 FVU ~0.25); bound 2%."""
    fvu = {}
    for dt in ("float32", "bfloat16"):
        out = tmp_path / dt
        res = train(TrainConfig(source="synthetic", widths="32,32", n_features=128, k=8, batch_size=256, steps=200,
                                dtype=dt, out=str(out), progress=False, log_every=50, checkpoint_every=0))
        m = _metrics(out)
        assert m[-1]["loss"] < 0.5 * m[0]["loss"], f"{dt}: loss {m[0]['loss']:.3f} -> {m[-1]['loss']:.3f}"
        assert all(p.dtype == torch.float32 for p in res.model.parameters()), "master weights must stay fp32"
        fvu[dt] = res.summary["fvu"]
    assert json.loads((tmp_path / "bfloat16" / "crosscoder" / "config.json").read_text())["compute_dtype"] == "bfloat16"
    for i, (a, b) in enumerate(zip(fvu["float32"], fvu["bfloat16"])):
        assert abs(b - a) / a <= 0.02, f"source {i}: fp32 FVU {a:.4f}, bf16 {b:.4f}"


HELDOUT_TOKENS = 20_000


def _heldout_store(folder):
    """The organism's two models harvested as the default store is, on fresh documents (their
    own RNG stream, so no row the crosscoders trained on)."""
    from fastxc.data.harvest import harvest
    from fastxc.organism import OrganismConfig, load_organism
    from fastxc.organism.default import CONTEXT_LENGTH, write_store_corpus

    cfg = OrganismConfig(seed=0)
    org = load_organism(cfg, progress=False)
    specs = write_store_corpus(folder / "data", seed=10_000, tokens=HELDOUT_TOKENS, slip_rate=cfg.slip_rate)
    return harvest([str(org.base), str(org.distilled)], folder / "store", specs, HELDOUT_TOKENS,
                   context_length=CONTEXT_LENGTH, batch_size=64, seed=1, progress=False,
                   source_names=["base", "distilled"])


@torch.no_grad()
def _heldout_fvu(model, store):
    """Per-source FVU of ``model`` on every row of ``store``, normalised by the training store's
    scales (model.input_scale), in eval mode and the model's compute dtype."""
    from fastxc.data.store import open_store

    reader = open_store(store)
    x = model.normalize(model.flatten_input(reader.read_rows(np.arange(len(reader)), normalise=False)))
    model.eval()
    return model.fvu(x, model.decode(model.encode(x))).tolist()


@pytest.mark.slow
def test_bf16_within_3_percent_of_fp32_on_the_organism_store(tmp_path):
    """The embedded default (organism store, seed 0, default config: topk, F=1024, k=16, 2000
    steps of 512 rows): bf16 mixed precision reaches the fp32 held-out FVU within 3% (relative)
    for both sources. Measured (2-core CPU): fp32 base 0.0189 / distilled 0.0350, bf16 the same
    to 0.3% on the store's evaluation batches (see the report of issue 13 for the held-out figures)."""
    from fastxc.organism import default_store

    store = default_store(seed=0, progress=False)
    heldout = _heldout_store(tmp_path / "heldout")
    fvu, summary = {}, {}
    for dt in ("float32", "bfloat16"):
        res = train(TrainConfig(store=str(store), dtype=dt, out=str(tmp_path / dt), progress=False))
        fvu[dt] = _heldout_fvu(res.model, heldout)
        summary[dt] = res.summary["fvu"]
    print(json.dumps({"heldout_fvu": fvu, "store_eval_fvu": summary}))
    for i, name in enumerate(["base", "distilled"]):
        a, b = fvu["float32"][i], fvu["bfloat16"][i]
        assert abs(b - a) / a <= 0.03, f"{name}: held-out FVU fp32 {a:.4f}, bf16 {b:.4f}"
