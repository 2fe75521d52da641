"""The demo page (``cxr serve``): its predictions are ``cxr predict``'s, bad uploads are reported, and the
page works in a real headless Chromium (Debian's ``chromium``, driven by Playwright)."""

from __future__ import annotations

import os
import shutil
import socket
import sys
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest

from cxr.evaluate.cam import overlay_size
from cxr.cli import main
from cxr.data.layout import CLASSES
from cxr.inference.predict import run_predict
from cxr.inference.serve import Predictor, probability_table, serve

SIZE = 32
CHROMIUM = os.environ.get("CXR_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
# Without the background-networking flags Chromium dials Google's services, which a closed network refuses.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def images(synthetic_root, tmp_path_factory) -> dict[str, Path]:
    """Two synthetic images of different classes and a text file named like a PNG."""
    text = tmp_path_factory.mktemp("bad") / "notes.png"
    text.write_text("just some text, not an image")
    return {"first": synthetic_root / "test" / "COVID19" / "test_000.png",
            "second": synthetic_root / "test" / "NORMAL" / "test_001.jpg", "text": text}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def expected(checkpoint: str, path: Path) -> dict[str, float]:
    """What ``cxr predict`` reports for ``path``."""
    row = run_predict(checkpoint, [path], device="cpu", progress=False).table.iloc[0]
    return {name: float(row[name]) for name in CLASSES}


def test_page_predictions_are_cxr_predicts(checkpoint, images):
    predictor = Predictor.load(checkpoint, "cpu")
    probabilities, overlay = predictor.classify(images["first"])
    assert list(probabilities) == list(CLASSES)
    reference = expected(checkpoint, images["first"])
    np.testing.assert_allclose(list(probabilities.values()), list(reference.values()), rtol=0, atol=1e-6)
    assert overlay.shape == (*overlay_size(SIZE)[::-1], 3)  # image and map side by side, captioned and overlay.dtype == np.uint8
    assert f"| COVID19 | {reference['COVID19']:.6f} |" in probability_table(probabilities)
    with pytest.raises(ValueError, match="^notes.png: not an image$"):
        predictor.classify(images["text"])


def test_serve_without_gradio_is_a_clear_error(checkpoint, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # as if the 'demo' extra were not installed
    assert main(["serve", "--checkpoint", checkpoint, "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: the demo page needs the 'demo' extra") and "uv sync --extra demo" in err
    assert "Traceback" not in err


def test_serve_with_a_bad_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert main(["serve", "--checkpoint", str(tmp_path / "missing.pt")]) == 1
    assert capsys.readouterr().err.startswith(f"error: --checkpoint {str(tmp_path / 'missing.pt')!r} does not exist")
    (tmp_path / "fake.pt").write_text("not a checkpoint")
    assert main(["serve", "--checkpoint", str(tmp_path / "fake.pt")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and "not a cxr checkpoint" in err and "Traceback" not in err


def test_serve_on_a_taken_port_is_a_clear_error(checkpoint, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--checkpoint", checkpoint, "--device", "cpu", "--port", str(port)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot listen on 127.0.0.1:{port}: the port is taken") and "--port" in err


@pytest.mark.parametrize("flags", [["--checkpoint", "best.pt", "--port", "0"],
                                   ["--checkpoint", "best.pt", "--port", "x"], ["--port", "7860"]])
def test_serve_bad_flags_are_argparse_errors(flags, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["serve", *flags])
    assert exit_.value.code == 2
    assert "error: " in capsys.readouterr().err


@pytest.fixture(scope="module")
def page_url(checkpoint, tmp_path_factory):
    """The demo page, served from this process on a free localhost port."""
    port = free_port()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GRADIO_TEMP_DIR", str(tmp_path_factory.mktemp("gradio")))  # uploads are kept there
        demo = serve(checkpoint, port=port, device="cpu", block=False)
        yield f"http://127.0.0.1:{port}/"
        demo.close()


@pytest.fixture(scope="module")
def browser():
    """Debian's Chromium, headless. Skipped only where it is missing outside CI; in CI (``CI`` set) it must run."""
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("CI is set but chromium is missing: apt-get install -y chromium")
        pytest.skip("chromium is not installed (apt-get install -y chromium); set CXR_CHROMIUM=PATH for another build")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


def upload(page, path: Path) -> None:
    """Clear the file box if it holds a file, then choose ``path`` as a user would."""
    clear = page.locator("#upload button[aria-label=Clear]")
    if clear.count():
        clear.click()
    page.locator("#upload input[type=file]").set_input_files(str(path))


def shown_probabilities(page) -> tuple[dict[str, float], dict[str, float]]:
    """The bar chart's unrounded values (each bar's meter) and the table's six-decimal values."""
    page.wait_for_selector("#probability-table table", timeout=60_000)
    bars = {name: float(page.get_by_test_id(f"{name}-confidence-set").locator("meter").get_attribute("value"))
            for name in CLASSES}
    cells = page.locator("#probability-table td").all_inner_texts()
    return bars, {name: float(value) for name, value in zip(cells[::2], cells[1::2])}


def check_prediction(page, checkpoint: str, path: Path) -> None:
    bars, table = shown_probabilities(page)
    reference = expected(checkpoint, path)
    assert list(table) == list(CLASSES)
    for shown, tolerance in ((bars, 1e-6), (table, 1e-4)):  # the bars hold the exact values, the table six decimals
        np.testing.assert_allclose([shown[c] for c in CLASSES], [reference[c] for c in CLASSES], rtol=0,
                                   atol=tolerance)
    assert page.get_by_test_id("label-output-value").inner_text() == max(reference, key=reference.get)
    assert page.locator("#cam img").count() == 1


def test_demo_page_in_headless_chromium(browser, page_url, checkpoint, images):
    page = browser.new_page(viewport={"width": 1200, "height": 720})
    requests = []
    page.on("request", lambda request: requests.append(request.url))
    page.goto(page_url)
    page.wait_for_selector("#upload input[type=file]", state="attached", timeout=30_000)
    assert "Chest X-ray classification" in page.locator("body").inner_text()

    upload(page, images["first"])
    check_prediction(page, checkpoint, images["first"])

    upload(page, images["text"])
    error = page.get_by_test_id("toast-text")
    error.wait_for(timeout=30_000)
    assert error.inner_text() == "notes.png: not an image"
    assert page.locator("#probability-table table").count() == 0  # the previous result is not left showing
    page.get_by_test_id("toast-close").click()

    upload(page, images["second"])
    check_prediction(page, checkpoint, images["second"])
    if os.environ.get("CXR_DEMO_SCREENSHOT"):  # how README's screenshot was taken
        page.screenshot(path=os.environ["CXR_DEMO_SCREENSHOT"], full_page=True)
    page.close()
    hosts = {urlparse(url).hostname for url in requests if not url.startswith(("data:", "blob:"))}
    assert hosts == {"127.0.0.1"}, f"the page reached beyond this machine: {sorted(hosts)}"
