"""`searchkit fusion {train,eval,predict,ablate}`: supervised image+text classifiers.

Parse, call `searchkit.fusion`, print. Progress lines (epochs, ablation runs) go to stderr so
`--json` output on stdout stays machine-readable.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from .output import handle_errors, print_json, stderr, table


fusion_app = typer.Typer(
    help="Supervised image+text classification on frozen encoder features: train, eval, predict, ablate.",
    add_completion=False,
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def register(app: typer.Typer) -> None:
    """Add the `fusion` command group to `app` (once)."""
    if any(g.name == "fusion" for g in app.registered_groups):
        return
    app.add_typer(fusion_app, name="fusion")


class Method(str, Enum):
    concat = "concat"
    attention = "attention"
    gated = "gated"


class Modality(str, Enum):
    both = "both"
    image = "image"
    text = "text"


class Side(str, Enum):
    image = "image"
    text = "text"


JsonOpt = typer.Option(False, "--json", help="Machine-readable output (JSON) on stdout.")
ModelOpt = typer.Option("auto", "--model", "-m", help="Encoder spec: auto, mini, open_clip:ARCH@TAG, or a checkpoint folder.")
ImagesOpt = typer.Option(None, "--images", help="Folder the CSV's image names are relative to. \\[default: the CSV's folder]")
CacheOpt = typer.Option(None, "--cache-dir", help="Feature cache folder. \\[default: $SEARCHKIT_CACHE/fusion or ~/.cache/searchkit/fusion]")


def _columns(image_col: str | None, text_col: str | None, label_col: str | None, base=None):
    from searchkit.fusion import Columns

    base = base or Columns()
    return Columns(image=image_col or base.image, text=text_col or base.text, label=label_col or base.label)


def _config(**kw):
    from searchkit.fusion import FusionConfig

    return FusionConfig(**{k: v for k, v in kw.items() if v is not None})


def _pct(x) -> str:
    return "-" if x is None else f"{x:.1f}"


def _epoch_line(prefix: str = ""):
    def show(s) -> None:
        val = "" if s.val_accuracy is None else f"  val loss {s.val_loss:.4f}  val acc {s.val_accuracy:5.1f}%"
        stderr(f"{prefix}epoch {s.epoch:3d}  loss {s.loss:.4f}  acc {s.accuracy:5.1f}%{val}  ({s.seconds:.1f}s)")

    return show


def _check_out_dir(out: Path) -> None:
    from searchkit.errors import UsageError

    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder")


@fusion_app.command("train")
@handle_errors
def train_cmd(
    data: Path = typer.Argument(..., help="CSV with an image, a text and a label column."),
    images: Optional[Path] = ImagesOpt,
    image_col: str = typer.Option("image", "--image-col", help="Column of image file names (empty cell: no image)."),
    text_col: str = typer.Option("text", "--text-col", help="Column of texts (empty cell: no text)."),
    label_col: str = typer.Option("label", "--label-col", help="Column of class labels."),
    method: Method = typer.Option(Method.concat, "--method", help="Fusion: concat (+product/difference), gated, or cross-modal attention."),
    modality: Modality = typer.Option(Modality.both, "--modality", help="Train on both sides, or on the image or the text alone."),
    model: str = ModelOpt,
    out: Path = typer.Option(..., "--out", "-o", help="Model folder to write."),
    epochs: int = typer.Option(30, "--epochs", min=1, help="Training epochs."),
    val_split: float = typer.Option(0.1, "--val-split", min=0.0, max=0.9, help="Share of rows held out (per class) to pick the best epoch; 0: keep the last."),
    labels: Optional[str] = typer.Option(None, "--labels", help="Comma-separated class list (order kept); every class needs rows. \\[default: the labels found]"),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Rows per step."),
    lr: float = typer.Option(1e-3, "--lr", help="Peak learning rate (one-cycle)."),
    hidden: int = typer.Option(256, "--hidden", min=2, help="Hidden width of the fusion MLP."),
    dropout: float = typer.Option(0.2, "--dropout", min=0.0, max=0.9, help="Dropout in the fusion net."),
    modality_dropout: float = typer.Option(0.15, "--modality-dropout", min=0.0, max=0.49, help="Chance a training row loses its image (and, separately, its text)."),
    input_dropout: float = typer.Option(0.4, "--input-dropout", min=0.0, max=0.9, help="Dropout on the standardized pooled features (lower it for encoders with few dimensions)."),
    attn_dim: int = typer.Option(64, "--attn-dim", min=8, help="Width of the attention method's token space."),
    interactions: bool = typer.Option(True, "--interactions/--no-interactions", help="Product and difference features of the two sides."),
    seed: int = typer.Option(0, "--seed", help="Random seed."),
    cache_dir: Optional[Path] = CacheOpt,
    json_out: bool = JsonOpt,
):
    """Train a fusion classifier on frozen encoder features; writes the model and its training curve."""
    from searchkit.encoders import get_encoder
    from searchkit.fusion import read_rows, train_fusion
    from searchkit.fusion.model import CURVE_FILE
    from searchkit.fusion.report import curve_png

    _check_out_dir(out)
    columns = _columns(image_col, text_col, label_col)
    config = _config(
        method=method.value, modality=modality.value, epochs=epochs, val_split=val_split, batch_size=batch_size,
        lr=lr, hidden=hidden, dropout=dropout, modality_dropout=modality_dropout, input_dropout=input_dropout,
        attn_dim=attn_dim, interactions=interactions, seed=seed,
    )
    config.check()
    rows = read_rows(
        data, images_dir=images, columns=columns, need_image=modality is not Modality.text,
        need_text=modality is not Modality.image,
    )
    encoder = get_encoder(model)
    fusion = train_fusion(
        rows, encoder, config, classes=labels.split(",") if labels else None, columns=columns,
        cache_dir=cache_dir, on_epoch=_epoch_line(),
    )
    fusion.save(out, curve_png=curve_png(fusion.history, title=f"{method.value} / {modality.value}"))
    summary = {
        "out": str(out),
        "encoder": encoder.spec,
        "method": fusion.method,
        "modality": fusion.modality,
        "labels": fusion.classes,
        "best_epoch": fusion.training["best_epoch"],
        "val_accuracy": fusion.training["val_accuracy"],
        "curve": str(out / CURVE_FILE),
    }
    if json_out:
        print_json(summary)
    else:
        table(
            f"fusion model written to {out}",
            ["encoder", "method", "modality", "classes", "best epoch", "val acc %"],
            [[encoder.spec, fusion.method, fusion.modality, len(fusion.classes), summary["best_epoch"], _pct(summary["val_accuracy"])]],
        )


@fusion_app.command("eval")
@handle_errors
def eval_cmd(
    model_dir: Path = typer.Argument(..., metavar="MODEL", help="Fusion model folder (from fusion train)."),
    data: Path = typer.Argument(..., help="Labelled CSV to evaluate on."),
    images: Optional[Path] = ImagesOpt,
    image_col: Optional[str] = typer.Option(None, "--image-col", help="\\[default: the model's training column]"),
    text_col: Optional[str] = typer.Option(None, "--text-col", help="\\[default: the model's training column]"),
    label_col: Optional[str] = typer.Option(None, "--label-col", help="\\[default: the model's training column]"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Encoder spec; must be the one the model was trained on. \\[default: that one]"),
    drop: Optional[Side] = typer.Option(None, "--drop", help="Hide this side of every row (missing-modality accuracy)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for eval.json and confusion.png. \\[default: MODEL]"),
    cache_dir: Optional[Path] = CacheOpt,
    json_out: bool = JsonOpt,
):
    """Accuracy, macro-F1, per-class precision/recall/F1 and a confusion-matrix PNG."""
    from searchkit.fsutil import atomic_write_bytes, atomic_write_json
    from searchkit.fusion import evaluate_model, load_model, read_rows, resolve_encoder
    from searchkit.fusion.report import confusion_png

    fusion = load_model(model_dir)
    encoder = resolve_encoder(fusion, model)
    out = out or model_dir
    _check_out_dir(out)
    columns = _columns(image_col, text_col, label_col, fusion.columns)
    rows = read_rows(
        data, images_dir=images, columns=columns, need_image=fusion.modality != "text" and drop is not Side.image,
        need_text=fusion.modality != "image" and drop is not Side.text,
    )
    report = evaluate_model(fusion, encoder, rows, drop=drop.value if drop else None, cache_dir=cache_dir)
    suffix = f"-no-{drop.value}" if drop else ""
    png, js = out / f"confusion{suffix}.png", out / f"eval{suffix}.json"
    report.extra = {"model": str(model_dir), "data": str(data), "confusion_png": str(png)}
    out.mkdir(parents=True, exist_ok=True)
    title = f"{fusion.method} / {fusion.modality}" + (f", {drop.value} dropped" if drop else "")
    atomic_write_bytes(png, confusion_png(report, title=f"{title}: accuracy {report.accuracy:.1f}%"))
    atomic_write_json(js, report.to_dict())
    if json_out:
        print_json(report.to_dict())
        return
    table(
        f"{data} ({report.n} rows{', ' + drop.value + ' dropped' if drop else ''})",
        ["accuracy %", "macro-F1 %"],
        [[_pct(report.accuracy), _pct(report.macro_f1)]],
    )
    table(
        "per class",
        ["class", "precision %", "recall %", "F1 %", "support"],
        [[c.label, _pct(c.precision), _pct(c.recall), _pct(c.f1), c.support] for c in report.classes],
    )
    print(f"confusion matrix: {png}\nreport: {js}")


@fusion_app.command("predict")
@handle_errors
def predict_cmd(
    model_dir: Path = typer.Argument(..., metavar="MODEL", help="Fusion model folder."),
    image: Optional[Path] = typer.Option(None, "--image", help="Image file (may be left out)."),
    text: Optional[str] = typer.Option(None, "--text", help="Text (may be left out)."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write a PNG: the image beside a probability bar chart."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Encoder spec; must be the model's own. \\[default: that one]"),
    json_out: bool = JsonOpt,
):
    """The label and class probabilities for an image, a text, or both."""
    from searchkit.errors import UsageError
    from searchkit.fsutil import atomic_write_bytes
    from searchkit.fusion import load_model, predict_one, resolve_encoder
    from searchkit.fusion.predict import image_for_plot
    from searchkit.fusion.report import prediction_png

    if image is None and not (text and text.strip()):
        raise UsageError("give --image PATH, --text TEXT, or both")
    fusion = load_model(model_dir)
    encoder = resolve_encoder(fusion, model)
    pred = predict_one(fusion, encoder, image=image, text=text)
    if plot is not None:
        plot.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(plot, prediction_png(image_for_plot(image), pred.probabilities, text))
    result = pred.to_dict() | ({"plot": str(plot)} if plot else {})
    if json_out:
        print_json(result)
        return
    ranked = sorted(pred.probabilities.items(), key=lambda kv: -kv[1])
    table(f"label: {pred.label}", ["class", "probability %"], [[c, f"{100 * p:.1f}"] for c, p in ranked])
    if plot:
        print(f"plot: {plot}")


@fusion_app.command("ablate")
@handle_errors
def ablate_cmd(
    data: Path = typer.Argument(..., help="Labelled training CSV."),
    images: Optional[Path] = ImagesOpt,
    image_col: str = typer.Option("image", "--image-col", help="Column of image file names."),
    text_col: str = typer.Option("text", "--text-col", help="Column of texts."),
    label_col: str = typer.Option("label", "--label-col", help="Column of class labels."),
    eval_data: Optional[Path] = typer.Option(None, "--eval-data", help="Labelled CSV to score on. \\[default: --test-split of DATA]"),
    eval_images: Optional[Path] = typer.Option(None, "--eval-images", help="Image folder of --eval-data. \\[default: --images]"),
    test_split: float = typer.Option(0.2, "--test-split", min=0.0, max=0.9, help="Share of DATA held out for scoring when there is no --eval-data."),
    methods: str = typer.Option("concat,gated,attention", "--methods", help="Comma-separated fusion methods for the both-modality runs."),
    modalities: str = typer.Option("text,image,both", "--modalities", help="Comma-separated modalities to run."),
    plain_concat: bool = typer.Option(True, "--plain-concat/--no-plain-concat", help="Also run concat without product/difference features."),
    model: str = ModelOpt,
    out: Path = typer.Option(..., "--out", "-o", help="Folder for ablation.md and ablation.json."),
    epochs: int = typer.Option(30, "--epochs", min=1, help="Training epochs per run."),
    val_split: float = typer.Option(0.1, "--val-split", min=0.0, max=0.9, help="Share of training rows used to pick each run's best epoch."),
    input_dropout: float = typer.Option(0.4, "--input-dropout", min=0.0, max=0.9, help="Dropout on the standardized pooled features."),
    seed: int = typer.Option(0, "--seed", help="Random seed."),
    save_models: bool = typer.Option(False, "--save-models", help="Also write every run's model under OUT/<run>/."),
    cache_dir: Optional[Path] = CacheOpt,
    json_out: bool = JsonOpt,
):
    """Text-only vs image-only vs both, and every fusion method: one comparison table."""
    from searchkit.encoders import get_encoder
    from searchkit.fusion import ablate, read_rows

    _check_out_dir(out)
    columns = _columns(image_col, text_col, label_col)
    config = _config(epochs=epochs, val_split=val_split, input_dropout=input_dropout, seed=seed)
    method_list = [m.strip() for m in methods.split(",") if m.strip()]
    modality_list = [m.strip() for m in modalities.split(",") if m.strip()]
    from searchkit.fusion.ablation import plan_runs

    plan_runs(method_list, modality_list, plain_concat)  # refuse bad names before any work
    rows = read_rows(data, images_dir=images, columns=columns)
    eval_rows = (
        read_rows(eval_data, images_dir=eval_images or images, columns=columns) if eval_data is not None else None
    )
    encoder = get_encoder(model)

    def show(run) -> None:
        stderr(f"{run.name}: accuracy {run.accuracy:.1f}%  macro-F1 {run.macro_f1:.1f}%  ({run.train_seconds:.1f}s)")

    result = ablate(
        rows, encoder, eval_rows=eval_rows, test_split=test_split, methods=method_list, modalities=modality_list,
        plain_concat=plain_concat, config=config, columns=columns, out=out, save_models=save_models,
        cache_dir=cache_dir, on_run=show,
    )
    if json_out:
        print_json(result.to_dict())
        return
    from searchkit.fusion.ablation import TABLE_COLUMNS

    table(
        f"ablation ({result.encoder}; {result.n_train} train rows, {result.n_eval} eval rows)",
        TABLE_COLUMNS,
        [r.row() for r in result.runs],
    )
    print(f"written: {out / 'ablation.md'}, {out / 'ablation.json'}")
