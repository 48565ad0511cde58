"""The drag-and-drop experience in ComfyUI's own page, in headless Chromium (tests/browser.py), on every host: each
template opens from the template browser under the pack's name and by dropping its file on the canvas with no
missing-node, missing-model or validation notice, every node with the widgets its definition gives it and the values
the file holds; Run in the page (tiny random-weight models, 128 x 128, 2 steps) puts an image in the page; and the PNG
it saved, dropped back, restores the graph that made it and the prompt the server ran.

`ZIMAGE_REFRESH_SCREENSHOTS=1` also rewrites the README's screenshots (docs/screenshots/) and the template browser's
thumbnails (workflows/NAME.jpg) from the newest host's page."""

from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path

import comfyui
import pytest
from browser import NoBrowser, Page, embedded, find_browser, same_values
from comfyui import NEWEST, PACK, ROOT
from workflow_api import UI_ONLY, shipped, widget_names

TEMPLATES = {ui.stem: json.loads(ui.read_text()) for ui, _ in shipped()}
# As a user would type them; ComfyUI's own VAELoader (the native-nodes template) picks the full-width VAE it needs.
SMALL = {"width": 128, "height": 128, "largest_size": 128, "steps": 2, "seed": 7, "vae_name": comfyui.FULL_WIDTH_VAE}
REFRESH = os.environ.get("ZIMAGE_REFRESH_SCREENSHOTS") == "1"

pytestmark = pytest.mark.server


@pytest.fixture(scope="module", params=comfyui.versions())
def browser_host(request, models, tmp_path_factory):
    """A fresh ComfyUI `request.param` with the pack and tiny models, and its page in Chromium."""
    try:
        find_browser()
        checkout = comfyui.host(request.param)
    except (NoBrowser, comfyui.NoHost) as e:
        if comfyui.in_ci():
            pytest.fail(f"CI=true: the browser tests need Chromium and ComfyUI {request.param}: {e}")
        pytest.skip(f"ComfyUI {request.param} in a browser: {e}")
    server = comfyui.Server(checkout, tmp_path_factory.mktemp(f"browser-{request.param}"), models).start()
    try:
        page = Page(server.url, object_info=server.get("/object_info"))
        yield server, page
        page.close()
    finally:
        server.stop()


def assert_same_graph(ours: dict, expected: dict, what: str):
    """The page's graph is `expected`: the same nodes of the same types in the same modes, widget values and links."""
    nodes = {n["id"]: n for n in ours["nodes"]}
    assert sorted(nodes) == sorted(n["id"] for n in expected["nodes"]), what
    for node in expected["nodes"]:
        page = nodes[node["id"]]
        assert (page["type"], page.get("mode", 0)) == (node["type"], node.get("mode", 0)), f"{what}: node {node['id']}"
        values = node.get("widgets_values", [])
        assert same_values(page.get("widgets_values", []), values), f"{what}: {node['type']} {node['id']} widgets"
    assert links(ours) == links(expected), f"{what}: links"


def links(graph: dict) -> list[tuple]:
    """A graph's links by socket names (a frontend may order a node's sockets its own way)."""
    nodes = {n["id"]: n for n in graph["nodes"]}
    named = lambda node, kind, slot: nodes[node][kind][slot]["name"]
    return sorted((source, named(source, "outputs", out), target, named(target, "inputs", into), kind)
                  for _, source, out, target, into, kind in (link[:6] for link in graph["links"]))  # fmt: skip


def assert_clean(page: Page, graph: dict, what: str):
    """No notice, no node in error, the file's graph, and every widget each node's definition asks for."""
    assert page.problems() == [], f"{what}: the page shows problems"
    assert_same_graph(page.graph(), graph, what)
    built = page.widgets()
    for node in graph["nodes"]:
        if node["type"] not in UI_ONLY:
            missing = {name for name, _ in widget_names(page.object_info[node["type"]])} - set(built[str(node["id"])])
            assert not missing, f"{what}: {node['type']} {node['id']} shows no widget for {sorted(missing)}"


def shot_paths(server, name: str, tmp_path: Path) -> tuple[Path, Path | None]:
    """Where a template's screenshot goes: the README's and the thumbnail when refreshing from the newest host."""
    if REFRESH and server.version == NEWEST:
        return ROOT / "docs" / "screenshots" / f"{name}.jpg", ROOT / "workflows" / f"{name}.jpg"
    return tmp_path / f"{name}.jpg", None


@pytest.mark.parametrize("name", TEMPLATES)
def test_each_template_opens_from_the_template_browser_runs_and_its_png_restores_it(browser_host, name, tmp_path):
    server, page = browser_host
    template = TEMPLATES[name]
    shot, thumbnail = shot_paths(server, name, tmp_path)
    if thumbnail is not None:  # the README's pictures: a browser of its own (one workflow tab), nodes drawn in full
        page = Page(server.url, object_info=page.object_info)
        page.for_pictures()
    try:
        check_template(page, name, template, shot, thumbnail)
    finally:
        if thumbnail is not None:
            page.close()


def check_template(page: Page, name: str, template: dict, shot: Path, thumbnail: Path | None):
    """Open from the template browser, check, make it small, Run, picture it, drop its PNG back, check again."""
    page.open_template(PACK, name, template)
    assert_clean(page, template, f"{name} from the template browser")

    page.set_widgets(SMALL)
    page.fit()
    queued = page.graph()
    images = page.run()
    page.screenshot(shot)
    if thumbnail is not None:
        page.screenshot(thumbnail, width=480)
    assert len(images) == sum(n["type"] in ("SaveImage", "PreviewImage") for n in template["nodes"])

    saved = next(src for src in images if "type=output" in src)
    with urllib.request.urlopen(saved, timeout=30) as response:
        png = response.read()
    workflow, prompt = embedded(png)
    page.new_workflow()
    page.drop("ComfyUI_00001_.png", png, "image/png", queued)
    assert_clean(page, queued, f"{name}'s PNG dropped")
    assert_same_graph(workflow, queued, f"{name}'s PNG's workflow")
    ran = lambda p: {i: (n["class_type"], n["inputs"]) for i, n in p.items()}
    assert ran(page.prompt()) == ran(prompt), f"{name}'s PNG dropped: the page's prompt is not the one that ran"


@pytest.mark.parametrize("name", TEMPLATES)
def test_each_template_loads_by_dropping_its_file_on_the_canvas(browser_host, name):
    page = browser_host[1]
    page.new_workflow()
    ui = ROOT / "workflows" / f"{name}.json"
    page.drop(ui.name, ui.read_bytes(), "application/json", TEMPLATES[name])
    assert_clean(page, TEMPLATES[name], f"{name} dropped")


def test_the_page_shows_a_missing_node_or_model_and_so_would_fail_these_tests(browser_host):
    """The checks above can fail: a template with an unknown node, and one naming a model file the server does not
    have, each dropped, are reported by this host's page (a dialog, a notice or a node in error)."""
    page = browser_host[1]
    template = TEMPLATES["zimage_turbo_text_to_image"]
    unknown, absent = json.loads(json.dumps(template)), json.loads(json.dumps(template))
    unknown["nodes"][0]["type"] = "NoSuchZImageNode"
    loader = next(n for n in absent["nodes"] if n["type"] == "ZImageTransformerLoader")
    loader["widgets_values"][0] = "z_image_turbo_fp9.safetensors"
    loader["properties"]["models"] = [{"name": "z_image_turbo_fp9.safetensors", "directory": "diffusion_models",
                                       "url": "https://huggingface.co/x/y/resolve/main/z_image_turbo_fp9.safetensors"}]  # fmt: skip
    for broken, word in ((unknown, "NoSuchZImageNode"), (absent, "z_image_turbo_fp9")):
        page.new_workflow()
        page.drop("broken.json", json.dumps(broken).encode(), "application/json", broken)
        problems = page.problems()
        assert problems, f"ComfyUI {browser_host[0].version}'s page showed nothing for a graph with {word}"
        page.close_dialogs()
