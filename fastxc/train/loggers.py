"""``--log tensorboard|wandb``: the metrics.jsonl records, also sent to TensorBoard or
Weights & Biases, and the NRN histogram at the end.

Both packages are optional extras (``pip install 'fastxc[tensorboard]'``, ``'fastxc[wandb]'``)
imported only when asked for; ``check_available`` turns a missing one into a one-line
TrainError before the run writes anything.

Scalar names: ``loss``, ``l0``, ``dead``, ``lr``, ``l1_coef`` (relu), ``skipped``, ``tokens``,
``tokens_per_s`` and per source ``mse/<name>`` and ``fvu/<name>``, each at the record's ``step``.
"""
from __future__ import annotations

import dataclasses
import os
import uuid
from pathlib import Path
from typing import Sequence

import numpy as np

from fastxc.train.config import TrainConfig, TrainError

NRN_BINS = np.linspace(0.0, 1.0, 21)  # the NRN histogram's bins: 20 on [0, 1]
WANDB_ID_FILE = "wandb-run-id"  # in --out: a resumed run logs to the same wandb run


def check_available(cfg: TrainConfig) -> None:
    """A TrainError naming the extra to install when a --log backend's package is missing."""
    for name in cfg.log_backends():
        try:
            if name == "tensorboard":
                from torch.utils.tensorboard import SummaryWriter  # noqa: F401 - needs the tensorboard package
            else:
                import wandb  # noqa: F401
        except ImportError:
            raise TrainError(f"--log {name} needs the {name} package: pip install 'fastxc[{name}]'") from None


def scalars(rec: dict, source_names: Sequence[str]) -> dict[str, float]:
    """One metrics.jsonl record as flat scalars (lists become ``key/<source name>``)."""
    out: dict[str, float] = {}
    for key, value in rec.items():
        if key == "step" or value is None:
            continue
        if isinstance(value, list):
            for name, v in zip(source_names, value):
                out[f"{key}/{name}"] = float(v)
        else:
            out[key] = float(value)
    return out


class MetricLoggers:
    """The --log backends of one run (rank 0 only): ``log(rec)``, ``histogram``, ``close``."""

    def __init__(self, cfg: TrainConfig, out: Path, start_step: int, source_names: Sequence[str]):
        self.names = list(source_names)
        self.tb = self.wandb = None
        backends = cfg.log_backends()
        if "tensorboard" in backends:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: a resumed run hides the events the stopped one wrote after its checkpoint
            # (metrics.jsonl keeps steps <= the checkpoint's, and so does this)
            self.tb = SummaryWriter(log_dir=str(out / "tensorboard"), purge_step=start_step + 1 if start_step else None)
        if "wandb" in backends:
            try:
                self.wandb = _init_wandb(cfg, out, start_step)
            except BaseException:
                self.close()
                raise

    def log(self, rec: dict) -> None:
        values = scalars(rec, self.names)
        if self.tb is not None:
            for tag, v in values.items():
                self.tb.add_scalar(tag, v, rec["step"])
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(values, step=rec["step"])

    def histogram(self, tag: str, values, step: int) -> None:
        v = np.asarray(values, dtype=np.float64)
        v = v[~np.isnan(v)]
        if self.tb is not None:
            self.tb.add_histogram(tag, v, step, bins=NRN_BINS)
            self.tb.flush()
        if self.wandb is not None:
            import wandb

            counts, edges = np.histogram(v, bins=NRN_BINS)
            self.wandb.log({tag: wandb.Histogram(np_histogram=(counts, edges))}, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def _init_wandb(cfg: TrainConfig, out: Path, start_step: int):
    """A wandb run for ``out``: project $WANDB_PROJECT or 'fastxc', files under $WANDB_DIR or
    ``out``; a resumed run continues the run id recorded in ``out``."""
    import wandb

    id_file = out / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if start_step > 0 and id_file.is_file() else uuid.uuid4().hex[:8]
    try:
        run = wandb.init(project=os.environ.get("WANDB_PROJECT", "fastxc"), name=out.name, id=run_id, resume="allow",
                         dir=os.environ.get("WANDB_DIR", str(out)), config=dataclasses.asdict(cfg))
    except Exception as e:  # wandb raises its own errors (not logged in, no network, ...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TrainError(f"--log wandb: wandb.init failed: {first} (WANDB_MODE=offline logs without an account)") from None
    id_file.write_text(run_id + "\n")
    return run
