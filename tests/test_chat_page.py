"""The chat page served at GET /, driven in headless Chromium (Debian's chromium + chromium-driver):
a message typed into the page gets a reply that streams in, equal to the model's greedy reply."""

from __future__ import annotations

import shutil
import tempfile

import httpx
import pytest
import torch

from herd.inference.server.runner import ServerConfig, ServerThread, build_app
from tests.server_fixtures import HELLO_A, trained_byte_model

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER),
                                reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")


@pytest.fixture(scope="module")
def server():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    model, tok = trained_byte_model()
    app = build_app(model, tok, ServerConfig(max_batch_size=2), model_name="bytes")
    with ServerThread(app) as srv:
        yield srv
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="herd-chromium-")
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                f"--user-data-dir={profile}"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def test_page_is_self_contained(server):
    html = httpx.get(server.url + "/").text
    assert "<script>" in html and "/v1/chat/completions" in html
    assert "http://" not in html.replace("http://" + server.url.split("//")[1], "") and "https://" not in html


def test_typed_message_gets_a_streamed_reply(server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server.url + "/")
    temperature = browser.find_element(By.ID, "temperature")
    temperature.clear()
    temperature.send_keys("0")
    # Record every text the reply bubble shows, to see it grow token by token.
    browser.execute_script("""
        window.seen = [];
        new MutationObserver(() => {
          const b = document.querySelectorAll('.assistant');
          if (b.length) window.seen.push(b[b.length - 1].textContent);
        }).observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true});
    """)
    box = browser.find_element(By.ID, "input")
    box.send_keys("Hello")
    browser.find_element(By.ID, "send").click()
    WebDriverWait(browser, 60).until(lambda d: "tokens/s" in d.find_element(By.ID, "stats").text)
    replies = browser.find_elements(By.CSS_SELECTOR, ".assistant")
    assert replies[-1].text == HELLO_A
    seen = [s for s in browser.execute_script("return window.seen") if s]
    assert len(set(seen)) > 3 and all(HELLO_A.startswith(s) for s in seen)  # it arrived in pieces
    assert "finish: stop" in browser.find_element(By.ID, "stats").text
