"""open_clip models behind the searchkit encoder contract.

Spec: `open_clip:ARCH@PRETRAINED`, where PRETRAINED is an open_clip pretrained tag, a local
checkpoint file, or `random` (deterministic random init, for tests and benchmarks only).
Extra architecture configs (JSON, open_clip's own format) are registered from the folders or
files listed in `SEARCHKIT_OPENCLIP_CONFIGS` (os.pathsep-separated).
"""

from __future__ import annotations

import logging
import os
import socket
import warnings
from urllib.parse import urlparse

import numpy as np

from ..errors import ModelUnavailableError, UnknownModelError, require
from .base import Encoder, l2_normalize

LOG = logging.getLogger(__name__)

_registered_config_paths: set[str] = set()


def register_extra_configs() -> None:
    """Register the architecture configs named by `SEARCHKIT_OPENCLIP_CONFIGS` with open_clip."""
    open_clip = require("open_clip", "open_clip_torch")
    for path in filter(None, os.environ.get("SEARCHKIT_OPENCLIP_CONFIGS", "").split(os.pathsep)):
        if path not in _registered_config_paths and os.path.exists(path):
            open_clip.add_model_config(path)
            _registered_config_paths.add(path)


def _host_reachable(host: str, timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _weights_cached(cfg: dict) -> bool:
    hub = cfg.get("hf_hub") or ""
    if hub:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            return False
        repo_id = "/".join(hub.strip("/").split("/")[:2])
        for filename in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
            if isinstance(try_to_load_from_cache(repo_id, filename), str):
                return True
    url = cfg.get("url") or ""
    if url:
        cached = os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(urlparse(url).path))
        return os.path.isfile(cached)
    return False


def _check_weights_reachable(arch: str, tag: str, cfg: dict) -> None:
    """Fail in one line, quickly, instead of letting the hub client retry for a minute."""
    if _weights_cached(cfg):
        return
    url = cfg.get("url") or ""
    host = urlparse(url).hostname if url and not cfg.get("hf_hub") else "huggingface.co"
    if not _host_reachable(host or "huggingface.co"):
        raise ModelUnavailableError(
            f"weights for open_clip:{arch}@{tag} are not cached and {host} cannot be reached; "
            "connect once to download them, or use --model mini (works offline)"
        )


class OpenClipEncoder(Encoder):
    def __init__(self, arch: str, pretrained: str, device: str):
        open_clip = require("open_clip", "open_clip_torch")
        import torch

        register_extra_configs()
        if arch not in open_clip.list_models():
            raise UnknownModelError(
                f"unknown open_clip architecture '{arch}'; see open_clip.list_models() "
                "(e.g. ViT-B-32), or register a config via SEARCHKIT_OPENCLIP_CONFIGS"
            )
        self.spec = f"open_clip:{arch}@{pretrained}"
        self.device = device
        if pretrained == "random":
            warnings.warn(
                f"{self.spec}: randomly initialised weights; embeddings are meaningless "
                "(use only for tests and benchmarks)",
                stacklevel=3,
            )
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=None)
        else:
            if os.path.isfile(pretrained):
                self.spec = f"open_clip:{arch}@{os.path.abspath(pretrained)}"
            else:
                tags = open_clip.list_pretrained_tags_by_model(arch)
                if pretrained not in tags:
                    raise UnknownModelError(
                        f"unknown pretrained tag '{pretrained}' for open_clip {arch}; "
                        f"known: {', '.join(tags) or 'none'} (or 'random', or a checkpoint file)"
                    )
                _check_weights_reachable(arch, pretrained, open_clip.get_pretrained_cfg(arch, pretrained))
            try:
                model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=pretrained)
            except Exception as e:  # open_clip raises RuntimeError/ValueError/OSError here
                raise ModelUnavailableError(
                    f"cannot load weights for {self.spec}: {str(e).splitlines()[0]}; "
                    "use --model mini (works offline)"
                ) from e
        self.model = model.to(device).eval()
        self._preprocess = preprocess
        self.tokenizer = open_clip.get_tokenizer(arch)
        size = model.visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.dim = int(self._output_dim())
        self.logit_scale = float(model.logit_scale.exp().item())
        # bench/index_throughput.py, ViT-B-32 on an idle 2-core CPU: 15.8 / 15.1 / 15.1 / 13.5
        # images/s at batch 8 / 16 / 32 / 64 (an earlier run under load had favoured 64); small
        # batches also start the encoder sooner and keep the decode window small
        self.image_batch_size = 128 if device.startswith("cuda") else 16

    def _output_dim(self) -> int:
        import torch

        with torch.inference_mode():
            return self.model.encode_text(self.tokenizer(["x"]).to(self.device)).shape[-1]

    def preprocess(self, image):
        return self._preprocess(image)

    @property
    def image_transform(self):
        return self._preprocess

    def _autocast(self):
        import contextlib

        import torch

        if self.device.startswith("cuda"):
            return torch.autocast("cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    def encode_image_tensors(self, batch) -> np.ndarray:
        import torch

        with torch.inference_mode(), self._autocast():
            return l2_normalize(self.model.encode_image(batch.to(self.device, non_blocking=True)))

    def _encode_text_batch(self, texts: list[str]) -> np.ndarray:
        import torch

        tokens = self.tokenizer(texts).to(self.device)
        with torch.inference_mode(), self._autocast():
            return l2_normalize(self._encode_tokens(tokens))

    def _encode_tokens(self, tokens):
        """open_clip's encode_text, cut to the longest prompt in the batch when that is exact.

        CLIP's text tower is causal and pools at the end-of-text token, so padding after the
        longest prompt never influences any output: dropping it gives identical embeddings.
        """
        if not self.can_cut_text_padding:
            return self.model.encode_text(tokens)
        length = int((tokens != 0).sum(dim=1).max().item())
        return self.text_forward(tokens[:, :length])

    @property
    def can_cut_text_padding(self) -> bool:
        m = self.model
        return (
            getattr(m, "text_pool_type", None) in ("argmax", "eos")
            and getattr(m, "attn_mask", None) is not None
            and hasattr(m, "token_embedding")
        )

    def text_forward(self, tokens):
        """The text tower on tokens of any length <= the context (unnormalized embeddings)."""
        import torch
        from open_clip.transformer import text_global_pool

        m = self.model
        length = tokens.shape[1]
        cast_dtype = m.transformer.get_cast_dtype()
        x = m.token_embedding(tokens).to(cast_dtype)
        x = x + m.positional_embedding[:length].to(cast_dtype)
        x = m.transformer(x, attn_mask=m.attn_mask[:length, :length])
        x = m.ln_final(x)
        x = text_global_pool(x, tokens, m.text_pool_type, eos_token_id=getattr(m, "text_eos_id", None))
        if m.text_projection is not None:
            x = m.text_projection(x) if isinstance(m.text_projection, torch.nn.Linear) else x @ m.text_projection
        return x

    def image_module(self):
        """The module mapping a preprocessed NCHW batch to unnormalized embeddings."""
        return self.model.visual

    def bpe_tokenizer(self):
        """open_clip's SimpleTokenizer when this model uses it (for torch-free export), else None."""
        from open_clip.tokenizer import SimpleTokenizer

        return self.tokenizer if isinstance(self.tokenizer, SimpleTokenizer) else None


def load_open_clip(rest: str, device: str) -> Encoder:
    arch, sep, pretrained = rest.partition("@")
    if not arch or not sep or not pretrained:
        raise UnknownModelError(
            f"bad open_clip spec 'open_clip:{rest}'; expected open_clip:ARCH@PRETRAINED "
            "(e.g. open_clip:ViT-B-32@laion2b_s34b_b79k or open_clip:ViT-B-32@random)"
        )
    return OpenClipEncoder(arch, pretrained, device)
