"""The image tower on ONNX Runtime fp32 vs torch fp32 on CPU, model only, in one process.

    python bench/image_backends.py [--model open_clip:ViT-B-32@random] [--batch 16] [--reps 3]

The two run interleaved on the same random batch (after a warm-up call each); prints one JSON
object with images/s and CPU seconds per batch of each, and the lowest cosine between their
embeddings. This decides, per architecture, whether onnx_image.SLOWER_ON_ONNX lists a model.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import warnings


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="open_clip:ViT-B-32@random")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    os.environ.setdefault("SEARCHKIT_CACHE", tempfile.mkdtemp(prefix="sk-bench-cache-"))
    os.environ["SEARCHKIT_DEVICE"] = "cpu"
    import numpy as np
    import torch

    from searchkit.encoders import get_encoder

    enc = get_encoder(args.model)
    base = enc.torch_encoder()
    x = np.random.default_rng(0).standard_normal((args.batch, 3, enc.image_size, enc.image_size)).astype(np.float32)
    runs = {"onnxruntime": (enc, x), "torch": (base, torch.from_numpy(x))}
    for e, b in runs.values():
        e.encode_image_tensors(b)
    res: dict[str, list[tuple[float, float]]] = {k: [] for k in runs}
    for _ in range(args.reps):
        for name, (e, b) in runs.items():
            cpu, wall = time.process_time(), time.perf_counter()
            e.encode_image_tensors(b)
            res[name].append((args.batch / (time.perf_counter() - wall), time.process_time() - cpu))
    a, c = enc.encode_image_tensors(x), base.encode_image_tensors(torch.from_numpy(x))
    out = {"benchmark": "image_backends", "model": args.model, "batch": args.batch}
    for name, rs in res.items():
        out[name] = {"images_per_s": [round(r[0], 2) for r in rs], "cpu_s_per_batch": [round(r[1], 2) for r in rs]}
    out["min_cosine"] = float((a * c).sum(axis=1).min())
    print(json.dumps(out))


if __name__ == "__main__":
    main()
