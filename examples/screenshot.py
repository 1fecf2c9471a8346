"""The README's gallery screenshot: a real search over real photos, in Debian's Chromium.

    python examples/screenshot.py sample build/flickr8k-dev --n 300 && searchkit index build/flickr8k-dev --index flickr8k-dev --model mini
    python examples/screenshot.py shoot --index flickr8k-dev --query "a dog running through the snow" --out docs/serve-gallery.jpg

`sample` copies the first N Flickr8k dev-split photos (../shared/data/flickr8k) into a folder;
`shoot` serves the index on 127.0.0.1 (a real uvicorn server), searches in the page and saves a
screenshot. Needs Playwright (the `test` extra) and /usr/bin/chromium.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import socket
import sys
import threading
import time
import urllib.request
from pathlib import Path

FLICKR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "flickr8k"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--no-first-run"]


def sample(dest: Path, n: int) -> None:
    if not FLICKR.exists():
        raise SystemExit(f"{FLICKR} is missing (see ../shared/data/README.md)")
    dest.mkdir(parents=True, exist_ok=True)
    names = (FLICKR / "splits" / "dev.txt").read_text().split()[:n]
    for name in names:
        shutil.copy2(FLICKR / "images" / name, dest / name)
    print(f"{len(names)} photos in {dest}", file=sys.stderr)


@contextlib.contextmanager
def served(index: str):
    """`searchkit serve --index INDEX` on a free loopback port, in a thread of this process."""
    import uvicorn

    from searchkit.serve import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app([index], warm=True), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join()


def shoot(index: str, query: str, out: Path, width: int, height: int) -> None:
    from playwright.sync_api import sync_playwright

    with served(index) as base, sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
        page = browser.new_page(viewport={"width": width, "height": height}, device_scale_factor=1)
        urllib.request.urlopen(f"{base}/api/search?q=warm+up", timeout=300).read()  # the model loads once
        page.goto(base + "/")
        page.fill("#q", query)
        page.press("#q", "Enter")
        page.wait_for_function(
            "() => { const imgs = [...document.querySelectorAll('#results .card img')];"
            " return imgs.length > 0 && imgs.slice(0, 15).every(i => i.complete && i.naturalWidth > 0); }",
            timeout=120_000,
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        jpeg = out.suffix.lower() in (".jpg", ".jpeg")
        page.screenshot(path=str(out), **({"type": "jpeg", "quality": 85} if jpeg else {}))
        print(f"{out}: {page.inner_text('#status')}", file=sys.stderr)
        browser.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sample", help="copy Flickr8k dev photos into a folder")
    s.add_argument("dest", type=Path)
    s.add_argument("--n", type=int, default=300)
    t = sub.add_parser("shoot", help="search in the page and save a screenshot")
    t.add_argument("--index", required=True)
    t.add_argument("--query", required=True)
    t.add_argument("--out", type=Path, default=Path("docs/serve-gallery.jpg"))
    t.add_argument("--width", type=int, default=1280)
    t.add_argument("--height", type=int, default=900)
    a = ap.parse_args()
    if a.cmd == "sample":
        sample(a.dest, a.n)
    else:
        shoot(a.index, a.query, a.out, a.width, a.height)


if __name__ == "__main__":
    main()
