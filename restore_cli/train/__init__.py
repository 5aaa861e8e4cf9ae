"""Training: config schema, on-the-fly data, losses, EMA, checkpoints and the loop.

``train(TrainOptions(config=...))`` is the `restore-cli train` command; see docs/training.md.
"""

from restore_cli.train.config import TrainConfig, load_config
from restore_cli.train.loop import TrainOptions, TrainResult, run_training, train

__all__ = ["TrainConfig", "TrainOptions", "TrainResult", "load_config", "run_training", "train"]
