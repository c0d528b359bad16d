"""The page in a real browser: headless Chromium (the system's package) driven through chromedriver.

Upload an image, type an instruction, edit, see the result; continue from it with its LoRA switched off;
go back to the first result in the history and edit it again (a branch) with the LoRA's slider moved;
download a result and read its PNG metadata, LoRA strength included.
Set LOWVRAM_KONTEXT_SCREENSHOT=FILE.png to keep a screenshot of the page at the end.
"""

import json
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

from lowvram_kontext.demo import demo_image
from lowvram_kontext.tiny import TinyWeights

from .page_server import running, serve_argv, write_lora

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


def _lora_strength(png: Path) -> float:
    with Image.open(png) as image:
        (lora,) = json.loads(image.text["loras"])
    return lora["strength"]


def test_edit_continue_branch_and_download_in_the_browser(
    browser, tiny_files: tuple[Path, TinyWeights], tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
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

    def lora(kind: str):  # noqa: ANN202 (a selenium element)
        """The papercut LoRA's toggle ("checkbox"), slider ("range") or strength box ("number")."""
        return find(By.CSS_SELECTOR, f'.lora[data-name="papercut"] input[type="{kind}"]')

    tiny_root, weights = tiny_files
    papercut = write_lora(weights, tmp_path / "papercut.safetensors")
    argv = serve_argv(tiny_root, tmp_path, "--width", "64", "--height", "64", "--lora", f"{papercut}:0.7")
    with running(argv) as server:
        browser.get(server.url)
        wait.until(lambda _: "Defaults: seed 3, 2 steps" in text("defaults"))
        assert find(By.ID, "steps").get_attribute("value") == "2"
        assert "Non-Commercial License" in text("notice")
        assert "default 0.7" in find(By.CSS_SELECTOR, '.lora[data-name="papercut"]').text
        assert lora("number").get_attribute("value") == lora("range").get_attribute("value") == "0.7"

        find(By.ID, "file").send_keys(str(picture))  # what choosing a file does
        wait.until(lambda _: text("input-label").startswith("#1 "))
        assert edit("Add a red hat").startswith("#2 ")
        assert find(By.ID, "result-image").get_attribute("naturalWidth") == "64"

        assert "LoRAs: papercut 0.7" in text("result-prompt")

        find(By.ID, "continue").click()
        wait.until(lambda _: text("input-label").startswith("#2 "))
        lora("checkbox").click()  # off: this edit runs without the LoRA
        assert not lora("range").is_enabled()
        assert edit("Make it night").startswith("#3 ")
        assert "LoRAs: papercut 0" in text("result-prompt")

        # Back to the first result from the history strip, and a different instruction: a branch,
        # with the LoRA on again and its slider moved three steps down.
        find(By.CSS_SELECTOR, '#history figure[data-id="2"]').click()
        wait.until(lambda _: text("input-label").startswith("#2 "))
        lora("checkbox").click()
        lora("range").send_keys(Keys.ARROW_LEFT * 3)
        assert float(lora("number").get_attribute("value")) == pytest.approx(0.55)
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
        assert _lora_strength(saved) == pytest.approx(0.55)
        earlier = sorted(server.app.gallery.folder.glob("00[23]-*.png"))
        assert [_lora_strength(png) for png in earlier] == [0.7, 0.0]

        screenshot = os.environ.get("LOWVRAM_KONTEXT_SCREENSHOT")
        if screenshot:
            browser.save_screenshot(screenshot)
