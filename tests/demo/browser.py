"""Driving the demo page in headless Chromium (Selenium with the system's chromium and chromium-driver),
for the browser tests and ``benchmarks/demo_latency.py``."""
from __future__ import annotations

import io
import os
import shutil
import socket
import time
import urllib.request

import numpy as np
from PIL import Image

CHROMIUM = next((p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser", shutil.which("chromium") or "")
                 if p and os.path.exists(p)), None)
DRIVER = next((p for p in ("/usr/bin/chromedriver", shutil.which("chromedriver") or "") if p and os.path.exists(p)),
              None)

# Installed in the page: the times of the pointer releases, and of each update a column shows (its time text
# changes with every update; the stamp waits for the column's image to be decoded)
WATCH = """
window.condistillTimes = {release: [], shown: {}};
document.addEventListener('pointerup', () => window.condistillTimes.release.push(performance.now()), true);
const stamped = {};
new MutationObserver(() => {
  for (const box of document.querySelectorAll('[id^=condistill-time-]')) {
    const column = box.id.replace('condistill-time-', 'condistill-output-');
    const label = box.innerText;
    if (!label || stamped[column] === label) continue;
    stamped[column] = label;
    const img = document.querySelector('#' + column + ' img');
    const done = () => (window.condistillTimes.shown[column] = window.condistillTimes.shown[column] || [])
      .push([performance.now(), label, img ? img.src : null]);
    requestAnimationFrame(() => (img ? img.decode().then(done, done) : done()));
  }
}).observe(document.body, {subtree: true, childList: true, characterData: true, attributes: true});
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1100"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(DRIVER), options=options)


def open_page(driver, url: str, timeout: float = 60):
    from selenium.webdriver.common.by import By

    driver.get(url)
    wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, "#condistill-status"), timeout, "the page to load")
    driver.execute_script(WATCH)


def wait_for(condition, timeout: float, what: str, every: float = 0.02):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"waited {timeout:.0f} s for {what}")


def canvas(driver):
    from selenium.webdriver.common.by import By

    return wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, "#condistill-canvas canvas"), 60, "the canvas")[-1]


def stroke(driver, points):
    """Draw one stroke through ``points`` (offsets in CSS pixels from the canvas center)."""
    from selenium.webdriver.common.action_chains import ActionChains

    chain = ActionChains(driver, duration=10).move_to_element_with_offset(canvas(driver), *points[0]).click_and_hold()
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        chain = chain.move_by_offset(x1 - x0, y1 - y0)
    chain.release().perform()


def image_src(driver, element_id: str) -> str | None:
    from selenium.webdriver.common.by import By

    found = driver.find_elements(By.CSS_SELECTOR, f"#{element_id} img")
    return found[0].get_attribute("src") if found else None


def fetch_image(src: str) -> np.ndarray:
    with urllib.request.urlopen(src, timeout=30) as response:
        return np.asarray(Image.open(io.BytesIO(response.read())).convert("RGB"))


def text(driver, element_id: str) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id).text


def upload(driver, path: str) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.CSS_SELECTOR, "#condistill-upload input[type=file]").send_keys(os.fspath(path))
