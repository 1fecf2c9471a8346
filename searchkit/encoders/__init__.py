"""Encoder registry: every model spec string resolves here, and only here.

Spec forms:
  open_clip:ARCH@PRETRAINED   open_clip weights through open_clip's own download and cache
  open_clip:ARCH@random       random init (deterministic seed), for tests and benchmarks only
  SPEC+int8                   SPEC with its image tower run as int8 ONNX on CPU (faster indexing)
  auto                        the quality default when its weights can be had, else the
                              offline fallback (see `AUTO_CANDIDATES`)

Other families register a prefix with `register_family(prefix, factory)`; a factory receives
the part after the first ':' and the device. A family may also give `fingerprint(rest)`, the
fingerprint its factory would produce, computed without loading the model: on CPU the registry
then finds the model's cached ONNX image tower (encoders/onnx_image.py) and builds no torch
model at all.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from ..errors import ModelUnavailableError, UnknownModelError
from .base import Encoder, ImageInput, default_device, l2_normalize

__all__ = [
    "Encoder",
    "ImageInput",
    "get_encoder",
    "register_family",
    "resolve_auto",
    "families",
    "default_device",
    "l2_normalize",
    "DEFAULT_SPEC",
]

LOG = logging.getLogger(__name__)

#: the quality default `auto` resolves to when its weights can be had
DEFAULT_SPEC = "open_clip:ViT-B-32@laion2b_s34b_b79k"
#: spec suffix selecting the int8 ONNX Runtime image tower (see encoders/onnx.py)
INT8_SUFFIX = "+int8"
#: what `auto` tries, in order
AUTO_CANDIDATES: list[str] = [DEFAULT_SPEC]

Factory = Callable[[str, str], Encoder]
_FAMILIES: dict[str, Factory] = {}
_FINGERPRINTS: dict[str, Callable[[str], str | None]] = {}
_CACHE: dict[tuple[str, str], Encoder] = {}
_LOCK = threading.Lock()


def register_family(prefix: str, factory: Factory, fingerprint: Callable[[str], str | None] | None = None) -> None:
    """Make `prefix:REST` specs resolve through `factory(REST, device)`; `fingerprint(REST)`,
    when given, is the encoder's fingerprint without building it (None: unknown)."""
    _FAMILIES[prefix] = factory
    if fingerprint is not None:
        _FINGERPRINTS[prefix] = fingerprint


def families() -> list[str]:
    _ensure_builtin()
    return sorted(_FAMILIES)


def _ensure_builtin() -> None:
    if "open_clip" not in _FAMILIES:
        from .openclip import load_open_clip, open_clip_fingerprint

        register_family("open_clip", load_open_clip, open_clip_fingerprint)
        from . import mini  # noqa: F401  (registers "mini" and checkpoint paths; appends "mini" to auto)


def resolve_auto(device: str | None = None) -> tuple[Encoder, str]:
    """The first `AUTO_CANDIDATES` entry that loads, and why it was chosen."""
    reasons = []
    for spec in AUTO_CANDIDATES:
        try:
            enc = get_encoder(spec, device=device)
        except ModelUnavailableError as e:
            reasons.append(str(e))
            continue
        why = "its weights are available" if not reasons else "; ".join(reasons)
        return enc, f"model 'auto' uses {enc.spec} ({why})"
    raise ModelUnavailableError(
        "no model for 'auto' can be loaded: " + "; ".join(reasons)
    )


def get_encoder(spec: str = "auto", *, device: str | None = None) -> Encoder:
    """Build (or reuse) the encoder a spec string names.

    Raises UnknownModelError for a spec no family understands, ModelUnavailableError when the
    weights cannot be had, MissingDependencyError when the family's library is missing.
    """
    _ensure_builtin()
    spec = spec.strip()
    device = device or default_device()
    if spec == "auto":
        enc, why = resolve_auto(device)
        LOG.info(why)
        return enc
    key = (spec, device)
    with _LOCK:
        if key in _CACHE:
            return _CACHE[key]
    prefix, sep, rest = spec.partition(":")
    if spec.endswith(INT8_SUFFIX):
        from .onnx import Int8ImageEncoder

        enc = Int8ImageEncoder(get_encoder(spec[: -len(INT8_SUFFIX)], device=device))
    elif sep and prefix in _FAMILIES:
        enc = _build(prefix, rest, device)
    elif not sep and spec in _FAMILIES:
        enc = _build(spec, "", device)
    elif "" in _FAMILIES and _looks_like_path(spec):
        enc = _build("", spec, device)
    else:
        raise UnknownModelError(
            f"unknown model spec '{spec}'; use one of: auto, "
            + ", ".join(f"{f}:…" if f else "PATH" for f in sorted(_FAMILIES))
            + " (e.g. open_clip:ViT-B-32@laion2b_s34b_b79k)"
        )
    with _LOCK:
        _CACHE[key] = enc
    return enc


def _build(family: str, rest: str, device: str) -> Encoder:
    """The family's encoder; on CPU, with its image tower on ONNX Runtime where it has one."""
    from . import onnx_image

    factory = _FAMILIES[family]
    if not onnx_image.enabled(device):
        return factory(rest, device)
    hint = _FINGERPRINTS.get(family)
    return onnx_image.load(hint(rest) if hint else None, lambda: factory(rest, device))


def _looks_like_path(spec: str) -> bool:
    import os

    return os.sep in spec or spec.startswith(".") or os.path.exists(spec)
