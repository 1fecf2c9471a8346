"""The vector indexes of a bundle, kept in step with meta.db: one `KindVectors` per item kind
(image, text) for its lifecycle, and `BundleVectors` over both for what they share.

KindVectors: open the kind's FAISS file (memory-mapped for readers when its lists are IVF),
reconcile a stale one with meta.db by id, rebuild a missing or unreadable one as the manifest
records, build a plan streaming from meta.db, measure recall and tune, decide end-of-run upkeep,
describe itself for the manifest.

BundleVectors: the session's loaded indexes and the generation each reflects (the pipeline
updates both as it writes), the settings recorded in meta.db, the one memory budget both kinds
share, reindex, upkeep and saving.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from .bundle import KINDS, META_DB, Bundle, now
from .errors import BudgetError, CorruptIndexError, UsageError
from .vectors import (
    KINDS as VECTOR_KINDS,
    RETRAIN_GROWTH,
    TARGET_RECALL,
    TOMBSTONE_REBUILD,
    Plan,
    QuerySet,
    Vectors,
    build,
    check_choice,
    default_budget,
    estimate_bytes,
    ivf_pq_params,
    plan_index,
    tune,
)

LOG = logging.getLogger(__name__)

#: items added per call when a stale index catches up with meta.db
CATCH_UP_BATCH = 20_000
#: stored vectors drawn (per query set) to measure recall
TUNE_QUERIES = 500


def plan_all(settings: dict, counts: dict[str, int], dim: int) -> dict[str, Plan]:
    """The plan of every kind's index; the budget covers both kinds together."""
    budget = settings["max_memory"] or default_budget()
    plans = {}
    order = sorted(KINDS, key=lambda k: counts.get(k, 0))  # the small one first
    used = 0
    for kind in order:
        try:
            plans[kind] = plan_index(counts.get(kind, 0), dim, settings["requested"], budget - used)
        except BudgetError as e:
            need = used + (e.min_bytes or 0)
            other = [k for k in KINDS if k != kind]
            raise BudgetError(
                f"{e} [{kind} items; the {other[0]} index takes {used:,} bytes of the budget too]"
                if used else str(e),
                min_bytes=need,
            ) from None
        used += plans[kind].memory
    return plans


class KindVectors:
    """The lifecycle of one item kind's vector index: open, reconcile, build, tune, upkeep."""

    def __init__(self, bundle: Bundle, store, kind: str, writable: bool):
        self.bundle = bundle
        self.store = store
        self.kind = kind
        self.writable = writable

    @property
    def dim(self) -> int:
        return int(self.store.get_meta("dim") or 0)

    def fetch(self, ids) -> np.ndarray:
        # missing_ok: a reader's on-disk index left behind by a killed run may still name
        # items meta.db no longer has; they score 0 here and are dropped from the results
        return self.store.vectors_by_ids(ids, self.dim, missing_ok=True)

    def open(self, generation: int, settings: dict) -> Vectors:
        """The index from its FAISS file when that matches the manifest (IVF inverted lists are
        memory-mapped for readers); a file older than the database (a run was killed) is
        brought up to date from meta.db by id (items never change their vector, so adding the
        missing ids and removing the vanished ones is exact); a missing or unreadable file is
        rebuilt from meta.db with the manifest's kind and parameters."""
        entry = self.bundle.manifest_entry(self.kind)
        file = self.bundle.vector_file(self.kind)
        vec = None
        if file.exists():
            fresh = self.bundle.is_fresh(self.kind, entry, generation)
            mmap = fresh and not self.writable and entry.get("kind") == "ivf-pq"
            try:
                vec = Vectors.load(file, self.dim, mmap=mmap, fetch=self.fetch)
            except CorruptIndexError as e:
                LOG.warning("%s; rebuilding it from %s", e, META_DB)
            if vec is not None:
                if entry.get("kind") == vec.kind:
                    vec.params.update(entry.get("params") or {})
                    vec.search_params.update(entry.get("search") or {})
                    vec.info = {k: entry[k] for k in ("recall", "reason", "built_at", "requested", "max_memory") if k in entry}
                if not fresh:
                    self.reconcile(vec)
        if vec is None:
            vec = self.build(self.plan_from_entry(entry, settings), settings, tune=False)
            if entry.get("kind") == vec.kind:
                vec.search_params.update(entry.get("search") or {})
                vec.info.update({k: entry[k] for k in ("recall", "requested", "max_memory") if k in entry})
        return vec

    def plan_from_entry(self, entry: dict, settings: dict) -> Plan:
        """What the manifest records (when it can still be built), else what the settings ask."""
        n = self.store.counts().get(self.kind, 0)
        k = entry.get("kind")
        params = {p: v for p, v in (entry.get("params") or {}).items() if p not in ("built_count", "trained_on")}
        if k in VECTOR_KINDS and not (k == "ivf-pq" and (ivf_pq_params(n, self.dim) is None or "nlist" not in params)):
            return Plan(k, params, estimate_bytes(k, n, self.dim, params), "rebuilt from meta.db as the manifest records")
        try:
            return plan_index(n, self.dim, settings["requested"], settings["max_memory"])
        except BudgetError:
            return plan_index(n, self.dim, "auto", None)

    def reconcile(self, vec: Vectors) -> None:
        """Bring `vec` in step with meta.db by id: add the missing items, remove the vanished.
        A reader leaves on-disk lists alone (catching up would copy their file): it searches
        them as they are, and the next `index` run catches up."""
        if vec.data_file() is not None and not self.writable:
            LOG.warning("%s index is behind %s (a run was interrupted); run `searchkit index` again to catch up", self.kind, META_DB)
            return
        db_ids = self.store.item_ids(self.kind)
        have = vec.ids()
        gone = np.setdiff1d(have, db_ids, assume_unique=True)
        new = np.setdiff1d(db_ids, have, assume_unique=True)
        if len(gone) or len(new):
            LOG.info("%s index: catching up with %s (+%d, -%d)", self.kind, META_DB, len(new), len(gone))
        if len(gone):
            vec.remove(gone)
        for start in range(0, len(new), CATCH_UP_BATCH):
            part = new[start : start + CATCH_UP_BATCH]
            vec.add(part, self.store.vectors_by_ids(part, self.dim))

    def sample(self, n: int, seed: int = 0) -> np.ndarray:
        """n stored vectors of this kind, drawn uniformly (fewer if there are fewer)."""
        ids = self.store.item_ids(self.kind)
        rng = np.random.default_rng(seed)
        pick = np.sort(rng.choice(len(ids), min(n, len(ids)), replace=False))
        return self.store.vectors_by_ids(ids[pick], self.dim)

    def build(self, plan: Plan, settings: dict, *, tune: bool = True) -> Vectors:
        """Build `plan` from meta.db, streaming; measure recall and tune it when approximate."""
        t = time.perf_counter()
        vec = build(
            plan,
            self.dim,
            lambda: self.store.iter_vectors(self.kind, self.dim),
            sample=self.sample,
            fetch=self.fetch,
            folder=self.bundle.path,
            name=self.kind,
        )
        vec.info = {
            "reason": plan.reason,
            "built_at": now(),
            "build_seconds": round(time.perf_counter() - t, 2),
            "requested": settings["requested"],
            "max_memory": settings["max_memory"],
        }
        if tune and vec.kind != "flat":
            vec.info["recall"] = self.tune(vec, settings["target_recall"])
        vec.dirty = True
        return vec

    def tune(self, vec: Vectors, target: float) -> dict:
        """recall@10 against exact search: leave-one-out stored vectors of this kind and (when
        the bundle has them) embeddings of the other kind as cross-modal queries."""
        rng = np.random.default_rng(1)
        sets = []
        ids = self.store.item_ids(self.kind)
        if len(ids) > 1:
            pick = np.sort(rng.choice(len(ids), min(TUNE_QUERIES, len(ids)), replace=False))
            sets.append(QuerySet(f"{self.kind} (stored, leave-one-out)", self.store.vectors_by_ids(ids[pick], self.dim), ids[pick]))
        other = "text" if self.kind == "image" else "image"
        oids = self.store.item_ids(other)
        if len(oids):
            pick = np.sort(rng.choice(len(oids), min(TUNE_QUERIES, len(oids)), replace=False))
            sets.append(QuerySet(f"{other}->{self.kind}", self.store.vectors_by_ids(oids[pick], self.dim), np.full(len(pick), -1)))
        result = tune(vec, sets, lambda: self.store.iter_vectors(self.kind, self.dim), target=target)
        if result.get("recall") is not None and not result.get("met"):
            LOG.warning(
                "%s index: recall@10 %.3f is below the target %.2f even with the most thorough search "
                "parameters tried (%s)", self.kind, result["recall"], target, result.get("search"),
            )
        return result

    def rebuild_reason(self, vec: Vectors, plan: Plan, settings: dict) -> str | None:
        """Why `vec` should be rebuilt at the end of a run, or None: a flat index outgrew the
        plan or the settings changed, IVF-PQ holds RETRAIN_GROWTH x the vectors it was built
        with, or HNSW tombstones passed TOMBSTONE_REBUILD."""
        n = len(vec)
        changed = (vec.info.get("requested", settings["requested"]), vec.info.get("max_memory", settings["max_memory"])) != (
            settings["requested"], settings["max_memory"]
        )
        where = (vec.kind, bool(vec.params.get("on_disk"))) != (plan.kind, bool(plan.params.get("on_disk")))
        if where and (vec.kind == "flat" or changed):
            return f"{vec.describe()} -> {plan.kind}{' on disk' if plan.params.get('on_disk') else ''} ({plan.reason})"
        if vec.kind == "ivf-pq" and n >= RETRAIN_GROWTH * max(1, int(vec.params.get("built_count") or n)):
            return f"retrain: grew from {vec.params.get('built_count')} to {n} vectors"
        if vec.kind == "hnsw" and vec.tombstones > TOMBSTONE_REBUILD * max(1, vec.index.ntotal):
            return f"rebuild: {vec.tombstones} of {vec.index.ntotal} HNSW nodes are deleted"
        return None

    def entry(self, vec: Vectors, generation: int | None = None) -> dict:
        """The manifest's description of this kind's vector index."""
        file = self.bundle.vector_file(self.kind)
        entry: dict[str, Any] = {
            "file": file.name,
            "count": len(vec),
            "kind": vec.kind,
            "faiss": vec.describe(),
            "params": vec.params,
            "search": vec.search_params,
            "memory_bytes": vec.memory_bytes(),
            **{k: v for k, v in vec.info.items()},
        }
        if vec.kind == "flat":
            entry["recall"] = {"k": 10, "recall": 1.0, "exact": True}
        if vec.kind == "hnsw":
            entry["tombstones"] = vec.tombstones
        data = vec.data_file()
        if data is not None:
            entry["data_file"] = data.name
            entry["data_bytes"] = data.stat().st_size if data.exists() else None
        if generation is not None:
            entry["generation"] = generation
        if file.exists():
            st = file.stat()
            entry["file_size"], entry["file_mtime_ns"] = st.st_size, st.st_mtime_ns
        return entry


class BundleVectors:
    """Both kinds' vector indexes of one bundle, in step with meta.db."""

    def __init__(self, bundle: Bundle, store, writable: bool):
        self.bundle = bundle
        self.store = store
        self.writable = writable
        self.kinds = {k: KindVectors(bundle, store, k, writable) for k in KINDS}
        #: the indexes loaded in this session, and the meta.db generation each reflects; the
        #: pipeline changes both as it commits items (Index exposes them as _vectors and
        #: _vectors_generation)
        self.loaded: dict[str, Vectors] = {}
        self.generation: dict[str, int] = {}

    @property
    def dim(self) -> int:
        return int(self.store.get_meta("dim") or 0)

    def settings(self) -> dict:
        """What the bundle asks of its vector indexes (recorded in meta.db): the requested kind
        (auto, flat, hnsw, ivf-pq), the memory budget in bytes (None: half of physical memory)
        and the recall@10 that search parameters are tuned to."""
        budget = self.store.get_meta("max_memory")
        return {
            "requested": self.store.get_meta("vector_index") or "auto",
            "max_memory": int(budget) if budget else None,
            "target_recall": float(self.store.get_meta("target_recall") or TARGET_RECALL),
        }

    def configure(self, vector_index: str | None, max_memory: int | str | None, target_recall: float | None) -> dict:
        """Record the requested kind, budget and target recall (None keeps the current value);
        a budget the current vectors cannot meet is refused (BudgetError) before anything changes."""
        from .filters import parse_size

        settings = self.settings()
        if vector_index is not None:
            settings["requested"] = check_choice(vector_index)
        if max_memory is not None:
            settings["max_memory"] = parse_size(max_memory, what="memory budget") or None
        if target_recall is not None:
            if not 0 < float(target_recall) <= 1:
                raise UsageError(f"target recall must be in (0, 1], not {target_recall}")
            settings["target_recall"] = float(target_recall)
        self.plan_all(settings)  # raises BudgetError before anything changes
        with self.store.transaction():
            self.store.set_meta("vector_index", settings["requested"])
            self.store.set_meta("max_memory", settings["max_memory"] or "")
            self.store.set_meta("target_recall", settings["target_recall"])
        return settings

    def plan_all(self, settings: dict, counts: dict[str, int] | None = None) -> dict[str, Plan]:
        return plan_all(settings, counts or self.store.counts(), self.dim)

    def check_budget(self, extra: dict[str, int] | None = None) -> None:
        """Raise BudgetError if the vectors, plus `extra` more of each kind, cannot fit the budget."""
        counts = self.store.counts()
        for kind, n in (extra or {}).items():
            counts[kind] = counts.get(kind, 0) + n
        self.plan_all(self.settings(), counts)

    def get(self, kind: str) -> Vectors:
        """The vector index of one kind, in step with meta.db (see KindVectors.open)."""
        if kind not in KINDS:
            raise UsageError(f"unknown kind '{kind}'; use one of: {', '.join(KINDS)}")
        gen = self.store.generation
        if kind in self.loaded and self.generation.get(kind) == gen:
            return self.loaded[kind]
        vec = self.loaded.get(kind)
        if vec is None or vec.mmapped:
            vec = self.kinds[kind].open(gen, self.settings())
        else:
            self.kinds[kind].reconcile(vec)
        vec.fetch = self.kinds[kind].fetch
        self.loaded[kind] = vec
        self.generation[kind] = gen
        return vec

    def reindex(self) -> dict:
        """Rebuild both kinds' indexes as the settings ask (tuned), then save."""
        settings = self.settings()
        plans = self.plan_all(settings)
        gen = self.store.generation
        for kind in KINDS:
            self.loaded[kind] = self.kinds[kind].build(plans[kind], settings)
            self.generation[kind] = gen
        self.save()
        return {k: self.kinds[k].entry(self.loaded[k]) for k in KINDS}

    def maintain(self) -> list[str]:
        """End-of-run upkeep: rebuild what `KindVectors.rebuild_reason` names, and measure recall
        where it is unknown. Returns what it did, one line per action."""
        done = []
        s = self.settings()
        try:
            plans = self.plan_all(s)
        except BudgetError as e:
            LOG.warning("vector indexes left as they are: %s", e)
            return done
        for kind in KINDS:
            vec = self.get(kind)
            why = self.kinds[kind].rebuild_reason(vec, plans[kind], s)
            if why:
                LOG.info("%s index: %s", kind, why)
                self.loaded[kind] = self.kinds[kind].build(plans[kind], s)
                self.generation[kind] = self.store.generation
                done.append(f"{kind}: {why}")
            elif vec.kind != "flat" and not (vec.info.get("recall") or {}).get("recall"):
                vec.info["recall"] = self.kinds[kind].tune(vec, s["target_recall"])
                vec.dirty = True
                done.append(f"{kind}: measured recall")
        return done

    def save(self) -> None:
        """Write the changed FAISS files (atomically), then the manifest, for the current
        generation; then delete the on-disk list files no saved index points at any more."""
        for kind in KINDS:
            vec = self.get(kind)
            file = self.bundle.vector_file(kind)
            if vec.dirty or not file.exists():
                vec.save(file)
        self.write_manifest(saved=True)
        for kind in KINDS:
            if kind in self.loaded:  # not loaded: nothing known about its files
                self.bundle.remove_unused_data_files(kind, self.loaded[kind].data_file())

    def write_manifest(self, *, saved: bool = False) -> None:
        """Describe the bundle; `saved`: the FAISS files on disk were just written at the
        generations in `self.generation` (otherwise the previous manifest's entries stay)."""
        counts = self.store.counts()
        old = (self.bundle.read_manifest() or {}).get("vectors", {})
        vectors = {}
        for k in KINDS:
            if saved and k in self.loaded:
                vectors[k] = self.kinds[k].entry(self.loaded[k], self.generation[k])
            else:
                vectors[k] = {**old.get(k, {}), "file": f"{k}.faiss", "generation": old.get(k, {}).get("generation")}
            vectors[k]["count"] = counts.get(k, 0)
        self.bundle.write_manifest(self.store, self.settings(), vectors)
