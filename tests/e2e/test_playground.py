"""The playground page (coordinator/static/playground.html) in a real headless chromium, driven by
selenium: a user types a prompt, watches partial images and step phases arrive, gets the final
image, then runs the same request on one worker alone and sees both latencies side by side."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

webdriver = pytest.importorskip(
    "selenium.webdriver", reason="selenium is a test extra (pip install -e '.[test]')"
)
from selenium.common.exceptions import WebDriverException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--window-size=1200,900",
)

pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver)",
)


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    try:
        driver = webdriver.Chrome(
            options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER)
        )
    except WebDriverException as exc:
        pytest.skip(f"chromium did not start: {exc.msg}")
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def test_the_playground_streams_a_request_and_compares_it_with_one_worker(browser, sdxl_cluster, tmp_path):
    browser.get(f"http://127.0.0.1:{sdxl_cluster.http_port}/")
    wait = WebDriverWait(browser, 60, poll_frequency=0.1)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#model option"))  # /v1/models answered
    prompt = browser.find_element(By.ID, "prompt")
    prompt.clear()
    prompt.send_keys("a blue square on the right")
    Select(browser.find_element(By.ID, "size")).select_by_visible_text("64x64")
    for field, value in (("steps", "12"), ("seed", "5"), ("partial-count", "2")):
        element = browser.find_element(By.ID, field)
        element.clear()
        element.send_keys(value)
    Select(browser.find_element(By.ID, "mode")).select_by_visible_text("hybrid")
    browser.find_element(By.ID, "generate").click()

    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#partials img"))
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#final img"))
    assert len(browser.find_elements(By.CSS_SELECTOR, "#partials img")) == 2
    phases = {c.get_attribute("class") for c in browser.find_elements(By.CSS_SELECTOR, "#phases span")}
    assert phases and "" not in phases  # every step drew its phase
    assert browser.find_element(By.ID, "detail-mode").text == "hybrid"
    assert "/" in browser.find_element(By.ID, "detail-tau1-tau2").text
    assert browser.execute_script("return document.querySelector('#final img').naturalWidth") == 64

    wait.until(lambda d: d.find_element(By.ID, "compare").is_enabled())
    browser.find_element(By.ID, "compare").click()
    wait.until(lambda d: d.find_element(By.ID, "comparison").is_displayed())
    main = browser.find_element(By.ID, "latency-main").text
    single = browser.find_element(By.ID, "latency-single").text
    assert main.endswith(" s") and single.endswith(" s") and float(single[:-2]) > 0
    assert browser.find_element(By.ID, "speedup").text.endswith("x")

    shot = tmp_path / "playground.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 0
    (ROOT / "out").mkdir(exist_ok=True)  # the test artifact, kept (out/ is ignored by git)
    shutil.copy(shot, ROOT / "out" / "playground.png")
