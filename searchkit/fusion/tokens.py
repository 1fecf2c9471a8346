"""Token-level features of frozen encoders, for the cross-attention fusion method.

The encoder contract only promises pooled embeddings. Attention needs the sequences behind
them: ViT patch tokens or CNN feature-map cells for images, per-token hidden states for texts.
An adapter reaches into one encoder family's model to get them:

- open_clip encoders with a ViT image tower and a CLIP text tower: the patch tokens after the
  final norm and the text token states after `ln_final`, both passed through the model's own
  projections, so tokens live in the joint embedding space;
- trained dual encoders (`mini`, checkpoint folders): EfficientNet-Lite feature-map cells
  (average-pooled to at most 7x7) and MiniLM token states, or the open_clip tower's tokens.

`token_adapter(encoder)` picks the adapter or raises UsageError naming what works instead.
Other families add theirs with `register_token_adapter`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from ..encoders.base import Encoder
from ..errors import UsageError

if TYPE_CHECKING:
    import torch

LOG = logging.getLogger(__name__)

#: text token states kept per text (the rest of a longer text is cut)
MAX_TEXT_TOKENS = 64
#: CNN feature maps are average-pooled to at most this many cells a side
MAX_GRID = 7


class TokenAdapter:
    """Token sequences of one encoder: images (n, T, d) with a fixed T, texts (L_i, d) each.

    `pooled_and_image_tokens` gets the pooled embeddings (from the encoder contract itself) and
    the image tokens in one forward pass: a hook on the module whose output (or input) holds the
    tokens catches them on the way. Hooks are per module, so do not share one encoder between
    threads while this runs.
    """

    encoder: Encoder

    def image_tokens(self, batch: torch.Tensor) -> np.ndarray:
        raise NotImplementedError

    def text_tokens(self, texts: list[str]) -> list[np.ndarray]:
        raise NotImplementedError

    def _hook(self) -> tuple[Any, bool] | None:
        """(module, True for its input / False for its output) that carries the tokens, or None."""
        return None

    def _tokens_from_hook(self, x: torch.Tensor) -> np.ndarray:
        raise NotImplementedError

    def pooled_and_image_tokens(self, batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """((n, dim) pooled embeddings exactly as `encode_image_tensors` gives, (n, T, d) tokens)."""
        caught: list[Any] = []
        where = self._hook()
        handle = None
        if where is not None:
            module, on_input = where
            if on_input:
                handle = module.register_forward_pre_hook(lambda m, args: caught.append(args[0]))
            else:
                handle = module.register_forward_hook(lambda m, args, out: caught.append(out))
        try:
            pooled = self.encoder.encode_image_tensors(batch)
        finally:
            if handle is not None:
                handle.remove()
        if len(caught) != 1:  # the encoder took another path (e.g. an exported runtime)
            return pooled, self.image_tokens(batch)
        import torch

        with torch.inference_mode():
            return pooled, self._tokens_from_hook(caught[0])


AdapterMaker = Callable[[Encoder], "TokenAdapter | None"]
_MAKERS: list[AdapterMaker] = []


def register_token_adapter(maker: AdapterMaker) -> None:
    """Add a function that returns a TokenAdapter for encoders it understands, else None."""
    _MAKERS.insert(0, maker)


def token_adapter(encoder: Encoder) -> TokenAdapter:
    """The token adapter of `encoder`; UsageError when its family cannot give tokens."""
    encoder = getattr(encoder, "torch_encoder", lambda: encoder)()  # tokens come from the torch model
    for maker in [*_MAKERS, _open_clip_adapter, _tower_adapter]:
        adapter = maker(encoder)
        if adapter is not None:
            return adapter
    raise UsageError(
        f"model {encoder.spec} cannot give token features, which --method attention needs; "
        "use --method concat or gated, or an open_clip ViT model or mini"
    )


# --- open_clip -------------------------------------------------------------------------------


def _vit_tokens(visual: Any, batch: torch.Tensor) -> torch.Tensor:
    """Patch tokens of an open_clip VisionTransformer, normed and projected: (n, grid², d)."""
    return _vit_head(visual, visual.transformer(visual._embeds(batch)))


def _vit_head(visual: Any, x: torch.Tensor) -> torch.Tensor:
    """Transformer output (n, 1 + grid², width) to projected patch tokens (n, grid², d)."""
    x = visual.ln_post(x[:, 1:])  # drop the class token; the pooled embedding stands for it
    if visual.proj is not None:
        x = x @ visual.proj
    return x


def _has_vit(visual: Any) -> bool:
    return all(hasattr(visual, a) for a in ("_embeds", "transformer", "ln_post", "proj")) and (
        getattr(visual, "attn_pool", None) is None
    )


def _text_module(model: Any) -> Any | None:
    """The object holding open_clip's text transformer parts (the CLIP model or its `.text`)."""
    holder = getattr(model, "text", model)
    needed = ("token_embedding", "positional_embedding", "transformer", "ln_final")
    if not all(hasattr(holder, a) for a in needed) or getattr(holder, "cls_emb", None) is not None:
        return None
    return holder


def _clip_text_tokens(model: Any, tokenizer: Any, texts: list[str], device: str) -> list[np.ndarray]:
    import torch

    t = _text_module(model)
    tokens = tokenizer(texts).to(device)
    pad = int(getattr(t, "pad_id", 0) or 0)
    valid = tokens != pad
    length = max(1, int(valid.sum(dim=1).max().item()))
    tokens, valid = tokens[:, :length], valid[:, :length]
    cast = t.transformer.get_cast_dtype() if hasattr(t.transformer, "get_cast_dtype") else torch.float32
    x = t.token_embedding(tokens).to(cast) + t.positional_embedding[:length].to(cast)
    mask = getattr(t, "attn_mask", None)
    x = t.transformer(x, attn_mask=None if mask is None else mask[:length, :length])
    x = t.ln_final(x)
    proj = getattr(t, "text_projection", None)
    if proj is not None:
        x = proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj
    x = x.float().cpu().numpy()
    v = valid.cpu().numpy()
    return [np.ascontiguousarray(x[i][v[i]][:MAX_TEXT_TOKENS]) for i in range(len(texts))]


class _OpenClipAdapter(TokenAdapter):
    def __init__(self, encoder: Any):
        self.encoder = encoder

    def image_tokens(self, batch: torch.Tensor) -> np.ndarray:
        import torch

        with torch.inference_mode():
            x = _vit_tokens(self.encoder.model.visual, batch.to(self.encoder.device))
        return x.float().cpu().numpy()

    def _hook(self):
        return self.encoder.model.visual.transformer, False

    def _tokens_from_hook(self, x):
        return _vit_head(self.encoder.model.visual, x).float().cpu().numpy()

    def text_tokens(self, texts: list[str]) -> list[np.ndarray]:
        import torch

        with torch.inference_mode():
            return _clip_text_tokens(self.encoder.model, self.encoder.tokenizer, texts, self.encoder.device)


def _open_clip_adapter(encoder: Encoder) -> TokenAdapter | None:
    model = getattr(encoder, "model", None)
    if model is None or not hasattr(encoder, "tokenizer") or not encoder.spec.startswith("open_clip:"):
        return None
    if not _has_vit(getattr(model, "visual", None)) or _text_module(model) is None:
        raise UsageError(
            f"{encoder.spec}: token features need an open_clip ViT image tower and a CLIP text "
            "transformer; use --method concat or gated with this model"
        )
    return _OpenClipAdapter(encoder)


# --- trained dual encoders (frozen towers + heads) ---------------------------------------------


def _cells(fmap: torch.Tensor) -> np.ndarray:
    """A CNN feature map (n, C, H, W) to cell tokens (n, h*w, C), average-pooled to <= MAX_GRID."""
    import torch.nn.functional as F

    h, w = fmap.shape[-2:]
    if h > MAX_GRID or w > MAX_GRID:
        fmap = F.adaptive_avg_pool2d(fmap, (min(h, MAX_GRID), min(w, MAX_GRID)))
    return fmap.flatten(2).transpose(1, 2).float().cpu().numpy()


class _TowerAdapter(TokenAdapter):
    def __init__(self, encoder: Any):
        self.encoder = encoder
        self.image_tower = encoder.image_tower
        self.text_tower = encoder.text_tower
        self.device = encoder.device

    def image_tokens(self, batch: torch.Tensor) -> np.ndarray:
        import torch

        tower = self.image_tower
        with torch.inference_mode():
            batch = batch.to(self.device)
            if hasattr(tower, "_enc"):  # an open_clip image tower
                return _vit_tokens(tower._enc.model.visual, batch).float().cpu().numpy()
            return _cells(tower.model.forward_features(batch))

    def _hook(self):
        tower = self.image_tower
        if hasattr(tower, "_enc"):
            return tower._enc.model.visual.transformer, False
        pool = getattr(tower.model, "global_pool", None)  # timm CNNs pool forward_features' output
        return (pool, True) if pool is not None else None

    def _tokens_from_hook(self, x):
        if hasattr(self.image_tower, "_enc"):
            return _vit_head(self.image_tower._enc.model.visual, x).float().cpu().numpy()
        return _cells(x)

    def text_tokens(self, texts: list[str]) -> list[np.ndarray]:
        import torch

        tower = self.text_tower
        with torch.inference_mode():
            if hasattr(tower, "_enc"):  # an open_clip text tower
                enc = tower._enc
                return _clip_text_tokens(enc.model, enc.tokenizer, texts, self.device)
            tok = tower.tokenizer(
                list(texts), padding=True, truncation=True, max_length=MAX_TEXT_TOKENS, return_tensors="pt"
            ).to(self.device)
            hidden = tower.model(**tok).last_hidden_state.float().cpu().numpy()
            valid = tok["attention_mask"].bool().cpu().numpy()
        return [np.ascontiguousarray(hidden[i][valid[i]]) for i in range(len(texts))]


def _tower_adapter(encoder: Encoder) -> TokenAdapter | None:
    image, text = getattr(encoder, "image_tower", None), getattr(encoder, "text_tower", None)
    if image is None or text is None:
        return None
    image_ok = hasattr(image, "_enc") and _has_vit(image._enc.model.visual) or hasattr(
        getattr(image, "model", None), "forward_features"
    )
    text_ok = (hasattr(text, "_enc") and _text_module(text._enc.model) is not None) or (
        hasattr(text, "tokenizer") and hasattr(text, "model")
    )
    if not (image_ok and text_ok):
        raise UsageError(
            f"{encoder.spec}: its towers ({image.spec}, {text.spec}) cannot give token features; "
            "use --method concat or gated with this model"
        )
    return _TowerAdapter(encoder)
