"""Training: `python -m jmp_ext.train` for JMP pretraining and fine-tuning (see __main__.py)."""

from jmp_ext.train.config import ConfigError, TrainConfig, TrainError, load_config

__all__ = ["ConfigError", "TrainConfig", "TrainError", "load_config"]
