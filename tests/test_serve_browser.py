"""The gallery page in a real browser: Debian's Chromium driven by Playwright, against a real
uvicorn server on 127.0.0.1. Skipped (with the reason) where Chromium or Playwright is missing,
unless SEARCHKIT_REQUIRE_BROWSER=1 (set by .ci/run), which makes a missing browser a failure."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from searchkit.serve import create_app
from tests.serve_helpers import build_bundles, running_server, tiny_env

CHROMIUM = Path(os.environ.get("SEARCHKIT_CHROMIUM", "/usr/bin/chromium"))
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--no-first-run"]
REQUIRED = os.environ.get("SEARCHKIT_REQUIRE_BROWSER") == "1"


def _unavailable(reason: str):
    if REQUIRED:
        pytest.fail(f"{reason} (SEARCHKIT_REQUIRE_BROWSER=1 makes the browser tests required)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        _unavailable(f"no Chromium at {CHROMIUM}: apt-get install chromium (or set SEARCHKIT_CHROMIUM)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("playwright is not installed: pip install -e '.[test]'")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("browser")
    with tiny_env(tmp):
        yield build_bundles(tmp)


def _images_rendered(page, selector: str = "#results .card img") -> None:
    """Wait until every result image has been decoded by the browser (naturalWidth > 0), or
    marked broken: only the symlinked photo's, whose file the server refuses to serve."""
    page.wait_for_function(
        """sel => { const imgs = [...document.querySelectorAll(sel)];
                    const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
                    return ok > 0 && imgs.every(i => (i.complete && i.naturalWidth > 0) || i.classList.contains('broken')); }""",
        arg=selector,
        timeout=20_000,
    )
    broken = page.eval_on_selector_all(selector + ".broken", "imgs => imgs.map(i => i.closest('figure').querySelector('.name').textContent)")
    assert set(broken) <= {"link.jpg"}, broken


def test_gallery_in_a_browser(browser, data, tmp_path):
    with tiny_env(tmp_path), running_server(create_app([data["main"], data["other"]])) as base:
        page = browser.new_page(viewport={"width": 1280, "height": 860})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(base + "/")
        page.wait_for_selector("#index option", state="attached")
        assert page.locator("#empty h1").is_visible()

        page.fill("#q", "a red bicycle")
        page.press("#q", "Enter")
        _images_rendered(page)
        assert "?q=a+red+bicycle" in page.url
        assert page.locator("#results .card").count() == 7
        assert "7 results" in page.inner_text("#status")

        # more like this, then Back returns to the text search
        first = page.locator("#results .card .name").first.inner_text()
        page.locator("#results .card .more").first.click()
        page.wait_for_url("**similar=*")
        page.wait_for_function("() => document.querySelector('#status').textContent.includes('more like this')")
        _images_rendered(page)
        assert first not in [n.inner_text() for n in page.locator("#results .card .name").all()]
        page.go_back()
        page.wait_for_function("() => document.querySelector('#status').textContent.includes('bicycle')")
        assert page.input_value("#q") == "a red bicycle"

        # keyboard: arrow into the grid, Enter opens the original, Esc closes it
        page.focus("#q")
        page.keyboard.press("ArrowDown")
        page.keyboard.press("ArrowRight")
        page.keyboard.press("Enter")
        page.wait_for_function("() => { const i = document.querySelector('#viewer img'); return i && i.naturalWidth > 0; }")
        page.keyboard.press("Escape")
        assert not page.locator("#viewer").is_visible()

        # search by an uploaded image: it finds itself first
        page.set_input_files("#image-input", str(data["photos"] / "img002.jpg"))
        page.wait_for_function("() => document.querySelector('#status').textContent.includes('photos like img002.jpg')")
        _images_rendered(page)
        assert page.locator("#results .card .name").first.inner_text() == "img002.jpg"
        assert page.locator("#results .card .score").first.inner_text() == "1.000"

        # text results show the text and its source
        page.fill("#q", "a cat")
        page.click("label:has(input[value=text])")
        page.wait_for_selector("#texts .text-result")
        assert "notes.txt:" in page.locator("#texts cite").first.inner_text()
        assert "kind=text" in page.url

        # filters travel in the URL
        page.click("label:has(input[value=image])")
        page.click("#filters-toggle")
        page.fill("#where_path", str(data["photos"] / "sub"))
        page.press("#where_path", "Enter")
        page.wait_for_function("() => document.querySelectorAll('#results .card').length === 1")
        assert "where_path=" in page.url

        # an error is shown as a readable message
        page.fill("#min_size", "lots")
        page.press("#min_size", "Enter")
        page.wait_for_selector("#error:not([hidden])")
        assert "lots" in page.inner_text("#error")
        page.click("#filters-clear")

        # info view
        page.click("#info-button")
        page.wait_for_selector("#info table")
        info = page.inner_text("#info")
        assert "Images" in info and "flat" in info and "Failures (0)" in info
        page.keyboard.press("Escape")

        # zero-shot classify with probability bars
        page.click("#classify-button")
        page.set_input_files("#classify-image", str(data["photos"] / "img001.jpg"))
        page.fill("#labels", "dog, cat, bicycle")
        page.click("#classify-form button[type=submit]")
        page.wait_for_selector("#classify-result .prob")
        assert page.locator("#classify-result .prob").count() == 3
        widths = page.eval_on_selector_all("#classify-result .bar", "bars => bars.map(b => parseFloat(b.style.width))")
        assert abs(sum(widths) - 100) < 1
        page.keyboard.press("Escape")

        page.fill("#q", "a photo")
        page.press("#q", "Enter")
        _images_rendered(page)
        shot = tmp_path / "gallery.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000
        assert errors == []
        page.close()


def test_page_asks_for_the_token(browser, data, tmp_path):
    with tiny_env(tmp_path), running_server(create_app([data["other"]], token="s3cret")) as base:
        page = browser.new_page()
        page.goto(base + "/?q=a+photo")
        page.wait_for_selector("#token[open]")
        page.fill("#token-input", "s3cret")
        page.press("#token-input", "Enter")
        _images_rendered(page)
        assert page.locator("#results .card").count() == 12
        page.close()
