"""Contrastive training of dual encoders: frozen towers, trained projection heads.

    from searchkit.train import TrainConfig, train
    result = train("captions.csv", "images/", "checkpoints/mine", TrainConfig(image_tower="efficientnet_lite2"),
                   val_split="dev.txt")
    encoder = searchkit.get_encoder("checkpoints/mine")
"""

from __future__ import annotations

from .contrastive import EpochStats, TrainConfig, TrainResult, distinct_image_batches, fit_heads, train

__all__ = ["TrainConfig", "TrainResult", "EpochStats", "train", "fit_heads", "distinct_image_batches"]
