"""The HTML report: self-contained, every embedded picture a real PNG."""

from __future__ import annotations

import base64
import io
import os
import re

import numpy as np

import pytest

from cryodask.cli import main
from cryodask.io.store import open_dataset


@pytest.fixture(scope="module")
def scored_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    assert main(["simulate", str(root / "sim"), "--count", "6", "--size", "512", "--artifacts", "--seed", "5"]) == 0
    store = root / "s.zarr"
    assert main(["ingest", str(root / "sim" / "mic_*.mrc"), "--out", str(store), "--dose", "40"]) == 0
    assert main(["score", str(store), "--out", str(root / "scores.csv")]) == 0
    return store


def _images(text):
    return re.findall(r'<img alt="([^"]*)" src="data:image/png;base64,([^"]+)">', text)


def test_report_embeds_every_plot(scored_store, tmp_path):
    import matplotlib.image

    ds = open_dataset(scored_store)
    assert {"hyperscore", "logic", "top_cause", "failed_rules", "defocus_u_A"} <= set(ds.data_vars)
    out = tmp_path / "report.html"
    middle = str(ds["micrograph_name"].values[np.argsort(-ds["hyperscore"].values)[2]])  # neither best nor worst
    assert main(["report", str(scored_store), "--out", str(out), "--micrograph", os.path.basename(middle)]) == 0
    text = out.read_text()
    assert "http://" not in text and "https://" not in text and "<link" not in text  # nothing to fetch
    images = _images(text)
    # 3 dataset figures; per micrograph (2 best, 2 worst, 1 named) the images, and the CTF
    # fit where there is one.
    sections = text.split("<h3>")[1:]
    assert len(sections) == 5
    for section in sections:
        name = section.split(": ", 1)[1].split("</h3>")[0]
        i = [str(v) for v in ds["micrograph_name"].values].index(name)
        has_ctf = bool(ds["defocus_u_A"].values[i] == ds["defocus_u_A"].values[i])
        assert ("power spectrum and CTF fit" in section) == has_ctf
        assert "raw, cleaned" in section
        assert ("Failed rules" in section) == bool(ds["failed_rules"].values[i])
    assert len(images) == 3 + 5 + sum("power spectrum and CTF fit" in s for s in sections)
    for alt, data in images:
        picture = matplotlib.image.imread(io.BytesIO(base64.b64decode(data)), format="png")
        assert picture.shape[0] > 100 and picture.shape[1] > 100, alt
        assert picture.std() > 0, alt  # not blank
    assert f"named: {middle}" in text


def test_report_names_a_missing_micrograph(scored_store, tmp_path, capsys):
    assert main(["report", str(scored_store), "--out", str(tmp_path / "r.html"), "--micrograph", "nope.mrc"]) == 2
    assert "no micrograph named 'nope.mrc'" in capsys.readouterr().err
    assert not (tmp_path / "r.html").exists()


@pytest.mark.browser
def test_report_renders_in_headless_chromium(scored_store, tmp_path):
    import shutil
    import subprocess

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("needs a browser: Debian's chromium (apt-get install chromium); CI installs it")
    out = tmp_path / "report.html"
    assert main(["report", str(scored_store), "--out", str(out)]) == 0
    text = out.read_text()
    expected = len(_images(text))
    # A copy that, once loaded, writes into its title how many images it has and how many
    # the browser decoded.
    probe = ("<script>window.addEventListener('load', () => { const all = Array.from(document.images);"
             " document.title = all.length + ' ' + all.filter(i => i.complete && i.naturalWidth > 0).length;"
             " });</script></body>")
    checked = tmp_path / "checked.html"
    checked.write_text(text.replace("</body>", probe))
    result = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=20000",
                             "--dump-dom", checked.as_uri()], capture_output=True, text=True, timeout=120)
    title = re.search(r"<title>([^<]*)</title>", result.stdout)
    assert title, result.stderr[-2000:]
    assert title.group(1) == f"{expected} {expected}"
    assert expected >= 5
