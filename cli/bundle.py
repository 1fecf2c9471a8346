"""`searchkit index`, `info` and `reindex`: build a bundle, describe it, rebuild its vector indexes."""

from __future__ import annotations

from enum import Enum
import logging
from typing import List, Optional

import typer

from .options import IndexOpt, JsonOpt
from .output import EXIT_PARTIAL, handle_errors, print_json, progress_bar, rel_path, stderr, table


class Engine(str, Enum):
    local = "local"
    ray = "ray"


class VectorKind(str, Enum):
    auto = "auto"
    flat = "flat"
    hnsw = "hnsw"
    ivf_pq = "ivf-pq"


VectorIndexOpt = typer.Option(
    None,
    "--vector-index",
    help="Vector index: auto (exact up to 1M vectors, then HNSW or IVF-PQ as memory allows), flat (exact), hnsw, ivf-pq. \\[default: the bundle's, else auto]",
)
MaxMemoryOpt = typer.Option(
    None, "--max-memory", help="Memory budget of the vector indexes, e.g. 512M or 4G. \\[default: the bundle's, else half of RAM]"
)


@handle_errors
def index_cmd(
    paths: List[str] = typer.Argument(..., help="Image folders (recursive), image files, or text corpora (.txt .csv .tsv .jsonl); local paths or object-store URLs (s3://, gs://, file://)."),
    index: Optional[str] = IndexOpt,
    model: str = typer.Option("auto", "--model", "-m", help="Model spec: auto, mini, open_clip:ARCH@TAG, or a checkpoint folder."),
    text_column: Optional[str] = typer.Option(None, "--text-column", help="Text column of .csv/.tsv/.jsonl corpora. \\[default: text, else caption]"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Images per model call. \\[default: the model's]"),
    workers: Optional[int] = typer.Option(None, "--workers", min=1, help="Image decode threads. \\[default: CPU count, 2..8]"),
    vector_index: Optional[VectorKind] = VectorIndexOpt,
    max_memory: Optional[str] = MaxMemoryOpt,
    engine: Engine = typer.Option(Engine.local, "--engine", help="Where decoding and encoding run: local (this process) or ray (a Ray cluster; needs searchkit\\[ray])."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Ray cluster: auto, or HOST:PORT of its head. \\[default: $RAY_ADDRESS, else a Ray instance on this machine]"),
    encoders: Optional[int] = typer.Option(None, "--encoders", min=1, help="Ray: encoder actors, each loading the model once. \\[default: GPUs / --gpus-per-encoder, else CPUs / 4]"),
    gpus_per_encoder: float = typer.Option(0, "--gpus-per-encoder", min=0, help="Ray: GPUs per encoder actor (0: encode on CPU)."),
    cpus_per_decoder: float = typer.Option(1, "--cpus-per-decoder", min=0.01, help="Ray: CPUs per read/decode/preprocess task."),
    json_out: bool = JsonOpt,
):
    """Add image folders, images and text corpora to an index, incrementally."""
    from searchkit import open_index
    from searchkit.filters import parse_size
    from searchkit.sources import resolve_roots

    resolve_roots(paths)  # refuse bad paths before creating anything
    run_on: object = "local"
    if engine is Engine.ray:
        from searchkit.pipeline_ray import RayEngine

        run_on = RayEngine(address=ray_address, encoders=encoders, gpus_per_encoder=gpus_per_encoder, cpus_per_decoder=cpus_per_decoder)
        run_on.check_installed()  # the missing extra, before a model loads
        for name in ("ray", "ray.data"):  # Ray's start-up and per-dataset notices; errors still show
            logging.getLogger(name).setLevel(logging.ERROR)
    if max_memory is not None:
        parse_size(max_memory, what="memory budget")
    with open_index(index, create=True, model=model) as idx, progress_bar(not json_out) as bar:
        if vector_index is not None or max_memory is not None:
            idx.configure_vectors(vector_index.value if vector_index else None, max_memory)
        summary = idx.add(paths, text_column=text_column, batch_size=batch_size, workers=workers, progress=bar, engine=run_on)
    if json_out:
        print_json(summary.to_dict())
    else:
        d = summary.to_dict()
        table(
            f"index {d['index']}  ({d['model']})",
            ["added", "updated", "unchanged", "removed", "failed", "total"],
            [[d[k] for k in ("added", "updated", "unchanged", "removed", "failed", "total")]],
        )
    for path, reason in summary.failures[:20]:
        stderr(f"failed: {path}: {reason}")
    if len(summary.failures) > 20:
        stderr(f"... and {len(summary.failures) - 20} more (see: searchkit info)")
    if summary.failed:
        raise typer.Exit(EXIT_PARTIAL)


@handle_errors
def info_cmd(index: Optional[str] = IndexOpt, json_out: bool = JsonOpt):
    """What an index holds: manifest, counts by kind, failures."""
    from searchkit import open_index

    with open_index(index) as idx:
        info = idx.info()
    if json_out:
        print_json(info)
        return
    m = info["manifest"] or {}
    enc = m.get("encoder") or {}
    c = info["counts"]
    rows = [
        ["index", info["index"]],
        ["model", enc.get("spec")],
        ["dim", enc.get("dim")],
        *[[f"{k} vectors", _describe_vectors(v)] for k, v in (m.get("vectors") or {}).items() if v.get("count")],
        ["images", c["image"]],
        ["text items", c["text"]],
        ["files", c["files"]],
        ["photos dated / with GPS", f'{info["photos"]["with_date"]} / {info["photos"]["with_gps"]}'],
        *[["camera", f"{cam} ({n})"] for cam, n in list(info["photos"]["cameras"].items())[:5]],
        ["failures", len(info["failures"])],
        ["created", m.get("created_at")],
        ["updated", m.get("updated_at")],
    ]
    table("", ["", ""], rows)
    if info["failures"]:
        table("failures", ["path", "reason"], [[rel_path(f["path"]), f["reason"]] for f in info["failures"]])


def _describe_vectors(v: dict) -> str:
    """One line per kind's vector index for `info`: kind, structure, recall@10, search params."""
    from searchkit.vectors import format_bytes

    parts = [f"{v.get('kind', 'flat')} ({v.get('faiss', 'IDMap2,Flat')})", f"{v.get('count', 0):,} vectors"]
    if v.get("memory_bytes") is not None:
        parts.append(f"~{format_bytes(v['memory_bytes'])}")
    rec = v.get("recall") or {}
    if rec.get("exact"):
        parts.append("exact")
    elif rec.get("recall") is not None:
        parts.append(f"recall@{rec.get('k', 10)} {rec['recall']:.3f} (target {rec.get('target')})")
    else:
        parts.append("recall not measured yet")
    if v.get("search") and v.get("kind") != "flat":
        parts.append(", ".join(f"{k}={x}" for k, x in v["search"].items()))
    return "; ".join(parts)


@handle_errors
def reindex_cmd(
    index: Optional[str] = IndexOpt,
    vector_index: VectorKind = typer.Option(..., "--vector-index", help="auto, flat, hnsw or ivf-pq."),
    max_memory: Optional[str] = MaxMemoryOpt,
    target_recall: Optional[float] = typer.Option(None, "--target-recall", min=0.01, max=1.0, help="recall@10 to tune search parameters to. \\[default: 0.95]"),
    json_out: bool = JsonOpt,
):
    """Rebuild the vector indexes from the embeddings stored in the bundle (no image is re-encoded)."""
    from searchkit import open_index

    with open_index(index, write=True) as idx:
        result = idx.reindex(vector_index.value, max_memory, target_recall)
        path = str(idx.path)
    if json_out:
        print_json({"index": path, "vectors": result})
        return
    table(f"reindex {path}", ["kind", "vector index"], [[k, _describe_vectors(v)] for k, v in result.items() if v.get("count")])
