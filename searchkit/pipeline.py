"""Indexing: plan against the disk, then reader -> encoder -> writer, batch by batch.

Planning compares each file with meta.db (size + mtime first, content hash only when those
differ), finds moved files by hash, and removes vanished ones. Then images are read, hashed,
draft-decoded and preprocessed in a thread pool through a bounded ordered window, encoded in
batches by the model, and each batch is committed to meta.db in one transaction before the
in-memory FAISS index takes it. A kill loses at most the batch in flight; a re-run finishes.
The ray engine (pipeline_ray.py) replaces only the decode and encode steps.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from typing import Any

import numpy as np

from .errors import DecodeError
from .fsutil import storage_error
from .images import decode_photo, header_meta, is_raw_path, read_bytes
from .remote import is_url
from .remote import stat as url_stat
from .results import AddSummary
from .sources import discover, parse_corpus, resolve_roots

LOG = logging.getLogger(__name__)


def content_hash(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


@dataclass
class Job:
    path: str
    kind: str
    size: int
    mtime_ns: int
    row: dict | None  # the file's row in meta.db, None when new
    known_hash: str | None = None  # computed while looking for moves


@dataclass
class Decoded:
    job: Job
    status: str  # "ok" | "same" | "fail"
    hash: str | None = None
    tensor: Any = None
    reason: str | None = None
    meta: Any = None  # photos.PhotoMeta: what the file's EXIF says


def decode_job(job: Job, draft_size: int, preprocess: Callable, *, backfill: bool = False) -> Decoded:
    """Read, hash, draft-decode and preprocess one image (in a decode thread or a Ray task),
    with what its EXIF says; `backfill`: an unchanged file whose EXIF facts were never read."""
    try:
        data = read_bytes(job.path)
        h = job.known_hash or content_hash(data)
        if job.row and job.row["hash"] == h:
            return Decoded(job, "same", h, meta=header_meta(data) if backfill else None)
        img, meta = decode_photo(data, draft_size=draft_size, raw=is_raw_path(job.path))
        del data
        return Decoded(job, "ok", h, preprocess(img), meta=meta)
    except DecodeError as e:
        return Decoded(job, "fail", reason=str(e))
    except Exception as e:  # a transform that chokes on a strange image
        LOG.debug("decode failed", exc_info=True)
        return Decoded(job, "fail", reason=f"{type(e).__name__}: {e}")


@dataclass
class StageTimes:
    """Seconds spent per stage (reader: waiting on decode; encoder; writer), logged at the end."""

    read: float = 0.0
    encode: float = 0.0
    write: float = 0.0


def ordered_map(pool: ThreadPoolExecutor, fn: Callable, items: Iterable, window: int) -> Iterator:
    """pool.map with at most `window` results in flight, so memory stays bounded."""
    it = iter(items)
    pending = deque(pool.submit(fn, x) for x in islice(it, window))
    while pending:
        fut = pending.popleft()
        for x in islice(it, 1):
            pending.append(pool.submit(fn, x))
        yield fut.result()


class _Run:
    def __init__(self, idx, summary: AddSummary, progress):
        self.idx = idx
        self.store = idx.store
        self.summary = summary
        self.progress = progress or (lambda advance, total: None)
        self.total_work = 0
        self.times = StageTimes()

    def apply(self, added: dict[str, tuple[list[int], list[np.ndarray]]], removed: list[int]) -> None:
        """Bring the in-memory FAISS indexes in step with a just-committed transaction."""
        for kind in ("image", "text"):
            vec = self.idx._vectors[kind]  # not idx.vectors(): that would rebuild from the new rows
            if removed:
                vec.remove(removed)
            ids, vecs = added.get(kind, ([], []))
            if ids:
                vec.add(np.asarray(ids, dtype=np.int64), np.vstack(vecs))
        gen = self.store.generation
        for kind in ("image", "text"):
            self.idx._vectors_generation[kind] = gen

    # -- planning -------------------------------------------------------------------------------
    def plan(self, roots, found: dict[str, str], unlisted: list[tuple[str, str]]) -> tuple[list[Job], list[Job]]:
        store, summary = self.store, self.summary
        known = store.all_files()
        counts = store.item_counts_by_file()
        no_meta = store.files_without_photo_meta()
        jobs: list[Job] = []
        new: list[Job] = []
        for path, kind in found.items():
            try:
                if is_url(path):
                    size, mtime = url_stat(path)
                else:
                    st = os.stat(path)
                    size, mtime = st.st_size, st.st_mtime_ns
            except OSError:
                size, mtime = -1, -1  # reading it will fail and say why
            row = known.get(path)
            if row and row["kind"] == kind and row["complete"] and row["size"] == size and row["mtime_ns"] == mtime:
                if row["id"] in no_meta:  # indexed before EXIF facts were recorded: read them once
                    jobs.append(Job(path, kind, size, mtime, row, known_hash=row["hash"]))
                    continue
                summary.unchanged += counts.get(row["id"], 0)
                continue
            job = Job(path, kind, size, mtime, row)
            (jobs if row else new).append(job)
        hidden = tuple(folder.rstrip(os.sep) + os.sep for folder, _ in unlisted)
        gone = {  # (files in a folder we could not list this time are not gone, just unseen)
            p: r
            for p, r in known.items()
            if p not in found and not p.startswith(hidden) and any(root.covers(p, r["kind"]) for root in roots)
        }
        # a new path whose content equals a vanished file's is that file moved: keep its vectors
        by_size: dict[tuple[str, int], list[dict]] = defaultdict(list)
        for r in gone.values():
            if r["complete"] and r["hash"]:
                by_size[(r["kind"], r["size"])].append(r)
        moves = []
        for job in new:
            candidates = by_size.get((job.kind, job.size))
            if not candidates:
                continue
            try:
                job.known_hash = content_hash(read_bytes(job.path))
            except DecodeError:
                continue
            match = next((r for r in candidates if r["hash"] == job.known_hash), None)
            if match:
                candidates.remove(match)
                del gone[match["path"]]
                moves.append((match, job))
        new = [j for j in new if all(j is not m[1] for m in moves)]
        removed: list[int] = []
        with store.transaction():
            for row, job in moves:
                store.move_file(row["id"], job.path, job.size, job.mtime_ns)
                store.clear_failures(row["path"])
                store.clear_failures(job.path)
                summary.updated += counts.get(row["id"], 0)
            for row in gone.values():
                removed += store.delete_file(row["id"])
                store.clear_failures(row["path"])
            for f in store.failures():  # failures of inputs no longer there are history
                base, sep, line = f["path"].rpartition(":")
                if not (sep and line.isdigit()):
                    base = f["path"]
                if base not in found and any(root.covers(base, k) for root in roots for k in ("image", "text")):
                    store.delete_failure(f["path"])  # (unlisted folders are recorded again below)
            for folder, reason in unlisted:
                self._fail(folder, reason)
            if removed:
                store.bump_generation()
        self.apply({}, removed)
        summary.removed += len(removed)
        all_jobs = jobs + new
        return [j for j in all_jobs if j.kind == "image"], [j for j in all_jobs if j.kind == "text"]

    # -- images ---------------------------------------------------------------------------------
    def images(self, jobs: list[Job], batch_size: int, workers: int) -> None:
        if not jobs:
            return
        enc = self.idx.encoder
        no_meta = self.store.files_without_photo_meta()

        # decoded images wait for their batch in the encoder's compact form where it has one
        preprocess = getattr(enc, "preprocess_compact", enc.preprocess)

        def decode(job: Job) -> Decoded:
            return decode_job(job, enc.image_size, preprocess, backfill=job.row is not None and job.row["id"] in no_meta)

        pending: list[Decoded] = []
        n_ok = 0
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="searchkit-decode")
        try:
            t0 = time.perf_counter()
            for d in ordered_map(pool, decode, jobs, window=max(2 * batch_size, 2 * workers)):
                self.times.read += time.perf_counter() - t0
                pending.append(d)
                n_ok += d.status == "ok"
                if n_ok >= batch_size:
                    self._write_images(pending)
                    pending, n_ok = [], 0
                t0 = time.perf_counter()
            self._write_images(pending)
        except BaseException:
            # Ctrl-C or an error: drop the queued reads instead of waiting for all of them
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()

    def _write_images(self, pending: list[Decoded]) -> None:
        if not pending:
            return
        from .encoders.base import stack_batch

        oks = [d for d in pending if d.status == "ok"]
        t0 = time.perf_counter()
        vecs = self.idx.encoder.encode_image_tensors(stack_batch([d.tensor for d in oks])) if oks else None
        self.times.encode += time.perf_counter() - t0
        self.commit_images(pending, vecs)

    def commit_images(self, pending: list[Decoded], vecs: np.ndarray | None) -> None:
        """One transaction for a batch of decoded images; `vecs` holds the embeddings of its
        "ok" entries, in order (every engine ends here, so the bundle is the same whichever ran)."""
        store, summary = self.store, self.summary
        oks = [d for d in pending if d.status == "ok"]
        t1 = time.perf_counter()
        added_ids: list[int] = []
        removed: list[int] = []
        with store.transaction():
            for i, d in enumerate(oks):
                job = d.job
                if job.row:
                    removed += store.delete_items_of(job.row["id"])
                fid = store.upsert_file(job.path, "image", job.size, job.mtime_ns, d.hash, True)
                added_ids.append(store.insert_item(fid, "image", vecs[i]))
                if d.meta is not None:
                    store.set_photo_meta(fid, d.meta)
                store.clear_failures(job.path)
                if job.row:
                    summary.updated += 1
                else:
                    summary.added += 1
            for d in pending:
                job = d.job
                if d.status == "same":
                    fid = store.upsert_file(job.path, "image", job.size, job.mtime_ns, d.hash, True)
                    if d.meta is not None:
                        store.set_photo_meta(fid, d.meta)
                    store.clear_failures(job.path)
                    summary.unchanged += 1
                elif d.status == "fail":
                    if job.row:  # it changed into something unreadable: its old vector is wrong now
                        removed += store.delete_file(job.row["id"])
                        summary.removed += 1
                    store.record_failure(job.path, d.reason or "unknown error")
                    summary.failed += 1
                    summary.failures.append((job.path, d.reason or ""))
            if added_ids or removed:
                store.bump_generation()
        self.apply({"image": (added_ids, [vecs] if oks else [])}, removed)
        self.times.write += time.perf_counter() - t1
        self.progress(len(pending), self.total_work)

    # -- text corpora ---------------------------------------------------------------------------
    def texts(self, jobs: list[Job], text_column: str | None) -> None:
        for job in jobs:
            self._corpus(job, text_column)

    def encode_texts(self, todo: list[tuple[int, str]]) -> Iterator[tuple[list[tuple[int, str]], np.ndarray]]:
        """(chunk of (line, text), their embeddings) for every document to encode; an engine
        may replace this and yield the chunks in any order."""
        enc = self.idx.encoder
        step = enc.text_batch_size
        for start in range(0, len(todo), step):
            chunk = todo[start : start + step]
            t0 = time.perf_counter()
            vecs = enc.encode_texts([t for _, t in chunk])
            self.times.encode += time.perf_counter() - t0
            yield chunk, vecs

    def _fail(self, path: str, reason: str) -> None:
        self.store.record_failure(path, reason)
        self.summary.failed += 1
        self.summary.failures.append((path, reason))

    def _corpus(self, job: Job, text_column: str | None) -> None:
        store, summary = self.store, self.summary
        try:
            data = read_bytes(job.path)
            h = content_hash(data)
            if job.row and job.row["complete"] and job.row["hash"] == h:
                with store.transaction():
                    store.upsert_file(job.path, "text", job.size, job.mtime_ns, h, True)
                summary.unchanged += store.item_counts_by_file().get(job.row["id"], 0)
                self.progress(1, self.total_work)
                return
            corpus = parse_corpus(job.path, data, text_column)
        except DecodeError as e:
            with store.transaction():
                store.clear_failures(job.path)
                self._fail(job.path, str(e))
            self.progress(1, self.total_work)
            return
        del data
        with store.transaction():
            old_hash = job.row["hash"] if job.row else None
            fid = store.upsert_file(job.path, "text", job.size, job.mtime_ns, old_hash, False)
        existing: dict[str, deque] = defaultdict(deque)
        for item_id, text, locator in store.text_items_of(fid):
            existing[text].append((item_id, locator))
        relocate: list[tuple[int, int]] = []
        todo: list[tuple[int, str]] = []
        for line, text in corpus.docs:
            if existing.get(text):
                item_id, locator = existing[text].popleft()
                summary.unchanged += 1
                if locator != line:
                    relocate.append((item_id, line))
            else:
                todo.append((line, text))
        self.total_work += len(todo)
        for chunk, vecs in self.encode_texts(todo):
            t1 = time.perf_counter()
            with store.transaction():
                ids = [store.insert_item(fid, "text", v, line, text) for (line, text), v in zip(chunk, vecs)]
                store.bump_generation()
            self.apply({"text": (ids, [vecs])}, [])
            self.times.write += time.perf_counter() - t1
            summary.added += len(chunk)
            self.progress(len(chunk), self.total_work)
        leftovers = [item_id for q in existing.values() for item_id, _ in q]
        with store.transaction():
            store.delete_items(leftovers)
            store.set_locators(relocate)
            store.upsert_file(job.path, "text", job.size, job.mtime_ns, h, True)
            store.clear_failures(job.path)
            for line, reason in corpus.bad_lines:
                self._fail(f"{job.path}:{line}", reason)
            if leftovers:
                store.bump_generation()
        self.apply({}, leftovers)
        summary.removed += len(leftovers)
        self.progress(1, self.total_work)


def _rollback(store) -> None:
    try:
        store.db.conn.rollback()
    except sqlite3.Error:
        pass


def _save_if_changed(idx, start_generation: int) -> None:
    """Save the FAISS files and manifest when this run changed anything they describe."""
    manifest = idx.read_manifest() or {}
    stale = any(
        (manifest.get("vectors") or {}).get(k, {}).get("generation") != idx.store.generation or idx._vectors[k].dirty
        for k in ("image", "text")
    )
    if stale or idx.store.generation != start_generation or manifest.get("counts", {}).get("failures") != len(idx.store.failures()):
        idx.save()


def add_paths(idx, paths, *, text_column=None, batch_size=None, workers=None, progress=None, engine=None) -> AddSummary:
    """The body of `Index.add` (see there). `engine`: None (this process) or an engine object
    such as `searchkit.pipeline_ray.RayEngine`; only decoding and encoding differ between them."""
    roots = resolve_roots(paths)
    summary = AddSummary(index=str(idx.path), model=idx.spec or "")
    run = _Run(idx, summary, progress)
    if engine is not None:
        engine.start()  # a missing extra or an unreachable cluster fails before anything changes
    start_generation = idx.store.generation
    for kind in ("image", "text"):
        idx.vectors(kind)  # load (or rebuild, after a killed run) before changing anything
    disk_failed = False
    try:
        found, unlisted = discover(roots)
        image_jobs, text_jobs = run.plan(roots, found, unlisted)
        idx.check_vector_budget({"image": sum(j.row is None for j in image_jobs)})  # refuse before encoding
        run.total_work = len(image_jobs) + len(text_jobs)
        run.progress(0, run.total_work)
        if image_jobs or text_jobs:
            enc = idx.encoder
            batch = batch_size or enc.image_batch_size
            n_workers = workers or min(8, max(2, os.cpu_count() or 2))
            if engine is None:
                run.images(image_jobs, batch, n_workers)
            else:
                engine.images(run, image_jobs, batch)
                run.encode_texts = lambda todo: engine.encode_texts(run, todo)
            run.texts(text_jobs, text_column)
        idx.maintain_vectors()  # (re)build / retrain approximate indexes; not after an interruption
    except Exception as e:
        err = storage_error(e, idx.path)
        if err is None:
            raise
        # the disk refused a write: the transaction in flight is rolled back and nothing more is
        # written (the FAISS files and manifest on disk stay a consistent older state, which the
        # next run catches up from meta.db)
        disk_failed = True
        _rollback(idx.store)
        raise err from e
    finally:
        if engine is not None:
            engine.close()
        if not disk_failed:
            try:
                _save_if_changed(idx, start_generation)
            except Exception as e:
                err = storage_error(e, idx.path)
                if err is None:
                    raise
                raise err from e
        LOG.info(
            "stage seconds: read-wait %.2f, encode %.2f, write %.2f",
            run.times.read, run.times.encode, run.times.write,
        )
    summary.total = sum(idx.store.counts().values())
    return summary
