"""Few-shot accuracy of other features from the same frozen `mini` image tower (issue 13).

    SEARCHKIT_IMAGE_ONNX=0 python bench/fewshot_features.py ../shared/data/flowers-dev [--cache /tmp/fsf]

Runs mini's torch image tower once per view of every image (the 224 centre crop the index uses,
its horizontal flip, the whole image at 256 and 288, a 224 crop of the 256 resize) and keeps, per
view, the 1280-d average-pooled features, their generalized mean (GeM, p = 3), the 320-d output
of the last block before the 1x1 head convolution, and the ImageNet probabilities (cached as .npy
under --cache, so reruns only fit probes). Each variant below is fed to the shipped method
(`FewShotClassifier.from_embeddings`: probe on unit features with the zero-shot prior, weighted
1/(1+k)); the zero-shot prior always uses the index's embedding of the 224 view:
  shipped        tower features (pooled + ConSE) centred on the head's training mean
  tta-flip       the same features averaged over the view and its flip, then centred
  tta-flip-256   averaged over 224, its flip and the whole image at 256
  s256, s288     the whole image at 256 / 288 instead of 224; crop256: 224 crop of the 256 resize
  ssqrt          shipped, then signed square root (power normalization), then L2
  gem            GeM pooling in place of average pooling (then centred on the head's mean)
  gem-ssqrt      gem, then ssqrt; gem-tta-flip: GeM features averaged over the view and its flip
  +block         shipped, concatenated with the 320-d block output (centred on the examples' mean)
  +probs         shipped, concatenated with sqrt(ImageNet probabilities) (centred on the examples' mean)
For each: mean accuracy (%) over 5 draws at 4 and 16 shots (the draws of `searchkit eval
fewshot`), and the 5-fold cross-validation ceiling (the same probe fitted on 4/5 of the images).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import stratified_folds  # noqa: E402

VIEWS = ("base", "flip", "s256", "s288", "crop256")


def norm(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True).clip(1e-12)


def softmax(z):
    p = np.exp(z - z.max(axis=1, keepdims=True))
    return p / p.sum(axis=1, keepdims=True)


def view_transforms(size: int):
    from torchvision import transforms as T

    tail = [T.ToTensor(), T.Normalize((0.5,) * 3, (0.5,) * 3)]
    bicubic = T.InterpolationMode.BICUBIC

    def square(side, crop):
        return T.Compose([T.Resize(side, interpolation=bicubic), T.CenterCrop(crop), *tail])

    return {
        "base": square(size, size),
        "flip": T.Compose([T.Resize(size, interpolation=bicubic), T.CenterCrop(size), T.RandomHorizontalFlip(1.0), *tail]),
        "s256": square(256, 256),
        "s288": square(288, 288),
        "crop256": square(256, size),
    }


def tower_outputs(enc, paths, cache: Path) -> dict[str, np.ndarray]:
    """view/part -> (n, d) arrays: pooled, gem, block, logits, derived (pooled + ConSE)."""
    import torch

    from searchkit.images import load_image

    cache.mkdir(parents=True, exist_ok=True)
    files = {f"{v}/{p}": cache / f"{v}-{p}.npy" for v in VIEWS for p in ("pooled", "gem", "block", "logits", "derived")}
    if all(f.exists() for f in files.values()):
        return {k: np.load(f) for k, f in files.items()}
    tower = enc.image_tower
    m = tower.model
    tf = view_transforms(tower.image_size)
    out = {k: [] for k in files}
    for i in range(0, len(paths), 16):
        imgs = [load_image(p) for p in paths[i : i + 16]]
        for v in VIEWS:
            px = torch.stack([tf[v](im) for im in imgs])
            with torch.no_grad():
                x = m.blocks(m.bn1(m.conv_stem(px)))
                block = x.mean((2, 3))
                fmap = m.bn2(m.conv_head(x))
                pooled = m.forward_head(fmap, pre_logits=True).float()
                gem = fmap.clamp_min(1e-6).pow(3).mean((2, 3)).pow(1 / 3)
                logits = m.get_classifier()(pooled)
                derived = tower.derive(pooled)
            for p, a in (("pooled", pooled), ("gem", gem), ("block", block), ("logits", logits), ("derived", derived)):
                out[f"{v}/{p}"].append(a.numpy())
    arrays = {k: np.concatenate(v) for k, v in out.items()}
    for k, f in files.items():
        np.save(f, arrays[k])
    return arrays


def main() -> None:
    from searchkit.encoders import get_encoder
    from searchkit.eval_fewshot import draws_of
    from searchkit.evaluate import class_folders
    from searchkit.fewshot import FewShotClassifier
    from searchkit.zeroshot import DEFAULT_TEMPLATES, label_embeddings

    ap = argparse.ArgumentParser()
    ap.add_argument("folder")
    ap.add_argument("--model", default="mini")
    ap.add_argument("--draws", type=int, default=5)
    ap.add_argument("--cache", default=None, help="folder for the raw tower outputs (default /tmp/fewshot-features/<folder>)")
    args = ap.parse_args()
    if os.environ.get("SEARCHKIT_IMAGE_ONNX") != "0":
        os.environ["SEARCHKIT_IMAGE_ONNX"] = "0"  # the torch tower: its intermediate activations
    enc = get_encoder(args.model)
    classes = class_folders(args.folder)
    labels = [label for label, _ in classes]
    paths = [p for _, ps in classes for p in ps]
    truth = np.array([i for i, (_, ps) in enumerate(classes) for _ in ps])
    cache = Path(args.cache or f"/tmp/fewshot-features/{Path(args.folder).name}")
    a = tower_outputs(enc, paths, cache)
    import torch

    head = enc.heads.image
    mean, hstd = head.mean.detach().numpy(), head.std.detach().numpy()
    with torch.no_grad():
        emb = norm(head(torch.from_numpy(a["base/derived"])).numpy())
    text = label_embeddings(enc, labels, DEFAULT_TEMPLATES)
    s, n = enc.logit_scale, len(labels)

    def centred(x):
        return norm(x - mean)

    def with_conse(pooled):
        with torch.no_grad():
            return enc.image_tower.derive(torch.from_numpy(pooled)).numpy()

    # variant -> (features for all images, extra part centred on the support mean or None)
    variants = {
        "shipped": (centred(a["base/derived"]), None),
        "tta-flip": (centred((a["base/derived"] + a["flip/derived"]) / 2), None),
        "tta-flip-256": (centred((a["base/derived"] + a["flip/derived"] + a["s256/derived"]) / 3), None),
        "s256": (centred(a["s256/derived"]), None),
        "s288": (centred(a["s288/derived"]), None),
        "crop256": (centred(a["crop256/derived"]), None),
        "ssqrt": (norm(np.sign(c := centred(a["base/derived"])) * np.sqrt(np.abs(c))), None),
        "gem": (centred(with_conse(a["base/gem"])), None),
        "gem-ssqrt": (norm(np.sign(c := centred(with_conse(a["base/gem"]))) * np.sqrt(np.abs(c))), None),
        "gem-tta-flip": (centred(with_conse((a["base/gem"] + a["flip/gem"]) / 2)), None),
        "+block": (centred(a["base/derived"]), a["base/block"]),
        "+probs": (centred(a["base/derived"]), np.sqrt(softmax(a["base/logits"]))),
    }
    assert np.allclose(centred(a["base/derived"]), norm(((a["base/derived"] - mean) / hstd) * hstd), atol=1e-5)

    def score(feats, extra, sup, q):
        fs, fq = feats[sup], feats[q]
        if extra is not None:  # each part unit length, then the concatenation
            mu = extra[sup].mean(0)
            fs = norm(np.hstack([fs, norm(extra[sup] - mu)]))
            fq = norm(np.hstack([fq, norm(extra[q] - mu)]))
        clf = FewShotClassifier.from_embeddings(labels, text, emb[sup], fs, truth[sup], s, "", None)
        return 100.0 * float((clf.logits(emb[q], fq).argmax(1) == truth[q]).mean())

    folds = stratified_folds(truth, n)
    out = {}
    for name, (feats, extra) in variants.items():
        row = {}
        for k in (4, 16):
            # the draws of `searchkit eval fewshot --seed 0`
            accs = [score(feats, extra, sup, q) for sup, q in draws_of(truth, n, k, args.draws)]
            row[f"{k}-shot"] = round(float(np.mean(accs)), 1)
            row[f"{k}-shot std"] = round(float(np.std(accs)), 1)
        hits = sum(score(feats, extra, train, test) * len(test) for train, test in folds)
        row["cv5"] = round(float(hits / len(truth)), 1)
        out[name] = row
    print(json.dumps({"benchmark": "fewshot_features", "folder": Path(args.folder).name, "model": enc.spec,
                      "images": int(len(truth)), "draws": args.draws, "accuracy": out}))


if __name__ == "__main__":
    main()
