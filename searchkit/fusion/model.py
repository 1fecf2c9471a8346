"""A trained fusion classifier: its net, its classes, the encoder it reads, and its folder.

A model folder holds

  config.json          format, version, encoder spec + fingerprint + dim, method, modality,
                       classes, net shape, CSV column names, training settings and history
  model.safetensors    the net's weights
  training_curve.png   loss and accuracy per epoch

Each file is replaced atomically and config.json is written last, so a folder either holds a
complete model or none that loads. A model only accepts features of the encoder it was trained
on: `load_model` refuses another spec or a changed fingerprint (ModelMismatchError).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..encoders.base import Encoder
from ..errors import ModelMismatchError, ModelUnavailableError, UnknownModelError
from ..fsutil import atomic_write_bytes, atomic_write_json
from .data import Columns, Rows
from .features import Features, extract_features

if TYPE_CHECKING:
    import torch

    from .nets import FusionNet, NetSpec

LOG = logging.getLogger(__name__)

FORMAT = "searchkit.fusion"
VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CURVE_FILE = "training_curve.png"


@dataclass
class FusionModel:
    """A fusion net plus what it needs to be used and saved again."""

    net: FusionNet
    spec: NetSpec
    classes: list[str]
    encoder_spec: str
    encoder_fingerprint: str
    columns: Columns = field(default_factory=Columns)
    training: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def method(self) -> str:
        return self.spec.method

    @property
    def modality(self) -> str:
        return self.spec.modality

    def features(
        self, encoder: Encoder, rows: Rows, *, cache_dir: str | os.PathLike | None = None, cache: bool = True
    ) -> Features:
        """The frozen-encoder features this model reads, for `rows`."""
        self.check_encoder(encoder)
        feats = extract_features(
            encoder,
            rows,
            tokens=self.spec.method == "attention",
            use_image=self.spec.modality != "text",
            use_text=self.spec.modality != "image",
            cache_dir=cache_dir,
            cache=cache,
        )
        self.check_features(feats)
        return feats

    def check_encoder(self, encoder: Encoder) -> None:
        if encoder.spec != self.encoder_spec:
            raise ModelMismatchError(
                f"this fusion model was trained on features of {self.encoder_spec}, not {encoder.spec}; "
                "leave out --model, or train a model for this encoder"
            )
        if encoder.fingerprint != self.encoder_fingerprint or encoder.dim != self.spec.dim:
            raise ModelMismatchError(
                f"the weights of {encoder.spec} changed since this fusion model was trained "
                f"(fingerprint {self.encoder_fingerprint}, now {encoder.fingerprint}); retrain it"
            )

    def check_features(self, feats: Features) -> None:
        s = self.spec
        if s.method != "attention":
            return
        if len(feats.image_tokens) and feats.image_tokens.shape[1:] != (s.n_image_tokens, s.image_token_dim):
            raise ModelMismatchError(
                f"image tokens of shape {feats.image_tokens.shape[1:]} do not fit this model "
                f"({s.n_image_tokens}, {s.image_token_dim}); it was trained with another encoder"
            )
        if len(feats.text_tokens) and feats.text_tokens.shape[-1] != s.text_token_dim:
            raise ModelMismatchError("text token width does not fit this model; it was trained with another encoder")

    def predict_proba(self, feats: Features, *, batch_size: int = 256, device: str = "cpu") -> np.ndarray:
        """(n, n_classes) class probabilities for every row of `feats`."""
        import torch

        self.net.to(device).eval()
        tables = self.net.prepare(feature_tensors(feats))
        out = []
        with torch.inference_mode():
            for start in range(0, len(feats), batch_size):
                idx = np.arange(start, min(start + batch_size, len(feats)))
                batch = make_batch(tables, idx, self.spec, device)
                out.append(self.net(batch).float().softmax(-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)), dtype=np.float32)

    def config(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "encoder": {"spec": self.encoder_spec, "fingerprint": self.encoder_fingerprint, "dim": self.spec.dim},
            "method": self.spec.method,
            "modality": self.spec.modality,
            "labels": list(self.classes),
            "net": self.spec.to_dict(),
            "columns": {"image": self.columns.image, "text": self.columns.text, "label": self.columns.label},
            "training": self.training,
            "history": self.history,
        }

    def save(self, folder: str | os.PathLike, *, curve_png: bytes | None = None) -> Path:
        """Write the model folder (see the module docstring); config.json goes last."""
        from safetensors.torch import save as to_bytes

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}
        atomic_write_bytes(folder / WEIGHTS_FILE, to_bytes(state, metadata={"format": FORMAT}))
        if curve_png is not None:
            atomic_write_bytes(folder / CURVE_FILE, curve_png)
        atomic_write_json(folder / CONFIG_FILE, self.config())
        return folder


def read_model_config(folder: str | os.PathLike) -> dict[str, Any]:
    """A fusion model folder's config; UnknownModelError when the folder is not one."""
    folder = Path(folder)
    cfg_path = folder / CONFIG_FILE
    if not folder.is_dir() or not cfg_path.is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise UnknownModelError(
            f"{folder} is not a fusion model (expected {CONFIG_FILE} and {WEIGHTS_FILE}; "
            "write one with: searchkit fusion train)"
        )
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelUnavailableError(f"cannot read {cfg_path}: {e}") from e
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        raise UnknownModelError(f"{folder} is not a fusion model ({cfg_path} has format {cfg.get('format')!r})")
    if int(cfg.get("version", 0)) > VERSION:
        raise ModelUnavailableError(f"{folder} was written by a newer searchkit (fusion model version {cfg['version']})")
    return cfg


def load_model(folder: str | os.PathLike, *, device: str = "cpu") -> FusionModel:
    """Rebuild a saved fusion model (weights on `device`, eval mode)."""
    from safetensors.torch import load_file

    from .nets import NetSpec, build_net

    folder = Path(folder)
    cfg = read_model_config(folder)
    spec = NetSpec(**cfg["net"])
    net = build_net(spec)
    try:
        net.load_state_dict(load_file(str(folder / WEIGHTS_FILE), device="cpu"))
    except (RuntimeError, OSError) as e:
        raise ModelUnavailableError(f"cannot load {folder / WEIGHTS_FILE}: {str(e).splitlines()[0]}") from e
    enc = cfg["encoder"]
    return FusionModel(
        net=net.to(device).eval(),
        spec=spec,
        classes=list(cfg["labels"]),
        encoder_spec=enc["spec"],
        encoder_fingerprint=enc["fingerprint"],
        columns=Columns(**cfg.get("columns", {})),
        training=cfg.get("training", {}),
        history=cfg.get("history", []),
    )


def resolve_encoder(model: FusionModel, spec: str | None = None, *, device: str | None = None) -> Encoder:
    """The encoder a fusion model reads: its own, or `spec` if that names the same one."""
    from ..encoders import get_encoder

    if spec and spec.strip() not in (model.encoder_spec, "auto"):
        encoder = get_encoder(spec, device=device)
    else:
        encoder = get_encoder(model.encoder_spec, device=device)
    model.check_encoder(encoder)
    return encoder


# --- batches -------------------------------------------------------------------------------------


def feature_tensors(feats: Features) -> dict[str, Any]:
    """`feats` as torch tensors (sharing memory with the numpy arrays where possible)."""
    import torch

    out: dict[str, Any] = {
        "image_index": torch.from_numpy(feats.image_index),
        "text_index": torch.from_numpy(feats.text_index),
        "image": torch.from_numpy(np.ascontiguousarray(feats.image, dtype=np.float32)),
        "text": torch.from_numpy(np.ascontiguousarray(feats.text, dtype=np.float32)),
    }
    if feats.has_tokens:
        out["image_tokens"] = torch.from_numpy(feats.image_tokens)
        out["text_tokens"] = torch.from_numpy(feats.text_tokens)
        out["text_mask"] = torch.from_numpy(feats.text_mask)
    return out


def _gather(table: torch.Tensor, index: torch.Tensor, ok: torch.Tensor, shape: tuple, dtype) -> torch.Tensor:
    import torch

    out = torch.zeros((len(index), *shape), dtype=dtype)
    if bool(ok.any()):
        out[ok] = table[index[ok]].to(dtype)
    return out


def make_batch(
    tables: dict[str, Any],
    rows: np.ndarray,
    spec: NetSpec,
    device: str = "cpu",
    *,
    drop_image: np.ndarray | None = None,
    drop_text: np.ndarray | None = None,
) -> dict[str, torch.Tensor]:
    """The net's input dict for data rows `rows`; `drop_*` masks hide a side (modality dropout)."""
    import torch

    rows_t = torch.as_tensor(rows, dtype=torch.long)
    ii, ti = tables["image_index"][rows_t], tables["text_index"][rows_t]
    image_ok, text_ok = ii >= 0, ti >= 0
    if drop_image is not None:
        image_ok &= ~torch.as_tensor(drop_image)
    if drop_text is not None:
        text_ok &= ~torch.as_tensor(drop_text)
    batch = {
        "image": _gather(tables["image"], ii, image_ok, (spec.dim,), torch.float32),
        "text": _gather(tables["text"], ti, text_ok, (spec.dim,), torch.float32),
        "image_ok": image_ok,
        "text_ok": text_ok,
    }
    if spec.method == "attention":
        batch["image_tokens"] = _gather(
            tables.get("image_tokens"), ii, image_ok, (spec.n_image_tokens, spec.image_token_in), torch.float16
        )
        mask_table = tables.get("text_mask")
        length = 1
        if bool(text_ok.any()):
            length = max(1, int(mask_table[ti[text_ok]].sum(1).max().item()))
        tt = tables.get("text_tokens")
        batch["text_tokens"] = _gather(
            tt[:, :length] if tt is not None else None, ti, text_ok, (length, spec.text_token_in), torch.float16
        )
        batch["text_mask"] = _gather(
            mask_table[:, :length] if mask_table is not None else None, ti, text_ok, (length,), torch.bool
        )
    return {k: v.to(device) for k, v in batch.items()}
