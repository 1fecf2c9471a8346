"""The fp32 image tower on ONNX Runtime (CPU), exported once per model fingerprint.

On CPU an open_clip or `mini` encoder indexes images through `OnnxImageEncoder`: the image
tower exported to ONNX (cached in `$SEARCHKIT_CACHE/image-onnx/`, see export_cache.py), with
its preprocessing (resize, centre crop, scale, normalize) redone in numpy and PIL. With the
export cached, an index run never imports torch or builds the torch model: measured with
bench/index_throughput.py --first-run, that is most of a first run's seconds and megabytes.
The torch model is loaded only on demand (texts with no cached text export, `+int8`, a fresh
export). Embeddings agree with torch's within cosine 0.9999 (tests/test_onnx_image.py).

`SEARCHKIT_IMAGE_ONNX=0` keeps the torch image tower. CUDA always keeps torch.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..machine import cpu_cores
from . import export_cache
from .base import Encoder, as_numpy
from .onnx import _normalize

LOG = logging.getLogger(__name__)

KIND = "image-onnx"
#: the export's second output for towers with an ImageNet classifier (mini's EfficientNet-Lite)
CLASS_OUTPUT = "class_probs"
#: and its tower features standardized by the image head (what few-shot compares examples by)
FEATURES_OUTPUT = "features"
#: specs measured slower on ONNX Runtime than on torch (bench/index_throughput.py); none so
#: far: ViT-B-32 and mini's EfficientNet-Lite0 both run faster there (README, Performance)
SLOWER_ON_ONNX: frozenset[str] = frozenset()
_OWN = frozenset({"_base", "_load_base", "_lock", "_text", "_pre", "_fingerprint", "_folder", "_outputs", "_session",
                  "_session_error", "_loader", "feature_std", "_streams", "_pool"})
_RESAMPLE = {"bicubic": 3, "bilinear": 2}  # PIL.Image.Resampling values


def enabled(device: str) -> bool:
    return device == "cpu" and os.environ.get("SEARCHKIT_IMAGE_ONNX") != "0"


class Preprocess:
    """torchvision's Resize(short side) -> CenterCrop -> ToTensor -> Normalize on an RGB PIL
    image, in PIL and numpy (Resize on a PIL image is PIL's own resize, so the pixels match)."""

    def __init__(self, size: int, crop: int, interpolation: str, mean: list[float], std: list[float]):
        self.size, self.crop, self.interpolation = int(size), int(crop), interpolation
        self.mean = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
        self.std = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)
        self._scale = (1.0 / (255.0 * self.std)).astype(np.float32)
        self._bias = (-self.mean / self.std).astype(np.float32)

    def params(self) -> dict:
        return {"size": self.size, "crop": self.crop, "interpolation": self.interpolation,
                "mean": self.mean.ravel().tolist(), "std": self.std.ravel().tolist()}

    def __call__(self, image) -> np.ndarray:
        """The model's CHW float32 input for one image."""
        return self.normalize(self.crop_uint8(image)[None])[0]

    def normalize(self, batch: np.ndarray) -> np.ndarray:
        """NHWC uint8 crops (`crop_uint8`) to the model's NCHW float32 input: (x / 255 - mean) / std
        as one multiply-add on a channel-first copy (14x faster than the four-pass form at batch 8;
        it runs between the model's calls, within 5e-7 of it)."""
        x = np.ascontiguousarray(batch.transpose(0, 3, 1, 2)).astype(np.float32)
        x *= self._scale
        x += self._bias
        return x

    def crop_uint8(self, image) -> np.ndarray:
        """The resized, centre-cropped HWC uint8 pixels: a quarter of the float input's bytes,
        so decoded images wait for their batch in this form."""
        w, h = image.size
        short, long = (w, h) if w <= h else (h, w)
        if short != self.size:  # torchvision: the short side to `size`, the long one truncated
            new_long = int(self.size * long / short)
            w, h = (self.size, new_long) if w <= h else (new_long, self.size)
            image = image.resize((w, h), _RESAMPLE[self.interpolation])
        c = self.crop
        if w < c or h < c:  # torchvision pads a too-small image with zeros before cropping
            from PIL import Image

            canvas = Image.new("RGB", (max(w, c), max(h, c)))
            canvas.paste(image, ((max(w, c) - w) // 2, (max(h, c) - h) // 2))
            image, (w, h) = canvas, canvas.size
        top, left = int(round((h - c) / 2.0)), int(round((w - c) / 2.0))
        image = image.crop((left, top, left + c, top + c))
        return np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))


def preprocess_of(transform) -> Preprocess | None:
    """The numpy twin of a torchvision Compose, or None when it holds steps it does not know."""
    steps = list(getattr(transform, "transforms", []))
    names = [type(t).__name__ for t in steps]
    kept = [(n, t) for n, t in zip(names, steps) if n not in ("MaybeConvertMode", "_convert_to_rgb", "function")]
    if [n for n, _ in kept] != ["Resize", "CenterCrop", "ToTensor", "Normalize"] and [n for n, _ in kept] != [
        "Resize", "CenterCrop", "MaybeToTensor", "Normalize"
    ]:
        return None
    resize, crop, _, norm = (t for _, t in kept)
    size = resize.size[0] if isinstance(resize.size, (list, tuple)) and len(resize.size) == 1 else resize.size
    interp = getattr(resize.interpolation, "value", str(resize.interpolation))
    crop_size = crop.size if isinstance(crop.size, int) else crop.size[0]
    if not isinstance(size, int) or resize.max_size is not None or interp not in _RESAMPLE:
        return None
    if not isinstance(crop.size, int) and crop.size[0] != crop.size[1]:
        return None
    return Preprocess(size, crop_size, interp, list(map(float, norm.mean)), list(map(float, norm.std)))


def _transform_of(base: Encoder):
    """The torchvision transform behind `base.preprocess` (open_clip's, or a trained encoder's
    image tower's)."""
    tower = getattr(base, "image_tower", None)
    return getattr(base, "_preprocess", None) or getattr(tower, "_transform", None)


def export_image_tower(base: Encoder, out: Path) -> bool:
    """Write image.onnx and meta.json (last) for `base` into the empty folder `out`."""
    pre = preprocess_of(_transform_of(base))
    if pre is None or not hasattr(base, "image_module"):
        return False
    import torch

    from .onnx import _export

    # a tower with its own ImageNet classifier also exports its class probabilities and its
    # standardized features, with the class names' text embeddings beside it: zero-shot (ConSE)
    # and few-shot then need no torch
    with_classes = getattr(base, "image_module_with_tower_outputs", lambda: None)()
    module = (with_classes or base.image_module()).cpu().eval()
    outputs = ("embeds", CLASS_OUTPUT, FEATURES_OUTPUT) if with_classes is not None else ("embeds",)
    try:
        example = torch.zeros(2, 3, base.image_size, base.image_size)
        _export(module, example, out / "image.onnx", "pixels", {0: ("batch", 1, 4096)}, trace=True, outputs=outputs)
    finally:
        module.to(base.device)
    if with_classes is not None:
        from safetensors.numpy import save_file

        from .conse_zeroshot import NAMES_FILE, class_name_text

        name_text, name_class = class_name_text(base)
        save_file({"text": name_text.astype(np.float16), "class": name_class}, str(out / NAMES_FILE))
    meta = {
        "fingerprint": base.fingerprint,
        "spec": base.spec,
        "dim": base.dim,
        "image_size": base.image_size,
        "logit_scale": base.logit_scale,
        "text_batch_size": base.text_batch_size,
        "int8_op_types": list(getattr(base, "int8_op_types", None) or []) or None,
        "preprocess": pre.params(),
        "outputs": list(outputs),
        **({"feature_std": base.feature_std.astype(float).tolist()} if with_classes is not None else {}),
    }
    (out / "meta.json").write_text(json.dumps(meta))
    return True


def load(fingerprint: str | None, load_base: Callable[[], Encoder]) -> Encoder:
    """The encoder a CPU run should index with: ONNX Runtime when its export is cached (the torch
    model is then built only if needed), else the torch model, exported now for this and later
    runs when the architecture runs faster on ONNX Runtime."""
    folder = export_cache.lookup(KIND, fingerprint) if fingerprint else None
    if folder is not None:
        return OnnxImageEncoder(folder, load_base)
    base = load_base()
    if fingerprint and fingerprint != base.fingerprint:
        LOG.debug("fingerprint hint %s differs from %s", fingerprint, base.fingerprint)
    if base.spec in SLOWER_ON_ONNX or export_cache.unsupported(KIND, base.fingerprint):
        return base
    try:
        folder = export_cache.build(KIND, base.fingerprint, lambda tmp: export_image_tower(base, tmp))
    except Exception as e:  # any export trouble only costs speed
        LOG.warning("image tower stays on torch (ONNX export failed: %s)", e)
        return base
    return base if folder is None else OnnxImageEncoder(folder, lambda: base, base)


class OnnxImageEncoder(Encoder):
    """A model's image tower on ONNX Runtime; texts through the cached ONNX text tower when
    there is one, else through the torch model (built on first need)."""

    #: ViT-B-32 on 2 cores: the same CPU per image at 8 as at 16 (52-64 vs 57-65 ms, interleaved
    #: runs), and a first run of 120 photos peaks at 572 instead of 611 MiB (activations)
    image_batch_size = 8

    def __init__(self, folder: Path, load_base: Callable[[], Encoder], base: Encoder | None = None):
        meta = json.loads((Path(folder) / "meta.json").read_text())
        self.spec: str = meta["spec"]
        self._fingerprint: str = meta["fingerprint"]
        self.dim, self.image_size = int(meta["dim"]), int(meta["image_size"])
        self.logit_scale = float(meta["logit_scale"])
        self.text_batch_size = int(meta["text_batch_size"])
        self.int8_op_types = tuple(meta["int8_op_types"]) if meta.get("int8_op_types") else None
        self.device = "cpu"
        self._pre = Preprocess(**meta["preprocess"])
        # Batches run as one-thread streams side by side, a slice of the batch each, instead of
        # one run on a pool of `cores` threads: while decode threads share the cores, the pool
        # waits at every operator for its slowest thread. First run, 120 12 MP photos,
        # ViT-B-32, 2 cores: 5-7 % less wall and CPU (bench/index_throughput.py --first-run);
        # a single image then runs on one thread. (The pool starts its threads on first use.)
        self._streams = cpu_cores()
        self._pool = ThreadPoolExecutor(self._streams, thread_name_prefix="searchkit-onnx")
        # the session (1-1.6 s of one core for ViT-B-32) loads in the background: an index run
        # decodes its first photos meanwhile, from meta.json's size and preprocessing alone
        self._session, self._session_error = None, None
        self._loader: threading.Thread | None = threading.Thread(
            target=self._load_session, args=(Path(folder) / "image.onnx",), name="searchkit-onnx-load"
        )
        self._loader.start()
        self._folder = Path(folder)
        self._outputs = tuple(meta.get("outputs") or ("embeds",))
        #: see `fewshot.feature_scale`; None when the export has no tower features
        self.feature_std = np.asarray(meta["feature_std"], np.float32) if meta.get("feature_std") else None
        self._load_base, self._base = load_base, base
        self._text = None
        self._lock = threading.Lock()

    def _load_session(self, path: Path) -> None:
        from .onnx import _session

        try:
            self._session = _session(path, mem_pattern=False, threads=1 if self._streams > 1 else None)
        except BaseException as e:  # raised where the session is first needed
            self._session_error = e

    @property
    def session(self):
        loader = self._loader
        if loader is not None:
            loader.join()
            self._loader = None
        if self._session_error is not None:
            raise self._session_error
        return self._session

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    def torch_encoder(self) -> Encoder:
        """The torch model behind this encoder (built on first call)."""
        with self._lock:
            if self._base is None:
                self._base = self._load_base()
            return self._base

    def image_module(self):  # for `+int8`, which quantizes the torch export
        return self.torch_encoder().image_module()

    def __getattr__(self, name: str):
        """Anything else the family's encoder has (its tokenizer, model, ...) comes from the
        torch model, built on first such use."""
        if name.startswith("__") or name in _OWN:  # (not set yet: no torch model for these)
            raise AttributeError(name)
        return getattr(self.torch_encoder(), name)

    def preprocess(self, image) -> np.ndarray:
        return self._pre(image)

    @property
    def image_transform(self) -> Preprocess:
        return self._pre

    def preprocess_compact(self, image) -> np.ndarray:
        """`preprocess` as HWC uint8 (see `Preprocess.crop_uint8`); `encode_image_tensors`
        takes a stack of these as well as float NCHW batches."""
        return self._pre.crop_uint8(image)

    def _run(self, batch, second: str | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """(unit embeddings, the export's output `second` as float32 or None) for a batch of
        uint8 crops (`preprocess_compact`) or float NCHW pixels."""
        if isinstance(batch, np.ndarray) and batch.dtype == np.uint8:
            batch = self._pre.normalize(batch)
        names = ["embeds", *([second] if second else [])]
        batch, session = as_numpy(batch), self.session
        if self._streams > 1 and len(batch) > 1:
            parts = np.array_split(batch, min(self._streams, len(batch)))
            outs = list(self._pool.map(lambda part: session.run(names, {"pixels": part}), parts))
            out = [np.concatenate([o[i] for o in outs]) for i in range(len(names))]
        else:
            out = session.run(names, {"pixels": batch})
        return _normalize(out[0]), (np.asarray(out[1], np.float32) if second else None)

    def encode_image_tensors(self, batch) -> np.ndarray:
        return self._run(batch)[0]

    def encode_image_tensors_with_features(self, batch) -> tuple[np.ndarray, np.ndarray]:
        """As the torch model's: the tower's standardized features where the export has them."""
        if FEATURES_OUTPUT not in self._outputs:
            return super().encode_image_tensors_with_features(batch)
        return self._run(batch, FEATURES_OUTPUT)

    def zeroshot_scorer(self, labels, templates, text_encoder=None):
        """ConSE zero-shot from the export alone when it has the class output and a text export
        with the tower's features is at hand (`text_encoder`, else the cached one); otherwise
        whatever the torch model does (None: the nearest-prompt recipe). An export without the
        class output comes from a model that has no such scorer, so torch is never built for it."""
        if CLASS_OUTPUT not in self._outputs:
            return None
        from ..zeroshot import label_embeddings
        from .conse_zeroshot import NAMES_FILE, ConSEZeroShot, label_text_features, load_class_names
        from .onnx import OnnxTextEncoder

        def with_features(enc) -> bool:  # (isinstance first: getattr on this class builds torch)
            return isinstance(enc, OnnxTextEncoder) and enc.has_text_features

        text = text_encoder if with_features(text_encoder) else self._text_encoder()
        if not with_features(text):
            return self.torch_encoder().zeroshot_scorer(labels, templates)

        def image_outputs(images):
            return self._run(np.stack([self._pre.crop_uint8(img) for img in images]), CLASS_OUTPUT)

        return ConSEZeroShot(label_embeddings(text, labels, templates), label_text_features(text.text_features, labels, templates),
                             load_class_names(self._folder / NAMES_FILE), self.logit_scale, image_outputs).probabilities

    def _text_encoder(self):
        if self._text is None:
            folder = export_cache.lookup("text-onnx", self._fingerprint)
            if folder is not None and self._base is None:
                try:
                    from .onnx import OnnxTextEncoder

                    self._text = OnnxTextEncoder(folder)
                except Exception as e:  # only costs speed
                    LOG.info("texts use the torch model (%s)", e)
            if self._text is None:
                self._text = self.torch_encoder()
        return self._text

    def _encode_text_batch(self, texts: list[str]) -> np.ndarray:
        return self._text_encoder().encode_texts(texts)
