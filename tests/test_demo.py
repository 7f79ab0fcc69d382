"""The demo page: self-contained, optional, and working in a real headless browser."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from serve.app import create_app
from serve.settings import Settings

from containers import image_for, serving
from imagedata import cat_photo_jpeg

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
CAT_CLASSES = {"tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"}


def never_loads():  # noqa: ANN201 - the page does not need the model
    raise RuntimeError("not needed")


def test_page_is_self_contained() -> None:
    with TestClient(create_app(Settings(), never_loads)) as client:
        response = client.get("/")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    page = response.text
    assert "invocations" in page
    # No external scripts, styles, fonts or images: nothing with a scheme or protocol-relative URL.
    assert not re.search(r'(src|href)\s*=\s*"(https?:)?//', page)
    assert "@import" not in page and "url(" not in page


def test_page_can_be_turned_off() -> None:
    with TestClient(create_app(Settings(demo=False), never_loads)) as client:
        assert client.get("/").status_code == 404


def chromium():  # noqa: ANN201
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        pytest.skip("Debian's chromium and chromium-driver are not installed")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=900,900"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service(executable_path=shutil.which("chromedriver")))


@pytest.mark.container
def test_upload_a_photo_in_a_real_browser(tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    photo = tmp_path / "cat.jpg"
    photo.write_bytes(cat_photo_jpeg())
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    with serving(image_for("cpu"), "-v", f"{model_dir}:/opt/ml/model:ro") as served:
        browser = chromium()
        try:
            browser.get(f"{served.url}/")
            browser.find_element(By.ID, "file").send_keys(str(photo))
            WebDriverWait(browser, 60).until(expected_conditions.visibility_of_element_located((By.ID, "results")))
            labels = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".prediction .label")]
            assert len(labels) == 5 and labels[0] in CAT_CLASSES, labels
            assert "round trip" in browser.find_element(By.ID, "latency").text
            ARTIFACTS.mkdir(exist_ok=True)
            assert browser.save_screenshot(str(ARTIFACTS / "demo.png"))
        finally:
            browser.quit()
