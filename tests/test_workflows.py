"""The shipped workflows: UI files are the source, API files their conversion, released model names throughout."""

import json
import uuid

import pytest
from comfyui import MODEL_FILES
from PIL import Image
from workflow_api import UI_ONLY, recorded_object_info, shipped, to_api

UIS = [ui for ui, _ in shipped()]


def test_every_kind_of_workflow_ships_in_both_formats():
    names = {ui.stem for ui in UIS}
    assert names == {
        "zimage_turbo_text_to_image", "zimage_base_text_to_image", "zimage_turbo_img2img", "zimage_turbo_inpaint",
        "zimage_turbo_with_native_nodes", "zimage_edit", "zimage_turbo_lora", "zimage_turbo_controlnet",
        "zimage_turbo_controlnet_inpaint", "zimage_base_controlnet",
    }  # fmt: skip
    assert {api.stem for api in (UIS[0].parent / "api").glob("*.json")} == names
    # the template browser's cards: NAME.jpg beside NAME.json (tests/test_browser.py draws them), kept small
    for ui in UIS:
        with Image.open(ui.with_suffix(".jpg")) as thumbnail:
            assert thumbnail.format == "JPEG" and thumbnail.width <= 480
        assert ui.with_suffix(".jpg").stat().st_size <= 40_000
    # the frontend's schema wants each workflow's id to be a UUID (1.27 and 1.35 warn on load otherwise)
    ids = [json.loads(ui.read_text())["id"] for ui in UIS]
    assert all(str(uuid.UUID(i)) == i for i in ids) and len(set(ids)) == len(ids)


@pytest.mark.parametrize("ui", UIS, ids=lambda p: p.stem)
def test_api_file_is_the_conversion_of_the_ui_file(ui):
    api = ui.parent / "api" / ui.name
    assert to_api(json.loads(ui.read_text()), recorded_object_info()) == json.loads(api.read_text())


@pytest.mark.parametrize("ui", UIS, ids=lambda p: p.stem)
def test_ui_file_is_a_consistent_graph(ui):
    graph = json.loads(ui.read_text())
    nodes = {n["id"]: n for n in graph["nodes"]}
    assert graph["version"] == 0.4 and graph["last_node_id"] == max(nodes)
    assert graph["last_link_id"] == max(link[0] for link in graph["links"])
    for link_id, source, slot, target, target_slot, kind in graph["links"]:
        assert link_id in nodes[source]["outputs"][slot]["links"]
        socket = nodes[target]["inputs"][target_slot]
        assert socket["link"] == link_id and socket["type"] == kind == nodes[source]["outputs"][slot]["type"]
    info = recorded_object_info()
    for node in nodes.values():
        if node["type"] in UI_ONLY:
            continue
        required = info[node["type"]]["input"]["required"]
        for socket in node["inputs"]:
            if socket["name"] in required and "widget" not in socket:
                assert socket["link"] is not None, f"{ui.name}: {node['type']}.{socket['name']} is not connected"


@pytest.mark.parametrize("ui", UIS, ids=lambda p: p.stem)
def test_workflow_names_the_released_files_it_expects(ui):
    graph = json.loads(ui.read_text())
    api = json.loads((ui.parent / "api" / ui.name).read_text())
    folders = {"ZImageTransformerLoader": "diffusion_models", "ZImageTextEncoderLoader": "text_encoders",
               "ZImageVAELoader": "vae", "VAELoader": "vae", "ZImageSigLIPLoader": "clip_vision",
               "ZImageControlNetLoader": "model_patches"}  # fmt: skip
    notes = " ".join(str(v) for n in graph["nodes"] if n["type"] in UI_ONLY for v in n["widgets_values"])
    for node in api.values():
        if node["class_type"] in folders:
            inputs = node["inputs"]
            name = inputs.get("name", inputs.get("vae_name", inputs.get("control_name")))
            assert name in MODEL_FILES[folders[node["class_type"]]]  # and so the server tests run it
            assert name in notes, f"{ui.name}: its note does not say where {name} comes from"
    for node in graph["nodes"]:
        for model in node["properties"].get("models", []):
            assert model["url"].startswith("https://huggingface.co/") and model["url"].endswith("/" + model["name"])
