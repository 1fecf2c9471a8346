"""The text side of a trained dual encoder (MiniLM tower + text head) as ONNX, for torch-free queries.

`export_text_query_model` (encoders/onnx.py) comes here for a `DualEncoder` whose text tower is
MiniLM, and writes the same folder layout as for open_clip, read by the same `OnnxTextEncoder`:

  text.onnx        token ids (zero-padded, [PAD] is 0) -> MiniLM (with the checkpoint's tuned
                   layers, if it has any) -> mean pooling over the non-padding tokens -> unit
                   length -> the checkpoint's text head ("embeds"), and the unit-length pooled
                   features themselves ("features", what ConSE zero-shot compares with the
                   class names)
  tokenizer.json   MiniLM's WordPiece tokenizer (the `tokenizers` form of the one the torch path
                   uses, truncating at the tower's max length), so no transformers at query time
  meta.json        fingerprint, dim, context length, and `clean: none` (no CLIP text cleaning)

The attention mask is computed inside the graph from the ids, so the reader feeds one input
like the open_clip export. Written to a temporary folder named like the open_clip export's and
renamed into place, so a killed export leaves only a temporary a later writer removes.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

LOG = logging.getLogger(__name__)


def _text_module(enc):
    import torch

    from .nets import mean_pool

    tower, head = enc.text_tower, enc.heads.text  # the checkpoint's tuned layers, if any, are in tower.model

    class MiniText(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = tower.model
            self.head = head

        def forward(self, tokens):
            mask = (tokens != 0).to(torch.int64)
            hidden = self.bert(input_ids=tokens, attention_mask=mask).last_hidden_state
            features = mean_pool(hidden, mask)
            return self.head(features), features

    return MiniText().eval()


def export_minilm_text_model(enc, folder: Path) -> None:
    """Write `folder` (text.onnx, tokenizer.json, meta.json) for a MiniLM-text `DualEncoder`."""
    import torch

    tower = enc.text_tower
    folder = Path(folder)
    tmp = Path(tempfile.mkdtemp(prefix=f".text-onnx-{os.getpid()}-", dir=folder.parent))
    try:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_str(tower.tokenizer.backend_tokenizer.to_str())  # a copy: the live one stays as is
        tok.no_padding()
        tok.enable_truncation(tower.max_length)
        tok.save(str(tmp / "tokenizer.json"))
        example = tower.tokenizer(["a photo of a dog", "x"], padding=True, return_tensors="pt")["input_ids"]
        module = _text_module(enc).cpu()
        chatter = io.StringIO()  # the exporter may print on stdout, which carries --json output
        # the TorchScript exporter: BERT's masking traces cleanly with dynamic batch and length
        with torch.inference_mode(False), torch.no_grad(), contextlib.redirect_stdout(chatter), _quiet_warnings():
            torch.onnx.export(
                module,
                (example,),
                str(tmp / "text.onnx"),
                input_names=["tokens"],
                output_names=["embeds", "features"],  # features: the tower's, for ConSE zero-shot
                dynamic_axes={"tokens": {0: "batch", 1: "length"}, "embeds": {0: "batch"}, "features": {0: "batch"}},
                opset_version=17,
                dynamo=False,
            )
        module.to(enc.device)
        meta = {
            "fingerprint": enc.fingerprint,
            "dim": enc.dim,
            "context_length": int(tower.max_length),
            "eot": int(tower.tokenizer.sep_token_id),
            "clean": "none",
        }
        (tmp / "meta.json").write_text(json.dumps(meta))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _quiet_warnings():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python-side shape checks
        yield
