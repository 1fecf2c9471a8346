"""`searchkit train` and `searchkit eval {retrieval,zeroshot,fewshot}`: parse, call the library, print."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer

from .output import EXIT_PARTIAL, handle_errors, print_json, stderr, table

ModelOpt = typer.Option("auto", "--model", "-m", help="Model spec: auto, mini, open_clip:ARCH@TAG, or a checkpoint folder.")
JsonOpt = typer.Option(False, "--json", help="Machine-readable output (JSON) on stdout.")


class Loss(str, Enum):
    infonce = "infonce"
    sigmoid = "sigmoid"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def _recall_rows(metrics: dict) -> list[list]:
    ks = sorted({int(k.split("@")[1]) for k in metrics if "@" in k})
    return [
        ["text→image", *[_pct(metrics[f"t2i_R@{k}"]) for k in ks]],
        ["image→text", *[_pct(metrics[f"i2t_R@{k}"]) for k in ks]],
    ], [f"R@{k}" for k in ks]


def train_cmd(
    captions: Path = typer.Argument(..., help="CSV with columns image,caption (several captions per image)."),
    images: Path = typer.Option(..., "--images", help="Folder the CSV's image names are relative to."),
    out: Path = typer.Option(..., "--out", "-o", help="Checkpoint folder to write (usable as --model PATH)."),
    val_split: Optional[Path] = typer.Option(None, "--val-split", help="File of validation image names, one a line."),
    val_fraction: Optional[float] = typer.Option(None, "--val-fraction", help="Random share of images for validation. \\[default: 0.1 without --val-split]"),
    train_split: Optional[Path] = typer.Option(None, "--train-split", help="File of training image names. \\[default: all non-validation images]"),
    image_tower: str = typer.Option("efficientnet_lite0+conse", "--image-tower", help="efficientnet_lite0|1|2, optionally +conse (pip-shipped), or open_clip:ARCH@TAG."),
    text_tower: str = typer.Option("all-MiniLM-L6-v2", "--text-tower", help="all-MiniLM-L6-v2 (pip-shipped) or open_clip:ARCH@TAG."),
    dim: int = typer.Option(256, "--dim", min=2, help="Shared embedding dimension."),
    hidden: int = typer.Option(0, "--hidden", min=0, help="Hidden width of a residual MLP in each head (0: linear heads)."),
    dropout: float = typer.Option(0.5, "--dropout", min=0.0, max=0.9, help="Dropout on head inputs (and hidden layer)."),
    epochs: int = typer.Option(40, "--epochs", min=1, help="Most epochs (each visits every training caption once)."),
    batch_size: int = typer.Option(256, "--batch-size", min=2, help="Pairs per batch (distinct images)."),
    lr: float = typer.Option(5e-4, "--lr", help="Peak learning rate (one-cycle schedule)."),
    weight_decay: float = typer.Option(0.2, "--weight-decay", help="AdamW weight decay."),
    patience: int = typer.Option(6, "--patience", min=1, help="Stop after this many epochs without a better validation mean recall."),
    loss: Loss = typer.Option(
        Loss.infonce, "--loss",
        help="Contrastive loss: infonce (CLIP: softmax over the batch, both ways) or sigmoid (SigLIP: each "
        "image–caption pair of the batch a match / no-match decision, with a learned logit bias from -10).",
    ),
    temperature: Optional[float] = typer.Option(
        None, "--temperature", help="Initial temperature (learned); its default follows --loss (CLIP's, SigLIP's).",
        show_default="0.07 with --loss infonce, 0.1 with --loss sigmoid",
    ),
    seed: int = typer.Option(0, "--seed", help="Random seed (splits, batches, init)."),
    unfreeze_image_blocks: int = typer.Option(
        0, "--unfreeze-image-blocks", min=0,
        help="Fine-tune the image tower's last N blocks (EfficientNet blocks or ViT layers) with the heads; "
        "their input activations are cached once. 0: frozen towers.",
    ),
    tower_lr_scale: float = typer.Option(0.1, "--tower-lr-scale", min=0.0, help="Learning rate of unfrozen tower blocks, as a fraction of --lr."),
    init_from: Optional[str] = typer.Option(
        None, "--init-from",
        help="Start the heads from this checkpoint's (a folder, or mini); same towers and head shapes. "
        "With --loss sigmoid from an infonce checkpoint (such as mini) the logit bias starts at -10.",
    ),
    caption_augment: int = typer.Option(
        0, "--caption-augment", min=0,
        help="Word-dropout variants per training caption, embedded once and shown in place of the caption at random. 0: none.",
    ),
    caption_word_dropout: float = typer.Option(0.2, "--caption-word-dropout", min=0.0, max=0.9, help="Share of a variant's words dropped."),
    all_captions: bool = typer.Option(
        False, "--all-captions", help="Each step shows all captions of its images (several positives per image).",
    ),
    unfreeze_text_layers: int = typer.Option(
        0, "--unfreeze-text-layers", min=0,
        help="Tune the MiniLM text tower's last N transformer layers with the heads (LiT-style; the image tower "
        "stays as set above); their input token states are cached once. 0: frozen text tower.",
    ),
    text_lr_scale: float = typer.Option(
        0.04, "--text-lr-scale", min=0.0, help="Learning rate of tuned text layers, as a fraction of --lr (0.04: 2e-5 at the default --lr).",
    ),
    device: Optional[str] = typer.Option(None, "--device", help="torch device. \\[default: cuda when present, else cpu]"),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Tower feature cache. \\[default: $SEARCHKIT_CACHE/features or ~/.cache/searchkit/features]"),
    json_out: bool = JsonOpt,
):
    """Train projection heads on frozen towers (CLIP-style), optionally fine-tuning the image tower's
    last blocks or the text tower's last layers, and write a checkpoint folder."""
    from searchkit.train import TrainConfig, train

    config = TrainConfig(
        image_tower=image_tower,
        text_tower=text_tower,
        dim=dim,
        hidden=hidden,
        dropout=dropout,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        patience=patience,
        init_temperature=temperature,
        seed=seed,
        unfreeze_image_blocks=unfreeze_image_blocks,
        tower_lr_scale=tower_lr_scale,
        init_from=init_from,
        caption_augment=caption_augment,
        caption_word_dropout=caption_word_dropout,
        all_captions=all_captions,
        unfreeze_text_layers=unfreeze_text_layers,
        text_lr_scale=text_lr_scale,
        loss=loss.value,
    )
    result = train(
        captions,
        images,
        out,
        config,
        val_split=val_split,
        val_fraction=val_fraction,
        train_split=train_split,
        device=device,
        cache_dir=cache_dir,
        progress=not json_out,
    )
    if json_out:
        print_json(result.to_dict())
        return
    table(
        "epochs",
        ["epoch", "loss", "val mean R", "t2i R@1", "t2i R@10", "i2t R@1", "temp", "s"],
        [
            [h.epoch, f"{h.loss:.4f}", _pct(h.val["mean"]), _pct(h.val["t2i_R@1"]), _pct(h.val["t2i_R@10"]),
             _pct(h.val["i2t_R@1"]), f"{h.temperature:.4f}", f"{h.seconds:.1f}"]
            for h in result.history
        ],
    )
    rows, cols = _recall_rows(result.best)
    table(f"best epoch {result.best_epoch} (validation, %)", ["direction", *cols], rows)
    stderr(f"checkpoint: {result.checkpoint}  (use: --model {result.checkpoint})")
    if result.plot:
        stderr(f"training curves: {result.plot}")


def eval_retrieval_cmd(
    captions: Path = typer.Option(..., "--captions", help="CSV with columns image,caption."),
    images: Path = typer.Option(..., "--images", help="Folder the CSV's image names are relative to."),
    split: Optional[Path] = typer.Option(None, "--split", help="File of image names to evaluate on. \\[default: every image in the CSV]"),
    model: str = ModelOpt,
    json_out: bool = JsonOpt,
):
    """Recall@1/5/10 text→image and image→text on an image–caption split."""
    from searchkit.evaluate import evaluate_retrieval

    report = evaluate_retrieval(model, captions, images, split=split)
    if json_out:
        print_json(report)
        return
    rows, cols = _recall_rows(report["metrics"])
    table(
        f"{report['model']}: {report['images']} images, {report['captions']} captions (%)",
        ["direction", *cols],
        rows + [["mean", _pct(report["metrics"]["mean"]), *[""] * (len(cols) - 1)]],
    )


OutOpt = typer.Option(
    Path("build/eval"), "--out", "-o", help="Folder the eval command writes its PNG into."
)
NoPlotOpt = typer.Option(False, "--no-plot", help="Do not write the PNG.")
TemplateOpt = typer.Option(
    None, "--template", "-t", help="Prompt template with {} for the label; repeat for an ensemble. \\[default: a built-in ensemble]"
)


def eval_zeroshot_cmd(
    folder: Path = typer.Argument(..., help="Folder with one sub-folder of images per class (folder name = label)."),
    model: str = ModelOpt,
    template: Optional[List[str]] = TemplateOpt,
    out: Path = OutOpt,
    no_plot: bool = NoPlotOpt,
    json_out: bool = JsonOpt,
):
    """Zero-shot top-1 / top-5 accuracy, per-class accuracy and a confusion-matrix PNG (OUT/zeroshot-FOLDER.png;
    beyond 30 classes it shows the most confused ones)."""
    from searchkit.evaluate import evaluate_zeroshot

    plot = None if no_plot else out / f"zeroshot-{folder.resolve().name}.png"
    report = evaluate_zeroshot(model, folder, templates=template, plot=plot)
    if json_out:
        print_json(report.to_dict())
    else:
        table(
            f"{report.model}: {report.n} images, {len(report.labels)} classes",
            ["top-1 %", "top-5 %"],
            [[_pct(report.top1), _pct(report.top5)]],
        )
        table("per class", ["class", "images", "accuracy %"], [
            [label, report.class_images[i], _pct(report.per_class[label])] for i, label in enumerate(report.labels)
        ])
        if report.plot:
            stderr(f"confusion matrix: {report.plot}")
    for path, error in report.failed:
        stderr(f"failed: {path}: {error}")
    if report.failed:
        raise typer.Exit(EXIT_PARTIAL)


def eval_fewshot_cmd(
    folder: Path = typer.Argument(..., help="Folder with one sub-folder of images per class (folder name = label)."),
    shots: str = typer.Option("1,2,4,8,16", "--shots", help="Examples per class to try, comma-separated."),
    draws: int = typer.Option(5, "--draws", min=1, help="Random draws of the examples per shot count (accuracy is their mean)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the draws."),
    model: str = ModelOpt,
    template: Optional[List[str]] = TemplateOpt,
    out: Path = OutOpt,
    no_plot: bool = NoPlotOpt,
    json_out: bool = JsonOpt,
):
    """Few-shot accuracy against examples per class (drawn from FOLDER, tested on the rest), zero-shot
    as the 0 point, and a PNG of the curve (OUT/fewshot-FOLDER.png)."""
    from searchkit.eval_fewshot import evaluate_fewshot, parse_shots

    shot_list = parse_shots(shots)
    plot = None if no_plot else out / f"fewshot-{folder.resolve().name}.png"
    report = evaluate_fewshot(model, folder, shots=shot_list, draws=draws, templates=template, seed=seed, plot=plot)
    if json_out:
        print_json(report.to_dict())
    else:
        table(
            f"{report.model}: {report.images} images, {len(report.labels)} classes, {report.draws} draws (%)",
            ["examples per class", "accuracy", "± std", "min", "max"],
            [["0 (zero-shot)", _pct(report.zeroshot), "", "", ""]]
            + [[k, _pct(v["mean"]), f"{v['std']:.1f}", _pct(v["min"]), _pct(v["max"])] for k, v in report.shots.items()],
        )
        if report.plot:
            stderr(f"accuracy plot: {report.plot}")
    for path, error in report.failed:
        stderr(f"failed: {path}: {error}")
    if report.failed:
        raise typer.Exit(EXIT_PARTIAL)


def register(app: typer.Typer) -> None:
    """Add `train` and the `eval` group to the main app."""

    app.command("train")(handle_errors(train_cmd))
    eval_app = typer.Typer(help="Evaluate a model: retrieval recall, zero-shot and few-shot accuracy.", no_args_is_help=True)
    eval_app.command("retrieval")(handle_errors(eval_retrieval_cmd))
    eval_app.command("zeroshot")(handle_errors(eval_zeroshot_cmd))
    eval_app.command("fewshot")(handle_errors(eval_fewshot_cmd))
    app.add_typer(eval_app, name="eval")
