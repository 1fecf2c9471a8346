"""The `searchkit` commands: JSON contracts, exit codes, one-line errors, kill-and-resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from searchkit.cli.main import app
from tests.conftest import TINY, make_images, run_cli

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def jsonl(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_index_query_classify_info_json(tmp_path):
    make_images(tmp_path / "photos", 4)
    (tmp_path / "photos" / "broken.jpg").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("a cat on a sofa\na dog in the park\n")
    r = invoke("index", tmp_path / "photos", tmp_path / "notes.txt", "--model", TINY, "--json")
    assert r.exit_code == 3, r.stderr  # finished, but one input failed
    summary = json.loads(r.stdout)
    assert summary == {
        "index": str(tmp_path / "indexes" / "default"),
        "model": TINY,
        "added": 6,
        "updated": 0,
        "unchanged": 0,
        "removed": 0,
        "failed": 1,
        "total": 6,
    }
    r = invoke("query", "a cat on a sofa", "-k", "3", "--json")
    assert r.exit_code == 0, r.stderr
    rows = jsonl(r.stdout)
    assert [x["rank"] for x in rows] == [1, 2, 3]
    assert all(set(x) == {"rank", "score", "confidence", "kind", "id", "path", "photo"} and x["kind"] == "image" for x in rows)
    r = invoke("query", "a cat on a sofa", "--kind", "text", "--json")
    rows = jsonl(r.stdout)
    assert rows[0]["text"] == "a cat on a sofa" and rows[0]["source"].endswith("notes.txt:1")
    assert set(rows[0]) == {"rank", "score", "confidence", "kind", "id", "text", "source"}
    img = tmp_path / "photos" / "img001.jpg"
    r = invoke("query", "--image", img, "-k", "1", "--json")
    assert jsonl(r.stdout)[0]["path"] == str(img)
    r = invoke("query", "--image", img, "--kind", "text", "--json")
    assert len(jsonl(r.stdout)) == 2
    r = invoke("classify", tmp_path / "photos", "--labels", "cat, dog", "--template", "a photo of a {}.", "--json")
    assert r.exit_code == 3  # broken.jpg
    rows = jsonl(r.stdout)
    ok = [x for x in rows if "error" not in x]
    assert len(ok) == 4 and all(set(x) == {"path", "label", "score", "scores"} for x in ok)
    assert all(set(x["scores"]) == {"cat", "dog"} for x in ok)
    assert any(x.get("error") for x in rows)
    r = invoke("info", "--json")
    info = json.loads(r.stdout)
    assert info["counts"] == {"image": 4, "text": 2, "files": 5}
    assert info["manifest"]["encoder"]["spec"] == TINY and len(info["failures"]) == 1


def test_human_output(tmp_path):
    make_images(tmp_path / "p", 2)
    r = invoke("index", tmp_path / "p", "--model", TINY)
    assert r.exit_code == 0 and "added" in r.stdout
    r = invoke("query", "anything")
    assert r.exit_code == 0 and "img000.jpg" in r.stdout
    r = invoke("info")
    assert "sk-tiny" in r.stdout


def test_index_option_name_vs_path(tmp_path):
    make_images(tmp_path / "p", 1)
    assert invoke("index", tmp_path / "p", "--index", "named", "--model", TINY).exit_code == 0
    assert (tmp_path / "indexes" / "named" / "manifest.json").exists()
    assert invoke("index", tmp_path / "p", "--index", tmp_path / "elsewhere" / "b", "--model", TINY).exit_code == 0
    assert (tmp_path / "elsewhere" / "b" / "meta.db").exists()
    assert invoke("query", "x", "--index", "named", "--json").exit_code == 0


@pytest.mark.parametrize(
    "args,code,message",
    [
        (["query", "a cat"], 1, "no index at"),
        (["info"], 1, "no index at"),
        (["index", "missing-folder", "--model", TINY], 2, "no such file or folder"),
        (["index", ".", "--model", "nonsense-model"], 1, "unknown model spec"),
        (["index", ".", "--model", "open_clip:ViT-B-32@nope"], 1, "unknown pretrained tag"),
        (["index", ".", "--model", "open_clip:ViT-B-32@laion2b_s34b_b79k"], 1, "cannot be reached"),
        (["query"], 2, "give query TEXT"),
    ],
)
def test_errors_are_one_line(tmp_path, args, code, message):
    r = invoke(*args)
    assert r.exit_code == code, (r.stdout, r.stderr)
    lines = [line for line in r.stderr.splitlines() if not line.startswith("warning:")]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in r.stderr


def test_query_errors_after_indexing(tmp_path):
    make_images(tmp_path / "p", 1)
    invoke("index", tmp_path / "p", "--model", TINY)
    r = invoke("query", "x", "--kind", "text")
    assert r.exit_code == 1 and "holds no text items" in r.stderr
    (tmp_path / "bad.png").write_text("nope")
    r = invoke("query", "--image", tmp_path / "bad.png")
    assert r.exit_code == 1 and r.stderr.strip().startswith("error: cannot read image")


def test_missing_optional_dependency(tmp_path, monkeypatch):
    from searchkit import encoders

    monkeypatch.setitem(sys.modules, "open_clip", None)
    monkeypatch.setattr(encoders, "_CACHE", {})
    r = invoke("index", ".", "--model", "open_clip:sk-tiny@random")
    assert r.exit_code == 1 and "pip install open_clip_torch" in r.stderr


@pytest.mark.slow
def test_unreadable_file_and_folder_are_recorded(tmp_path):
    """Permission denied, for real: as root, the run gives up the capabilities that let root
    read any file (util-linux `setpriv`). An unlistable folder's indexed images are kept."""
    import shutil

    d = tmp_path / "p"
    make_images(d, 1, start=1)
    make_images(d / "sub", 1, start=10)
    cmd = [sys.executable, "-m", "searchkit.cli", "index", str(d), "--model", TINY, "--json"]
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    make_images(d, 1, start=0)
    (d / "img000.jpg").chmod(0)
    (d / "sub").chmod(0)
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv: root can read any file")
        caps = "-dac_override,-dac_read_search"
        cmd = ["setpriv", f"--bounding-set={caps}", f"--inh-caps={caps}", *cmd]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True)
    finally:
        (d / "sub").chmod(0o755)
    assert r.returncode == 3, r.stderr
    s = json.loads(r.stdout)
    assert (s["added"], s["removed"], s["failed"], s["total"]) == (0, 0, 2, 2)
    assert f"{d / 'img000.jpg'}: permission denied" in r.stderr
    assert f"{d / 'sub'}: cannot list folder: permission denied" in r.stderr


@pytest.mark.slow
def test_console_script_and_module_entry_points(tmp_path):
    exe = Path(sys.executable).with_name("searchkit")
    r = subprocess.run([str(exe), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "classify" in r.stdout
    r = run_cli("--help")
    assert r.returncode == 0 and "index" in r.stdout


@pytest.mark.parametrize("argv, shown", [
    (["index", "--help"], ["[default: the model's]", "[default: CPU count, 2..8]", "needs searchkit[ray]"]),
    (["classify", "--help"], ["[default with --examples: its folder names]"]),
    (["dupes", "--help"], ["[default: 0.65]"]),
    (["fusion", "eval", "--help"], ["[default: the model's training column]"]),
])
def test_help_keeps_bracketed_text(argv, shown):
    """Rich reads "[...]" in a help text as markup and drops it unless escaped: the defaults
    that options compute at run time must still be printed."""
    r = runner.invoke(app, argv, env={"COLUMNS": "250", "TERMINAL_WIDTH": "250"})
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.replace("│", " ").split())
    for s in shown:
        assert s in text, (s, text)


@pytest.mark.slow
def test_wheel_ships_cli_inside_the_package(tmp_path):
    """`cli/` is installed as `searchkit.cli`, never as a top-level `cli` module."""
    import zipfile

    root = Path(__file__).resolve().parents[1]
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(root)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    (wheel,) = tmp_path.glob("searchkit-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "searchkit/cli/main.py" in names and "searchkit/py.typed" in names
    assert not any(n.startswith("cli/") for n in names)
    assert {"searchkit/serve/static/index.html", "searchkit/serve/static/app.js", "searchkit/serve/static/style.css"} <= set(names)


def test_the_store_does_not_drag_pandas_in():
    """sqlite-utils would import pandas (present with Ray's extra) at ~0.7 s and ~70 MB of every
    command; the store hides it while sqlite-utils loads, and pandas still imports afterwards."""
    code = (
        "import sys, importlib.util; import searchkit.store\n"
        "print('pandas' in sys.modules)\n"
        "if importlib.util.find_spec('pandas'):\n    import pandas; print(pandas.DataFrame({'a': [1]}).shape)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == "False"
