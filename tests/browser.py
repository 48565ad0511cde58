"""ComfyUI's own page in headless Chromium, for the browser tests: what a user does with our templates there (pick one
in the template browser, drop a file on the canvas, press Run) and what the page then holds.

The browser is Debian's `chromium` with its `chromium-driver`, driven by Selenium (PyPI); nothing is downloaded.
The page is the frontend the host pins (`comfyui-frontend-package`): 1.49 on ComfyUI 0.33.0, 1.35 on 0.8.0, 1.27 on
0.3.64. The selectors below are the ones all three share (their `data-testid`s and ARIA labels).
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import time
import urllib.request
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
DRIVERS = ("chromedriver",)
RUN_BUTTON = "[data-testid=queue-button], button.p-splitbutton-button[aria-label=Run]"
IMAGE_NODES_JS = "app.graph.nodes.filter(n => ['SaveImage', 'PreviewImage'].includes(n.type))"


class NoBrowser(Exception):
    """No Chromium or no driver here, or Selenium missing; the message says which."""


def find_browser() -> tuple[str, str]:
    """The paths of Chromium and its driver, or NoBrowser naming what to install."""
    try:
        import selenium  # noqa: F401
    except ImportError as e:
        raise NoBrowser("selenium is not installed (pip install -e .[test])") from e
    browser = next((p for p in map(shutil.which, BROWSERS) if p), None)
    driver = next((p for p in map(shutil.which, DRIVERS) if p), None)
    if browser is None or driver is None:
        raise NoBrowser("no Chromium or ChromeDriver on PATH (Debian: apt-get install chromium chromium-driver)")
    return browser, driver


def same_values(ours, theirs, tolerance: float = 1e-6) -> bool:
    """Widget values alike, floats within `tolerance` (the page stores what its number widgets round to)."""
    if isinstance(ours, (int, float)) and isinstance(theirs, (int, float)) and not isinstance(ours, bool):
        return abs(ours - theirs) <= tolerance * max(1.0, abs(theirs))
    if isinstance(ours, list) and isinstance(theirs, list):
        return len(ours) == len(theirs) and all(same_values(a, b, tolerance) for a, b in zip(ours, theirs))
    return ours == theirs


class Page:
    """One ComfyUI page in its own headless Chromium."""

    def __init__(self, url: str, object_info: dict | None = None, size: tuple[int, int] = (1400, 860)):
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        browser, driver = find_browser()
        options = webdriver.ChromeOptions()
        options.binary_location = browser
        for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                    f"--window-size={size[0]},{size[1]}", "--hide-scrollbars"):  # fmt: skip
            options.add_argument(arg)
        # a returning user: a first visit would open the template browser by itself (and 1.35's ignores Escape)
        request = urllib.request.Request(f"{url}/settings/Comfy.TutorialCompleted", data=b"true", method="POST")
        urllib.request.urlopen(request, timeout=30).close()
        self.driver = webdriver.Chrome(service=Service(driver), options=options)
        self.url, self.object_info = url, object_info  # the server's node definitions
        self.driver.get(self.url)
        self.wait("return !!(window.app && app.graph && document.querySelector('canvas'))", 120, "the page to load")
        time.sleep(1)
        self.close_dialogs()

    def for_pictures(self):
        """Settings for screenshots: nodes drawn in full at small zoom (1.49's level-of-detail cut), no minimap."""
        for key, value in (("LiteGraph.Canvas.MinFontSizeForLOD", 1), ("Comfy.Minimap.Visible", False)):
            self.js("return app.extensionManager.setting.set(arguments[0], arguments[1])", key, value)

    def close(self):
        self.driver.quit()

    def js(self, script: str, *args):
        return self.driver.execute_script(script, *args)

    def wait(self, script: str, timeout: float, what: str, *args):
        """Until `script` returns something truthy, which is returned."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.js(script, *args)
            if value:
                return value
            time.sleep(0.25)
        raise TimeoutError(f"waited {timeout:.0f} s for {what}; the page shows: {self.problems()}")

    def close_dialogs(self):
        """Escape until no dialog (nor its fading mask) is left."""
        from selenium.webdriver.common.action_chains import ActionChains
        from selenium.webdriver.common.keys import Keys

        for _ in range(20):
            if not self.js("return document.querySelector('[role=dialog]:not(.p-popover), .p-dialog-mask')"):
                return
            ActionChains(self.driver).send_keys(Keys.ESCAPE).perform()
            time.sleep(0.5)
        raise TimeoutError(f"a dialog does not close: {self.problems()}")

    def problems(self) -> list[str]:
        """What the page says is wrong: open dialogs (missing nodes or models, failed validation, errors), warning
        and error toasts or notices (0.33.0 shows a missing node or model as a notice, not a dialog), and nodes the
        page marks in error or cannot build."""
        return self.js("""
            const text = el => el.innerText.replace(/\\s+/g, ' ').trim().slice(0, 300);
            const shown = [...document.querySelectorAll(
                '[role=dialog], [role=alertdialog], .p-toast-message-warn, .p-toast-message-error')]
                .filter(el => !el.matches('.p-popover')).map(text);  // a popover is a tab's hover preview
            const notices = [...document.querySelectorAll('div.pointer-events-auto')].map(text)
                .filter(t => /missing|error|failed|invalid/i.test(t) && t.length < 300);
            const nodes = app.graph.nodes.filter(n => n.has_errors || !LiteGraph.registered_node_types[n.type])
                .map(n => `node ${n.id} ${n.type}: ${n.has_errors ? 'in error' : 'unknown type'}`);
            return [...shown, ...notices, ...nodes];
        """)

    def graph(self) -> dict:
        """The graph the page holds, as it would save it."""
        return self.js("return JSON.parse(JSON.stringify(app.graph.serialize()))")

    def widgets(self) -> dict[str, list[str]]:
        """Each node's widget names, as the page built them."""
        return self.js(
            "return Object.fromEntries(app.graph.nodes.map(n => [String(n.id), (n.widgets || []).map(w => w.name)]))"
        )

    def open_template(self, pack: str, name: str, graph: dict):
        """Open the template browser from the sidebar, pick `pack` under the extensions, click `name`'s card and
        wait until the page holds `graph`'s nodes."""
        self.close_dialogs()
        self.click("return document.querySelector('button[aria-label^=Templates]')", "the Templates button")
        entry = f"//*[@role='dialog']//*[(@role='button' or @role='option') and normalize-space(.)='{pack}']"
        self.click(f"return document.evaluate(\"{entry}\", document, null, 9, null).singleNodeValue",
                   f"{pack} in the template browser")  # fmt: skip
        self.click(f"return document.querySelector('[role=dialog] [data-testid=\"template-workflow-{name}\"]')",
                   f"{pack}'s card {name}")  # fmt: skip
        self.wait_for_graph(name, graph)

    def click(self, script: str, what: str, timeout: float = 30):
        """Click the element `script` finds, once it is there and takes clicks (the page re-renders as it goes)."""
        from selenium.common.exceptions import ElementClickInterceptedException, StaleElementReferenceException

        deadline = time.monotonic() + timeout
        while True:
            try:
                self.wait(script, max(1.0, deadline - time.monotonic()), what).click()
                return
            except (StaleElementReferenceException, ElementClickInterceptedException):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.25)

    def new_workflow(self):
        """A blank workflow tab, as the + button next to the tabs makes."""
        from selenium.webdriver.common.by import By

        self.close_dialogs()
        buttons = self.driver.find_elements(By.CSS_SELECTOR, "button[aria-label='Create a new blank workflow']")
        next(b for b in buttons if b.is_displayed()).click()
        self.wait("return app.graph.nodes.length == 0", 30, "a blank workflow")

    def drop(self, name: str, data: bytes, mime: str, graph: dict):
        """Drop a file on the canvas as a file manager would (a DataTransfer holding it), and wait for its graph."""
        self.close_dialogs()
        self.js("""
            const [b64, name, mime] = arguments;
            const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
            const data = new DataTransfer();
            data.items.add(new File([bytes], name, {type: mime}));
            const canvas = document.querySelector('canvas#graph-canvas') || document.querySelector('canvas');
            const box = canvas.getBoundingClientRect();
            const at = {clientX: box.x + box.width / 2, clientY: box.y + box.height / 2};
            for (const type of ['dragenter', 'dragover', 'drop'])
                canvas.dispatchEvent(new DragEvent(type, {bubbles: true, cancelable: true, dataTransfer: data, ...at}));
        """, base64.b64encode(data).decode(), name, mime)  # fmt: skip
        self.wait_for_graph(name, graph)

    def wait_for_graph(self, name: str, graph: dict):
        """Until the page holds `graph`'s nodes (ids and types) and the template browser is closed."""
        nodes = sorted(f"{n['id']} {n['type']}" for n in graph["nodes"])
        self.wait("""return !document.querySelector('[role=dialog] [data-testid^=template-workflow-]') &&
                     JSON.stringify(app.graph.nodes.map(n => `${n.id} ${n.type}`).sort()) == JSON.stringify(arguments[0])""",
                  30, f"{name}'s {len(nodes)} nodes", nodes)  # fmt: skip
        time.sleep(0.5)  # dialogs and notices about what was loaded come just after

    def set_widgets(self, values: dict[str, object]):
        """Every widget called one of `values`' names takes that value, as typing it in would."""
        self.js("""
            const values = arguments[0];
            for (const node of app.graph.nodes) for (const w of node.widgets || [])
                if (w.name in values) { w.value = values[w.name]; w.callback?.(w.value); }
            app.graph.setDirtyCanvas(true, true);
        """, values)  # fmt: skip

    def image_counts(self) -> list[int]:
        """How many loaded images each image node shows."""
        return self.js(
            f"return {IMAGE_NODES_JS}.map(n => (n.imgs || []).filter(i => i.complete && i.naturalWidth > 0).length)"
        )

    def run(self, timeout: float = 300) -> list[str]:
        """Press Run and wait until every image node shows its image; the images' addresses."""
        from selenium.webdriver.common.by import By

        self.close_dialogs()
        button = next(b for b in self.driver.find_elements(By.CSS_SELECTOR, RUN_BUTTON) if b.is_displayed())
        button.click()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            counts, problems = self.image_counts(), self.problems()
            if problems:
                raise AssertionError(f"after Run the page shows: {problems}")
            if counts and all(counts):
                return self.js(f"return {IMAGE_NODES_JS}.flatMap(n => n.imgs.map(i => i.src))")
            time.sleep(0.5)
        raise TimeoutError(f"no image in the page {timeout:.0f} s after Run (image nodes show {self.image_counts()})")

    def prompt(self) -> dict:
        """The API prompt the page would queue for its graph."""
        return self.js("return app.graphToPrompt().then(p => JSON.parse(JSON.stringify(p.output)))")

    def fit(self):
        """Fit the whole graph in view (the '.' key's command)."""
        self.js("return app.extensionManager.command.execute('Comfy.Canvas.FitView')")
        time.sleep(0.3)

    def screenshot(self, path: Path, width: int = 1200):
        """The page as a small JPEG (`width` pixels wide): for the README, kept to tens of kilobytes."""
        from PIL import Image

        image = Image.open(io.BytesIO(self.driver.get_screenshot_as_png())).convert("RGB")
        image = image.resize((width, round(image.height * width / image.width)), Image.LANCZOS)
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, "JPEG", quality=80, optimize=True, progressive=True)


def embedded(png: bytes) -> tuple[dict, dict]:
    """The workflow and the prompt ComfyUI's SaveImage wrote into a PNG's text chunks."""
    from PIL import Image

    info = Image.open(io.BytesIO(png)).info
    return json.loads(info["workflow"]), json.loads(info["prompt"])
