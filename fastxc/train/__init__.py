"""Train a crosscoder: ``python -m fastxc.train [flags]`` or ``fastxc.train.main(argv)``.

Config precedence: dataclass defaults < ``--config file.json|yaml`` < command-line flags.
Data: ``--store DIR`` (an activation store), ``--source synthetic`` (planted features), or,
with neither, the embedded default. Outputs in ``--out``: ``crosscoder/``, ``checkpoint/``,
``metrics.jsonl``, ``summary.json`` (``fastxc.train.loop``).

Modules, one job each:

    config            TrainConfig (every field a --flag), the parser, config files
    loop              train(): setup, resume, the step loop, metrics, evaluation
    checkpoint        checkpoints of either format: save, find, load, load_full_model
    command           main(): the command line around train() (and --sweep)
    sweep             --sweep: several runs trained from one stream of batches
    parallel          torch.distributed: process group, collectives, each rank's batches
    data_parallel     DataParallelCrosscoder (--parallel data)
    feature_parallel  FeatureParallelCrosscoder (--parallel features)

Several processes: ``torchrun --nproc-per-node N -m fastxc.train ... --parallel data|features``
(gloo on CPU, NCCL on CUDA); ``--parallel`` without torchrun runs as a world of one.
"""
from fastxc.train.checkpoint import (CHECKPOINT_VERSION, find_checkpoint, load_checkpoint, load_full_model,
                                     save_checkpoint)
from fastxc.train.command import main, print_summary
from fastxc.train.config import TrainConfig, TrainError, build_parser, load_config_file, parse_config
from fastxc.train.feature_parallel import feature_parallel_comm_bytes
from fastxc.train.loop import DataSource, TrainResult, evaluate, l1_at, lr_at, open_data, train
from fastxc.train.sweep import Sweep, sweep_from_flags, train_sweep

__all__ = [
    "CHECKPOINT_VERSION", "DataSource", "Sweep", "TrainConfig", "TrainError", "TrainResult", "build_parser", "evaluate",
    "feature_parallel_comm_bytes", "find_checkpoint", "l1_at", "load_checkpoint", "load_config_file",
    "load_full_model", "lr_at", "main", "open_data", "parse_config", "print_summary", "save_checkpoint",
    "sweep_from_flags", "train", "train_sweep",
]
