"""The pack inside real ComfyUI servers (0.33.0, 0.8.0, 0.3.64: tests/comfyui.py), driven over its HTTP/websocket API.

The `server`, `client` and `models` fixtures are in conftest.py: one server per version, one after another.
"""

from __future__ import annotations

import json
import shutil
import struct
import time
import urllib.request

import numpy as np
import pytest
import torch
from comfyui import FULL_WIDTH_VAE, INPUT_IMAGES, NEWEST, PACK, SIZE, node_of, run, saved, small, workflow
from PIL import Image
from workflow_api import recorded_object_info, shipped, to_api, widget_names

from zimage_core.client import ServerError, failure, job_prompt
from zimage_core.client.__main__ import main as client_main
from zimage_core.controlnet import ControlRequest
from zimage_core.pipeline import Models, generate

OUR_NODES = [
    "ZImageTransformerLoader", "ZImageTextEncoderLoader", "ZImageVAELoader", "ZImageTextEncode", "ZImageSampler",
    "ZImageVAEDecode", "ZImageVAEEncode", "ZImageSigLIPLoader", "ZImageEditConditioning", "ZImageVAEToVAE",
    "ZImageLoraLoader", "ZImageControlNetLoader", "ZImageControlNetApply",
]  # fmt: skip


def test_pack_loads_and_lists_every_node_with_its_inputs(server):
    log = server.tail(400)
    assert "custom_nodes/comfyui-zimage" in log and f"Cannot import {server.base}" not in log, log
    info = server.get("/object_info")
    recorded = recorded_object_info()
    for node in OUR_NODES:
        assert node in info, f"{node} missing on ComfyUI {server.version}"
        assert info[node]["category"].startswith("Z-Image/")
        assert info[node]["input_order"] == recorded[node]["input_order"]
        for group in ("required", "optional"):
            for name, spec in info[node]["input"].get(group, {}).items():
                assert spec[1].get("tooltip"), f"{node}.{name} has no tooltip"
                assert spec[0] == recorded[node]["input"][group][name][0]


def test_api_workflows_are_the_conversion_of_the_ui_workflows_with_this_servers_definitions(server):
    info = server.get("/object_info")
    for cls, recorded in recorded_object_info().items():
        assert widget_names(info[cls]) == widget_names(recorded), f"{cls} widgets differ on {server.version}"
    for ui, api in shipped():
        assert to_api(json.loads(ui.read_text()), info) == json.loads(api.read_text()), ui.name


@pytest.mark.parametrize("name", [ui.stem for ui, _ in shipped()])
def test_every_shipped_workflow_finishes_with_images_on_disk(server, client, name):
    graph = small(workflow(name))
    if "inpaint" in name:  # the shipped file names example.png; this one carries a mask in its alpha channel
        graph[node_of(graph, "LoadImage")]["inputs"]["image"] = INPUT_IMAGES[1]
    entry = run(client, graph)
    assert failure(entry) is None, failure(entry)
    images = saved(server, entry)
    assert len(images) == sum(n["class_type"] == "SaveImage" for n in graph.values())  # edit: both of its routes
    assert all(image.shape == (*SIZE, 3) and image.std() > 1 for image in images), [i.shape for i in images]


def test_our_latents_decode_the_same_with_the_native_vae_decode(server, client):
    """One prompt, one latent from our sampler (fed by a native empty latent), decoded by both VAE decoders."""
    graph = small(workflow("zimage_turbo_with_native_nodes"))
    sampler = node_of(graph, "ZImageSampler")
    graph["90"] = {"class_type": "ZImageVAELoader", "inputs": {"name": FULL_WIDTH_VAE, "weight_dtype": "default",
                                                               "device": "default"}}  # fmt: skip
    graph["91"] = {"class_type": "ZImageVAEDecode", "inputs": {"vae": ["90", 0], "samples": [sampler, 0],
                                                               "tiled": "auto"}}  # fmt: skip
    graph["92"] = {"class_type": "SaveImage", "inputs": {"images": ["91", 0], "filename_prefix": "ours"}}
    entry = run(client, graph)
    assert failure(entry) is None, failure(entry)
    native, ours = saved(server, entry)
    difference = np.abs(native.astype(int) - ours.astype(int))
    assert difference.max() <= 2 and ours.std() > 1, (difference.max(), difference.mean())


def in_fp32(server, client, graph: dict) -> np.ndarray:
    """The one image `graph` saves, with the transformer and text encoder in fp32 (as the pipeline is run here)."""
    for loader in ("ZImageTransformerLoader", "ZImageTextEncoderLoader"):
        graph[node_of(graph, loader)]["inputs"]["weight_dtype"] = "fp32"
    entry = run(client, graph)
    assert failure(entry) is None, failure(entry)
    (image,) = saved(server, entry)
    return image


def test_nodes_make_the_pipelines_image(server, client, models):
    """The node graph and `zimage_core.pipeline.generate` (proven against diffusers) give the same pixels."""
    graph = small(workflow("zimage_turbo_text_to_image"), seed=11)
    image = in_fp32(server, client, graph)
    files = Models(models / "transformer.safetensors", models / "text_encoder.safetensors", models / "vae.safetensors")
    prompt = graph[node_of(graph, "ZImageTextEncode")]["inputs"]["text"]
    result = generate(files, [prompt], width=SIZE[0], height=SIZE[1], steps=4, seeds=[11], dtype=torch.float32)
    expected = np.clip(255.0 * result.images[0].numpy(), 0, 255).astype(np.uint8)  # as SaveImage converts
    difference = np.abs(image.astype(int) - expected.astype(int))  # two processes: their thread counts may differ
    assert difference.max() <= 1 and difference.mean() <= 0.01, (difference.max(), difference.mean())


@pytest.mark.hosts(NEWEST)  # the pipeline parity is ours; every host runs the edit workflow above
def test_an_edit_graph_makes_the_pipelines_edit(server, client, models):
    """The Omni route of the edit workflow and `generate(references=...)` share their policies (VAE dtype, sizes,
    prompt pieces): the same pixels."""
    graph = small(workflow("zimage_edit"), steps=2, seed=7)
    edit, sampler = node_of(graph, "ZImageEditConditioning"), "5"
    graph = ancestors(graph, next(i for i, n in graph.items() if n["inputs"].get("filename_prefix") == "z-image-edit"))
    for node in graph.values():
        if node["class_type"] in ("ZImageTransformerLoader", "ZImageTextEncoderLoader", "ZImageSigLIPLoader"):
            node["inputs"]["weight_dtype"] = "fp32"
    entry = run(client, graph)
    assert failure(entry) is None, failure(entry)
    (image,) = saved(server, entry)
    files = Models(models / "omni.safetensors", models / "text_encoder.safetensors", models / "vae.safetensors",
                   siglip=models / "siglip.safetensors")  # fmt: skip
    with Image.open(server.base / "input" / graph[node_of(graph, "LoadImage")]["inputs"]["image"]) as picture:
        reference = picture.convert("RGB")
    inputs = graph[edit]["inputs"]
    result = generate(files, [inputs["prompt"]], [inputs["negative"]], steps=2, cfg=graph[sampler]["inputs"]["cfg"],
                      seeds=[7], dtype=torch.float32, references=[reference])  # fmt: skip
    expected = np.clip(255.0 * result.images[0].numpy(), 0, 255).astype(np.uint8)
    difference = np.abs(image.astype(int) - expected.astype(int))
    assert image.shape == expected.shape and difference.max() <= 1, (difference.max(), difference.mean())


@pytest.mark.hosts(NEWEST)  # the pipeline parity is ours; every host runs the ControlNet workflows above
def test_a_controlnet_graph_makes_the_pipelines_controlled_image(server, client, models):
    """The Turbo ControlNet workflow with its control image fed straight in (the pipeline runs no Canny) and
    `generate(control=ControlRequest(...))` (proven against diffusers) give the same pixels."""
    graph = small(workflow("zimage_turbo_controlnet"), seed=13)
    load, apply = node_of(graph, "LoadImage"), node_of(graph, "ZImageControlNetApply")
    for kind in ("ImageScaleToMaxDimension", "Canny", "PreviewImage"):
        del graph[node_of(graph, kind)]
    graph[apply]["inputs"]["image"] = graph[node_of(graph, "GetImageSize")]["inputs"]["image"] = [load, 0]
    image = in_fp32(server, client, graph)
    files = Models(models / "transformer.safetensors", models / "text_encoder.safetensors", models / "vae.safetensors")
    with Image.open(server.base / "input" / graph[load]["inputs"]["image"]) as picture:
        control = torch.from_numpy(np.asarray(picture.convert("RGB"), np.float32) / 255)[None]
    inputs = graph[apply]["inputs"]
    request = ControlRequest(models / "controlnet.safetensors", image=control, strength=inputs["strength"],
                             start=inputs["start_percent"], end=inputs["end_percent"])  # fmt: skip
    prompt = graph[node_of(graph, "ZImageTextEncode")]["inputs"]["text"]
    result = generate(files, [prompt], steps=4, seeds=[13], dtype=torch.float32, control=request)
    expected = np.clip(255.0 * result.images[0].numpy(), 0, 255).astype(np.uint8)
    difference = np.abs(image.astype(int) - expected.astype(int))
    assert image.shape == expected.shape and difference.max() <= 1, (difference.max(), difference.mean())
    entry = run(client, job_prompt(graph, [(apply, "strength", 0.0)]))
    (plain,) = saved(server, entry)
    assert np.abs(plain.astype(int) - image.astype(int)).mean() > 0.1  # the control acted


def test_a_file_that_is_no_controlnet_is_named_in_the_error(server, client):
    link = server.base / "models" / "model_patches" / "flux_style_lora.safetensors"
    link.symlink_to((server.base / "models" / "loras" / "flux_style_lora.safetensors").resolve())
    graph = small(workflow("zimage_turbo_controlnet"))
    loader = node_of(graph, "ZImageControlNetLoader")
    entry = run(client, job_prompt(graph, [(loader, "control_name", link.name)]))
    message = failure(entry)["exception_message"]
    assert "flux_style_lora.safetensors" in message and "not a Z-Image Fun ControlNet" in message, message
    assert failure(run(client, graph)) is None  # the server and its cache go on


def test_bad_values_come_back_as_node_errors_for_our_node(server, client):
    graph = small(workflow("zimage_turbo_text_to_image"))
    for node, name, value, expected in (
        (node_of(graph, "ZImageSampler"), "steps", 0, "value_smaller_than_min"),
        (node_of(graph, "ZImageTransformerLoader"), "name", "missing.safetensors", "custom_validation_failed"),
        (node_of(graph, "ZImageVAEDecode"), "tiled", "sometimes", "custom_validation_failed"),
    ):
        with pytest.raises(ServerError) as rejected:
            client.queue(job_prompt(graph, [(node, name, value)]))
        errors = rejected.value.details["node_errors"]
        assert errors[node]["class_type"] == graph[node]["class_type"]
        assert {e["type"] for e in errors[node]["errors"]} == {expected}  # one per validated input on 0.8.0
        assert name in str(rejected.value) and str(value) in str(rejected.value)


def test_a_failing_node_leaves_the_server_serving(server, client):
    graph = small(workflow("zimage_base_text_to_image"))
    sampler = node_of(graph, "ZImageSampler")
    del graph[sampler]["inputs"]["negative"]  # cfg 4 without a negative prompt: the sampler refuses
    entry = run(client, graph)
    error = failure(entry)
    assert error["type"] == "execution_error" and error["node_type"] == "ZImageSampler"
    assert "negative" in error["exception_message"]
    graph = small(workflow("zimage_turbo_with_native_nodes"))
    graph[node_of(graph, "EmptySD3LatentImage")]["class_type"] = "EmptyLatentImage"  # an SD 1.x latent: 4 channels
    error = failure(run(client, graph))
    assert error["node_type"] == "ZImageSampler" and "16-channel" in error["exception_message"]
    broken = server.base / "models" / "diffusion_models" / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file at all")
    graph = small(workflow("zimage_turbo_text_to_image"))
    graph[node_of(graph, "ZImageTransformerLoader")]["inputs"]["name"] = broken.name
    error = failure(run(client, graph))
    assert error["node_type"] == "ZImageTransformerLoader" and "broken.safetensors" in error["exception_message"]
    broken.unlink()
    entry = run(client, small(workflow("zimage_turbo_text_to_image")))
    assert failure(entry) is None and saved(server, entry)


def test_interrupt_stops_sampling_within_one_evaluation(server, client):
    graph = small(workflow("zimage_turbo_text_to_image"), steps=1000)
    sampler = node_of(graph, "ZImageSampler")
    graph[sampler]["inputs"].update(width=1024, height=1024)  # about 0.1 s per evaluation on 2 CPU cores
    events = []
    prompt_id = client.queue(graph)
    deadline = time.monotonic() + 120

    def progress():
        with client.changed:
            steps = [m["data"]["value"] for m in client.events.get(prompt_id, []) if m["type"] == "progress"]
        return max(steps, default=0)

    while progress() < 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    at_interrupt = progress()
    client.call("/interrupt", {})
    entry = client.wait(prompt_id, on_event=events.append, timeout=120)
    assert failure(entry)["type"] == "execution_interrupted"
    last = max(m["data"]["value"] for m in events if m["type"] == "progress")
    assert 5 <= at_interrupt and last - at_interrupt <= 2, (at_interrupt, last)
    assert failure(run(client, small(workflow("zimage_turbo_text_to_image")))) is None


def test_progress_and_live_previews_per_evaluation(server, client):
    import websocket

    ws = websocket.create_connection(f"ws://127.0.0.1:{server.port}/ws?clientId=previews", timeout=120)
    graph = small(workflow("zimage_turbo_text_to_image"), steps=6, seed=21)
    prompt_id = client.call("/prompt", {"prompt": graph, "client_id": "previews"})["prompt_id"]
    previews, progress = 0, []
    while True:
        message = ws.recv()
        if isinstance(message, bytes):
            previews += struct.unpack(">I", message[:4])[0] == 1  # PREVIEW_IMAGE
            continue
        message = json.loads(message)
        data = message.get("data", {})
        if message["type"] == "progress" and data.get("prompt_id") == prompt_id:
            progress.append((data["value"], data["max"]))
        if message["type"] in ("execution_success", "execution_error") and data.get("prompt_id") == prompt_id:
            break
    ws.close()
    assert message["type"] == "execution_success"
    assert progress == [(i, 6) for i in range(1, 7)]
    assert previews >= 6


def test_models_are_reused_on_requeue_and_reloaded_when_the_file_changes(server, client, models, tmp_path):
    graph = small(workflow("zimage_turbo_text_to_image"), seed=31)
    first = run(client, graph)
    events = []
    again = run(client, job_prompt(graph, [], seed=32), events)
    cached = {n for m in events if m["type"] == "execution_cached" for n in m["data"]["nodes"]}
    loaders = {node_of(graph, c) for c in ("ZImageTransformerLoader", "ZImageTextEncoderLoader", "ZImageVAELoader")}
    assert loaders <= cached and failure(again) is None

    from helpers import QWEN3_SMALL, SMALL, reference_transformer, to_comfy
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    sd = to_comfy(reference_transformer(dict(SMALL, cap_feat_dim=QWEN3_SMALL["hidden_size"]), seed=1).state_dict())
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in sd.items()}, other)
    link = server.base / "models" / "diffusion_models" / "z_image_turbo_bf16.safetensors"
    link.unlink()
    shutil.copy(other, link)  # the same name, other weights
    swapped = run(client, graph)
    link.unlink()
    link.symlink_to(models / "transformer.safetensors")
    back = run(client, graph)
    (a,), (b,), (c,) = saved(server, first), saved(server, swapped), saved(server, back)
    assert np.abs(a.astype(int) - b.astype(int)).max() > 10, "a replaced file was not reloaded"
    assert np.array_equal(a, c)


def test_the_client_runs_a_prompt_file_against_the_server(server, tmp_path):
    api = next(api for ui, api in shipped() if ui.stem == "zimage_turbo_text_to_image")
    sampler = node_of(json.loads(api.read_text()), "ZImageSampler")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red apple on a table\n\n一只猫在窗台上\n")
    code = client_main([str(api), "--server", server.url, "--prompts", str(prompts), "--seed", "3", "--size",
                        "128x128", "--set", f"{sampler}.steps=2", "--concurrency", "2", "--out", str(tmp_path / "out"),
                        "--quiet"])  # fmt: skip
    assert code == 0
    records = [json.loads(line) for line in (tmp_path / "out" / "jobs.jsonl").read_text().splitlines()]
    assert sorted(r["prompt"] for r in records) == ["a red apple on a table", "一只猫在窗台上"]
    assert sorted(r["seed"] for r in records) == [3, 4]
    for r in records:
        assert r["error"] is None and r["size"] == [128, 128] and r["prompt_id"]
        assert np.asarray(Image.open(r["outputs"][0])).shape == (128, 128, 3)


def test_the_template_browser_lists_and_serves_the_ui_workflows(server):
    listed = server.get("/api/workflow_templates")
    assert sorted(listed[PACK]) == sorted(ui.stem for ui, _ in shipped())
    for ui, _ in shipped():
        assert server.get(f"/api/workflow_templates/{PACK}/{ui.name}") == json.loads(ui.read_text())
        thumbnail = f"{server.url}/api/workflow_templates/{PACK}/{ui.stem}.jpg"  # where the cards look for it
        with urllib.request.urlopen(thumbnail, timeout=30) as response:
            assert response.headers["Content-Type"] == "image/jpeg"
            assert response.read() == ui.with_suffix(".jpg").read_bytes()


def ancestors(graph: dict, output: str) -> dict:
    """The part of `graph` that `output` needs."""
    keep, todo = set(), [output]
    while todo:
        node = todo.pop()
        keep.add(node)
        todo += [v[0] for v in graph[node]["inputs"].values() if isinstance(v, list) and v[0] not in keep]
    return {k: v for k, v in graph.items() if k in keep}


def test_edit_errors_name_the_problem(server, client):
    graph = small(workflow("zimage_edit"))
    edit, loader = node_of(graph, "ZImageEditConditioning"), node_of(graph, "ZImageTransformerLoader")
    graph = ancestors(graph, next(i for i, n in graph.items() if n["inputs"].get("filename_prefix") == "z-image-edit"))
    assert failure(run(client, graph)) is None  # the Omni route alone works

    plain = job_prompt(graph, [(loader, "name", "z_image_turbo_bf16.safetensors")])
    error = failure(run(client, plain))
    assert error["node_type"] == "ZImageSampler" and "needs an Omni/Edit transformer" in error["exception_message"]

    wrong = server.base / "models" / "clip_vision" / "not_siglip.safetensors"
    wrong.symlink_to(server.base / "models" / "vae" / "ae.safetensors")
    error = failure(run(client, job_prompt(graph, [(node_of(graph, "ZImageSigLIPLoader"), "name", wrong.name)])))
    assert error["node_type"] == "ZImageSigLIPLoader" and "not a SigLIP2 vision encoder" in error["exception_message"]
    wrong.unlink()

    missing = json.loads(json.dumps(graph))
    del missing[edit]["inputs"]["image"]
    with pytest.raises(ServerError) as rejected:
        client.queue(missing)
    assert [e["type"] for e in rejected.value.details["node_errors"][edit]["errors"]] == ["required_input_missing"]

    text = small(workflow("zimage_turbo_text_to_image"))
    text[node_of(text, "ZImageTransformerLoader")]["inputs"]["name"] = "z_image_omni_bf16.safetensors"
    error = failure(run(client, text))
    assert error["node_type"] == "ZImageSampler" and "give it Z-Image Edit Conditioning" in error["exception_message"]


def test_the_client_uploads_the_image_to_edit(server, tmp_path):
    api = next(api for ui, api in shipped() if ui.stem == "zimage_edit")
    graph = json.loads(api.read_text())
    picture = tmp_path / "to_edit.png"
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (200, 170, 3), dtype=np.uint8)).save(picture)
    samplers = [i for i, n in graph.items() if n["class_type"] == "ZImageSampler"]
    code = client_main([str(api), "--server", server.url, "--upload", f"{node_of(graph, 'LoadImage')}.image={picture}",
                        *[a for i in samplers for a in ("--set", f"{i}.steps=2")], "--out", str(tmp_path / "out"),
                        "--quiet"])  # fmt: skip
    assert code == 0 and (server.base / "input" / picture.name).is_file()
    (record,) = [json.loads(line) for line in (tmp_path / "out" / "jobs.jsonl").read_text().splitlines()]
    sizes = {np.asarray(Image.open(f)).shape for f in record["outputs"]}
    assert len(record["outputs"]) == 2 and sizes == {(192, 160, 3)}  # cut to multiples of 16


@pytest.fixture(scope="module")
def quantized(models):
    """The small models as the quantized files users download, written by the reference quantizers: GGUF of the
    transformer (city96's layout) and of Qwen3 (llama.cpp's names) by gguf-py; Comfy-Org's int8 ConvRot, MXFP8 and
    NVFP4 transformers and fp8/fp4 "mixed" Qwen3 encoders by comfy-kitchen."""
    from helpers import QWEN3_SMALL, ck_quantized_file, is_block_linear, llama_cpp_names, qwen3_mixed_format, write_gguf
    from safetensors.torch import load_file

    from zimage_core.files import GGUFFile

    out = models / "quantized"
    out.mkdir(exist_ok=True)
    transformer = {k: v.float() for k, v in load_file(models / "transformer.safetensors").items()}
    te = {k: v.float() for k, v in load_file(models / "text_encoder.safetensors").items()}
    q8 = lambda n: "Q8_0" if is_block_linear(n) else "F16"
    files = {
        "z_image_turbo-Q8_0.gguf": write_gguf(out / "z_image_turbo-Q8_0.gguf", transformer, q8, "lumina2")[0],
        "Qwen3-4B-Q8_0.gguf": write_gguf(  # every matrix in blocks, the token embedding too, as llama.cpp's Q8_0
            out / "Qwen3-4B-Q8_0.gguf", llama_cpp_names(te, QWEN3_SMALL["num_hidden_layers"]), lambda n: "Q8_0", "qwen3"
        )[0],
    }
    kinds = GGUFFile(files["Qwen3-4B-Q8_0.gguf"]).kinds
    assert {kinds.get("token_embd.weight"), kinds.get("blk.1.ffn_down.weight")} == {"Q8_0"}, kinds
    for name, label in (("int8_convrot", "int8_tensorwise + convrot 256"), ("mxfp8", "mxfp8"), ("nvfp4", "nvfp4")):
        path = out / f"z_image_turbo_{name}.safetensors"
        files[path.name] = ck_quantized_file(transformer, label, path)[0]
    for mix in ("fp8_mixed", "fp4_mixed"):
        path, label = out / f"qwen_3_4b_{mix}.safetensors", lambda n, mix=mix: qwen3_mixed_format(n, mix)
        files[path.name] = ck_quantized_file(te, label, path, select=lambda n: True)[0]
    return files


@pytest.mark.parametrize(
    ("loader", "name"),
    [("ZImageTransformerLoader", "z_image_turbo-Q8_0.gguf"),  # GGUF: listed through the host's folder_paths
     pytest.param("ZImageTransformerLoader", "z_image_turbo_int8_convrot.safetensors", marks=pytest.mark.hosts(NEWEST)),
     pytest.param("ZImageTransformerLoader", "z_image_turbo_mxfp8.safetensors", marks=pytest.mark.hosts(NEWEST)),
     pytest.param("ZImageTransformerLoader", "z_image_turbo_nvfp4.safetensors", marks=pytest.mark.hosts(NEWEST)),
     ("ZImageTextEncoderLoader", "Qwen3-4B-Q8_0.gguf"),
     pytest.param("ZImageTextEncoderLoader", "qwen_3_4b_fp8_mixed.safetensors", marks=pytest.mark.hosts(NEWEST)),
     pytest.param("ZImageTextEncoderLoader", "qwen_3_4b_fp4_mixed.safetensors", marks=pytest.mark.hosts(NEWEST))],
)  # fmt: skip (the safetensors formats are read by our code alone; inside each host by test_server_native)
def test_quantized_files_are_listed_and_generate_through_our_loaders(server, client, models, quantized, loader, name):
    """GGUF files are listed from the model folders (as ComfyUI-GGUF lists them) and, like ComfyUI's quantized
    safetensors, make the image our pipeline makes from the same file."""
    folder = "diffusion_models" if loader == "ZImageTransformerLoader" else "text_encoders"
    link = server.base / "models" / folder / name
    if not link.exists():
        link.symlink_to(quantized[name])
    info = server.get(f"/object_info/{loader}")[loader]["input"]["required"]["name"]
    assert name in (info[1]["options"] if info[0] == "COMBO" else info[0]), info
    graph = small(workflow("zimage_turbo_text_to_image"), seed=13)
    for each in ("ZImageTransformerLoader", "ZImageTextEncoderLoader"):
        graph[node_of(graph, each)]["inputs"]["weight_dtype"] = "fp32"
    graph[node_of(graph, loader)]["inputs"]["name"] = name
    entry = run(client, graph)
    assert failure(entry) is None, failure(entry)
    (image,) = saved(server, entry)
    files = Models(models / "transformer.safetensors", models / "text_encoder.safetensors", models / "vae.safetensors")
    files = Models(
        **{**vars(files), "transformer" if folder == "diffusion_models" else "text_encoder": quantized[name]}
    )
    prompt = graph[node_of(graph, "ZImageTextEncode")]["inputs"]["text"]
    result = generate(files, [prompt], width=SIZE[0], height=SIZE[1], steps=4, seeds=[13], dtype=torch.float32)
    expected = np.clip(255.0 * result.images[0].numpy(), 0, 255).astype(np.uint8)
    difference = np.abs(image.astype(int) - expected.astype(int))
    assert difference.max() <= 1 and difference.mean() <= 0.01, (difference.max(), difference.mean())


def link_model(server, folder: str, name: str, path):
    link = server.base / "models" / folder / name
    if not link.exists():
        link.symlink_to(path)


def lora_graph(transformer: str, lora: str, strength: float) -> dict:
    """The LoRA workflow, small, in fp32, with `transformer` and `lora` at `strength`."""
    graph = small(workflow("zimage_turbo_lora"), seed=13)
    for each in ("ZImageTransformerLoader", "ZImageTextEncoderLoader"):
        graph[node_of(graph, each)]["inputs"]["weight_dtype"] = "fp32"
    graph[node_of(graph, "ZImageTransformerLoader")]["inputs"]["name"] = transformer
    graph[node_of(graph, "ZImageLoraLoader")]["inputs"] |= {"lora_name": lora, "strength": strength}
    return graph


@pytest.mark.parametrize(
    "transformer", ["z_image_turbo_bf16.safetensors", pytest.param("z_image_turbo-Q8_0.gguf", marks=pytest.mark.hosts(NEWEST))]
)
def test_our_lora_loader_stacks_with_the_native_one_and_makes_our_pipelines_image(
    server, client, models, quantized, transformer
):
    """The LoRA workflow with a kohya LoRA in diffusers' split q/k/v names (which no host maps onto the fused qkv)
    at 0.8, then the host's LoraLoaderModelOnly with a fused-name LoRA at 0.5 on the same MODEL: every key of both
    applies, on bf16 and on compact GGUF weights, and the image is the one our pipeline makes with both LoRAs."""
    from safetensors.torch import load_file

    path = quantized.get(transformer, models / "transformer.safetensors")
    link_model(server, "diffusion_models", transformer, path)
    graph = lora_graph(transformer, "pixel_art_style_z_image_turbo.safetensors", 0.8)
    ours, sampler = node_of(graph, "ZImageLoraLoader"), node_of(graph, "ZImageSampler")
    graph["20"] = {"class_type": "LoraLoaderModelOnly", "inputs": {
        "model": [ours, 0], "lora_name": "zimage_lora.safetensors", "strength_model": 0.5}}  # fmt: skip
    graph[sampler]["inputs"]["model"] = ["20", 0]
    entry = run(client, graph)
    assert failure(entry) is None, failure(entry)
    (image,) = saved(server, entry)
    log, n = server.tail(400), len(load_file(models / "lora_split.safetensors"))
    assert f"LoRA pixel_art_style_z_image_turbo.safetensors (kohya/musubi): {n} of {n} keys applied" in log, log
    assert "lora key not loaded" not in log
    files = Models(path, models / "text_encoder.safetensors", models / "vae.safetensors")
    prompt = graph[node_of(graph, "ZImageTextEncode")]["inputs"]["text"]
    settings = {"width": SIZE[0], "height": SIZE[1], "steps": 4, "seeds": [13], "dtype": torch.float32}
    loras = [(models / "lora_split.safetensors", 0.8), (models / "lora.safetensors", 0.5)]
    expected, plain = (generate(files, [prompt], **settings, loras=each).images[0].numpy() for each in (loras, None))
    difference = np.abs(image.astype(int) - np.clip(255.0 * expected, 0, 255).astype(np.uint8).astype(int))
    assert difference.max() <= 1 and difference.mean() <= 0.01, (difference.max(), difference.mean())
    assert np.abs(expected - plain).mean() > 0.01  # the LoRAs change the image


def test_a_lora_that_matches_nothing_fails_its_prompt_naming_the_file(server, client):
    entry = run(client, lora_graph("z_image_turbo_bf16.safetensors", "flux_style_lora.safetensors", 1.0))
    error = failure(entry)
    assert error and error["node_type"] == "ZImageLoraLoader", error
    assert "flux_style_lora.safetensors: none of its 2 keys applies" in error["exception_message"], error
    assert "lora_unet_double_blocks_0_img_attn_qkv" in error["exception_message"]
    again = run(client, lora_graph("z_image_turbo_bf16.safetensors", "pixel_art_style_z_image_turbo.safetensors", 1))
    assert failure(again) is None, failure(again)
