"""The trainer's configuration: ``TrainConfig`` (every field is also a ``--flag``), the command
line parser and config files.

Precedence: dataclass defaults < ``--config file.json|yaml`` (the same field names, dashes or
underscores) < command-line flags.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from fastxc.core.cli import Parser
from fastxc.core.crosscoder import (ACTIVATIONS, COMPUTE_DTYPES, JUMPRELU_BANDWIDTH, JUMPRELU_INIT_THRESHOLD,
                                   JUMPRELU_L0_COEF)
from fastxc.train.parallel import PARALLEL_MODES


LOG_BACKENDS = ("tensorboard", "wandb")


class TrainError(RuntimeError):
    """A training run that cannot go on (bad config, bad data, diverged); one-line message."""


def _doc(text: str, metadata_extra: dict | None = None, **kw) -> Any:
    return field(metadata={"help": text, **(metadata_extra or {})}, **kw)


# The harvest flags: they mean something only when training straight from the models.
HARVEST_FIELDS = ("model_b", "layer", "layers", "dataset", "tokens", "save_store", "shard_tokens")


@dataclass
class TrainConfig:
    """Everything a training run needs. Each field is also a ``--flag`` (underscores -> dashes)."""

    # data
    store: str | None = _doc("activation store directory to train from", default=None)
    source: str | None = _doc("'synthetic' for the planted-feature source; default: the embedded default", default=None)
    widths: str | None = _doc("expected source widths, comma-separated; checked against the data (synthetic: sets them)", default=None)
    # training straight from the models (no store): the harvest's sources and data flags
    model_a: str | None = _doc("train straight from this model (hub id or local folder) and --model-b, harvesting "
                               "into an in-memory shuffle buffer (no store)", default=None)
    model_b: str | None = _doc("the second model of --model-a", default=None)
    model: list | None = _doc("further models to train from (repeatable)", default=None, metadata_extra={"append": True})
    layer: int | None = _doc("decoder layer whose input is captured (default: half depth)", default=None,
                             metadata_extra={"type": int})
    layers: str | None = _doc("several layers of each model as sources, e.g. 2,4,6", default=None)
    dataset: list | None = _doc("path_or_id[@config][#split][:proportion] of the texts to harvest (repeatable: a mix)",
                                default=None, metadata_extra={"append": True})
    text_field: str = _doc("dataset field with the text", default="text")
    skip_bad_lines: bool = _doc("skip and count .jsonl/.txt lines that are not UTF-8 or not a JSON object", default=False)
    tokens: int | None = _doc("rows to harvest (default: steps x batch size, every row trained on once)", default=None,
                              metadata_extra={"type": int})
    buffer_rows: int = _doc("rows in the shuffle buffer (refilled by half; batches drawn uniformly from it)",
                            default=65536)
    context_length: int = _doc("tokens per model input sequence, BOS included", default=128)
    harvest_batch_size: int = _doc("sequences per model forward pass", default=8)
    model_dtype: str = _doc("dtype the models run in: float32, bfloat16, float16", default="float32")
    outlier_factor: float = _doc("drop positions with a norm > factor x the median (0: keep all)", default=10.0)
    shuffle_buffer: int = _doc("streaming document shuffle buffer (0: off)", default=0)
    ignore_special_tokens: bool = _doc("require only the regular vocabularies to match", default=False)
    save_store: str | None = _doc("also write the harvested rows as a store here (as fastxc harvest would)", default=None)
    store_dtype: str = _doc("dtype of the --save-store store: bfloat16, float16, float32, fp8", default="bfloat16")
    shard_tokens: int | None = _doc("rows per shard of the --save-store store (default 65536)", default=None,
                                    metadata_extra={"type": int})
    # model
    activation: str = _doc(f"one of {', '.join(ACTIVATIONS)}", default="topk")
    # k = 16 of 1024 suits the embedded default (two 128-wide sources): at k = 32 the feature that
    # fires before "Wait" also absorbs shared line-break directions and leans less to the
    # distilled model on some organism seeds (NRN 0.60 against 0.78 at k = 16, seed 1).
    k: int = _doc("active features per row (topk, batchtopk)", default=16)
    n_features: int = _doc("dictionary size F", default=1024)
    aux_k: int = _doc("AuxK dead-feature loss size (0: off)", default=0)
    aux_coef: float = _doc("AuxK loss weight", default=1.0 / 32.0)
    l1_coef: float = _doc("decoder-norm-weighted L1 coefficient (relu)", default=1.0)
    l0_coef: float = _doc("L0 sparsity coefficient (jumprelu)", default=JUMPRELU_L0_COEF)
    jumprelu_bandwidth: float = _doc("bandwidth of the straight-through threshold gradient (jumprelu)", default=JUMPRELU_BANDWIDTH)
    jumprelu_init_threshold: float = _doc("every feature's threshold at init (jumprelu)", default=JUMPRELU_INIT_THRESHOLD)
    # Adam moves log(theta) by about lr per step: at lr 1e-3 a threshold changes by at most a
    # factor e^1.5 in 1500 steps, too slow to follow the code's scale (bench/sweep_jumprelu.py:
    # planted recovery 0.49 at scale 1, 0.96 at 10, same run)
    jumprelu_threshold_lr_scale: float = _doc("learning-rate multiplier of the jumprelu log-thresholds", default=10.0)
    l1_warmup_frac: float = _doc("fraction of steps over which the sparsity coefficient warms up from 0 (relu L1, jumprelu L0)",
                                 default=0.05)
    dec_init_norm: float = _doc("per-source decoder row norm at init", default=0.1)
    dead_tokens: int = _doc("a feature silent for this many rows counts as dead (AuxK's target and the logged dead "
                            "count; none is dead before this many rows)", default=1_000_000)
    # optimisation
    steps: int = _doc("training steps", default=2000)
    batch_size: int = _doc("rows per step", default=512)
    lr: float = _doc("Adam learning rate", default=1e-3)
    warmup_frac: float = _doc("fraction of steps of linear LR warm-up", default=0.02)
    decay_frac: float = _doc("final fraction of steps of linear LR decay to 0", default=0.2)
    seed: int = _doc("seed for init and data order", default=0)
    max_bad_batches: int = _doc("stop after this many consecutive bad batches: input holding NaN/Inf, or a diverged "
                                "loss (non-finite, or FVU 100x above the untrained model's)", default=10)
    # runtime and outputs
    out: str | None = _doc("output directory (default: a new runs/<date-time>/ folder)", default=None)
    resume: bool = _doc("continue from the checkpoint in --out (an error when there is none)", default=False)
    resume_if_exists: bool = _doc("continue from the checkpoint in --out when there is one, else start fresh", default=False)
    overwrite: bool = _doc("replace an existing run in --out instead of refusing", default=False)
    log_every: int = _doc("steps between metric lines", default=100)
    log: str = _doc("also log the metrics to 'tensorboard' (--out/tensorboard/), 'wandb', or both "
                    "('tensorboard,wandb'); 'none': metrics.jsonl only", default="none")
    checkpoint_every: int = _doc("steps between checkpoints (0: only at the end)", default=500)
    eval_batches: int = _doc("batches in the final evaluation", default=8)
    device: str = _doc("torch device: auto (CUDA when available, else cpu), cpu, cuda, cuda:N", default="auto")
    dtype: str = _doc("compute dtype: float32, or bfloat16 (mixed precision: bf16 GEMMs and activations, "
                      "fp32 master weights, Adam state and loss)", default="float32")
    parallel: str = _doc("under torchrun: 'data' (ranks split each batch's rows) or 'features' (ranks split the dictionary); 'none': one process", default="none")
    progress: bool = _doc("show a progress bar", default=True)
    verify_store: bool = _doc("check every store shard's sha256 before training (reads the whole store)", default=False)
    # synthetic source
    synthetic_shared: int = _doc("synthetic: planted shared features", default=32)
    synthetic_unique: int = _doc("synthetic: planted features unique to each source", default=32)
    synthetic_noise: float = _doc("synthetic: noise norm per source", default=0.05)

    def validate(self) -> None:
        """Raise TrainError with one clear line on a bad value."""
        if self.activation not in ACTIVATIONS:
            raise TrainError(f"--activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")
        if self.n_features <= 0:
            raise TrainError(f"--n-features must be positive, got {self.n_features}")
        if self.activation in ("topk", "batchtopk") and not 0 < self.k <= self.n_features:
            raise TrainError(f"--k must satisfy 0 < k <= n_features ({self.n_features}), got {self.k}")
        if not 0 <= self.aux_k <= self.n_features:
            raise TrainError(f"--aux-k must satisfy 0 <= aux_k <= n_features ({self.n_features}), got {self.aux_k}")
        for name in ("steps", "batch_size", "log_every", "eval_batches", "max_bad_batches", "dead_tokens"):
            if getattr(self, name) <= 0:
                raise TrainError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.checkpoint_every < 0:
            raise TrainError(f"--checkpoint-every must be >= 0, got {self.checkpoint_every}")
        for name in ("lr", "l1_coef", "l0_coef", "aux_coef", "dec_init_norm", "jumprelu_bandwidth", "jumprelu_init_threshold",
                     "jumprelu_threshold_lr_scale"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0) or (name in ("lr", "dec_init_norm", "jumprelu_bandwidth",
                                                               "jumprelu_init_threshold",
                                                               "jumprelu_threshold_lr_scale") and v == 0):
                raise TrainError(f"--{name.replace('_', '-')} must be a finite positive number, got {v}")
        for name in ("warmup_frac", "decay_frac", "l1_warmup_frac"):
            if not 0 <= getattr(self, name) <= 1:
                raise TrainError(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(self, name)}")
        if self.warmup_frac + self.decay_frac > 1:
            raise TrainError("--warmup-frac + --decay-frac must be <= 1")
        if self.source not in (None, "synthetic", "default"):
            raise TrainError(f"--source must be 'synthetic' (or omitted), got {self.source!r}")
        if self.store and self.source == "synthetic":
            raise TrainError("give either --store or --source synthetic, not both")
        self._validate_models()
        if (self.resume or self.resume_if_exists) and self.overwrite:
            flag = "--resume" if self.resume else "--resume-if-exists"
            raise TrainError(f"{flag} and --overwrite contradict each other")
        if self.verify_store and self.source == "synthetic":
            raise TrainError("--verify-store checks a --store; the synthetic source has none")
        self.log_backends()
        if self.dtype not in COMPUTE_DTYPES:
            raise TrainError(f"--dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {self.dtype!r}")
        if self.parallel not in PARALLEL_MODES:
            raise TrainError(f"--parallel must be one of {', '.join(PARALLEL_MODES)}, got {self.parallel!r}")
        if self.parallel == "features" and self.activation == "jumprelu":
            raise TrainError("--activation jumprelu does not run under --parallel features yet; use --parallel data or none")
        self.parsed_widths()

    def aux_k_warning(self) -> str | None:
        """Why --aux-k can do little in this run (a warning's text), or None.

        AuxK trains only the features silent for --dead-tokens rows, so it acts at most on the
        rows after the first --dead-tokens: with the defaults (1M, and 2000 x 512 = 1.02M rows
        per run) that is the last 2% of the run. It applies to topk and batchtopk only.
        """
        if self.aux_k == 0:
            return None
        if self.activation not in ("topk", "batchtopk"):
            return f"--aux-k {self.aux_k} is ignored: AuxK applies to topk and batchtopk, not {self.activation}"
        rows = self.steps * self.batch_size
        if self.dead_tokens * 2 > rows:
            share = max(0.0, 1 - self.dead_tokens / rows)
            return (f"--aux-k {self.aux_k} acts only on features silent for --dead-tokens {self.dead_tokens} rows, "
                    f"so on at most the last {100 * share:.0f}% of this run's {rows} rows; lower --dead-tokens")
        return None

    def model_list(self) -> list[str]:
        """The models to train straight from (--model-a, --model-b, then each --model)."""
        return [m for m in (self.model_a, self.model_b) if m] + [str(m) for m in (self.model or [])]

    @property
    def on_the_fly(self) -> bool:
        """Training straight from the models (harvesting into a shuffle buffer), not a store."""
        return bool(self.model_list())

    def harvest_tokens(self) -> int:
        """Rows to harvest: --tokens, or steps x batch size (each trained on once)."""
        return int(self.tokens) if self.tokens is not None else self.steps * self.batch_size

    def parsed_layers(self) -> list[int] | None:
        if self.layers is None:
            return None
        try:
            return [int(v) for v in str(self.layers).replace(" ", "").split(",") if v]
        except ValueError:
            raise TrainError(f"--layers must be comma-separated integers, got {self.layers!r}") from None

    def _validate_models(self) -> None:
        """The flags of training straight from the models (checked before anything is loaded)."""
        for name in ("model", "dataset"):  # a config file may give one as a plain string
            if isinstance(getattr(self, name), str):
                setattr(self, name, [getattr(self, name)])
        if not self.on_the_fly:
            given = [f for f in HARVEST_FIELDS if getattr(self, f) not in (None, [])]
            if given:
                flag = "--" + given[0].replace("_", "-")
                raise TrainError(f"{flag} is for training straight from the models: give --model-a and --model-b "
                                 "(or --model, repeated)")
            return
        if self.store:
            raise TrainError("give either --store or --model-a/--model-b/--model (training straight from the "
                             "models), not both")
        if self.source == "synthetic":
            raise TrainError("give either --source synthetic or --model-a/--model-b/--model, not both")
        if self.verify_store:
            raise TrainError("--verify-store checks a --store; training straight from the models has none")
        layers = self.parsed_layers()
        if len(self.model_list()) == 1 and (layers is None or len(set(layers)) < 2):
            raise TrainError("one model gives one source: give a second model (--model-b) or several --layers")
        if not self.dataset:
            raise TrainError("no dataset to harvest: give --dataset PATH_OR_ID[:PROPORTION] (repeatable)")
        for name in ("buffer_rows", "context_length", "harvest_batch_size"):
            if getattr(self, name) <= 0:
                raise TrainError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.buffer_rows < self.batch_size:
            raise TrainError(f"--buffer-rows {self.buffer_rows} is smaller than the batch (--batch-size "
                             f"{self.batch_size}): the buffer must hold at least one batch")
        if self.tokens is not None and self.tokens <= 0:
            raise TrainError(f"--tokens must be positive, got {self.tokens}")
        if self.harvest_tokens() < self.steps * self.batch_size:
            raise TrainError(f"--tokens {self.tokens} is fewer than --steps x --batch-size = "
                             f"{self.steps * self.batch_size}: each row is trained on once; give more --tokens "
                             "or fewer --steps")
        if not (math.isfinite(self.outlier_factor) and self.outlier_factor >= 0):
            raise TrainError(f"--outlier-factor must be >= 0, got {self.outlier_factor}")
        if self.save_store is not None and self.out is not None and Path(self.save_store).resolve() == Path(self.out).resolve():
            raise TrainError("--save-store must be another folder than --out")

    def log_backends(self) -> list[str]:
        """The --log backends, e.g. ['tensorboard', 'wandb'] ([] for 'none')."""
        names = [v for v in str(self.log).replace(" ", "").split(",") if v and v != "none"]
        bad = [v for v in names if v not in LOG_BACKENDS]
        if bad:
            raise TrainError(f"--log must be none, {', '.join(LOG_BACKENDS)} or a comma-separated list of them, got {self.log!r}")
        return list(dict.fromkeys(names))

    def parsed_widths(self) -> list[int] | None:
        if self.widths is None:
            return None
        try:
            w = [int(v) for v in str(self.widths).replace(" ", "").split(",") if v]
        except ValueError:
            raise TrainError(f"--widths must be comma-separated integers, got {self.widths!r}") from None
        if not w or any(v <= 0 for v in w):
            raise TrainError(f"--widths must be positive integers, got {self.widths!r}")
        return w


# ---------------------------------------------------------------------------- CLI
def _bool(v: str) -> bool:
    if v.lower() in ("1", "true", "yes", "on"):
        return True
    if v.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {v!r}")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="python -m fastxc.train",
        description="Train a sparse crosscoder. With no arguments: the embedded default, offline.",
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument("--config", help="JSON or YAML file of config fields (flags override it)")
    p.add_argument("--sweep", help="YAML or JSON file of several runs trained from one stream of batches, each "
                                   "into --out/NAME/ (fastxc.train.sweep; flags override its shared fields)")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        helptext = f"{f.metadata['help']} (default: {default})"
        if f.metadata.get("append"):
            p.add_argument(flag, action="append", metavar=f.name.upper(), help=helptext)
        elif isinstance(default, bool):
            if default:
                p.add_argument(flag, type=_bool, metavar="BOOL", help=helptext)
                p.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, action="store_false", help=f"turn off {flag}")
            else:
                p.add_argument(flag, action="store_true", help=helptext)
        else:
            typ = f.metadata.get("type") or {int: int, float: float}.get(type(default), str)
            p.add_argument(flag, type=typ, help=helptext)
    return p


def load_config_file(path: str) -> dict:
    """Read a JSON or YAML dict of config fields (dashes or underscores)."""
    data = read_mapping(path)
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in names:
            raise TrainError(f"config file {path}: unknown field {key!r}")
        out[name] = value
    return out


def read_mapping(path: str, what: str = "config file") -> dict:
    """The mapping a JSON or YAML (.yaml, .yml) file holds; TrainError naming the ``what``
    when it holds none."""
    p = Path(path)
    if not p.is_file():
        raise TrainError(f"{what} {path} does not exist")
    text = p.read_text()
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:
        raise TrainError(f"{what} {path} cannot be parsed: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise TrainError(f"{what} {path} must hold a mapping of fields")
    return data


def parse_flags(argv: Sequence[str] | None) -> dict:
    """The flags given on the command line (field name -> value; 'config', 'sweep' when given).
    SystemExit on --help or a bad flag, as argparse does."""
    return vars(build_parser().parse_args(argv))


def parse_config(argv: Sequence[str] | None) -> TrainConfig:
    return config_from_flags(parse_flags(argv))


def config_from_flags(args: dict) -> TrainConfig:
    """The validated TrainConfig of one run from ``parse_flags``' dict."""
    args = dict(args)
    if "sweep" in args:
        raise TrainError("--sweep trains several runs: read it with fastxc.train.sweep.sweep_from_flags")
    values: dict = {}
    if "config" in args:
        values.update(load_config_file(args.pop("config")))
    values.update(args)
    cfg = TrainConfig(**values)
    cfg.validate()
    return cfg
