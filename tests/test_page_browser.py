"""The page in a real browser: headless Chromium (the system's package) driven through chromedriver.

Upload an image, type an instruction, edit, see the result; continue from it; go back to the first
result in the history and edit it again (a branch); download a result and read its PNG metadata.
Set LOWVRAM_KONTEXT_SCREENSHOT=FILE.png to keep a screenshot of the page at the end.
"""

import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

from lowvram_kontext.demo import demo_image

from .page_server import running, serve_argv

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="needs chromium and chromedriver (Debian: chromium, chromium-driver)",
)
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
PATIENCE = 300  # seconds a page change may take before the test gives up (a hang, not a speed limit)


@pytest.fixture
def browser(tmp_path: Path):
    webdriver = pytest.importorskip("selenium.webdriver")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1400,1400"]:
        options.add_argument(flag)
    # The driver is named, so selenium looks for nothing on the network.
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)
    driver.execute_cdp_cmd("Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(tmp_path / "dl")})
    yield driver
    driver.quit()


def test_edit_continue_branch_and_download_in_the_browser(browser, tiny_root: Path, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, PATIENCE)
    find = browser.find_element
    picture = tmp_path / "snowman.png"
    demo_image(64).save(picture)

    def text(element_id: str) -> str:
        return find(By.ID, element_id).text

    def edit(prompt: str) -> str:
        """Type ``prompt``, press Edit, and wait for a new result; its label ("#N · WxH")."""
        before = text("result-label")
        find(By.ID, "prompt").clear()
        find(By.ID, "prompt").send_keys(prompt)
        find(By.ID, "edit").click()
        wait.until(lambda _: text("result-label") not in ("", before) and text("status").startswith("Done"))
        return text("result-label")

    def history() -> list[str]:
        return [f.get_attribute("title") for f in browser.find_elements(By.CSS_SELECTOR, "#history figure")]

    argv = serve_argv(tiny_root, tmp_path, "--width", "64", "--height", "64")
    with running(argv) as server:
        browser.get(server.url)
        wait.until(lambda _: "Defaults: seed 3, 2 steps" in text("defaults"))
        assert find(By.ID, "steps").get_attribute("value") == "2"
        assert "Non-Commercial License" in text("notice")

        find(By.ID, "file").send_keys(str(picture))  # what choosing a file does
        wait.until(lambda _: text("input-label").startswith("#1 "))
        assert edit("Add a red hat").startswith("#2 ")
        assert find(By.ID, "result-image").get_attribute("naturalWidth") == "64"

        find(By.ID, "continue").click()
        wait.until(lambda _: text("input-label").startswith("#2 "))
        assert edit("Make it night").startswith("#3 ")

        # Back to the first result from the history strip, and a different instruction: a branch.
        find(By.CSS_SELECTOR, '#history figure[data-id="2"]').click()
        wait.until(lambda _: text("input-label").startswith("#2 "))
        assert edit("Add snow").startswith("#4 ")
        wait.until(lambda _: len(history()) == 4)
        assert history()[3].startswith("#4 from #2: Add snow") and history()[2].startswith("#3 from #2:")

        find(By.ID, "show-plan").click()
        wait.until(lambda _: "every component is loaded whole" in text("plan-text"))
        find(By.ID, "close-plan").click()

        find(By.ID, "download").click()
        downloads = tmp_path / "dl"
        wait.until(lambda _: downloads.is_dir() and [p for p in downloads.iterdir() if p.suffix == ".png"])
        (saved,) = [p for p in downloads.iterdir() if p.suffix == ".png"]
        assert saved.name == "004-add-snow.png"
        with Image.open(saved) as png:
            assert png.text["prompt"] == "Add snow" and png.text["earlier prompts"] == '["Add a red hat"]'
        assert saved.read_bytes() == (server.app.gallery.folder / saved.name).read_bytes()

        screenshot = os.environ.get("LOWVRAM_KONTEXT_SCREENSHOT")
        if screenshot:
            browser.save_screenshot(screenshot)
