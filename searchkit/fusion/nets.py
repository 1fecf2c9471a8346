"""The fusion networks (torch modules). Import this module lazily: it imports torch.

All three read a batch dict of frozen features and return class logits:

  image, text            (B, dim) pooled embeddings (the encoder contract: shared space, unit rows)
  image_ok, text_ok      (B,) bool; False marks a missing side, which the net replaces by its own
                         learned placeholder (so missing inputs train and predict on one path)
  image_tokens           (B, T, d_img)  attention only
  text_tokens, text_mask (B, L, d_txt), (B, L)  attention only

Methods:
  concat     MLP over [u_i, u_t, u_i*u_t, |u_i-u_t|]. The product and difference terms are
             what make *agreement* between the two sides learnable (plain concatenation leaves
             a matching task to the MLP to rediscover a bilinear form); `interactions=False`
             gives plain concatenation, for ablations.
  gated      a gated multimodal unit: image, text and interaction experts (tanh projections),
             mixed per hidden unit by softmax gates computed from both sides, then an MLP.
  attention  co-attention over token sequences: text tokens attend to image patches and image
             patches to text tokens; each sequence starts with its pooled embedding (through one
             shared projection, keeping the two in one space), and the two global outputs meet
             in the same interaction head as `concat`.

A net built for one modality sees the other as always missing.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass
class NetSpec:
    """Everything needed to rebuild a net (stored in the model's config.json)."""

    method: str
    modality: str
    n_classes: int
    dim: int
    hidden: int = 256
    dropout: float = 0.2
    #: dropout on the standardized pooled inputs (feature noise; see FusionNet)
    input_dropout: float = 0.4
    interactions: bool = True
    image_token_dim: int = 0
    text_token_dim: int = 0
    n_image_tokens: int = 0
    max_text_tokens: int = 0
    attn_dim: int = 64
    attn_heads: int = 4
    attn_layers: int = 1
    #: token features wider than this are first reduced to it by a fixed PCA (0: never)
    token_reduce: int = 256

    def to_dict(self) -> dict:
        return asdict(self)

    def reduced(self, width: int) -> int:
        """The width a token feature of `width` has after the fixed PCA reduction."""
        return min(width, self.token_reduce) if self.token_reduce else width

    @property
    def image_token_in(self) -> int:
        return self.reduced(self.image_token_dim)

    @property
    def text_token_in(self) -> int:
        return self.reduced(self.text_token_dim)


def _mlp(d_in: int, hidden: int, d_out: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.LayerNorm(d_in),
        nn.Linear(d_in, hidden),
        nn.GELU(),
        nn.Dropout(dropout),
        nn.Linear(hidden, hidden),
        nn.GELU(),
        nn.Dropout(dropout),
        nn.Linear(hidden, d_out),
    )


def _pair_features(a: torch.Tensor, b: torch.Tensor, interactions: bool) -> torch.Tensor:
    if not interactions:
        return torch.cat([a, b], dim=-1)
    return torch.cat([a, b, a * b, (a - b).abs()], dim=-1)


class FusionNet(nn.Module):
    """Shared parts: input standardization, the modality switch and the pooled placeholders.

    Pooled embeddings are standardized per dimension with statistics of the training rows
    (fixed buffers, saved with the weights): this removes each modality's constant offset (the
    "modality gap" of CLIP-style spaces, or the common direction of an untrained tower), so
    products and differences compare what varies between inputs. `input_dropout` then drops
    standardized dimensions while training: noise on the similarity the head reads, which keeps
    it from trusting the over-tight agreement an encoder shows on pairs it was trained on.
    """

    def __init__(self, spec: NetSpec):
        super().__init__()
        self.spec = spec
        for side in ("image", "text"):
            self.register_buffer(f"{side}_mean", torch.zeros(spec.dim))
            self.register_buffer(f"{side}_std", torch.full((spec.dim,), 1.0 / math.sqrt(spec.dim)))
        self.image_missing = nn.Parameter(torch.randn(spec.dim) * 0.02)
        self.text_missing = nn.Parameter(torch.randn(spec.dim) * 0.02)
        self.input_drop = nn.Dropout(spec.input_dropout)

    def prepare(self, tables: dict) -> dict:
        """Fixed transforms of whole feature tables, applied once before batching (none here)."""
        return tables

    @torch.no_grad()
    def set_stats(self, image: torch.Tensor | None, text: torch.Tensor | None) -> None:
        """Fix the standardization from training features ((n, dim) each; None or empty: keep)."""
        for side, x in (("image", image), ("text", text)):
            if x is not None and len(x) > 1:
                getattr(self, f"{side}_mean").copy_(x.float().mean(0))
                getattr(self, f"{side}_std").copy_(x.float().std(0).clamp_min(1e-4))

    def present(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(image_ok, text_ok) after the modality switch."""
        image_ok, text_ok = batch["image_ok"], batch["text_ok"]
        if self.spec.modality == "image":
            text_ok = torch.zeros_like(text_ok)
        elif self.spec.modality == "text":
            image_ok = torch.zeros_like(image_ok)
        return image_ok, text_ok

    def pooled(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(u_image, u_text, image_ok, text_ok): standardized embeddings, placeholders where missing."""
        image_ok, text_ok = self.present(batch)
        x_i = self.input_drop((batch["image"] - self.image_mean) / self.image_std)
        x_t = self.input_drop((batch["text"] - self.text_mean) / self.text_std)
        u_i = torch.where(image_ok[:, None], x_i, self.image_missing.expand_as(x_i))
        u_t = torch.where(text_ok[:, None], x_t, self.text_missing.expand_as(x_t))
        return u_i, u_t, image_ok, text_ok


class ConcatFusion(FusionNet):
    def __init__(self, spec: NetSpec):
        super().__init__(spec)
        width = spec.dim * (4 if spec.interactions else 2)
        self.head = _mlp(width, spec.hidden, spec.n_classes, spec.dropout)

    def forward(self, batch: dict) -> torch.Tensor:
        u_i, u_t, _, _ = self.pooled(batch)
        return self.head(_pair_features(u_i, u_t, self.spec.interactions))


class GatedFusion(FusionNet):
    def __init__(self, spec: NetSpec):
        super().__init__(spec)
        d, h = spec.dim, spec.hidden
        self.n_experts = 3 if spec.interactions else 2
        self.norm_i, self.norm_t = nn.LayerNorm(d), nn.LayerNorm(d)
        self.expert_i = nn.Linear(d, h)
        self.expert_t = nn.Linear(d, h)
        self.expert_x = nn.Linear(2 * d, h) if spec.interactions else None
        self.gate = nn.Linear(d * (3 if spec.interactions else 2), h * self.n_experts)
        self.head = _mlp(h, h, spec.n_classes, spec.dropout)

    def forward(self, batch: dict) -> torch.Tensor:
        u_i, u_t, _, _ = self.pooled(batch)
        a, b = self.norm_i(u_i), self.norm_t(u_t)
        experts = [torch.tanh(self.expert_i(a)), torch.tanh(self.expert_t(b))]
        gate_in = [a, b]
        if self.expert_x is not None:
            experts.append(torch.tanh(self.expert_x(torch.cat([u_i * u_t, (u_i - u_t).abs()], dim=-1))))
            gate_in.append(u_i * u_t)
        gates = self.gate(torch.cat(gate_in, dim=-1)).view(len(a), self.n_experts, -1).softmax(dim=1)
        mixed = (gates * torch.stack(experts, dim=1)).sum(dim=1)
        return self.head(mixed)


class CoAttentionLayer(nn.Module):
    """Text attends to image and image to text (both from the previous states), then MLPs."""

    def __init__(self, d: int, heads: int, dropout: float):
        super().__init__()
        self.norm_t, self.norm_i = nn.LayerNorm(d), nn.LayerNorm(d)
        self.t_from_i = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.i_from_t = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.ff_t = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * d, d))
        self.ff_i = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * d, d))

    def forward(self, t, t_mask, i, i_mask):
        qt, qi = self.norm_t(t), self.norm_i(i)
        t = t + self.t_from_i(qt, qi, qi, key_padding_mask=~i_mask, need_weights=False)[0]
        i = i + self.i_from_t(qi, qt, qt, key_padding_mask=~t_mask, need_weights=False)[0]
        return t + self.ff_t(t), i + self.ff_i(i)


class AttentionFusion(FusionNet):
    def __init__(self, spec: NetSpec):
        super().__init__(spec)
        if not (spec.image_token_dim and spec.text_token_dim and spec.n_image_tokens and spec.max_text_tokens):
            raise ValueError("attention fusion needs token dimensions in its spec")
        d = spec.attn_dim
        for side, width in (("image", spec.image_token_dim), ("text", spec.text_token_dim)):
            if spec.reduced(width) < width:  # fixed PCA, fitted by `fit_reduction`
                self.register_buffer(f"{side}_pca_mean", torch.zeros(width))
                self.register_buffer(f"{side}_pca", torch.zeros(width, spec.reduced(width)))
        self.global_in = nn.Linear(spec.dim, d)  # one projection for both pooled embeddings
        self.image_in = nn.Sequential(nn.Linear(spec.image_token_in, d), nn.LayerNorm(d))
        self.text_in = nn.Sequential(nn.Linear(spec.text_token_in, d), nn.LayerNorm(d))
        self.image_pos = nn.Parameter(torch.randn(1, 1 + spec.n_image_tokens, d) * 0.02)
        self.text_pos = nn.Parameter(torch.randn(1, 1 + spec.max_text_tokens, d) * 0.02)
        self.image_missing_token = nn.Parameter(torch.randn(d) * 0.02)
        self.text_missing_token = nn.Parameter(torch.randn(d) * 0.02)
        self.layers = nn.ModuleList(
            CoAttentionLayer(d, spec.attn_heads, spec.dropout) for _ in range(spec.attn_layers)
        )
        self.out_norm_i, self.out_norm_t = nn.LayerNorm(d), nn.LayerNorm(d)
        width = d * (4 if spec.interactions else 2)
        self.head = _mlp(width, spec.hidden, spec.n_classes, spec.dropout)

    @torch.no_grad()
    def fit_reduction(self, image_tokens: torch.Tensor | None, text_tokens: torch.Tensor | None) -> None:
        """Fit the fixed PCA of each side from sample token vectors ((n, width) each)."""
        for side, x in (("image", image_tokens), ("text", text_tokens)):
            if not hasattr(self, f"{side}_pca") or x is None or len(x) < 2:
                continue
            x = x.double()
            mean = x.mean(0)
            k = getattr(self, f"{side}_pca").shape[1]
            centred = x - mean
            _, vectors = torch.linalg.eigh(centred.T @ centred)  # ascending eigenvalues
            basis = vectors.flip(1)[:, :k].float()
            getattr(self, f"{side}_pca_mean").copy_(mean)
            getattr(self, f"{side}_pca").copy_(basis)

    @torch.no_grad()
    def prepare(self, tables: dict) -> dict:
        """Token tables reduced by the fixed PCA once, so batches carry the narrow tokens."""
        out = dict(tables)
        for side in ("image", "text"):
            key = f"{side}_tokens"
            if hasattr(self, f"{side}_pca") and out.get(key) is not None and out[key].shape[-1] != self.spec.reduced(
                out[key].shape[-1]
            ):
                mean, basis = getattr(self, f"{side}_pca_mean").cpu(), getattr(self, f"{side}_pca").cpu()
                parts = [
                    ((chunk.float() - mean) @ basis).to(torch.float16) for chunk in torch.split(out[key], 1024)
                ]
                out[key] = torch.cat(parts) if parts else out[key][..., : basis.shape[1]]
        return out

    def _sequence(self, pooled, tokens, mask, ok, proj, pos, missing):
        """[global token, tokens...] + positions; a missing side is its placeholder token alone."""
        first = torch.where(ok[:, None], self.global_in(pooled), missing.expand(len(pooled), -1))
        rest = proj(tokens)
        rest = torch.where(ok[:, None, None], rest, torch.zeros_like(rest))
        seq = torch.cat([first[:, None], rest], dim=1) + pos[:, : 1 + tokens.shape[1]]
        full = torch.cat([torch.ones_like(ok[:, None]), mask & ok[:, None]], dim=1)
        return seq, full

    def forward(self, batch: dict) -> torch.Tensor:
        u_i, u_t, image_ok, text_ok = self.pooled(batch)
        it = batch["image_tokens"].float()
        tt = batch["text_tokens"].float()[:, : self.spec.max_text_tokens]
        tmask = batch["text_mask"][:, : self.spec.max_text_tokens]
        imask = torch.ones(it.shape[:2], dtype=torch.bool, device=it.device)
        i, i_mask = self._sequence(u_i, it, imask, image_ok, self.image_in, self.image_pos, self.image_missing_token)
        t, t_mask = self._sequence(u_t, tt, tmask, text_ok, self.text_in, self.text_pos, self.text_missing_token)
        for layer in self.layers:
            t, i = layer(t, t_mask, i, i_mask)
        a_i, a_t = self.out_norm_i(i[:, 0]), self.out_norm_t(t[:, 0])
        return self.head(_pair_features(a_i, a_t, self.spec.interactions))


def build_net(spec: NetSpec) -> FusionNet:
    classes = {"concat": ConcatFusion, "gated": GatedFusion, "attention": AttentionFusion}
    return classes[spec.method](spec)
