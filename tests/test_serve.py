"""`searchkit serve`: every endpoint and error status in-process (ASGI), auth, traversal and
upload attacks, micro-batched concurrent queries, a bundle indexed by another process while
it is served, and the real command on 127.0.0.1."""

from __future__ import annotations

import asyncio
import io
import json
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image

import searchkit
from searchkit.serve import create_app
from tests.conftest import TINY, make_images
from tests.serve_helpers import build_bundles, copy_bundle, free_port, tiny_env


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    with tiny_env(tmp):
        yield build_bundles(tmp)


@pytest.fixture(scope="module")
def client(data, tmp_path_factory):
    with tiny_env(tmp_path_factory.mktemp("env")):
        app = create_app([data["main"], data["other"]], max_upload="2M")
        with TestClient(app, raise_server_exceptions=False) as c:
            yield c


def jpeg_bytes(img: Image.Image, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def assert_error(r, status: int, *words: str) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and "\n" not in body["error"] and "Traceback" not in body["error"]
    for w in words:
        assert w in body["error"], body["error"]
    return body


# -- status -----------------------------------------------------------------------------------
def test_health_indexes_info_and_docs(client, data):
    assert client.get("/healthz").json() == {"status": "ok"}
    r = client.get("/api/indexes").json()
    assert r["default"] == "main"
    by = {i["name"]: i for i in r["indexes"]}
    assert by["main"]["counts"] == {"image": 7, "text": 3, "files": 8}
    assert by["other"]["counts"]["image"] == 12 and by["main"]["model"] == TINY
    info = client.get("/api/info", params={"index": "other"}).json()
    with searchkit.open_index(data["other"]) as idx:
        assert info == json.loads(json.dumps(idx.info()))  # the same object as `searchkit info --json`
    assert client.get("/openapi.json").json()["paths"]["/api/search"]
    assert client.get("/docs").status_code == 200
    assert_error(client.get("/api/info", params={"index": "nope"}), 404, "nope")


# -- search -----------------------------------------------------------------------------------
def test_text_search_matches_the_library(client, data):
    r = client.get("/api/search", params={"q": "a red bicycle", "k": 5})
    assert r.status_code == 200
    body = r.json()
    assert body["took_ms"] >= 0 and len(body["results"]) == 5
    with searchkit.open_index(data["main"]) as idx:
        expected = [x.to_dict() for x in idx.search("a red bicycle", k=5)]
    for got, want in zip(body["results"], expected):
        assert {k: got[k] for k in want} == {**want, "score": pytest.approx(want["score"], abs=1e-5)}
        assert got["thumbnail"] == f"/api/items/{got['id']}/thumbnail?index=main"
        assert got["similar"] == f"/api/items/{got['id']}/similar?index=main"
    texts = client.get("/api/search", params={"q": "a cat", "kind": "text", "k": 3}).json()["results"]
    assert {t["kind"] for t in texts} == {"text"} and texts[0]["source"].startswith(str(data["corpus"]) + ":")
    assert "thumbnail" not in texts[0]
    other = client.get("/api/search", params={"q": "x", "index": "other", "k": 20}).json()["results"]
    assert len(other) == 12 and all("/more/" in x["path"] for x in other)


def test_search_filters(client, data):
    sub = str(data["photos"] / "sub")
    r = client.get("/api/search", params={"q": "anything", "where_path": sub}).json()["results"]
    assert [x["path"] for x in r] == [sub + "/img004.jpg"]
    assert client.get("/api/search", params={"q": "x", "min_size": "1G"}).json()["results"] == []
    assert len(client.get("/api/search", params={"q": "x", "after": "2000-01-01", "k": 50}).json()["results"]) == 7
    assert_error(client.get("/api/search", params={"q": "x", "after": "yesterday"}), 400, "yesterday")
    assert_error(client.get("/api/search", params={"q": "x", "min_size": "lots"}), 400, "lots")
    assert_error(client.get("/api/search", params={"q": "x", "min_size": "2M", "max_size": "1M"}), 400)


@pytest.mark.parametrize(
    "params,status",
    [
        ({"q": "   "}, 400),
        ({}, 422),
        ({"q": "x", "k": 0}, 422),
        ({"q": "x", "k": "many"}, 422),
        ({"q": "x", "k": 10_000}, 422),
        ({"q": "x", "kind": "video"}, 422),
        ({"q": "x" * 3000}, 422),
        ({"q": "x", "index": "missing"}, 404),
        ({"q": "x", "index": "other", "kind": "text"}, 404),  # holds no text items
    ],
)
def test_search_errors(client, params, status):
    assert_error(client.get("/api/search", params=params), status)


def test_image_search_and_upload_errors(client, data):
    query = (data["photos"] / "img002.jpg").read_bytes()
    r = client.post("/api/search", files={"image": ("q.jpg", query, "image/jpeg")}, data={"k": "3"})
    res = r.json()["results"]
    assert res[0]["path"] == str(data["photos"] / "img002.jpg") and res[0]["score"] == pytest.approx(1.0, abs=1e-3)
    texts = client.post("/api/search", files={"image": ("q.jpg", query)}, data={"kind": "text", "k": "2"}).json()["results"]
    assert [t["kind"] for t in texts] == ["text", "text"]
    sub = client.post("/api/search", files={"image": ("q.jpg", query)}, data={"where_path": str(data["photos"] / "sub")}).json()
    assert [x["path"] for x in sub["results"]] == [str(data["photos"] / "sub" / "img004.jpg")]
    on_other = client.post("/api/search?index=other", files={"image": ("q.jpg", query)}).json()["results"]
    assert all("/more/" in x["path"] for x in on_other)
    assert_error(client.post("/api/search", files={"image": ("q.jpg", b"not an image at all")}), 415, "not a readable image")
    assert_error(client.post("/api/search", files={"image": ("q.jpg", b"")}), 415, "empty")
    assert_error(client.post("/api/search", files={"image": ("q.jpg", query[: len(query) // 3])}), 415)
    assert_error(client.post("/api/search", data={"k": "3"}), 422, "image")
    assert_error(client.post("/api/search", files={"image": ("q.jpg", query)}, data={"k": "-1"}), 422)
    assert_error(client.post("/api/search", files={"image": ("q.jpg", query)}, data={"index": "nope"}), 404)
    assert_error(client.post("/api/search", files={"image": ("q.jpg", query)}, data={"before": "soon"}), 400)


def test_upload_cap_and_bomb(client, data):
    big = os.urandom(3 * 1024 * 1024)  # the client's cap is 2M
    assert_error(client.post("/api/search", files={"image": ("big.jpg", big)}), 413, "2.0 MB")

    def chunks():  # no Content-Length: refused once the bytes received pass the cap
        for _ in range(48):
            yield b"x" * 65536

    r = client.post("/api/search", content=chunks(), headers={"content-type": "multipart/form-data; boundary=zz"})
    assert_error(r, 413, "too large")
    bomb = io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(bomb, "PNG")  # 100M pixels, over PIL's limit; a few KB
    assert len(bomb.getvalue()) < 2 * 1024 * 1024
    assert_error(client.post("/api/search", files={"image": ("bomb.png", bomb.getvalue())}), 413, "decompression bomb")
    assert_error(client.post("/api/classify", files={"image": ("bomb.png", bomb.getvalue())}, data={"labels": "a,b"}), 413)
    # nothing of the uploads landed in the bundle or the indexed folder
    names = {p.name for p in data["photos"].rglob("*")} | {p.name for p in data["main"].rglob("*")}
    assert not any(n.startswith(("q.", "big.", "bomb.")) for n in names)


# -- items ------------------------------------------------------------------------------------
def test_item_thumbnail_file_and_similar(client, data):
    with searchkit.open_index(data["main"]) as idx:
        ids = {r.path: r.id for r in idx.search("x", k=20)}
        text_id = idx.search("a cat", k=1, kind="text")[0].id
    path = str(data["photos"] / "img001.jpg")
    i = ids[path]
    meta = client.get(f"/api/items/{i}").json()
    assert meta["path"] == path and meta["kind"] == "image" and meta["size"] == os.path.getsize(path)
    assert meta["modified"].startswith("20") and meta["similar"].endswith("index=main")
    t = client.get(f"/api/items/{text_id}").json()
    assert t["kind"] == "text" and t["text"] and t["source"].endswith(":1")

    r = client.get(f"/api/items/{i}/thumbnail", params={"size": 32})
    assert r.headers["content-type"] == "image/jpeg"
    thumb = Image.open(io.BytesIO(r.content))
    assert thumb.format == "JPEG" and max(thumb.size) == 32
    r2 = client.get(f"/api/items/{i}/thumbnail", params={"size": 32, "format": "webp"})
    assert Image.open(io.BytesIO(r2.content)).format == "WEBP"
    hits = client.app.state.searchkit.thumbnails.hits
    client.get(f"/api/items/{i}/thumbnail", params={"size": 32})
    assert client.app.state.searchkit.thumbnails.hits == hits + 1
    assert client.get(f"/api/items/{i}/thumbnail", params={"size": 32}, headers={"If-None-Match": r.headers["etag"]}).status_code == 304
    rotated = client.get(f"/api/items/{ids[str(data['photos'] / 'rotated.jpg')]}/thumbnail").content
    w, h = Image.open(io.BytesIO(rotated)).size
    assert (w, h) == (30, 60)  # EXIF orientation applied: stored 60x30, shown upright
    assert_error(client.get(f"/api/items/{i}/thumbnail", params={"size": 5000}), 422)
    assert_error(client.get(f"/api/items/{i}/thumbnail", params={"format": "gif"}), 422)

    f = client.get(f"/api/items/{i}/file")
    assert f.content == open(path, "rb").read() and f.headers["content-type"] == "image/jpeg"

    sim = client.get(f"/api/items/{i}/similar", params={"k": 3}).json()["results"]
    assert len(sim) == 3 and i not in [s["id"] for s in sim] and [s["rank"] for s in sim] == [1, 2, 3]
    with searchkit.open_index(data["main"]) as idx:
        want = [r.id for r in idx.search(data["photos"] / "img001.jpg", k=4) if r.id != i][:3]
    assert [s["id"] for s in sim] == want  # the stored embedding, not a re-encoding
    sim_text = client.get(f"/api/items/{i}/similar", params={"kind": "text", "k": 2}).json()["results"]
    assert [s["kind"] for s in sim_text] == ["text", "text"]

    assert_error(client.get(f"/api/items/{text_id}/thumbnail"), 404, "text item")
    assert_error(client.get(f"/api/items/{text_id}/file"), 404)
    for missing in ("999", "0", str(2**70)):
        for tail in ("", "/thumbnail", "/file", "/similar"):
            assert_error(client.get(f"/api/items/{missing}{tail}"), 404)


def test_ids_of_another_bundle_are_404(client, data):
    with searchkit.open_index(data["other"]) as idx:
        other_ids = [r.id for r in idx.search("x", k=12)]
    with searchkit.open_index(data["main"]) as idx:
        main_max = max(r.id for r in idx.search("x", k=20)) + 3  # text items come after images
    beyond = [i for i in other_ids if i > main_max]
    assert beyond, "the other bundle should hold ids main does not"
    for i in beyond:
        assert client.get(f"/api/items/{i}/file", params={"index": "other"}).status_code == 200
        for tail in ("", "/thumbnail", "/file", "/similar"):
            assert_error(client.get(f"/api/items/{i}{tail}"), 404, "main")


@pytest.mark.parametrize(
    "path",
    [
        "/api/items/%2e%2e%2f%2e%2e%2fetc%2fpasswd/file",
        "/api/items/..%2F..%2Fetc%2Fpasswd",
        "/api/items/%2Fetc%2Fpasswd/file",
        "/api/items//etc/passwd/file",
        "/api/items/-1/file",
        "/api/items/1%2F..%2F2/file",
        "/api/items/1.0/file",
        "/static/%2e%2e/%2e%2e/bundles.py",
        "/static/..%2F..%2Fsafety.py",
        "/static/%2Fetc%2Fpasswd",
        "/static//etc/passwd",
        "/etc/passwd",
    ],
)
def test_traversal_is_404(client, path):
    r = client.get(path)
    assert r.status_code == 404, (path, r.status_code, r.text[:200])
    assert b"root:" not in r.content and b"import" not in r.content


def test_symlinks_under_an_indexed_folder_are_not_served(client, data, tmp_path):
    with searchkit.open_index(data["main"]) as idx:
        link = next(r for r in idx.search("x", k=20) if r.path.endswith("link.jpg"))
    # it was indexed (the indexer follows file symlinks), but its file is never served
    for tail in ("/file", "/thumbnail"):
        assert_error(client.get(f"/api/items/{link.id}{tail}"), 404, "symlink")
    assert client.get(f"/api/items/{link.id}/similar").status_code == 200  # its stored vector is fine


def test_a_file_swapped_after_indexing_is_not_served(data, tmp_path):
    """A file replaced by a symlink to a secret, or by other content, after it was indexed."""
    with tiny_env(tmp_path):
        bundle = copy_bundle(data["other"], tmp_path / "copy")
        app = create_app([bundle])
        with TestClient(app, raise_server_exceptions=False) as c:
            res = c.get("/api/search", params={"q": "x", "k": 2}).json()["results"]
            a, b = res[0], res[1]
            assert c.get(f"/api/items/{a['id']}/file").status_code == 200
            original = open(a["path"], "rb").read()
            os.replace(a["path"], str(tmp_path / "moved.jpg"))
            os.symlink(data["outside"] / "secret.jpg", a["path"])
            os.utime(a["path"], follow_symlinks=False)
            try:
                assert_error(c.get(f"/api/items/{a['id']}/file"), 404)
                assert_error(c.get(f"/api/items/{a['id']}/thumbnail"), 404)
            finally:
                os.unlink(a["path"])
                open(a["path"], "wb").write(original)
            st = os.stat(b["path"])
            with open(b["path"], "ab") as f:
                f.write(b"x")
            try:
                assert_error(c.get(f"/api/items/{b['id']}/file"), 404, "changed since it was indexed")
            finally:
                with open(b["path"], "r+b") as f:
                    f.truncate(st.st_size)
                os.utime(b["path"], ns=(st.st_atime_ns, st.st_mtime_ns))
            assert c.get(f"/api/items/{b['id']}/file").status_code == 200


# -- classify ---------------------------------------------------------------------------------
def test_classify(client, data):
    img = (data["photos"] / "img000.jpg").read_bytes()
    r = client.post("/api/classify", files={"image": ("mine.jpg", img)}, data={"labels": "cat, dog ,car"}).json()
    assert r["path"] == "mine.jpg" and r["label"] in ("cat", "dog", "car")
    assert set(r["scores"]) == {"cat", "dog", "car"} and sum(r["scores"].values()) == pytest.approx(1, abs=1e-4)
    with searchkit.open_index(data["main"]) as idx:
        want = idx.classify([data["photos"] / "img000.jpg"], "cat,dog,car")[0]
    assert r["label"] == want.label
    t = client.post("/api/classify", files={"image": ("m.jpg", img)}, data={"labels": "cat,dog", "templates": ["a {} here", "one {}"]})
    assert t.status_code == 200 and set(t.json()["scores"]) == {"cat", "dog"}
    assert_error(client.post("/api/classify", files={"image": ("m.jpg", img)}, data={"labels": " , "}), 400)
    assert_error(client.post("/api/classify", files={"image": ("m.jpg", img)}, data={"labels": "a,b", "templates": ["no slot"]}), 400)
    assert_error(client.post("/api/classify", files={"image": ("m.jpg", b"%PDF-1.4")}, data={"labels": "a,b"}), 415)
    assert_error(client.post("/api/classify", files={"image": ("m.jpg", img)}), 422, "labels")


def test_unknown_routes_and_methods_are_json(client):
    assert_error(client.get("/api/nothing"), 404)
    assert_error(client.delete("/api/search"), 405)
    assert_error(client.post("/api/search", content=b"{}", headers={"content-type": "application/json"}), 422)


# -- auth -------------------------------------------------------------------------------------
def test_token(data, tmp_path):
    with tiny_env(tmp_path):
        app = create_app([data["other"]], token="s3cret")
        with TestClient(app, raise_server_exceptions=False) as c:
            for path in ("/api/indexes", "/api/search?q=x", "/api/info", "/api/items/1", "/api/items/1/thumbnail", "/api/items/1/file"):
                r = c.get(path)
                assert_error(r, 401, "Bearer")
                assert r.headers["www-authenticate"] == "Bearer"
                assert_error(c.get(path, headers={"Authorization": "Bearer wrong"}), 401)
                assert_error(c.get(path, headers={"Authorization": "s3cret"}), 401)
                assert c.get(path, headers={"Authorization": "Bearer s3cret"}).status_code == 200, path
            assert_error(c.post("/api/classify", files={"image": ("a.jpg", b"x")}, data={"labels": "a,b"}), 401)
            assert_error(c.post("/api/search", files={"image": ("a.jpg", b"x")}), 401)
            # the page, its files and the health check need no token
            assert c.get("/healthz").status_code == 200
            assert c.get("/").status_code == 200 and c.get("/static/app.js").status_code == 200


def test_page_and_static_files(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in r.headers["content-security-policy"]
    html = r.text
    assert "/static/app.js" in html and "/static/style.css" in html
    assert "http://" not in html and "https://" not in html  # nothing from a CDN
    js = client.get("/static/app.js")
    assert js.status_code == 200 and "javascript" in js.headers["content-type"]
    assert "https://" not in js.text and "http://" not in js.text
    assert client.get("/static/style.css").status_code == 200


# -- concurrency ------------------------------------------------------------------------------
def test_concurrent_text_queries_are_batched_and_exact(client, data):
    queries = [f"photo number {i}" for i in range(24)]

    async def run():
        transport = httpx.ASGITransport(app=client.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as ac:
            rs = await asyncio.gather(*[ac.get("/api/search", params={"q": q, "k": 4}) for q in queries])
            rs += await asyncio.gather(*[ac.get("/api/search", params={"q": q, "k": 2, "kind": "text"}) for q in queries[:6]])
        return rs

    batcher = client.app.state.searchkit.bundles.get("main").batcher
    before = len(batcher.batch_sizes)
    responses = asyncio.run(run())
    assert all(r.status_code == 200 for r in responses)
    assert max(batcher.batch_sizes[before:]) > 1  # they were encoded together
    with searchkit.open_index(data["main"]) as idx:
        for q, r in zip(queries, responses):
            assert [x["id"] for x in r.json()["results"]] == [x.id for x in idx.search(q, k=4)]
        for q, r in zip(queries[:6], responses[24:]):
            assert [x["id"] for x in r.json()["results"]] == [x.id for x in idx.search(q, k=2, kind="text")]


def test_served_bundle_indexed_by_another_process(data, tmp_path):
    """`searchkit index` runs on a served bundle: the server answers throughout, from a
    consistent state, and serves the new images afterwards without a restart."""
    with tiny_env(tmp_path):
        bundle = copy_bundle(data["other"], tmp_path / "live")
        new = make_images(tmp_path / "new", 24, start=300)
        app = create_app([bundle])
        with TestClient(app, raise_server_exceptions=False) as c:
            assert c.get("/api/indexes").json()["indexes"][0]["counts"]["image"] == 12
            env = {**os.environ, "SEARCHKIT_DEVICE": "cpu"}
            proc = subprocess.Popen(
                [sys.executable, "-m", "searchkit.cli", "index", str(tmp_path / "new"), "--index", str(bundle), "--batch-size", "4"],
                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )
            seen, statuses = set(), []
            try:
                while proc.poll() is None:
                    r = c.get("/api/search", params={"q": "x", "k": 60})
                    statuses.append(r.status_code)
                    res = r.json()["results"] if r.status_code == 200 else []
                    assert [x["rank"] for x in res] == list(range(1, len(res) + 1))
                    assert len({x["id"] for x in res}) == len(res)
                    seen.add(len(res))
                    n = c.get("/api/indexes").json()["indexes"][0]["counts"]["image"]
                    assert 12 <= n <= 36
                    time.sleep(0.05)
                out, err = proc.communicate(timeout=60)
            finally:
                if proc.poll() is None:
                    proc.kill()
            assert proc.returncode == 0, err  # the server never took the writer lock
            assert statuses and set(statuses) == {200}
            r = c.get("/api/search", params={"q": "x", "k": 60}).json()["results"]
            assert len(r) == 36 and {str(p) for p in new} <= {x["path"] for x in r}
            newest = next(x for x in r if x["path"] == str(new[-1]))
            assert c.get(newest["thumbnail"]).status_code == 200
            assert c.get("/api/indexes").json()["indexes"][0]["counts"]["image"] == 36


# -- the real command -------------------------------------------------------------------------
def _raw_get(port: int, target: str) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, data


def test_serve_refusals(data, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from searchkit.cli.main import app

    runner = CliRunner()
    refused = runner.invoke(app, ["serve", "--index", str(data["other"]), "--host", "0.0.0.0"])
    assert refused.exit_code == 2 and "--token" in refused.output and refused.exception.__class__ is SystemExit
    missing = runner.invoke(app, ["serve", "--index", str(tmp_path / "none")])
    assert missing.exit_code == 1 and "no index" in missing.output
    monkeypatch.setenv("SEARCHKIT_HOME", str(tmp_path / "empty"))
    none_home = runner.invoke(app, ["serve", "--all"])
    assert none_home.exit_code == 1 and "no index under" in none_home.output
    bad_cap = runner.invoke(app, ["serve", "--index", str(data["other"]), "--max-upload", "lots"])
    assert bad_cap.exit_code == 2 and "upload limit" in bad_cap.output


def test_searchkit_serve_command(data, tmp_path):
    port = free_port()
    env = {**os.environ, "SEARCHKIT_DEVICE": "cpu"}
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "searchkit.cli", "serve", "--index", str(data["other"]), "--index", str(data["main"]), "--port", str(port), "--token", "tok"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        while True:
            try:
                if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() - t0 < 30, "the server did not come up"
            time.sleep(0.1)
        auth = {"Authorization": "Bearer tok"}
        assert httpx.get(base + "/api/indexes").status_code == 401
        names = [i["name"] for i in httpx.get(base + "/api/indexes", headers=auth).json()["indexes"]]
        assert names == ["other", "main"]
        res = httpx.get(base + "/api/search", params={"q": "a photo", "k": 3, "index": "main"}, headers=auth, timeout=30).json()["results"]
        assert len(res) == 3
        served = next(r for r in res if not r["path"].endswith("link.jpg"))  # (a symlink is never served)
        thumb = httpx.get(base + served["thumbnail"], headers=auth, timeout=30)
        assert thumb.status_code == 200 and Image.open(io.BytesIO(thumb.content)).size
        # raw request targets, not normalised by any client
        for target in ("/static/../../pyproject.toml", "/static/../views/page.py", "/api/items/../../../etc/passwd", "/static/%2e%2e/%2e%2e/app.py", "/../../etc/passwd"):
            status, body = _raw_get(port, target)
            assert status in (400, 404), (target, status)
            assert b"root:" not in body and b"[project]" not in body and b"import" not in body
    finally:
        proc.terminate()
        proc.wait(timeout=20)
