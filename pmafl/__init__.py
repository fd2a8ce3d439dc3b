"""pmafl core: models, data, attacks, losses, teacher cache, local training and evaluation.

Plain PyTorch; imports no Flower code, so any Flower project or script can reuse it.
"""

from pmafl.config import ConfigError, RunConfig, TrainConfig
from pmafl.train import pmafl_train, train_model

__all__ = ["ConfigError", "RunConfig", "TrainConfig", "pmafl_train", "train_model"]
