"""Few-shot evaluation: accuracy against the number of labelled examples per class.

For each shot count k and each of `draws` random draws, k images per class (at most all but one
of the class) become the examples of a `FewShotClassifier`, and accuracy is measured on every
other image. Every image is embedded once (through the few-shot example cache), so a draw costs
only the fit of a small linear probe. Zero-shot accuracy on all images, scored as
`classify` without examples scores them (`evaluate_zeroshot`: for mini with its tower's ImageNet
classifier), is the 0-shot point of the curve.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import UsageError
from .figures import save_figure


@dataclass
class FewShotReport:
    model: str
    labels: list[str]
    images: int
    draws: int
    zeroshot: float
    shots: dict[int, dict[str, float]]  # k -> {"mean", "std", "min", "max"} accuracy in %
    failed: list[tuple[str, str]] = field(default_factory=list)
    plot: str | None = None

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "labels": self.labels,
            "images": self.images,
            "draws": self.draws,
            "zeroshot": self.zeroshot,
            "shots": {str(k): v for k, v in self.shots.items()},
            "failed": [{"path": p, "error": e} for p, e in self.failed],
            "plot": self.plot,
        }


def parse_shots(shots: str | Sequence[int]) -> list[int]:
    if isinstance(shots, str):
        try:
            shots = [int(x) for x in shots.split(",") if x.strip()]
        except ValueError:
            raise UsageError(f"--shots takes comma-separated whole numbers, e.g. 1,2,4,8,16 (not {shots!r})") from None
    out = sorted(set(int(k) for k in shots))
    if not out or out[0] < 1:
        raise UsageError("shot counts must be at least 1")
    return out


def draws_of(truth: np.ndarray, n_classes: int, k: int, draws: int, seed: int = 0):
    """(support, query) index arrays for each of `draws` random draws of k examples per class
    (fewer where a class has no more than k images: one always stays a query); the same draws
    for the same seed, so benchmarks compare methods on what `searchkit eval fewshot` scores."""
    by_class = [np.flatnonzero(truth == c) for c in range(n_classes)]
    for r in range(draws):
        rng = np.random.default_rng([seed, k, r])
        support = np.concatenate([rng.choice(ix, min(k, len(ix) - 1), replace=False) for ix in by_class]).astype(np.int64)
        yield support, np.setdiff1d(np.arange(len(truth)), support)


def embed_folder(encoder, paths: list[str]) -> tuple[np.ndarray, np.ndarray, list[int], list[tuple[str, str]]]:
    """Embeddings and features of the readable images (cached), their positions, and (path, error) failures."""
    from .errors import InputError
    from .fewshot import embed_cached
    from .images import load_image

    try:
        return (*embed_cached(encoder, paths), list(range(len(paths))), [])
    except InputError:
        pass  # some file is unreadable: find which, one at a time
    ok, failed = [], []
    for i, p in enumerate(paths):
        try:
            load_image(p)
            ok.append(i)
        except Exception as e:  # noqa: BLE001 - any decode failure is recorded, not fatal
            failed.append((p, str(e)))
    return (*embed_cached(encoder, [paths[i] for i in ok]), ok, failed)


def evaluate_fewshot(
    encoder,
    root: str | os.PathLike,
    *,
    shots: str | Sequence[int] = (1, 2, 4, 8, 16),
    draws: int = 5,
    templates: Sequence[str] | None = None,
    seed: int = 0,
    plot: str | os.PathLike | None = None,
) -> FewShotReport:
    """Few-shot accuracy on a folder of class sub-folders; writes an accuracy-vs-shots PNG if `plot`."""
    from .evaluate import _as_encoder, class_folders, evaluate_zeroshot
    from .fewshot import FewShotClassifier, feature_scale
    from .zeroshot import check_templates, label_embeddings

    shots = parse_shots(shots)
    if draws < 1:
        raise UsageError("draws must be at least 1")
    classes = class_folders(root)
    encoder = _as_encoder(encoder)
    labels = [label for label, _ in classes]
    paths = [p for _, ps in classes for p in ps]
    truth_all = np.array([i for i, (_, ps) in enumerate(classes) for _ in ps], dtype=np.int64)
    emb, feats, ok, failed = embed_folder(encoder, paths)
    truth = truth_all[ok]
    text = label_embeddings(encoder, labels, check_templates(templates))
    scale = feature_scale(encoder, feats.shape[1])
    zero = evaluate_zeroshot(encoder, root, templates=templates).top1
    out: dict[int, dict[str, float]] = {}
    for k in shots:
        accs = []
        for support, query in draws_of(truth, len(labels), k, draws, seed):
            clf = FewShotClassifier.from_embeddings(
                labels, text, emb[support], feats[support], truth[support], encoder.logit_scale, encoder.fingerprint, scale
            )
            accs.append(100.0 * float((clf.logits(emb[query], feats[query]).argmax(1) == truth[query]).mean()))
        a = np.asarray(accs)
        out[k] = {"mean": float(a.mean()), "std": float(a.std()), "min": float(a.min()), "max": float(a.max())}
    report = FewShotReport(encoder.spec, labels, int(len(truth)), draws, zero, out, failed)
    if plot is not None:
        report.plot = str(plot_fewshot(report, plot, title=f"{Path(root).name}: {encoder.spec}"))
    return report


def plot_fewshot(report: FewShotReport, path: str | os.PathLike, title: str = "") -> Path:
    """Accuracy (mean ± std over draws) against examples per class, zero-shot at 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = [0, *report.shots]
    mean = [report.zeroshot, *(v["mean"] for v in report.shots.values())]
    std = [0.0, *(v["std"] for v in report.shots.values())]
    fig, ax = plt.subplots(figsize=(5.5, 3.8), constrained_layout=True)
    ax.errorbar(range(len(ks)), mean, yerr=std, marker="o", capsize=3)
    ax.axhline(report.zeroshot, color="grey", linestyle=":", label=f"zero-shot {report.zeroshot:.1f} %")
    ax.set_xticks(range(len(ks)), [str(k) for k in ks])
    ax.set(xlabel="examples per class", ylabel="accuracy %", title=title, ylim=(0, 100))
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    return save_figure(fig, path)
