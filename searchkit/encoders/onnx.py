"""ONNX Runtime paths: torch-free text queries, and an int8 image tower (`SPEC+int8`).

Text queries without torch: `export_text_query_model(enc, folder)` writes the text tower as ONNX
(sequence length left dynamic, so the exact padding cut of `OpenClipEncoder` still applies) and
CLIP's byte-level BPE as a `tokenizers` JSON (trained dual encoders export their MiniLM side
the same way, see encoders/mini_onnx.py). `OnnxTextEncoder(folder)` embeds texts with
onnxruntime + tokenizers alone. The index writer stores these in the bundle (`text-onnx/`), so a
cold `searchkit query` loads a few hundred MB of text tower and never imports torch or open_clip.
The export is made once per model in the export cache and linked into each bundle.

`SPEC+int8`: the image tower exported to ONNX, dynamically quantized to int8 (int8 weights,
activations quantized per batch) and run by onnxruntime; texts go through the base encoder.
A base encoder may name the op types to quantize (`int8_op_types`): convolutional towers quantize
only their fully connected layers, because onnxruntime's dynamic int8 convolutions (ConvInteger)
are both slower than its fp32 ones and far off (EfficientNet-Lite0: cosine 0.90 to fp32).
Exports are cached under `$SEARCHKIT_CACHE` (default ~/.cache/searchkit).
"""

from __future__ import annotations

import hashlib
import html
import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np

from ..errors import UsageError, require
from ..machine import cpu_cores
from . import export_cache
from .base import Encoder, as_numpy
from .export_cache import cache_dir

LOG = logging.getLogger(__name__)

TEXT_DIR = "text-onnx"
_CLIP_SPLIT = r"""<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def _session(path: Path, *, mem_pattern: bool = True, threads: int | None = None):
    """`threads`: the intra-op pool's size (default: one per core).
    `mem_pattern=False`: no per-input-shape block planned ahead (ViT-B-32's image tower, batch
    16: 10 MB less peak, same speed, measured in fresh processes)."""
    ort = require("onnxruntime")
    so = ort.SessionOptions()
    so.enable_mem_pattern = mem_pattern
    so.intra_op_num_threads = threads or cpu_cores()
    # ORT's pool spins after each run by default; on a small machine the spinning threads then
    # compete with the search that follows every query encoding (an exact scan splits over the
    # cores). Measured on 2 cores: encoding alone 8.7 ms spinning vs 9.6 ms not, but whole
    # queries within noise of each other (15-17 ms both ways), so the pool sleeps instead.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return np.ascontiguousarray(x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12))


def clip_basic_clean(text: str) -> str:
    """What open_clip's tokenizer does before BPE (ftfy repair, HTML unescape)."""
    import ftfy

    return html.unescape(html.unescape(ftfy.fix_text(text))).strip()


def build_clip_tokenizer(simple_tokenizer):
    """open_clip's SimpleTokenizer (its vocabulary and merges) as a `tokenizers.Tokenizer`."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors

    merges = [pair for pair, _ in sorted(simple_tokenizer.bpe_ranks.items(), key=lambda kv: kv[1])]
    tok = Tokenizer(
        models.BPE(vocab=dict(simple_tokenizer.encoder), merges=merges, end_of_word_suffix="</w>", continuing_subword_prefix="")
    )
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip(), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    sot, eot = simple_tokenizer.encoder["<start_of_text>"], simple_tokenizer.encoder["<end_of_text>"]
    tok.post_processor = processors.TemplateProcessing(
        single="<start_of_text> $A <end_of_text>", special_tokens=[("<start_of_text>", sot), ("<end_of_text>", eot)]
    )
    return tok


def _export(
    module, example, path: Path, input_name: str, dynamic: dict[int, tuple[str, int, int]], *, trace: bool = False,
    outputs: tuple[str, ...] = ("embeds",),
) -> None:
    """ONNX export with the named dynamic dimensions (dim: (name, min, max)).

    `trace`: TorchScript tracing instead of torch.export. It exports ViT-B-32's image tower in
    less than half the time, and ONNX Runtime runs its graph no slower (README, Performance),
    but it fixes every size that Python code computes from a dynamic one (the text tower's
    length-dependent slices), so only the image towers, with a dynamic batch alone, use it.
    PyTorch's fused attention fast path has no ONNX form, so it is off while tracing.
    """
    import contextlib
    import io
    import warnings

    import torch

    chatter = io.StringIO()  # the exporter prints progress on stdout, which carries --json output
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(not trace and fastpath)
    try:
        with torch.inference_mode(False), torch.no_grad(), contextlib.redirect_stdout(chatter), warnings.catch_warnings():
            if trace:
                warnings.simplefilter("ignore")  # tracer and deprecation warnings about a known-good trace
                torch.onnx.export(
                    module, (example,), str(path), input_names=[input_name], output_names=list(outputs),
                    dynamic_axes={input_name: {axis: name for axis, (name, _, _) in dynamic.items()}},
                    dynamo=False, opset_version=17,
                )
            else:
                dims = {axis: torch.export.Dim(name, min=lo, max=hi) for axis, (name, lo, hi) in dynamic.items()}
                torch.onnx.export(
                    module, (example,), str(path), input_names=[input_name], output_names=list(outputs),
                    dynamic_shapes=(dims,), dynamo=True, opset_version=18,
                )
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    LOG.debug(chatter.getvalue())


def export_text_query_model(enc: Encoder, folder: Path) -> bool:
    """Make `folder` (text.onnx, tokenizer.json, meta.json) for `enc`; False if unsupported.

    The export is made once per model fingerprint in the export cache and linked into `folder`
    (see export_cache.py), so a second bundle of the same model gets it in milliseconds. An
    encoder with its own text export (`export_text_query_model(folder)`, e.g. trained dual
    encoders, see encoders/mini_onnx.py) writes the same layout its own way."""

    def make(tmp: Path) -> bool:  # only on a cache miss: it may build the torch model
        base = getattr(enc, "torch_encoder", lambda: enc)()  # (an ONNX image encoder's torch model)
        own = getattr(base, "export_text_query_model", None)
        return bool(own(tmp)) if own is not None else _export_text_tower(base, tmp)

    src = export_cache.build(TEXT_DIR, enc.fingerprint, make)
    if src is None:
        return False
    export_cache.link_into(src, Path(folder))
    return True


def _export_text_tower(enc: Encoder, out: Path) -> bool:
    """Write the text tower of the torch encoder `enc` into the empty folder `out` (meta.json last)."""
    bpe = getattr(enc, "bpe_tokenizer", lambda: None)()
    if bpe is None or not getattr(enc, "can_cut_text_padding", False):
        return False
    import torch

    class TextTower(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = enc.model

        def forward(self, tokens):
            return enc.text_forward(tokens)

    example = bpe(["a photo of a dog", "x"]).to(enc.device)[:, :8]
    _export(TextTower().eval(), example, out / "text.onnx", "tokens", {0: ("batch", 1, 4096), 1: ("length", 2, int(bpe.context_length))})
    build_clip_tokenizer(bpe).save(str(out / "tokenizer.json"))
    meta = {
        "fingerprint": enc.fingerprint,
        "dim": enc.dim,
        "context_length": int(bpe.context_length),
        "eot": int(bpe.encoder["<end_of_text>"]),
    }
    (out / "meta.json").write_text(json.dumps(meta))
    return True


class OnnxTextEncoder:
    """Embeds texts like the exported encoder, with onnxruntime and tokenizers only."""

    def __init__(self, folder: str | Path):
        from tokenizers import Tokenizer

        folder = Path(folder)
        meta = json.loads((folder / "meta.json").read_text())
        self.fingerprint: str = meta["fingerprint"]
        self.dim: int = meta["dim"]
        self.context_length: int = meta["context_length"]
        self.eot: int = meta["eot"]
        self.clean = clip_basic_clean if meta.get("clean", "clip") == "clip" else str
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.session = _session(folder / "text.onnx")

    @staticmethod
    def matches(folder: Path, fingerprint: str) -> bool:
        try:
            return json.loads((Path(folder) / "meta.json").read_text())["fingerprint"] == fingerprint
        except (OSError, ValueError, KeyError):
            return False

    def tokenize(self, texts: list[str]) -> np.ndarray:
        """(n, context_length) int64, zero-padded, truncated keeping the end-of-text token."""
        out = np.zeros((len(texts), self.context_length), dtype=np.int64)
        for row, enc in zip(out, self.tokenizer.encode_batch([self.clean(t) for t in texts])):
            ids = enc.ids
            if len(ids) > self.context_length:
                ids = ids[: self.context_length - 1] + [self.eot]
            row[: len(ids)] = ids
        return out

    def encode_texts(self, texts) -> np.ndarray:
        return self._run(texts, ["embeds"])[0]

    @property
    def has_text_features(self) -> bool:
        """Whether the export also gives the tower's pre-head features (mini's does, for ConSE)."""
        return "features" in {o.name for o in self.session.get_outputs()}

    def text_features(self, texts) -> np.ndarray:
        """The text tower's unit-length features before the head (needs `has_text_features`)."""
        return self._run(texts, ["features"])[0]

    def _run(self, texts, outputs: list[str]) -> list[np.ndarray]:
        texts = list(texts)
        if not texts:
            return [np.zeros((0, self.dim), dtype=np.float32) for _ in outputs]
        tokens = self.tokenize(texts)
        length = int((tokens != 0).sum(axis=1).max())
        return [_normalize(x) for x in self.session.run(outputs, {"tokens": tokens[:, :length]})]


class Int8ImageEncoder(Encoder):
    """`SPEC+int8`: the base encoder with its image tower run as int8 ONNX on CPU."""

    def __init__(self, base: Encoder):
        if not hasattr(base, "image_module"):
            raise UsageError(f"{base.spec} has no exportable image tower; '+int8' is not available for it")
        self.base = base
        self.spec = f"{base.spec}+int8"
        self.dim, self.image_size, self.logit_scale = base.dim, base.image_size, base.logit_scale
        self.image_batch_size, self.text_batch_size = base.image_batch_size, base.text_batch_size
        self.device = "cpu"
        #: ONNX op types to quantize (None: all that onnxruntime can); the base encoder may narrow it
        self.op_types = getattr(base, "int8_op_types", None)
        ident = base.fingerprint + (f"|int8:{','.join(self.op_types)}" if self.op_types else "")
        key = hashlib.sha256(ident.encode()).hexdigest()[:16]
        path = cache_dir() / "onnx" / key / "image.int8.onnx"
        if not path.exists():
            self._build(path)
        self.session = _session(path)

    def _build(self, path: Path) -> None:
        import torch

        require("onnx")
        from onnxruntime.quantization import QuantType, quantize_dynamic

        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            fp32 = Path(tmp) / "image.onnx"
            example = torch.zeros(2, 3, self.image_size, self.image_size)
            _export(self.base.image_module().cpu().eval(), example, fp32, "pixels", {0: ("batch", 1, 4096)}, trace=True)
            quantize_dynamic(
                str(fp32), str(Path(tmp) / "q.onnx"), weight_type=QuantType.QInt8, per_channel=True,
                op_types_to_quantize=list(self.op_types) if self.op_types else None,
            )
            os.replace(Path(tmp) / "q.onnx", path)
        self.base.image_module().to(self.base.device)

    @property
    def fingerprint(self) -> str:
        return f"{self.base.fingerprint}+int8"

    def preprocess(self, image):
        return self.base.preprocess(image)

    @property
    def image_transform(self):
        return self.base.image_transform

    def encode_image_tensors(self, batch) -> np.ndarray:
        return _normalize(self.session.run(None, {"pixels": as_numpy(batch)})[0])

    def _encode_text_batch(self, texts: list[str]) -> np.ndarray:
        return self.base._encode_text_batch(texts)


