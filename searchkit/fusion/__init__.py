"""Supervised image+text classification on top of frozen searchkit encoders.

    from searchkit import get_encoder
    from searchkit.fusion import FusionConfig, load_model, read_rows, train_fusion, evaluate_model

    encoder = get_encoder("mini")
    rows = read_rows("train.csv", images_dir="photos/")            # image,text,label columns
    model = train_fusion(rows, encoder, FusionConfig(method="gated", modality="both"))
    model.save("models/gated")
    report = evaluate_model(load_model("models/gated"), encoder, read_rows("dev.csv", images_dir="photos/"))

Pieces: `data` (CSV rows, class checks, splits), `features` (cached frozen features, pooled and
token-level), `tokens` (token adapters per encoder family), `nets` (concat / gated / attention
fusion, torch), `train`, `model` (save/load), `predict`, `report` (metrics and figures),
`ablation`. Importing this package does not import torch.
"""

from __future__ import annotations

from .ablation import AblationResult, AblationRun, ablate
from .data import Columns, Rows, read_rows
from .features import Features, extract_features
from .model import FusionModel, load_model, resolve_encoder
from .predict import Prediction, evaluate_model, predict_one
from .report import EvalReport
from .tokens import register_token_adapter, token_adapter
from .train import METHODS, MODALITIES, EpochStats, FusionConfig, fit_model, train_fusion

__all__ = [
    "METHODS",
    "MODALITIES",
    "AblationResult",
    "AblationRun",
    "Columns",
    "EpochStats",
    "EvalReport",
    "Features",
    "FusionConfig",
    "FusionModel",
    "Prediction",
    "Rows",
    "ablate",
    "evaluate_model",
    "extract_features",
    "fit_model",
    "load_model",
    "predict_one",
    "read_rows",
    "register_token_adapter",
    "resolve_encoder",
    "token_adapter",
    "train_fusion",
]
