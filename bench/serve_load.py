"""`searchkit serve` under load: a 100k-item bundle, the server as a separate process, clients
on loopback at 1, 4 and 16 concurrent connections.

    python bench/serve_load.py [--n 100000] [--model open_clip:ViT-B-32@random] [--seconds 8]

The bundle is built as bench/query_latency.py builds it (N synthetic clustered vectors written
through the store), and its first --thumbs file rows are pointed at real JPEG files (640x480,
Flickr8k photos when ../shared/data is there, generated ones otherwise) so thumbnails are made
from real files. Measured, in this order: the in-process library search (`Index.search`, warm,
one query at a time: the reference); the server's first thumbnails (each id once, 4 clients:
made from the file); then for 1, 4 and 16 clients, each for --seconds: text searches (k=10), and
thumbnails (the page's size and format, ids at random: mostly from the cache); and the busiest
level's searches again against a server started with micro-batching off
(SEARCHKIT_SERVE_MAX_BATCH=1), to show what batching gives under the same load. Every client
keeps one keep-alive connection and sends its next request when the last one is answered.
Prints one JSON object: QPS, p50, p99, errors and the server's CPU time per request per level. Targets (issue 12, 2 cores): zero
errors; single-client search p50 <= 1.5x the library's; 16-client search QPS >= 1.5x
single-client; 16-client p99 <= 250 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlencode

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import FLICKR  # noqa: E402
from query_latency import build_bundle, pct  # noqa: E402

WORDS = "cat dog sofa beach sunset mountain red blue child running car street snow park bicycle".split()


def queries(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(2, 7))) for _ in range(n)]


def attach_photos(bundle: Path, folder: Path, n: int) -> None:
    """Point the first n file rows at real JPEGs (with their true size and mtime)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    sources = sorted((FLICKR / "images").glob("*.jpg"))[:n] if FLICKR.exists() else []
    rows = []
    rng = np.random.default_rng(0)
    for i in range(n):
        p = folder / f"photo{i:05d}.jpg"
        if i < len(sources):
            img = Image.open(sources[i]).convert("RGB").resize((640, 480))
        else:
            base = rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)
            img = Image.fromarray(base).resize((640, 480), Image.BICUBIC)
        img.save(p, quality=90)
        st = p.stat()
        rows.append((str(p), st.st_size, st.st_mtime_ns, i + 1))
    with sqlite3.connect(bundle / "meta.db") as db:
        db.executemany("UPDATE files SET path = ?, size = ?, mtime_ns = ? WHERE id = ?", rows)


def library_search(bundle: Path, qs: list[str]) -> dict:
    import searchkit

    with searchkit.open_index(bundle) as idx:
        idx.search("warm up", k=10)
        times = []
        for q in qs:
            t0 = time.perf_counter()
            idx.search(q, k=10)
            times.append(time.perf_counter() - t0)
    return {"p50": round(pct(times, 50), 2), "p99": round(pct(times, 99), 2)}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its threads so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measured(pid: int, run) -> dict:
    """`run()`'s result plus the server's CPU milliseconds per answered request: unlike wall
    times, this hardly depends on what else the machine is running."""
    c0 = cpu_seconds(pid)
    out = run()
    out["server_cpu_ms_per_request"] = round((cpu_seconds(pid) - c0) * 1000 / max(1, out["requests"]), 2)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(bundle: Path, port: int, env: dict | None = None) -> tuple[subprocess.Popen, float]:
    import httpx

    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "searchkit.cli", "serve", "--index", str(bundle), "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})},
    )
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc, time.perf_counter() - t0
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {proc.stderr.read()}")
        time.sleep(0.05)


class Connection:
    """One keep-alive HTTP/1.1 connection that sends GETs and reads sized responses: a load
    generator as lean as wrk's, since it shares the server's two cores (httpx took ~1.7 ms of
    CPU per request here, as much as a fifth of the server's own)."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader = self.writer = None

    async def get(self, path: str, params: dict) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.write(f"GET {path}?{urlencode(params)} HTTP/1.1\r\nHost: {self.host}\r\n\r\n".encode())
        head = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower()
        length = next((int(line.split(":", 1)[1]) for line in head.split("\r\n") if line.startswith("content-length:")), None)
        if length is None:
            raise ConnectionError("response without content-length")
        return int(head[9:12]), await self.reader.readexactly(length)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def load(base: str, clients: int, seconds: float, make_request, limit: int | None = None) -> dict:
    """`clients` connections, each sending its next request when the last is answered."""
    host, port = base.rsplit("//", 1)[1].split(":")
    latencies: list[float] = []
    errors: list[str] = []
    counter = iter(range(limit)) if limit is not None else None
    deadline = time.perf_counter() + seconds

    async def client(rng: random.Random) -> None:
        conn = Connection(host, int(port))
        try:
            while time.perf_counter() < deadline:
                if counter is not None and next(counter, None) is None:
                    return
                path, params = make_request(rng)
                t0 = time.perf_counter()
                try:
                    status, body = await conn.get(path, params)
                except (OSError, asyncio.IncompleteReadError, ConnectionError) as e:
                    errors.append(type(e).__name__)
                    conn.close()
                    conn = Connection(host, int(port))
                    continue
                if status != 200:
                    errors.append(f"{status} {body[:80]!r}")
                    continue
                latencies.append(time.perf_counter() - t0)
        finally:
            conn.close()

    t0 = time.perf_counter()
    await asyncio.gather(*[client(random.Random(i)) for i in range(clients)])
    wall = time.perf_counter() - t0
    return {
        "clients": clients,
        "requests": len(latencies),
        "qps": round(len(latencies) / wall, 1),
        "p50_ms": round(pct(latencies, 50), 2) if latencies else None,
        "p99_ms": round(pct(latencies, 99), 2) if latencies else None,
        "errors": len(errors),
        **({"error_sample": errors[:3]} if errors else {}),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--model", default="open_clip:ViT-B-32@random")
    ap.add_argument("--seconds", type=float, default=8.0, help="per level and workload")
    ap.add_argument("--levels", default="1,4,16")
    ap.add_argument("--thumbs", type=int, default=300, help="file rows pointed at real photos")
    args = ap.parse_args()
    import warnings

    warnings.filterwarnings("ignore", message=".*randomly initialised")
    levels = [int(x) for x in args.levels.split(",")]
    text = queries(2000, seed=1)
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp) / "bundle"
        t = time.perf_counter()
        build_bundle(bundle, args.model, args.n)
        attach_photos(bundle, Path(tmp) / "photos", args.thumbs)
        build_s = time.perf_counter() - t
        library = library_search(bundle, queries(200, seed=2))  # before the server: no contention
        port = free_port()
        proc, start_s = start_server(bundle, port)
        base = f"http://127.0.0.1:{port}"
        try:
            import httpx

            t0 = time.perf_counter()
            httpx.get(base + "/api/search", params={"q": "first query", "k": 10}, timeout=120).raise_for_status()
            first_s = time.perf_counter() - t0

            def search(rng):
                return "/api/search", {"q": rng.choice(text), "k": 10}

            ids = list(range(1, args.thumbs + 1))
            cold_ids = iter(ids)

            def thumb_cold(rng):
                return f"/api/items/{next(cold_ids)}/thumbnail", {"size": 384, "format": "webp"}

            def thumb(rng):
                return f"/api/items/{rng.choice(ids)}/thumbnail", {"size": 384, "format": "webp"}

            for _ in range(20):  # warm connections and the batcher's thread
                httpx.get(base + "/api/search", params={"q": "warm", "k": 10}).raise_for_status()
            out_search, out_thumb = {}, {}
            pid = proc.pid
            cold = measured(pid, lambda: asyncio.run(load(base, 4, 120, thumb_cold, limit=len(ids))))
            for n in levels:
                out_search[str(n)] = measured(pid, lambda: asyncio.run(load(base, n, args.seconds, search)))
            for n in levels:
                out_thumb[str(n)] = measured(pid, lambda: asyncio.run(load(base, n, args.seconds, thumb)))
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        # the same busiest level against a server that answers one query at a time
        port = free_port()
        proc, _ = start_server(bundle, port, {"SEARCHKIT_SERVE_MAX_BATCH": "1"})
        try:
            base = f"http://127.0.0.1:{port}"
            for _ in range(20):
                httpx.get(base + "/api/search", params={"q": "warm", "k": 10}, timeout=120).raise_for_status()
            unbatched = measured(proc.pid, lambda: asyncio.run(load(base, levels[-1], args.seconds, search)))
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    one, top = out_search[str(levels[0])], out_search[str(levels[-1])]
    errors = sum(r["errors"] for r in [*out_search.values(), *out_thumb.values(), cold, unbatched])
    print(
        json.dumps(
            {
                "benchmark": "serve_load",
                "model": args.model,
                "n_vectors": args.n,
                "cpu_cores": os.cpu_count(),
                "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
                "build_s": round(build_s, 1),
                "server_up_s": round(start_s, 2),
                "first_query_s": round(first_s, 2),
                "library_search_ms": library,
                "search": out_search,
                "thumbnail_first": cold,
                "thumbnail": out_thumb,
                f"search_{levels[-1]}_clients_without_batching": unbatched,
                "targets": {
                    "zero_errors": errors == 0,
                    "single_client_p50_vs_library": round(one["p50_ms"] / library["p50"], 2),
                    "single_client_p50_within_1.5x": one["p50_ms"] <= 1.5 * library["p50"],
                    f"qps_{levels[-1]}_vs_1": round(top["qps"] / one["qps"], 2),
                    f"qps_{levels[-1]}_batched_vs_unbatched": round(top["qps"] / unbatched["qps"], 2),
                    "qps_ratio_at_least_1.5": top["qps"] >= 1.5 * one["qps"],
                    f"p99_{levels[-1]}_clients_le_250ms": top["p99_ms"] is not None and top["p99_ms"] <= 250,
                },
            }
        )
    )


if __name__ == "__main__":
    main()
