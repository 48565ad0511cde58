"""UI-format workflows (what ComfyUI's browser saves) to API format (what `POST /prompt` takes), as the frontend
converts them: widget values are positional, so the node definitions (`/object_info`) say which is which."""

from __future__ import annotations

import json
from pathlib import Path

WORKFLOWS = Path(__file__).parents[1] / "workflows"
OBJECT_INFO = Path(__file__).parent / "data" / "object_info.json"  # recorded from ComfyUI 0.8.0 with this pack
UI_ONLY = {"Note", "MarkdownNote"}  # drawn by the frontend, never sent to the server
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
SEED_NAMES = {"seed", "noise_seed"}


def widget_names(info: dict) -> list[tuple[str, int]]:
    """(input, values it takes in `widgets_values`) for each widget: a seed's control and an upload button add one."""
    spec = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
    order = info["input_order"].get("required", []) + info["input_order"].get("optional", [])
    out = []
    for name in order:
        kind, options = spec[name][0], (spec[name][1] if len(spec[name]) > 1 else {})
        if (isinstance(kind, list) or kind in WIDGET_TYPES) and not options.get("forceInput"):
            extra = options.get("control_after_generate") or (kind == "INT" and name in SEED_NAMES)
            out.append((name, 1 + bool(extra) + bool(options.get("image_upload"))))
    return out


def to_api(ui: dict, object_info: dict) -> dict:
    links = {link[0]: link for link in ui["links"]}
    api = {}
    for node in sorted(ui["nodes"], key=lambda n: n["id"]):
        if node["type"] in UI_ONLY or node.get("mode", 0) in (2, 4):  # muted or bypassed nodes are not sent
            continue
        info = object_info[node["type"]]
        inputs, values = {}, list(node.get("widgets_values") or [])
        for name, taken in widget_names(info):
            inputs[name], values = values[0], values[taken:]
        if values:
            raise ValueError(f"node {node['id']} ({node['type']}): {len(values)} widget values left over")
        for socket in node.get("inputs", []):
            if socket.get("link") is not None:
                _, source, slot, *_ = links[socket["link"]]
                inputs[socket["name"]] = [str(source), slot]
        api[str(node["id"])] = {
            "class_type": node["type"],
            "inputs": inputs,
            "_meta": {"title": node.get("title") or info["display_name"]},
        }
    return api


def shipped() -> list[tuple[Path, Path]]:
    """Every shipped UI workflow and its API twin."""
    return [(ui, WORKFLOWS / "api" / ui.name) for ui in sorted(WORKFLOWS.glob("*.json"))]


def recorded_object_info() -> dict:
    return json.loads(OBJECT_INFO.read_text())
