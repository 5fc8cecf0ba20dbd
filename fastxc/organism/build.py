"""Build (or load from the cache) the model organism: a tokenizer, "base" and "distilled".

- base: a tiny Llama-config causal LM trained from scratch on the general corpus. Input and
  output embeddings are untied, and tokens the general text never uses (digits, the line
  break, the think tags, "Wait") start with a zero input embedding, which base training leaves
  at zero: base has no representation of them of its own.
- distilled: base fine-tuned on reasoning traces with ``general_mix`` of general text mixed
  in, so it keeps its general behaviour (the seed study's DeepSeek-R1 -> Qwen distillation in
  miniature). Fine-tuning trains the embeddings, the output head and the layers below half
  depth; the upper half stays base's. What the distilled model learns (checking a step,
  deciding to reflect) is then computed below the layer the crosscoder reads, as the seed
  study reads its distilled models at half depth.

Both are saved with ``save_pretrained`` next to a copy of the tokenizer, so
``AutoModelForCausalLM.from_pretrained(path)`` and the harvester load them like hub models.
The cache lives in ``$FASTXC_HOME/organism/`` (default ``~/.cache/fastxc``), one folder per
(recipe version, config); a folder is complete once its ``organism.json`` exists, and it is
built in a temporary sibling and renamed into place, so a killed build never looks finished.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from fastxc.core import numerics
from fastxc.organism.corpus import Corpus, build_corpus
from fastxc.organism.tokenizer import train_tokenizer

# Bump when anything that changes the built models changes (corpus, tokenizer, training).
# v4: the v3 recipe built under pinned CPU numerics (fastxc.core.numerics), so every x86-64
# machine builds the same weights.
RECIPE_VERSION = 4


@dataclass(frozen=True)
class OrganismConfig:
    """Recipe of one organism. Every field is part of the cache key."""

    seed: int = 0
    """Seeds the corpus, the initialisation and the batch order."""
    vocab_size: int = 1024
    """BPE vocabulary size (special tokens included)."""
    hidden_size: int = 128
    """Residual stream width: the width of each source in the harvested store."""
    n_layers: int = 4
    """Decoder layers; the store is harvested at the input of layer n_layers // 2."""
    n_heads: int = 4
    intermediate_size: int = 256
    seq_len: int = 64
    """Training window in tokens (a trace is 40-80 tokens with BOS and EOS)."""
    batch_size: int = 32
    base_steps: int = 800
    """Optimizer steps of base pre-training on general text."""
    distill_steps: int = 500
    """Optimizer steps of fine-tuning base into distilled."""
    base_lr: float = 3e-3
    distill_lr: float = 2e-3
    general_mix: float = 0.25
    """Fraction of fine-tuning windows drawn from general text (keeps base behaviour)."""
    n_general: int = 20000
    """General documents in the training corpus."""
    n_traces: int = 10000
    """Reasoning traces in the training corpus."""
    slip_rate: float = 0.6
    """Fraction of traces with a slip corrected after "Wait,"."""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name != "seed" and not v > 0:
                raise ValueError(f"organism --{f.name.replace('_', '-')} must be > 0, got {v}")
        if not (0 < self.general_mix < 1 and 0 <= self.slip_rate <= 1):
            raise ValueError("organism --general-mix must be in (0, 1) and --slip-rate in [0, 1]")
        if self.hidden_size % self.n_heads:
            raise ValueError(f"organism --hidden-size {self.hidden_size} must divide by --n-heads {self.n_heads}")

    def key(self) -> str:
        """Cache folder name: recipe version, seed and a hash of the full config."""
        blob = json.dumps({"recipe": RECIPE_VERSION, **asdict(self)}, sort_keys=True)
        return f"v{RECIPE_VERSION}-seed{self.seed}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"


class Organism(NamedTuple):
    """Paths of a built organism."""

    root: Path
    base: Path  # save_pretrained folder (model + tokenizer)
    distilled: Path
    tokenizer: Path
    info: dict  # the contents of organism.json (config, timings, losses)


def fastxc_home() -> Path:
    """``$FASTXC_HOME`` or ``~/.cache/fastxc`` (XDG_CACHE_HOME respected)."""
    env = os.environ.get("FASTXC_HOME")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "fastxc"


def organism_dir(cfg: OrganismConfig) -> Path:
    return fastxc_home() / "organism" / cfg.key()


@contextmanager
def _quiet_threads(n: int | None):
    """Run torch with ``n`` intra-op threads (default: $FASTXC_THREADS or all cores) and without transformers'
    per-file progress bars (ours is enough), then restore both."""
    from transformers.utils import logging as hf_logging

    old, bars = torch.get_num_threads(), hf_logging.is_progress_bar_enabled()
    # FASTXC_THREADS caps it on a shared machine: with other jobs on the cores, 2 spinning
    # OpenMP threads measured 10x slower per step than 1 thread on this 2-core CPU.
    n = n or int(os.environ.get("FASTXC_THREADS") or 0) or os.cpu_count() or 1
    torch.set_num_threads(n)
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        torch.set_num_threads(old)
        if bars:
            hf_logging.enable_progress_bar()


def _stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """All documents as one 1-D id stream: ``<|bos|> doc <|endoftext|>`` each."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for row in tokenizer(texts, add_special_tokens=True)["input_ids"]:
        ids.extend(row)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def _lr_at(step: int, steps: int, lr: float) -> float:
    """Linear warm-up over 5% of steps, then cosine decay to 10% of ``lr``."""
    warm = max(1, steps // 20)
    if step < warm:
        return lr * (step + 1) / warm
    t = (step - warm) / max(1, steps - warm)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def _train(model, streams: list[torch.Tensor], probs: list[float], steps: int, lr: float,
           cfg: OrganismConfig, seed: int, desc: str, progress: bool) -> list[float]:
    """Next-token training on random windows; each row drawn from stream i with ``probs[i]``.

    Returns the loss every 10% of training (for organism.json).
    """
    from tqdm.auto import tqdm

    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    model.train()
    T, B = cfg.seq_len, cfg.batch_size
    p = torch.tensor(probs, dtype=torch.float)
    losses, ema = [], None
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False)
    for step in bar:
        which = torch.multinomial(p, B, replacement=True, generator=g)
        rows = []
        for w in which.tolist():
            s = streams[w]
            start = int(torch.randint(0, len(s) - T - 1, (1,), generator=g))
            rows.append(s[start:start + T])
        x = torch.stack(rows)
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, lr)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if step % max(1, steps // 10) == 0 or step == steps - 1:
            losses.append(round(ema, 4))
            bar.set_postfix(loss=f"{ema:.3f}")
    model.eval()
    return losses


def distill(model, trace_s: torch.Tensor, general_s: torch.Tensor, cfg: OrganismConfig, progress: bool,
            desc: str = "organism: distilled") -> list[float]:
    """Fine-tune base ``model`` into distilled in place: ``cfg.distill_steps`` on the trace stream
    with ``cfg.general_mix`` of general text. Returns ``_train``'s losses."""
    # Layers from half depth up (and the final norm) stay base's; see the module docstring.
    for layer in model.model.layers[cfg.n_layers // 2:]:
        layer.requires_grad_(False)
    model.model.norm.requires_grad_(False)
    return _train(model, [trace_s, general_s], [1.0 - cfg.general_mix, cfg.general_mix], cfg.distill_steps,
                  cfg.distill_lr, cfg, cfg.seed + 1, desc, progress)


def _new_model(cfg: OrganismConfig, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    mcfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_heads,
        max_position_embeddings=max(256, 2 * cfg.seq_len), tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(cfg.seed)
    return LlamaForCausalLM(mcfg)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def write_heldout(corpus: Corpus, folder: Path) -> dict[str, Path]:
    """Held-out jsonl files (field "text"): traces, general, and their 50/50 mix."""
    folder.mkdir(parents=True, exist_ok=True)
    traces = [{"text": t.text, "question": t.question, "answer": t.answer, "kind": t.kind,
               "slipped": t.slipped} for t in corpus.heldout_traces]
    general = [{"text": g} for g in corpus.heldout_general]
    paths = {"traces": folder / "heldout_traces.jsonl", "general": folder / "heldout_general.jsonl"}
    _write_jsonl(paths["traces"], traces)
    _write_jsonl(paths["general"], general)
    return paths


def build_organism(cfg: OrganismConfig = OrganismConfig(), out: str | Path | None = None,
                   progress: bool = True, threads: int | None = None) -> Organism:
    """Build the organism into ``out`` (default: its cache folder), replacing what is there.

    The build runs under pinned CPU numerics (``fastxc.core.numerics``): in this process when
    it is pinned, else in a pinned child process, so the weights do not depend on the CPU.
    """
    from tqdm.auto import tqdm

    final = Path(out) if out is not None else organism_dir(cfg)
    if not numerics.is_pinned():
        run_pinned(["-m", "fastxc.organism", "--out", str(final), "--eval", "0",
                    *config_flags(cfg), *(["--threads", str(threads)] if threads else []),
                    *([] if progress else ["--no-progress"])])
        return _organism(final)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    t0 = time.time()
    timings = {}
    with _quiet_threads(threads):
        random.seed(cfg.seed)
        corpus = build_corpus(cfg.seed, cfg.n_general, cfg.n_traces, slip_rate=cfg.slip_rate)
        traces = [t.text for t in corpus.traces]
        tokenizer = train_tokenizer(corpus.general + traces, cfg.vocab_size)
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
        write_heldout(corpus, tmp / "corpus")
        general_s, trace_s = _stream(tokenizer, corpus.general), _stream(tokenizer, traces)
        timings["corpus_tokenizer_s"] = round(time.time() - t0, 1)

        t = time.time()
        model = _new_model(cfg, tokenizer)
        # Tokens base never reads get no input embedding: a zero row has zero gradient, and
        # AdamW leaves it at zero (weight decay only scales it).
        unseen = torch.ones(len(tokenizer), dtype=torch.bool)
        unseen[general_s.unique()] = False
        with torch.no_grad():
            model.get_input_embeddings().weight[unseen] = 0.0
        base_losses = _train(model, [general_s], [1.0], cfg.base_steps, cfg.base_lr, cfg,
                             cfg.seed, "organism: base", progress)
        model.save_pretrained(str(tmp / "base"))
        tokenizer.save_pretrained(str(tmp / "base"))
        timings["base_s"] = round(time.time() - t, 1)

        t = time.time()
        distill_losses = distill(model, trace_s, general_s, cfg, progress)
        model.save_pretrained(str(tmp / "distilled"))
        tokenizer.save_pretrained(str(tmp / "distilled"))
        timings["distilled_s"] = round(time.time() - t, 1)
    timings["total_s"] = round(time.time() - t0, 1)
    info = {
        "recipe_version": RECIPE_VERSION, "config": asdict(cfg), "timings": timings,
        "numerics": numerics.describe(),
        "sha256": {name: file_sha256(tmp / name / "model.safetensors") for name in ("base", "distilled")},
        "base_losses": base_losses, "distill_losses": distill_losses,
        "tokens": {"general": len(general_s), "traces": len(trace_s)},
        "half_depth_layer": cfg.n_layers // 2,
    }
    (tmp / "organism.json").write_text(json.dumps(info, indent=1))
    if final.exists():
        shutil.rmtree(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, final)
    if progress:
        tqdm.write(f"organism built in {timings['total_s']:.0f}s: {final}")
    return _organism(final)


def _organism(root: Path) -> Organism:
    info = json.loads((root / "organism.json").read_text())
    return Organism(root, root / "base", root / "distilled", root / "tokenizer", info)


def load_organism(cfg: OrganismConfig = OrganismConfig(), progress: bool = True,
                  rebuild: bool = False, threads: int | None = None) -> Organism:
    """The cached organism for ``cfg``, built first if it is missing (or ``rebuild``)."""
    root = organism_dir(cfg)
    if not rebuild and (root / "organism.json").is_file():
        return _organism(root)
    return build_organism(cfg, progress=progress, threads=threads)


# sha256 of base/ and distilled/ model.safetensors of the default config (OrganismConfig(seed=S))
# under recipe v4's pinned numerics (built 2026-12-01 on an AMD EPYC machine; the same floats gave
# every figure the README measured on the project's earlier CI machine). A machine that builds other
# bytes has CPU floats the pinning does not cover; ``reproduces`` says so.
RECORDED_SHA256 = {
    0: {"base": "9a76d88934fd25f74174b4436583d4fd82576cee89d5577236397540a0eac4a8",
        "distilled": "760f7f90d24c441f42cdc71b20e29b2ccb963fe12bea12d2e2afe5350fb0dea6"},
    1: {"base": "e69a6f0219036f759e728ed698f0ad401dde16a29cab83ea4715dc41d953118f",
        "distilled": "839c3a19556fb9207ed1e92fb5d2c7743e19da647d3a3246dffb7d68d00d87f2"},
}


def reproduces(org: Organism) -> bool | None:
    """Whether ``org``'s weights are the recorded ones (None: no record for its config)."""
    cfg = OrganismConfig(**org.info["config"])
    want = RECORDED_SHA256.get(cfg.seed) if cfg == OrganismConfig(seed=cfg.seed) else None
    if want is None or org.info.get("recipe_version") != RECIPE_VERSION:
        return None
    return org.info.get("sha256") == want


def config_fields() -> list[dataclasses.Field]:
    return list(dataclasses.fields(OrganismConfig))


def config_flags(cfg: OrganismConfig) -> list[str]:
    """``cfg`` as ``python -m fastxc.organism`` flags."""
    return [a for f in config_fields() for a in ("--" + f.name.replace("_", "-"), str(getattr(cfg, f.name)))]


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes (a stage's output, recorded so two machines can compare)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def run_pinned(args: list[str]) -> None:
    """Run ``python ARGS`` in a child process with pinned CPU numerics; raise if it fails."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, *args], env=numerics.pinned_env())
    if proc.returncode != 0:
        raise RuntimeError(f"pinned-numerics step failed (exit {proc.returncode}): python {' '.join(args)}")
