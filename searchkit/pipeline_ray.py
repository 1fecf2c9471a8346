"""The ray engine: decoding and encoding on a Ray cluster, committed here by the single writer.

Planning and writing are the local engine's (`pipeline._Run`), so the bundle, its incremental
behaviour and its crash safety do not depend on the engine. Only the middle differs:

    jobs -> ray.data.from_items -> map_batches(decode_batch)     CPU tasks: read, hash,
                                                                  draft-decode, preprocess,
                                                                  read the EXIF facts
                                -> map_batches(EncoderActor)     actor pool; each actor loads
                                                                  the encoder once (GPU if asked)
                                -> iter_batches on the driver    -> _Run.commit_images, one
                                                                  transaction per batch

Ray Data's streaming executor bounds the blocks in flight, so the driver and the object store
hold a few batches at a time whatever the number of files. Batches come back in any order; each
row carries the index of its job, and each commit is self-contained. A task or actor lost with
its node is retried by Ray; a killed driver loses the batches not yet committed, and a re-run
(with either engine) plans them again.

Inputs must be readable from every node at the same path: a shared filesystem, or object-store
URLs (`s3://...`, `gs://...`, read through pyarrow's filesystems, see `remote.py`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .encoders.base import as_numpy
from .errors import ModelMismatchError, UsageError, require
from .photos import PhotoMeta
from .pipeline import Decoded, Job, decode_job

LOG = logging.getLogger(__name__)

#: environment the encoder actors need to rebuild the driver's exact encoder (extra open_clip
#: configs, caches, offline mode); the device is not forwarded: actors choose it from their GPUs
FORWARDED_ENV = ("SEARCHKIT_OPENCLIP_CONFIGS", "SEARCHKIT_CACHE", "HF_HUB_OFFLINE", "HF_HOME", "HF_HUB_CACHE", "TORCH_HOME")

#: logical memory each encoder actor reserves (Ray Data measured 1.2 GiB for a ViT-B-32 actor
#: in bench/ray_index.py)
ENCODER_MEMORY = 3 << 29


def _import_ray():
    return require("ray", "'searchkit[ray]'")


def decode_batch(batch: dict[str, np.ndarray], draft_size: int, transform) -> dict[str, np.ndarray]:
    """Ray task body: a batch of job rows -> decode results with the preprocessed pixels as bytes
    and the EXIF facts as JSON ("" when none were read)."""
    n = len(batch["i"])
    status, hashes, reasons, pixels, metas, seconds = [], [], [], [], [], []
    for k in range(n):
        t0 = time.perf_counter()
        row_hash = batch["row_hash"][k]
        job = Job(str(batch["path"][k]), "image", 0, 0, {"hash": row_hash} if row_hash else None, batch["known_hash"][k] or None)
        d = decode_job(job, draft_size, transform, backfill=bool(batch["backfill"][k]))
        status.append(d.status)
        hashes.append(d.hash or "")
        reasons.append(d.reason or "")
        pixels.append(as_numpy(d.tensor).tobytes() if d.tensor is not None else b"")  # (torch or numpy preprocessing)
        metas.append(json.dumps(d.meta.to_dict()) if d.meta is not None else "")
        seconds.append(time.perf_counter() - t0)
    return {
        "i": np.asarray(batch["i"], dtype=np.int64),
        "status": np.asarray(status, dtype=object),
        "hash": np.asarray(hashes, dtype=object),
        "reason": np.asarray(reasons, dtype=object),
        "pixels": np.asarray(pixels, dtype=object),
        "meta": np.asarray(metas, dtype=object),
        "decode_s": np.asarray(seconds, dtype=np.float64),
    }


class EncoderActor:
    """Ray actor body: the driver's encoder, loaded once per actor, on the actor's own device.
    Called by Ray Data with batches of decoded images; `texts` is called directly."""

    def __init__(self, spec: str, fingerprint: str, device: str, env: dict[str, str], shape: tuple[int, ...]):
        os.environ.update(env)
        import warnings

        from .encoders import get_encoder

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*randomly initialised")
            self.enc = get_encoder(spec, device=device)
        if self.enc.fingerprint != fingerprint:  # e.g. a checkpoint path that differs on this node
            raise ModelMismatchError(
                f"{spec} on this Ray node has fingerprint {self.enc.fingerprint}, the index expects {fingerprint}"
            )
        self.shape = tuple(shape)

    def texts(self, chunk: list[tuple[int, str]]) -> tuple[list[tuple[int, str]], np.ndarray, float]:
        t0 = time.perf_counter()
        vecs = self.enc.encode_texts([t for _, t in chunk])
        return chunk, vecs, time.perf_counter() - t0

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        t0 = time.perf_counter()
        import torch

        n = len(batch["i"])
        ok = np.asarray([s == "ok" for s in batch["status"]], dtype=bool)
        vecs = np.zeros((n, self.enc.dim), dtype=np.float32)
        if ok.any():
            tensors = torch.stack(
                [torch.from_numpy(np.frombuffer(b, dtype=np.float32).reshape(self.shape)) for b in batch["pixels"][ok]]
            )
            vecs[ok] = self.enc.encode_image_tensors(tensors)
        out = {k: batch[k] for k in ("i", "status", "hash", "reason", "meta", "decode_s")}
        out["vector"] = vecs
        out["encode_s"] = np.full(n, (time.perf_counter() - t0) / max(1, n))
        return out


@dataclass
class RayEngine:
    """How `Index.add(..., engine=RayEngine(...))` runs on Ray.

    address: None connects to $RAY_ADDRESS, else to a cluster `ray start` began on this
        machine, else starts a Ray instance here; "auto" joins the cluster this machine is part
        of; "HOST:PORT" a given head (ray.init's meanings).
        When Ray is already initialised in this process, that session is used as it is.
    encoders: encoder actors (default: one per `gpus_per_encoder` GPUs in the cluster, else
        one per 4 CPUs, at least 1); the pool starts with one and grows up to this many.
    gpus_per_encoder: GPUs each encoder actor holds (0: encode on CPU).
    cpus_per_decoder: CPUs each read/decode/preprocess task holds.
    decode_batch: images per decode task (amortizes the per-task cost).
    """

    address: str | None = None
    encoders: int | None = None
    gpus_per_encoder: float = 0
    cpus_per_decoder: float = 1
    decode_batch: int = 8
    #: per-stage seconds summed over the cluster (decode tasks, encoder actors) of the last run
    cluster_times: dict[str, float] = field(default_factory=lambda: {"decode": 0.0, "encode": 0.0})
    _owns_ray: bool = field(default=False, repr=False)
    _text_actors: list | None = field(default=None, repr=False)

    @classmethod
    def coerce(cls, engine: Any) -> RayEngine:
        if isinstance(engine, RayEngine):
            return engine
        if engine == "ray":
            return cls()
        raise UsageError(f"unknown engine {engine!r}; use 'local' or 'ray'")

    # -- session ----------------------------------------------------------------------------
    @staticmethod
    def check_installed() -> None:
        """MissingDependencyError naming the extra when Ray (with Ray Data) is not installed."""
        _import_ray()
        require("ray.data", "'searchkit[ray]'")

    def start(self) -> None:
        """Connect to (or start) Ray before anything in the bundle changes."""
        self.check_installed()
        ray = _import_ray()
        self.cluster_times = {"decode": 0.0, "encode": 0.0}
        if self.gpus_per_encoder < 0 or self.cpus_per_decoder <= 0 or (self.encoders is not None and self.encoders < 1):
            raise UsageError("--encoders must be >= 1, --gpus-per-encoder >= 0 and --cpus-per-decoder > 0")
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.WARNING}
            if self.address is None and not os.environ.get("RAY_ADDRESS"):
                kwargs["include_dashboard"] = False
            try:
                ray.init(address=self.address, **kwargs)
            except (ConnectionError, ValueError, RuntimeError) as e:
                msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise UsageError(f"cannot connect to Ray at {self.address or os.environ.get('RAY_ADDRESS') or 'a new local instance'}: {msg}") from e
            self._owns_ray = True
        if self.gpus_per_encoder and not ray.cluster_resources().get("GPU"):
            self.close()
            raise UsageError("--gpus-per-encoder was given but the Ray cluster has no GPUs")
        ctx = require("ray.data").DataContext.get_current()
        ctx.enable_progress_bars = False  # the caller's progress callback reports the commits

    def close(self) -> None:
        if self._text_actors:
            for actor in self._text_actors:
                _import_ray().kill(actor)
        self._text_actors = None
        if self._owns_ray:
            _import_ray().shutdown()
            self._owns_ray = False

    def _pool_size(self) -> int:
        if self.encoders:
            return int(self.encoders)
        res = _import_ray().cluster_resources()
        if self.gpus_per_encoder:
            return max(1, int(res.get("GPU", 0) // self.gpus_per_encoder))
        return max(1, int(res.get("CPU", 1) // 4))

    def _actor_kwargs(self, run) -> dict:
        enc = run.idx.encoder
        return {
            "spec": enc.spec,
            "fingerprint": enc.fingerprint,
            "device": "cuda" if self.gpus_per_encoder else "cpu",
            "env": {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ},
            "shape": (3, enc.image_size, enc.image_size),
        }

    def _encoder_args(self, run) -> dict:
        import ray.data

        return dict(
            fn_constructor_kwargs=self._actor_kwargs(run),
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=self._pool_size()),
            num_cpus=1,
            num_gpus=self.gpus_per_encoder or None,
            # Ray's logical memory, so a node takes no more model copies than it holds; being
            # a resource the decode tasks do not ask for, it also keeps Ray Data from fusing
            # decoding into the actors. (Ray Data restarts actors and retries their calls on
            # node loss by default.)
            memory=ENCODER_MEMORY,
        )

    # -- images -----------------------------------------------------------------------------
    def images(self, run, jobs: list[Job], batch_size: int) -> None:
        if not jobs:
            return
        import ray.data

        enc = run.idx.encoder
        no_meta = run.store.files_without_photo_meta()  # unchanged files whose EXIF was never read
        rows = [
            {"i": i, "path": j.path, "known_hash": j.known_hash or "", "row_hash": (j.row or {}).get("hash") or "",
             "backfill": j.row is not None and j.row["id"] in no_meta}
            for i, j in enumerate(jobs)
        ]
        per_block = max(1, min(self.decode_batch, batch_size))
        ds = ray.data.from_items(rows, override_num_blocks=max(1, -(-len(rows) // per_block)))
        ds = ds.map_batches(
            decode_batch,
            batch_size=per_block,
            batch_format="numpy",
            fn_kwargs={"draft_size": enc.image_size, "transform": enc.image_transform},
            num_cpus=self.cpus_per_decoder,
        )
        ds = ds.map_batches(EncoderActor, batch_size=batch_size, batch_format="numpy", **self._encoder_args(run))
        t0 = time.perf_counter()
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            run.times.read += time.perf_counter() - t0
            self.cluster_times["decode"] += float(np.sum(batch["decode_s"]))
            self.cluster_times["encode"] += float(np.sum(batch["encode_s"]))
            pending = [
                Decoded(jobs[int(i)], str(s), str(h) or None, None, str(r) or None, PhotoMeta(**json.loads(m)) if m else None)
                for i, s, h, r, m in zip(batch["i"], batch["status"], batch["hash"], batch["reason"], batch["meta"])
            ]
            ok = np.asarray([d.status == "ok" for d in pending], dtype=bool)
            run.commit_images(pending, np.asarray(batch["vector"], dtype=np.float32)[ok] if ok.any() else None)
            t0 = time.perf_counter()
        run.times.encode += self.cluster_times["encode"]
        LOG.info("ray cluster seconds: decode tasks %.2f, encoder actors %.2f", self.cluster_times["decode"], self.cluster_times["encode"])

    # -- texts ------------------------------------------------------------------------------
    def encode_texts(self, run, todo: list[tuple[int, str]]) -> Iterator[tuple[list[tuple[int, str]], np.ndarray]]:
        """Documents are small, so they travel through the driver to a few long-lived encoder
        actors shared by every corpus of the run (one Ray Data pipeline per corpus would start
        a pool per file); one chunk in flight per actor bounds memory."""
        if not todo:
            return
        ray = _import_ray()
        from ray.util import ActorPool

        if self._text_actors is None:
            actor = ray.remote(EncoderActor).options(
                num_cpus=1, num_gpus=self.gpus_per_encoder or 0, memory=ENCODER_MEMORY, max_restarts=-1, max_task_retries=-1
            )
            self._text_actors = [actor.remote(**self._actor_kwargs(run)) for _ in range(self._pool_size())]
        step = run.idx.encoder.text_batch_size
        chunks = (todo[i : i + step] for i in range(0, len(todo), step))
        t0 = time.perf_counter()
        for chunk, vecs, seconds in ActorPool(self._text_actors).map_unordered(lambda a, c: a.texts.remote(c), chunks):
            run.times.read += time.perf_counter() - t0
            self.cluster_times["encode"] += seconds
            run.times.encode += seconds
            yield chunk, vecs
            t0 = time.perf_counter()
