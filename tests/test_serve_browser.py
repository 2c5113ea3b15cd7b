"""The chat page in headless Chromium: upload an image, send a question, read the streamed answer.

Needs Debian's `chromium` and `chromium-driver` and the `selenium` package; skipped without them.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
from PIL import Image

from llavakit.infer.api import load_pipeline
from llavakit.serve.app import create_app
from test_serve import running

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1200,900"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()),
                       reason="needs Debian packages chromium and chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver)"),
]


@pytest.fixture()
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs the selenium package")
    profile = tempfile.mkdtemp(prefix="llavakit-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*FLAGS, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def test_page_uploads_an_image_and_streams_the_answer(tiny_model_dir, tmp_path, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    image = tmp_path / "red.png"
    Image.new("RGB", (40, 30), (200, 20, 20)).save(image)
    expected = load_pipeline(tiny_model_dir).generate([([Image.open(image).convert("RGB")], "<image>\nWhat is this?")],
                                                      max_new_tokens=40)[0]
    pipe = load_pipeline(tiny_model_dir, model_id="tiny")
    with running(create_app(pipe)) as url:
        browser.get(url + "/")
        wait = WebDriverWait(browser, 60)
        wait.until(lambda d: d.find_element(By.ID, "model").text == "tiny")
        browser.find_element(By.ID, "image").send_keys(str(image))
        wait.until(lambda d: d.find_element(By.ID, "preview").get_attribute("src").startswith("data:image/png;base64,"))
        browser.find_element(By.ID, "max-tokens").clear()
        browser.find_element(By.ID, "max-tokens").send_keys("40")
        browser.find_element(By.ID, "message").send_keys("What is this?")
        browser.execute_script(  # count the answer's text updates: one per streamed delta
            "window.__updates = 0; new MutationObserver((records) => { window.__updates += records.length; })"
            ".observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true});")
        browser.find_element(By.ID, "send").click()
        answer = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, ".msg.assistant[data-done='true']"))
        text = answer.find_element(By.CSS_SELECTOR, ".text").get_attribute("textContent")
        assert "error" not in answer.get_attribute("class")
        assert text == expected
        assert browser.execute_script("return window.__updates;") > 3  # user message, answer box, then several pieces
        assert browser.find_element(By.CSS_SELECTOR, ".msg.user img").get_attribute("src").startswith("data:image/png")
        # a second turn with another image: the request carries the newest image only (turn 1 goes without its own)
        blue = tmp_path / "blue.png"
        Image.new("RGB", (30, 40), (20, 20, 200)).save(blue)
        browser.find_element(By.ID, "image").send_keys(str(blue))
        wait.until(lambda d: d.find_element(By.ID, "preview").is_displayed())
        browser.find_element(By.ID, "message").send_keys("And this one?")
        browser.find_element(By.ID, "send").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-done='true']")) == 2)
        second = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")[1]
        assert "error" not in second.get_attribute("class")
        sent = browser.execute_script("return requestMessages().map((m) => Array.isArray(m.content) ? "
                                      "m.content.filter((p) => p.type === 'image_url').length : 0);")
        assert sent == [0, 0, 1, 0]  # user (image dropped), assistant, user (newest image), assistant
