"""Vector indexes: one contract for every kind (flat, HNSW, IVF-PQ) checked against exact search
on synthetic data; the choice under a memory budget; recall recorded in the manifest; reindex from
the stored embeddings without the encoder; filters through the library and the CLI."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest
from typer.testing import CliRunner

import searchkit
from searchkit import vectors as V
from searchkit.vectors import flat as vflat
from searchkit.cli.main import app
from searchkit.errors import BudgetError, UsageError
from searchkit.filters import Filter, parse_size, parse_time_ns
from tests.conftest import TINY, make_images

D = 32


def clustered(n: int, d: int = D, seed: int = 0, centers: int = 40) -> np.ndarray:
    """Unit vectors around a few centers (structure like real embeddings, unlike pure noise)."""
    rng = np.random.default_rng(seed)
    c = np.random.default_rng(99).standard_normal((centers, d)).astype(np.float32)
    x = c[rng.integers(0, centers, n)] + 0.6 * rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def exact(xb: np.ndarray, ids: np.ndarray, q: np.ndarray, k: int, allowed=None):
    """Ground truth with a plain IndexFlat, as faiss' own contrib tests do."""
    import faiss

    keep = np.isin(ids, allowed) if allowed is not None else np.ones(len(ids), bool)
    flat = faiss.IndexFlatIP(xb.shape[1])
    flat.add(xb[keep])
    Dt, It = flat.search(q, min(k, int(keep.sum())))
    return Dt, ids[keep][It]


def recall(I, It) -> float:
    return float(np.mean([len(set(a[a >= 0]) & set(b)) / len(b) for a, b in zip(I, It)]))


N = 3000
XB = clustered(N)
IDS = np.arange(1, N + 1, dtype=np.int64) * 3  # ids need not be dense or start at 0
XQ = clustered(60, seed=1)
BY_ID = dict(zip(IDS.tolist(), XB))


def fetch(ids):
    return np.stack([BY_ID[int(i)] for i in ids]).astype(np.float32)


def make(kind: str) -> V.Vectors:
    if kind == "flat":
        v = V.FlatVectors(D)
    elif kind == "hnsw":
        v = V.HNSWVectors(D, params={"M": 16, "ef_construction": 40})
    elif kind == "ivf-pq":
        v = V.IVFPQVectors(D, params={"nlist": 16, "m": 8, "nbits": 6, "opq": False}, search_params={"nprobe": 4})
        v.train(XB)
    else:  # "ivf-pq-fastscan": 4-bit codes in SIMD blocks, what plan_index builds in memory
        v = V.IVFPQVectors(D, params={"nlist": 16, "m": 16, "nbits": 4, "fastscan": True, "opq": False}, search_params={"nprobe": 4})
        v.train(XB)
    v.fetch = fetch
    v.add(IDS, XB)
    return v


CONTRACT = ["flat", "hnsw", "ivf-pq", "ivf-pq-fastscan"]


@pytest.fixture(scope="module", params=CONTRACT)
def built(request):
    return make(request.param)


def check_against_exact(v, q=XQ, k=10, allowed=None, min_recall=0.9, alive=None):
    ids = IDS if alive is None else alive
    xb = fetch(ids)
    Dt, It = exact(xb, ids, q, k, allowed)
    Dv, Iv = v.search(q, k, allowed=allowed)
    assert Iv.shape[1] == It.shape[1]
    if allowed is not None:
        assert np.isin(Iv[Iv >= 0], allowed).all()
    if v.kind == "flat":
        np.testing.assert_array_equal(Iv, It)
    else:
        assert recall(Iv, It) >= min_recall
    # scores are true cosines, best first, for every kind (IVF-PQ re-ranks exactly)
    ok = Iv >= 0
    np.testing.assert_allclose(Dv[ok], np.einsum("qd,qkd->qk", q, np.stack([fetch(r[r >= 0]) for r in Iv]))[ok] if ok.all() else Dv[ok], atol=1e-4)
    assert (np.diff(Dv, axis=1) <= 1e-6).all()
    return Iv


def test_contract_search_matches_exact(built):
    assert len(built) == N
    check_against_exact(built)
    np.testing.assert_array_equal(np.sort(built.ids()), IDS)
    # k larger than the index, and a single 1-d query
    _, I = built.search(XQ[0], 5000)
    assert I.shape == (1, N) and len(set(I[0])) == N
    with pytest.raises(UsageError):
        built.search(XQ, 0)


def test_contract_filters(built):
    rng = np.random.default_rng(2)
    broad = np.sort(rng.choice(IDS, N // 3, replace=False))
    narrow = np.sort(rng.choice(IDS, 25, replace=False))
    check_against_exact(built, allowed=broad)
    check_against_exact(built, allowed=narrow, min_recall=0.99)  # selective: answered exactly
    _, I = built.search(XQ, 10, allowed=narrow[:3])
    assert I.shape[1] == 3 and set(I[0]) == set(narrow[:3])
    _, I = built.search(XQ, 10, allowed=np.array([7, 8], np.int64))  # ids not in the index
    assert I.size == 0 or (I < 0).all()


@pytest.mark.parametrize("kind", CONTRACT)
def test_contract_remove_add_save_load(kind, tmp_path):
    v = make(kind)
    gone = IDS[::5]
    v.remove(gone)
    alive = np.setdiff1d(IDS, gone)
    assert len(v) == len(alive) and set(v.ids().tolist()) == set(alive.tolist())
    I = check_against_exact(v, alive=alive, min_recall=0.85)
    assert not np.isin(I, gone).any()
    # re-adding a removed vector under a new id (what an updated file does)
    BY_ID[10**6] = XB[0]
    v.add(np.array([10**6], np.int64), XB[:1])
    assert v.search(XB[:1], 1)[1][0, 0] == 10**6
    path = tmp_path / f"{kind}.faiss"
    v.save(path)
    assert not v.dirty and not list(tmp_path.glob(".*tmp"))
    w = V.Vectors.load(path, D, fetch=fetch)
    assert type(w) is type(v) and len(w) == len(v)
    np.testing.assert_array_equal(w.search(XQ, 10)[1], v.search(XQ, 10)[1])
    assert w.describe() == v.describe()
    if kind.startswith("ivf-pq"):  # memory-mapped inverted lists answer the same, and refuse writes
        m = V.Vectors.load(path, D, mmap=True, fetch=fetch)
        assert m.mmapped
        np.testing.assert_array_equal(m.search(XQ, 10, nprobe=4)[1], v.search(XQ, 10, nprobe=4)[1])
        with pytest.raises(UsageError, match="read-only"):
            m.add(np.array([5], np.int64), XB[:1])
    if kind == "hnsw":  # tombstones live in the file itself
        assert w.tombstones == len(gone) and not np.isin(w.search(XQ, 50)[1], gone).any()


def test_flat_is_exact_through_float16_near_ties():
    """A band of 400 scores closer together than float16 can tell apart: the flat index widens
    its candidates until the bound proves the top k exact (the float32 vectors from `fetch`).
    `fetch` returns each stored vector moved along the query by up to 4e-4, so the exact order
    inside the band differs from the scanned one, as float16 rounding can make it."""
    rng = np.random.default_rng(5)
    q = clustered(1, seed=9)[0]
    u = rng.standard_normal((400, D)).astype(np.float32)
    u -= np.outer(u @ q, q)
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    s = np.linspace(0.9, 0.901, 400, dtype=np.float32)[:, None]
    xb = np.vstack([s * q + np.sqrt(1 - s**2) * u, clustered(2000, seed=10)]).astype(np.float32)
    moved = xb + rng.uniform(-4e-4, 4e-4, (len(xb), 1)).astype(np.float32) * q
    ids = np.arange(10, 10 + len(xb), dtype=np.int64)
    v = V.FlatVectors(D, fetch=lambda i: moved[np.asarray(i) - 10])
    v.add(ids, xb)
    assert v.half and v.describe() == "IDMap2,SQfp16"
    Q = np.vstack([q, clustered(3, seed=11)])
    _, It = exact(moved, ids, Q, 25)
    Dv, Iv = v.search(Q, 25)
    np.testing.assert_array_equal(Iv, It)
    np.testing.assert_allclose(Dv, np.take_along_axis(Q @ moved.T, Iv - 10, 1), atol=1e-6)
    allowed = np.sort(rng.choice(ids, 1500, replace=False))
    np.testing.assert_array_equal(v.search(Q, 25, allowed=allowed)[1], exact(moved, ids, Q, 25, allowed)[1])
    v.fetch = None  # without the float32 vectors: float16 scores, within the bound
    Dh, Ih = v.search(Q, 25)
    assert np.abs(Dh - np.take_along_axis(Q @ xb.T, Ih - 10, 1)).max() <= V.FLAT_SCORE_ERROR


@pytest.mark.parametrize("half", [True, False])
def test_flat_split_scan_matches_one_scan(monkeypatch, half):
    """A single query's exact scan split over ranges of positions (one per core) gives what one
    scan gives, also after removals have moved positions; float32 (older bundles) likewise."""
    import faiss

    monkeypatch.setattr(vflat, "cpu_cores", lambda: 3)  # three ranges, whatever this machine has
    index = None if half else faiss.IndexIDMap2(faiss.IndexFlatIP(D))
    v = V.FlatVectors(D, index=index, fetch=fetch)
    v.add(IDS, XB)
    v.remove(IDS[::7])
    alive = np.setdiff1d(IDS, IDS[::7])
    monkeypatch.setattr(vflat, "SPLIT_SCAN_MIN", 10**9)
    whole = [v.search(XQ[i], 15) for i in range(5)]
    monkeypatch.setattr(vflat, "SPLIT_SCAN_MIN", 100)
    calls = []
    orig = V.FlatVectors._split_scan
    monkeypatch.setattr(V.FlatVectors, "_split_scan", lambda self, q, kk: calls.append(kk) or orig(self, q, kk))
    for i in range(5):
        Ds, Is = v.search(XQ[i], 15)
        np.testing.assert_array_equal(Is, whole[i][1])
        np.testing.assert_allclose(Ds, whole[i][0], atol=1e-6)
    assert len(calls) >= 5
    np.testing.assert_array_equal(v.search(XQ[:1], 15)[1], exact(fetch(alive), alive, XQ[:1], 15)[1])


def test_fastscan_add_after_remove_finds_the_new_vectors():
    """FAISS leaves removed codes' 4-bit values in the tail of a fast-scan block and later adds
    OR into them; IVFPQVectors clears them. Compared on the codes alone (no re-ranking)."""
    v = make("ivf-pq-fastscan")
    v.fetch = None
    q = XB[:60]

    def found(ids):
        _, I = v.search(q, 20, nprobe=16)
        return [int(i) in row for i, row in zip(ids, I)]

    before = found(IDS[:60])
    assert np.mean(before) > 0.9
    v.remove(IDS[:60])
    new = 10**8 + np.arange(60, dtype=np.int64)
    v.add(new, q)
    assert found(new) == before  # the same codes again: found exactly where the originals were


def test_tune_reaches_target_and_reports_held_out_recall():
    v = make("ivf-pq")
    sets = [V.QuerySet("stored", XB[:200], IDS[:200]), V.QuerySet("other", XQ, np.full(len(XQ), -1))]
    rec = v_t = V.tune(v, sets, lambda: [(IDS, XB)], target=0.95)
    assert rec["recall"] >= 0.9 and rec["met"] and set(rec["by_query_set"]) == {"stored", "other"}
    assert rec["queries"] == {"tuning": 130, "measured": 130}
    assert v.search_params == rec["search"] and v_t["search"]["nprobe"] >= 1
    h = make("hnsw")
    rec = V.tune(h, sets, lambda: [(IDS, XB)], target=0.99)
    assert "efSearch" in rec["search"] and rec["recall"] >= 0.95


def test_exact_knn_streams_blocks():
    blocks = [(IDS[i : i + 700], XB[i : i + 700]) for i in range(0, N, 700)]
    Ds, Is = V.exact_knn(XQ, blocks, 10)
    Dt, It = exact(XB, IDS, XQ, 10)
    np.testing.assert_array_equal(Is, It)
    np.testing.assert_allclose(Ds, Dt, atol=1e-5)


def test_on_disk_ivf_pq_shards_merge_move_and_copy_on_write(tmp_path, capfd):
    import hashlib
    import shutil

    plan = V.Plan("ivf-pq", {"nlist": 16, "m": 8, "nbits": 6, "opq": False, "on_disk": True, "shard_size": 1000}, 0, "test")
    blocks = lambda: [(IDS[i : i + 700], XB[i : i + 700]) for i in range(0, N, 700)]  # noqa: E731
    bundle = tmp_path / "a"
    bundle.mkdir()
    v = V.build(plan, D, blocks, sample=lambda n: XB, fetch=fetch, folder=bundle, name="image")
    data = v.data_file()
    assert v.params["shards"] == 3 and data.parent == bundle and data.name.startswith("image.") and data.suffix == ".ivfdata"
    assert sorted(p.name for p in bundle.iterdir()) == [data.name]  # the shard files are gone
    assert len(v) == N and v.memory_bytes() < N * 8  # codes are not counted as resident
    check_against_exact(v)
    check_against_exact(v, allowed=np.sort(IDS[::3]))
    v.save(bundle / "image.faiss")
    digest = hashlib.sha256(data.read_bytes()).hexdigest()
    # the bundle moves: the lists are found next to the .faiss, and FAISS prints nothing
    moved = shutil.copytree(bundle, tmp_path / "b")
    capfd.readouterr()
    r = V.Vectors.load(moved / "image.faiss", D, mmap=True, fetch=fetch)
    assert r.params["on_disk"] and r.data_file().parent == moved and capfd.readouterr().out == ""
    np.testing.assert_array_equal(r.search(XQ, 10)[1], v.search(XQ, 10)[1])
    with pytest.raises(UsageError, match="read-only"):
        r.remove(IDS[:1])
    # a writer changes a private copy; the saved pair stays intact until the new one is saved
    w = V.Vectors.load(moved / "image.faiss", D, fetch=fetch)
    w.remove(IDS[:10])
    w.add(np.array([10**7], np.int64), XB[:1])
    assert w.data_file() != r.data_file() and capfd.readouterr().out == ""
    assert hashlib.sha256((moved / data.name).read_bytes()).hexdigest() == digest
    assert len(V.Vectors.load(moved / "image.faiss", D)) == N  # what a kill here would leave
    w.save(moved / "image.faiss")
    again = V.Vectors.load(moved / "image.faiss", D, fetch=fetch)
    assert len(again) == N - 9 and again.data_file().name == w.data_file().name
    BY_ID[10**7] = XB[0]
    assert again.search(XB[:1], 1)[1][0, 0] in (IDS[0], 10**7)


# -- the choice under a budget --------------------------------------------------------------------
def test_plan_choices_and_parameters():
    assert V.plan_index(500, 512).kind == "flat"
    assert V.plan_index(1_000_000, 512, budget=8 * 1024**3).kind == "flat"
    assert V.plan_index(1_000_000, 512, budget=1024**3).kind == "flat"  # float16: ~1 KB a vector
    p = V.plan_index(1_000_000, 512, budget=512 * 1024**2)
    assert p.kind == "ivf-pq" and p.memory <= 100 * 1024**2  # <= 100 MB per million vectors
    n, nlist = 1_000_000, p.params["nlist"]
    assert 4 * n**0.5 <= nlist <= 16 * n**0.5 and p.params["train_size"] >= 39 * nlist
    assert V.plan_index(3_000_000, 512, budget=32 * 1024**3).kind == "hnsw"
    assert V.plan_index(3_000_000, 512, budget=2 * 1024**3).kind == "ivf-pq"
    tight = V.plan_index(1_000_000, 512, budget=40 * 1024**2)  # fewer bytes per code to fit
    assert tight.kind == "ivf-pq" and tight.params["m"] < p.params["m"] and tight.memory <= 40 * 1024**2
    disk = V.plan_index(1_000_000, 512, budget=12 * 1024**2)  # not even IVF-PQ fits in RAM: codes on disk
    assert disk.kind == "ivf-pq" and disk.params["on_disk"] and disk.memory <= 12 * 1024**2
    assert V.code_bytes(disk.params) == V.code_bytes(p.params)  # disk is cheap: as many bytes per code as in RAM
    # in memory: 4-bit fast-scan codes; on disk: 8-bit PQ (FAISS' on-disk lists take no fast-scan blocks)
    assert p.params["fastscan"] and p.params["nbits"] == 4 and not disk.params["fastscan"] and disk.params["nbits"] == 8
    small = V.plan_index(2000, 512, "ivf-pq")
    assert small.kind == "flat" and "to train" in small.reason  # too few vectors: exact until then
    assert V.plan_index(2000, 512, "hnsw").kind == "hnsw"


def test_budget_refused_with_the_smallest_that_works():
    with pytest.raises(BudgetError) as e:
        V.plan_index(1_000_000, 512, budget=5 * 1024**2)
    need = e.value.min_bytes
    assert "smallest budget" in str(e.value) and need > 5 * 1024**2
    assert V.plan_index(1_000_000, 512, budget=need).memory <= need  # and that one works
    with pytest.raises(BudgetError):
        V.plan_index(1000, 512, "flat", budget=1000)
    with pytest.raises(UsageError, match="unknown vector index"):
        V.plan_index(10, 8, "annoy")
    assert parse_size("4G") == 4 * 1024**3 and parse_size("1.5M") == 1572864 and parse_size("512MB") == 512 * 1024**2
    with pytest.raises(UsageError):
        parse_size("lots")


# -- bundles ------------------------------------------------------------------------------------
def synthetic_bundle(name: str, n: int, seed: int = 0) -> np.ndarray:
    """A bundle of the tiny model's dimension holding n synthetic image rows (no encoding)."""
    x = clustered(n, seed=seed, centers=200)
    with searchkit.open_index(name, create=True, model=TINY) as idx:
        assert idx.dim == D
        db = idx.store.db
        with idx.store.transaction():
            db.conn.executemany(
                "INSERT INTO files(id, path, kind, size, mtime_ns, hash, complete) VALUES (?, ?, 'image', ?, ?, ?, 1)",
                ((i, f"/photos/{'a' if i % 2 else 'b'}/{i:06d}.jpg", 1000 + i, i * 10**9, f"{i:032x}") for i in range(1, n + 1)),
            )
            db.conn.executemany(
                "INSERT INTO items(id, file_id, kind, vector) VALUES (?, ?, 'image', ?)",
                ((i + 1, i + 1, x[i].tobytes()) for i in range(n)),
            )
            idx.store.bump_generation()
        idx.save()
    return x


@pytest.fixture
def forbid_encoder(monkeypatch):
    """Call it, and any later attempt to load or run an encoder fails the test."""
    from searchkit import encoders
    from searchkit.encoders.base import Encoder
    from searchkit.index import Index

    def boom(*a, **k):
        raise AssertionError("the encoder must not be used")

    def forbid():
        monkeypatch.setattr(encoders, "get_encoder", boom)
        monkeypatch.setattr(encoders, "_CACHE", {})
        monkeypatch.setattr(Index, "encoder", property(boom))
        for name in ("encode_images", "encode_texts", "encode_image_tensors"):
            monkeypatch.setattr(Encoder, name, boom, raising=False)

    return forbid


def test_reindex_without_encoding_records_recall_and_serves_mmapped(tmp_path, forbid_encoder):
    n = 26_000  # just enough to train IVF-PQ automatically at this size
    x = synthetic_bundle("big", n)
    forbid_encoder()
    with searchkit.open_index("big", write=True) as idx:
        with pytest.raises(BudgetError, match="smallest budget"):
            idx.reindex("ivf-pq", max_memory="20K")
        assert idx.vector_settings()["requested"] == "auto"  # refused before anything changed
        out = idx.reindex("ivf-pq", max_memory="64M")
    img = out["image"]
    assert img["kind"] == "ivf-pq" and img["count"] == n and img["memory_bytes"] <= 64 * 1024**2
    assert img["params"]["train_size"] >= 39 * img["params"]["nlist"]
    m = json.loads((tmp_path / "indexes" / "big" / "manifest.json").read_text())
    entry = m["vectors"]["image"]
    assert entry["kind"] == "ivf-pq" and m["vector_index"]["requested"] == "ivf-pq"
    rec = entry["recall"]
    assert rec["k"] == 10 and rec["recall"] >= 0.9 and rec["target"] == 0.95
    assert "nprobe" in entry["search"] and entry["search"] == rec["search"]
    idx = searchkit.open_index("big")
    vec = idx.vectors("image")
    assert vec.mmapped and vec.search_params == entry["search"]
    res = idx.search(x[123], k=3)  # an embedding query finds its own row, exact score
    assert res[0].id == 124 and res[0].score == pytest.approx(1.0, abs=1e-5)
    res = idx.search(x[123], k=5, where=Filter(path="/photos/a"))
    assert res and all(r.path.startswith("/photos/a/") for r in res)
    info = CliRunner().invoke(app, ["info", "--index", "big"])
    assert info.exit_code == 0 and "recall@10" in info.stdout and "ivf-pq" in info.stdout
    # a missing FAISS file is rebuilt as the manifest says (kind and parameters), not as flat
    idx.close()
    (tmp_path / "indexes" / "big" / "image.faiss").unlink()
    idx = searchkit.open_index("big")
    v2 = idx.vectors("image")
    assert v2.kind == "ivf-pq" and v2.params["nlist"] == entry["params"]["nlist"] and v2.search_params == entry["search"]
    idx.close()
    # and back to exact, from the stored vectors again
    r = CliRunner().invoke(app, ["reindex", "--index", "big", "--vector-index", "flat", "--json"])
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["vectors"]["image"]["kind"] == "flat"
    r = CliRunner().invoke(app, ["reindex", "--index", "big", "--vector-index", "hnsw", "--max-memory", "1K"])
    assert r.exit_code == 2 and "smallest budget" in r.stderr


def test_incremental_adds_deletes_catch_up_and_retrain(tmp_path):
    x = synthetic_bundle("inc", 26_000)
    with searchkit.open_index("inc", write=True) as idx:
        idx.reindex("ivf-pq", max_memory="64M")
    make_images(tmp_path / "p", 4)
    with searchkit.open_index("inc", create=True) as idx:
        s = idx.add([tmp_path / "p"])  # per-batch adds go into the trained IVF-PQ
        assert s.added == 4 and idx.vectors("image").kind == "ivf-pq"
    idx = searchkit.open_index("inc")
    assert idx.search(tmp_path / "p" / "img002.jpg", k=1)[0].path == str(tmp_path / "p" / "img002.jpg")
    idx.close()
    (tmp_path / "p" / "img002.jpg").unlink()
    with searchkit.open_index("inc", create=True) as idx:
        assert idx.add([tmp_path / "p"]).removed == 1
    bundle = tmp_path / "indexes" / "inc"
    idx = searchkit.open_index("inc")
    assert all(r.path != str(tmp_path / "p" / "img002.jpg") for r in idx.search("x", k=50, where={"path": str(tmp_path / "p")}))
    assert len(idx.search("x", k=50, where={"path": str(tmp_path / "p")})) == 3
    idx.close()
    # a FAISS file older than meta.db (a killed run) is brought up to date by id, not retrained
    m = json.loads((bundle / "manifest.json").read_text())
    m["vectors"]["image"]["generation"] = -1
    (bundle / "manifest.json").write_text(json.dumps(m))
    with searchkit.open_index("inc", write=True) as idx:
        idx.store.db.execute("DELETE FROM items WHERE id <= 10")
        vec = idx.vectors("image")
        assert vec.kind == "ivf-pq" and len(vec) == 26_000 + 3 - 10 and vec.params["trained_on"] == m["vectors"]["image"]["params"]["trained_on"]
        # grown 4x past its build size: the end of a run retrains
        vec.params["built_count"] = 6000
        done = idx.maintain_vectors()
        assert done and "retrain" in done[0]
        assert idx.vectors("image").params["built_count"] == len(vec)
        del x


def test_bundle_on_disk_lists_when_ram_is_short(tmp_path, capfd):
    synthetic_bundle("disk", 26_000)
    with searchkit.open_index("disk", write=True) as idx:
        out = idx.reindex("ivf-pq", max_memory="200K")  # below the smallest in-memory IVF-PQ
    img = out["image"]
    bundle = tmp_path / "indexes" / "disk"
    assert img["kind"] == "ivf-pq" and img["params"]["on_disk"] and img["memory_bytes"] <= 200 * 1024
    assert img["recall"]["recall"] >= 0.9 and (bundle / img["data_file"]).exists()
    idx = searchkit.open_index("disk")
    vec = idx.vectors("image")
    assert vec.mmapped and vec.data_file().name == img["data_file"] and len(vec) == 26_000
    idx.close()
    # an incremental run copies the lists, changes the copy, and drops the old file once saved
    make_images(tmp_path / "p", 3)
    with searchkit.open_index("disk", create=True) as idx:
        assert idx.add([tmp_path / "p"]).added == 3
    files = sorted(p.name for p in bundle.glob("*.ivfdata"))
    entry = searchkit.open_index("disk").read_manifest()["vectors"]["image"]
    assert files == [entry["data_file"]] != [img["data_file"]] and entry["count"] == 26_003
    capfd.readouterr()
    r = CliRunner().invoke(app, ["query", "x", "--index", "disk", "--where-path", str(tmp_path / "p"), "--json"])
    assert r.exit_code == 0 and len(r.stdout.splitlines()) == 3 and capfd.readouterr().out == ""


def test_hnsw_bundle_deletions_are_tombstones(tmp_path):
    make_images(tmp_path / "p", 6)
    r = CliRunner().invoke(
        app, ["index", str(tmp_path / "p"), "--model", TINY, "--vector-index", "hnsw", "--json"]
    )
    assert r.exit_code == 0, r.stderr
    (tmp_path / "p" / "img001.jpg").unlink()
    with searchkit.open_index("default", create=True) as idx:
        idx.add([tmp_path / "p"])
    idx = searchkit.open_index("default")
    vec = idx.vectors("image")
    assert vec.kind == "hnsw" and len(vec) == 5 and vec.tombstones == 1
    assert {os.path.basename(r.path) for r in idx.search("x", k=10)} == {f"img00{i}.jpg" for i in (0, 2, 3, 4, 5)}
    m = idx.read_manifest()
    assert m["vectors"]["image"]["recall"]["recall"] is not None and m["vectors"]["image"]["tombstones"] == 1


# -- filters ------------------------------------------------------------------------------------
@pytest.fixture
def filtered_bundle(tmp_path):
    a = make_images(tmp_path / "p" / "2023", 4)
    b = make_images(tmp_path / "p" / "2024", 3, start=10, ext="png")
    big = tmp_path / "p" / "2024" / "big.png"
    from tests.conftest import noise_image

    noise_image(77, size=(400, 300)).save(big)
    old = time.mktime((2023, 3, 1, 12, 0, 0, 0, 0, -1))
    for p in a:
        os.utime(p, (old, old))
    with searchkit.open_index("f", create=True, model=TINY) as idx:
        idx.add([tmp_path / "p"])
    return tmp_path / "p", a, b, big


def test_filters_in_the_library(filtered_bundle):
    root, a, b, big = filtered_bundle
    idx = searchkit.open_index("f")
    names = lambda res: {os.path.basename(r.path) for r in res}  # noqa: E731
    assert names(idx.search("x", k=20, where=Filter(path=str(root / "2023")))) == {p.name for p in a}
    assert names(idx.search("x", k=20, where=Filter(path=str(root / "202")))) == set()  # a folder, not a string prefix
    assert names(idx.search("x", k=20, where={"path": "*.png"})) == {p.name for p in b} | {"big.png"}
    assert names(idx.search("x", k=20, where=Filter(min_size=big.stat().st_size))) == {"big.png"}
    assert "big.png" not in names(idx.search("x", k=20, where=Filter(max_size=big.stat().st_size - 1)))
    assert names(idx.search("x", k=20, where=Filter(before="2023-06-01"))) == {p.name for p in a}
    assert names(idx.search("x", k=20, where=Filter(after="2023-06-01", path="*.jpg"))) == set()
    # the filtered top k are the true top k among the matches
    q = a[0]
    full = [r for r in idx.search(q, k=20) if r.path.endswith(".png")]
    only = idx.search(q, k=2, where={"path": "*.png"})
    assert [r.id for r in only] == [r.id for r in full[:2]]
    with pytest.raises(UsageError, match="ISO date"):
        idx.search("x", where=Filter(after="last tuesday"))
    with pytest.raises(UsageError, match="unknown filter"):
        idx.search("x", where={"colour": "red"})
    assert parse_time_ns("1970-01-01T00:00:01+00:00") == 10**9


def test_filters_in_the_cli(filtered_bundle):
    root, a, b, big = filtered_bundle
    r = CliRunner().invoke(app, ["query", "x", "--index", "f", "--where-path", str(root / "2024"), "--min-size", "1K", "--json"])
    assert r.exit_code == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert rows and all(x["path"].startswith(str(root / "2024")) for x in rows)
    r = CliRunner().invoke(app, ["query", "x", "--index", "f", "--after", "2023-01-01", "--before", "2023-12-31", "--json"])
    assert {os.path.basename(json.loads(line)["path"]) for line in r.stdout.splitlines()} == {p.name for p in a}
    r = CliRunner().invoke(app, ["query", "x", "--index", "f", "--after", "someday"])
    assert r.exit_code == 2 and "ISO date" in r.stderr
