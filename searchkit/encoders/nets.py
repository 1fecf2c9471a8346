"""Torch modules around the image towers: the whole image path as one module, and towers cut in two.

- `ConSE`: pooled EfficientNet features to pooled features + the ConSE vector, with the MiniLM
  class-prompt embeddings held as a constant buffer (so the step exports to ONNX).
- `LiteFeatures` / `Embedder`: pixels to tower features, and tower features + a projection head
  + L2 normalization to final embeddings (what `image_module()` returns for export).
- `TowerCut`: a tower split at the input of its last N blocks. The trunk runs once per image and
  its output is cached on disk; the tail (the last N blocks and everything after them) is trained.
  `prefixes` name the tail's weights inside the tower network's state dict, which is what a
  checkpoint saves and what loading applies.
- `cut_bert`: the same for a BERT text tower (MiniLM), cut at the input of its last N transformer
  layers; the trunk maps token ids to token states, the tail token states to the tower's pooled,
  unit-length features (LiT-style tuning of the text side).

Imported lazily (it imports torch at module level).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError


class ConSE(nn.Module):
    """Append the ConSE vector: the class prompts' embeddings weighted by the top-k probabilities."""

    def __init__(self, classifier: nn.Module, class_text: torch.Tensor, top_k: int):
        super().__init__()
        self.classifier = classifier
        self.register_buffer("class_text", class_text.float().clone())
        self.top_k = top_k

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        probs = self.classifier(pooled).float().softmax(-1)
        top, idx = probs.topk(self.top_k, dim=-1)
        top = top / top.sum(-1, keepdim=True)
        semantic = (top.unsqueeze(-1) * F.embedding(idx, self.class_text)).sum(1)
        return torch.cat([pooled.float(), semantic], dim=1)


class LiteFeatures(nn.Module):
    """Pixels to a timm EfficientNet's pooled features, then the tower's derive step (if any)."""

    def __init__(self, model: nn.Module, derive: nn.Module | None):
        super().__init__()
        self.model = model
        self.derive = derive if derive is not None else nn.Identity()

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        pooled = self.model.forward_head(self.model.forward_features(pixels), pre_logits=True)
        return self.derive(pooled.float())


class Embedder(nn.Module):
    """Tower features through a projection head, L2-normalized: the final image embedding."""

    def __init__(self, features: nn.Module, head: nn.Module):
        super().__init__()
        self.features = features
        self.head = head

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.features(pixels)), dim=-1)


class TowerOutputs(nn.Module):
    """One pass of an EfficientNet tower to what every CPU path of a trained dual encoder needs,
    as one ONNX graph: the final embedding, the ImageNet classifier's class probabilities
    (ConSE zero-shot) and the tower features standardized by the image head's training
    statistics, unit length (few-shot; `DualEncoder.encode_image_tensors_with_features`)."""

    def __init__(self, model: nn.Module, derive: nn.Module | None, head: nn.Module):
        super().__init__()
        self.model = model
        self.derive = derive if derive is not None else nn.Identity()
        self.head = head

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pooled = self.model.forward_head(self.model.forward_features(pixels), pre_logits=True).float()
        feats = self.derive(pooled)
        emb = F.normalize(self.head(feats), dim=-1)
        standardized = F.normalize((feats - self.head.mean) / self.head.std, dim=-1)
        return emb, self.model.get_classifier()(pooled).softmax(-1), standardized


@dataclass
class TowerCut:
    """A tower network cut at the input of its last `blocks` blocks."""

    network: nn.Module  # the module whose state dict names the tower's weights
    trunk: nn.Module  # pixels -> activations at the cut (frozen, run once per image)
    tail: nn.Module  # activations -> the tower's raw (pooled) output (trained)
    prefixes: tuple[str, ...]  # the tail's weights in `network.state_dict()`
    blocks: int

    def owns(self, key: str) -> bool:
        return any(key == p or key.startswith(p + ".") for p in self.prefixes)

    def tail_parameters(self) -> list[nn.Parameter]:
        return [p for k, p in self.network.named_parameters() if self.owns(k)]

    def tail_state(self) -> dict[str, torch.Tensor]:
        """The tail's weights under the tower network's own key names (what a checkpoint saves)."""
        return {k: v.detach().cpu().contiguous() for k, v in self.network.state_dict().items() if self.owns(k)}


class TailFeatures(nn.Module):
    """Cut activations to tower features: the trained tail, then the tower's derive step (if any)."""

    def __init__(self, tail: nn.Module, derive: nn.Module | None):
        super().__init__()
        self.tail = tail
        self.derive = derive if derive is not None else nn.Identity()

    def forward(self, acts: torch.Tensor) -> torch.Tensor:
        return self.derive(self.tail(acts))


def _check_blocks(n: int, available: int, what: str, unit: str = "blocks") -> None:
    if not 1 <= n <= available:
        raise UsageError(f"cannot unfreeze {n} {unit} of {what}: it has {available} (use 1..{available})")


class _FrozenBatchNorm(nn.Module):
    """Keeps BatchNorm layers of a trained tail on their pretrained running statistics."""

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self


class LiteTrunk(nn.Module):
    def __init__(self, model: nn.Module, blocks: list[nn.Module]):
        super().__init__()
        self.conv_stem, self.bn1, self.blocks = model.conv_stem, model.bn1, nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.bn1(self.conv_stem(x)))


class LiteTail(_FrozenBatchNorm):
    def __init__(self, model: nn.Module, blocks: list[nn.Module]):
        super().__init__()
        self.blocks = nn.Sequential(*blocks)
        self.conv_head, self.bn2, self.global_pool = model.conv_head, model.bn2, model.global_pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.global_pool(self.bn2(self.conv_head(self.blocks(x)))).float()


def cut_efficientnet(model: nn.Module, n: int) -> TowerCut:
    """A timm EfficientNet cut before its last `n` blocks (blocks counted across stages)."""
    flat = [(f"blocks.{s}.{j}", block) for s, stage in enumerate(model.blocks) for j, block in enumerate(stage)]
    _check_blocks(n, len(flat), "this EfficientNet")
    head, tail = flat[: len(flat) - n], flat[len(flat) - n :]
    return TowerCut(
        network=model,
        trunk=LiteTrunk(model, [b for _, b in head]).eval(),
        tail=LiteTail(model, [b for _, b in tail]),
        prefixes=(*(name for name, _ in tail), "conv_head", "bn2"),
        blocks=n,
    )


class VitTrunk(nn.Module):
    def __init__(self, visual: nn.Module, cut: int):
        super().__init__()
        self.visual, self.cut = visual, cut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = self.visual
        x = v._embeds(x)
        for block in v.transformer.resblocks[: self.cut]:
            x = block(x) if v.transformer.batch_first else block(x.transpose(0, 1)).transpose(0, 1)
        return x


class VitTail(nn.Module):
    def __init__(self, visual: nn.Module, cut: int):
        super().__init__()
        self.visual, self.cut = visual, cut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = self.visual
        for block in v.transformer.resblocks[self.cut :]:
            x = block(x) if v.transformer.batch_first else block(x.transpose(0, 1)).transpose(0, 1)
        pooled, _ = v._pool(x)
        return (pooled @ v.proj if v.proj is not None else pooled).float()


def cut_open_clip_vit(visual: nn.Module, n: int) -> TowerCut:
    """An open_clip VisionTransformer cut before its last `n` transformer blocks."""
    if not (hasattr(visual, "_embeds") and hasattr(visual, "_pool") and hasattr(visual, "transformer")):
        raise UsageError(
            f"partial fine-tuning supports open_clip VisionTransformer towers, not {type(visual).__name__}"
        )
    if getattr(visual, "attn_pool", None) is not None:
        raise UsageError("partial fine-tuning does not support open_clip towers with attentional pooling")
    layers = len(visual.transformer.resblocks)
    _check_blocks(n, layers, "this ViT")
    cut = layers - n
    prefixes = (*(f"transformer.resblocks.{i}" for i in range(cut, layers)), "ln_post", "proj")
    return TowerCut(visual, VitTrunk(visual, cut).eval(), VitTail(visual, cut), prefixes, n)


def _additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(batch, length) 0/1 attention mask -> (batch, 1, 1, length) additive mask for BERT layers."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def _bert_layers(layers, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    extended = _additive_mask(mask, hidden.dtype)
    for layer in layers:
        out = layer(hidden, extended)
        hidden = out[0] if isinstance(out, tuple) else out  # transformers 4 returns a tuple
    return hidden


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the non-padding token states, unit length (sentence-transformers' MiniLM pooling)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)
    return F.normalize(pooled.float(), dim=-1)


class BertTrunk(nn.Module):
    """(token ids, attention mask) -> token states at the input of layer `cut` (frozen)."""

    def __init__(self, model: nn.Module, cut: int):
        super().__init__()
        self.embeddings, self.layers = model.embeddings, nn.ModuleList(model.encoder.layer[:cut])

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = self.embeddings(input_ids=ids, token_type_ids=torch.zeros_like(ids))
        return _bert_layers(self.layers, hidden, mask)


class BertTail(nn.Module):
    """(token states at the cut, attention mask) -> the tower's pooled unit-length features."""

    def __init__(self, model: nn.Module, cut: int):
        super().__init__()
        self.layers = nn.ModuleList(model.encoder.layer[cut:])

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return mean_pool(_bert_layers(self.layers, hidden, mask), mask)


def cut_bert(model: nn.Module, n: int) -> TowerCut:
    """A transformers BERT model (MiniLM) cut before its last `n` transformer layers."""
    layers = len(model.encoder.layer)
    _check_blocks(n, layers, "this text tower", unit="layers")
    cut = layers - n
    return TowerCut(
        network=model,
        trunk=BertTrunk(model, cut).eval(),
        tail=BertTail(model, cut),
        prefixes=tuple(f"encoder.layer.{i}" for i in range(cut, layers)),
        blocks=n,
    )
