"""Unattended `/prompt` use on each host: a battery of bad inputs across every node, a seeded fuzz, a soak, interrupts
at every step and during decode, and two clients with different models side by side.

Every bad input must come back as a clear error naming the node and the input: ComfyUI's `node_errors` at
validation, or an `execution_error` whose message names the input (or its file); our nodes never leak a Python
bug (`TypeError`, `KeyError`, ...). After each case the server still serves, and a valid prompt gives the same
image as before the battery. Figures for the closing note are collected in `comfyui.REPORT`, printed at the end.
"""

from __future__ import annotations

import copy
import os
import random
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from comfyui import FULL_WIDTH_VAE, NEWEST, REPORT, node_of, saved, small, workflow
from PIL import Image
from safetensors.torch import save_file

from zimage_core.client import Client, ServerError, failure

BUGS = {"TypeError", "AttributeError", "KeyError", "IndexError", "RuntimeError", "ZeroDivisionError", "AssertionError",
        "UnboundLocalError", "NameError", "NotImplementedError", "OverflowError"}  # fmt: skip
T2I = small(workflow("zimage_turbo_text_to_image"), steps=2, seed=1, size=(64, 64))


def base(kind: str = "t2i") -> dict:
    """A fresh copy of a small valid graph: t2i (nodes 1-7), inpaint (+ 10 LoadImage, 11 VAE Encode), the Omni edit
    route alone (15 SigLIP loader, 16 Edit Conditioning), native (12 EmptySD3LatentImage, 13/14 native VAE), lora
    (+ 9 Z-Image LoRA Loader), controlnet (the Canny workflow: 4 its loader, 5 LoadImage, 11 Apply)."""
    if kind == "t2i":
        return copy.deepcopy(T2I)
    name = {"inpaint": "zimage_turbo_inpaint", "edit": "zimage_edit", "native": "zimage_turbo_with_native_nodes",
            "lora": "zimage_turbo_lora", "controlnet": "zimage_turbo_controlnet"}[kind]  # fmt: skip
    graph = small(workflow(name), steps=2, seed=1, size=(64, 64))
    if kind == "inpaint":
        graph["10"]["inputs"]["image"] = "example_inpaint.png"
    if kind == "controlnet":  # without the edges' preview: one output, as for edit below
        del graph[node_of(graph, "PreviewImage")]
    if kind == "edit":  # the Omni route only (one output, so a bad input never leaves the other half queued)
        graph = {k: v for k, v in graph.items() if k in {"1", "2", "3", "5", "6", "7", "10", "15", "16"}}
        graph["10"]["inputs"]["image"] = "small.png"
    return graph


# ---- what a case must give ----


@dataclass
class Outcome:
    stage: str  # "validation" (HTTP 400 or node_errors), "execution" (execution_error), "interrupted", "success"
    details: dict = field(default_factory=dict)
    entry: dict | None = None


def outcome(client: Client, graph: dict, timeout: float = 120) -> Outcome:
    try:
        prompt_id = client.queue(graph)
    except ServerError as e:
        return Outcome("validation", e.details)
    entry = client.wait(prompt_id, timeout=timeout)  # a TimeoutError here is a hang: the test fails
    error = failure(entry)
    if error is None:
        return Outcome("success", entry=entry)
    data = next((d for kind, d in entry["status"]["messages"] if kind == error["type"]), {})
    return Outcome("interrupted" if error["type"] == "execution_interrupted" else "execution", data, entry)


def clear(result: Outcome, graph: dict) -> str | None:
    """Why `result` is not a clear error (None when it is, or when it succeeded)."""
    if result.stage == "validation":
        if not result.details.get("error", {}).get("message"):
            return f"a rejection without a message: {result.details}"
        for node, err in result.details.get("node_errors", {}).items():
            for e in err["errors"]:
                name = e.get("extra_info", {}).get("input_name")
                if not e.get("message"):
                    return f"node {node}: an error without a message: {e}"
                if name and e["type"] == "custom_validation_failed" and name not in e["details"].split(" - ", 1)[-1]:
                    return f"node {node}: the message for input {name!r} names another: {e['details']!r}"
    if result.stage == "execution":
        kind, message = result.details.get("exception_type", ""), result.details.get("exception_message", "")
        ours = graph.get(str(result.details.get("node_id")), {}).get("class_type", "").startswith("ZImage")
        if not message.strip() or (ours and kind.rsplit(".", 1)[-1] in BUGS):
            return f"{result.details.get('node_type')}: {kind}: {message[:300]}"
    return None


def invalid(node: str, name: str):
    """Refused at validation, with an error on `node` naming input `name`."""

    def check(result: Outcome):
        assert result.stage == "validation", (result.stage, result.details)
        errors = result.details["node_errors"][node]["errors"]
        assert any(e.get("extra_info", {}).get("input_name") == name for e in errors), errors

    return check


def fails(node_type: str, *fragments: str):
    """Ends with an execution_error in a `node_type` node whose message holds every fragment."""

    def check(result: Outcome):
        assert result.stage == "execution", (result.stage, result.details)
        message = result.details["exception_message"]
        assert result.details["node_type"] == node_type and all(f in message for f in fragments), message

    return check


def refused(node: str, name: str, node_type: str, *fragments: str):
    """Refused at validation (hosts that check V3 combos) or at execution (0.3.64), naming the input either way."""

    def check(result: Outcome):
        if result.stage == "validation":
            invalid(node, name)(result)
        else:
            fails(node_type, name, *fragments)(result)

    return check


def rejected(result: Outcome):
    """Refused by ComfyUI's own checks of the graph's structure, with a message."""
    assert result.stage == "validation" and result.details["error"]["message"], result.details


def runs(result: Outcome):
    assert result.stage == "success", (result.stage, result.details)
    assert any(out.get("images") for out in result.entry["outputs"].values())


def edit(graph: dict, node: str, **inputs) -> dict:
    graph[node]["inputs"].update(inputs)
    return graph


def without(graph: dict, node: str, *names: str) -> dict:
    for name in names:
        del graph[node]["inputs"][name]
    return graph


def plus(graph: dict, nodes: dict, node: str | None = None, **links) -> dict:
    """Add `nodes` to the graph and point inputs of `node` at them."""
    graph.update(copy.deepcopy(nodes))
    return edit(graph, node, **links) if node else graph


SOLID_96 = {"30": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 96, "height": 96}}}
MASK_BATCH_2 = {
    "31": {"class_type": "RepeatImageBatch", "inputs": {"image": ["10", 0], "amount": 2}},
    "32": {"class_type": "ImageToMask", "inputs": {"image": ["31", 0], "channel": "red"}},
}
NAN_LATENT = {"40": {"class_type": "LoadLatent", "inputs": {"latent": "nan.latent"}}}
INF_LATENT = {"41": {"class_type": "LoadLatent", "inputs": {"latent": "inf.latent"}}}
SD_LATENT = {"42": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}}
NAN, INF = float("nan"), float("inf")
LONG = "a lighthouse on a cliff at night, " * 3000  # about 100k characters
CONTROL = "a cat\x00\x01\x07\x1b[31m\u202e\ufeff\u200b on a mat\r\n\t"

CASES = {
    # loaders: missing, climbing, empty, truncated, corrupt and non-Z-Image files, bad options
    "transformer not in the folder": (lambda: edit(base(), "1", name="nope.safetensors"), invalid("1", "name")),
    "transformer name climbs out": (lambda: edit(base(), "1", name="../../../../etc/passwd"), invalid("1", "name")),
    "transformer name climbs to a real file": (
        lambda: edit(base(), "1", name="../vae/ae.safetensors"),
        invalid("1", "name"),
    ),
    "transformer absolute path": (lambda: edit(base(), "1", name="/etc/hostname"), invalid("1", "name")),
    "transformer empty file": (
        lambda: edit(base(), "1", name="empty.safetensors"),
        fails("ZImageTransformerLoader", "empty.safetensors"),
    ),
    "transformer truncated": (
        lambda: edit(base(), "1", name="truncated.safetensors"),
        fails("ZImageTransformerLoader", "truncated"),
    ),
    "transformer corrupt header": (
        lambda: edit(base(), "1", name="corrupt.safetensors"),
        fails("ZImageTransformerLoader", "corrupt.safetensors"),
    ),
    "transformer is a VAE": (
        lambda: edit(base(), "1", name="a_vae.safetensors"),
        fails("ZImageTransformerLoader", "not a Z-Image"),
    ),
    "transformer unknown weight_dtype": (
        lambda: edit(base(), "1", weight_dtype="fp4"),
        refused("1", "weight_dtype", "ZImageTransformerLoader", "fp4"),
    ),
    "text encoder not in the folder": (lambda: edit(base(), "2", name="nope.safetensors"), invalid("2", "name")),
    "text encoder is a transformer": (
        lambda: edit(base(), "2", name="a_transformer.safetensors"),
        fails("ZImageTextEncoderLoader", "not a Qwen3"),
    ),
    "text encoder truncated": (
        lambda: edit(base(), "2", name="truncated.safetensors"),
        fails("ZImageTextEncoderLoader", "truncated"),
    ),
    "text encoder unknown device": (
        lambda: edit(base(), "2", device="cuda:7"),
        refused("2", "device", "ZImageTextEncoderLoader", "cuda:7"),
    ),
    "VAE not in the folder": (lambda: edit(base(), "3", name="nope.safetensors"), invalid("3", "name")),
    "VAE is a text encoder": (
        lambda: edit(base(), "3", name="a_text_encoder.safetensors"),
        fails("ZImageVAELoader", "not a VAE"),
    ),
    "VAE corrupt header": (lambda: edit(base(), "3", name="corrupt.safetensors"), fails("ZImageVAELoader", "corrupt")),
    "VAE decode unknown tiled": (lambda: edit(base(), "6", tiled="sometimes"), invalid("6", "tiled")),
    "SigLIP not in the folder": (lambda: edit(base("edit"), "15", name="nope.safetensors"), invalid("15", "name")),
    "SigLIP is a VAE": (
        lambda: edit(base("edit"), "15", name="a_vae.safetensors"),
        fails("ZImageSigLIPLoader", "not a SigLIP2"),
    ),
    "LoRA not in the folder": (
        lambda: edit(base("lora"), "9", lora_name="nope.safetensors"),
        refused("9", "lora_name", "ZImageLoraLoader", "nope.safetensors"),
    ),
    "LoRA name climbs out": (
        lambda: edit(base("lora"), "9", lora_name="../../../../etc/passwd"),
        refused("9", "lora_name", "ZImageLoraLoader", "passwd"),
    ),
    "LoRA empty file": (
        lambda: edit(base("lora"), "9", lora_name="empty.safetensors"),
        fails("ZImageLoraLoader", "empty.safetensors"),
    ),
    "LoRA corrupt header": (
        lambda: edit(base("lora"), "9", lora_name="corrupt.safetensors"),
        fails("ZImageLoraLoader", "corrupt.safetensors"),
    ),
    "LoRA is a transformer": (
        lambda: edit(base("lora"), "9", lora_name="a_transformer.safetensors"),
        fails("ZImageLoraLoader", "a_transformer.safetensors", "none of its"),
    ),
    "LoRA of another model": (
        lambda: edit(base("lora"), "9", lora_name="flux_style_lora.safetensors"),
        fails("ZImageLoraLoader", "flux_style_lora.safetensors", "none of its 2 keys"),
    ),
    "LoRA strength NaN": (
        lambda: edit(base("lora"), "9", strength=NAN),
        fails("ZImageLoraLoader", "strength is nan"),
    ),
    "LoRA strength 1000": (lambda: edit(base("lora"), "9", strength=1000.0), invalid("9", "strength")),
    "a VAE as the LoRA's model": (lambda: edit(base("lora"), "9", model=["3", 0]), invalid("9", "model")),
    # sizes
    "width 0": (lambda: edit(base(), "5", width=0), invalid("5", "width")),
    "height negative": (lambda: edit(base(), "5", height=-64), invalid("5", "height")),
    "width not a multiple of 16": (lambda: edit(base(), "5", width=70), fails("ZImageSampler", "multiples of 16")),
    "width beyond the schema": (lambda: edit(base(), "5", width=8208), invalid("5", "width")),
    "size beyond the model's position table": (  # a diffusers folder with a 64-patch table: 1024 pixels at most
        lambda: edit(edit(base(), "1", name="z_image_small_table"), "5", width=1040),
        fails("ZImageSampler", "beyond this model's position table"),
    ),
    # steps, cfg, shift, denoise, variety
    "steps 0": (lambda: edit(base(), "5", steps=0), invalid("5", "steps")),
    "steps 100000": (lambda: edit(base(), "5", steps=100_000), invalid("5", "steps")),
    "steps not a number": (lambda: edit(base(), "5", steps="eight"), invalid("5", "steps")),
    "cfg below 1": (lambda: edit(base(), "5", cfg=0.5), invalid("5", "cfg")),
    "cfg above 30": (lambda: edit(base(), "5", cfg=31.0), invalid("5", "cfg")),
    "cfg NaN": (lambda: edit(base(), "5", cfg=NAN), fails("ZImageSampler", "cfg is nan")),
    "cfg infinite": (lambda: edit(base(), "5", cfg=INF), invalid("5", "cfg")),
    "shift negative": (lambda: edit(base(), "5", shift=-1.0), invalid("5", "shift")),
    "shift NaN": (lambda: edit(base(), "5", shift=NAN), fails("ZImageSampler", "shift is nan")),
    "denoise above 1": (lambda: edit(base(), "5", denoise=1.5), invalid("5", "denoise")),
    "denoise NaN": (lambda: edit(base(), "5", denoise=NAN), fails("ZImageSampler", "denoise is nan")),
    "denoise 0 on a latent": (lambda: edit(base("inpaint"), "5", denoise=0.0), fails("ZImageSampler", "no step")),
    "variety above 2": (lambda: edit(base(), "5", variety=3.0), invalid("5", "variety")),
    "variety NaN": (lambda: edit(base(), "5", variety=NAN), fails("ZImageSampler", "variety is nan")),
    "batch_size 0": (lambda: edit(base(), "5", batch_size=0), invalid("5", "batch_size")),
    "batch_size 65": (lambda: edit(base(), "5", batch_size=65), invalid("5", "batch_size")),
    # seeds at and beyond their limits
    "seed -1": (lambda: edit(base(), "5", seed=-1), invalid("5", "seed")),
    "seed 2^64": (lambda: edit(base(), "5", seed=2**64), invalid("5", "seed")),
    "seed 2^64 - 1, batch 2 (wraps)": (lambda: edit(base(), "5", seed=2**64 - 1, batch_size=2), runs),
    "seed 0": (lambda: edit(base(), "5", seed=0), runs),
    # latents
    "SD 4-channel latent": (
        lambda: plus(base(), SD_LATENT, "5", latent=["42", 0]),
        fails("ZImageSampler", "16-channel"),
    ),
    "NaN latent into the sampler": (
        lambda: plus(base(), NAN_LATENT, "5", latent=["40", 0]),
        fails("ZImageSampler", "latent", "NaN"),
    ),
    "infinite latent into VAE decode": (
        lambda: plus(base(), INF_LATENT, "6", samples=["41", 0]),
        fails("ZImageVAEDecode", "samples", "infinite"),
    ),
    "SD latent into VAE decode": (
        lambda: plus(base(), SD_LATENT, "6", samples=["42", 0]),
        fails("ZImageVAEDecode", "samples", "16-channel"),
    ),
    # masks
    "mask of another size (resized, as ComfyUI's samplers do)": (
        lambda: plus(base("inpaint"), SOLID_96, "5", mask=["30", 0]),
        runs,
    ),
    "mask of another batch": (
        lambda: plus(base("inpaint"), MASK_BATCH_2, "5", mask=["32", 0]),
        fails("ZImageSampler", "mask has shape (2, 128, 128)"),
    ),
    "mask without a latent": (
        lambda: plus(base(), SOLID_96, "5", mask=["30", 0]),
        fails("ZImageSampler", "mask needs the latent"),
    ),
    # prompts: all legitimate, all must run
    "prompt empty": (lambda: edit(base(), "4", text=""), runs),
    "prompt whitespace only": (lambda: edit(base(), "4", text="  \n\t  "), runs),
    "prompt of 100k characters": (lambda: edit(base(), "4", text=LONG), runs),
    "prompt with control characters": (lambda: edit(base(), "4", text=CONTROL), runs),
    "max_length negative": (lambda: edit(base(), "4", max_length=-1), invalid("4", "max_length")),
    # edit conditioning
    "edit without an image": (lambda: without(base("edit"), "16", "image"), invalid("16", "image")),
    "edit with a Turbo transformer": (
        lambda: edit(base("edit"), "1", name="z_image_turbo_bf16.safetensors"),
        fails("ZImageSampler", "needs an Omni/Edit transformer"),
    ),
    "edit with seed variety": (lambda: edit(base("edit"), "5", variety=0.5), fails("ZImageSampler", "seed variety")),
    "text conditioning into an Omni transformer": (
        lambda: edit(base(), "1", name="z_image_omni_bf16.safetensors"),
        fails("ZImageSampler", "Edit Conditioning"),
    ),
    # values where links belong, broken links, structure
    "a string as the conditioning": (
        lambda: edit(base(), "5", positive="a cat"),
        refused("5", "positive", "ZImageSampler", "conditioning"),
    ),
    "a number as the latent": (
        lambda: edit(base(), "6", samples=5),
        refused("6", "samples", "ZImageVAEDecode", "LATENT"),
    ),
    "link to a missing node": (lambda: edit(base(), "5", positive=["99", 0]), rejected),
    "link to a missing output": (lambda: edit(base(), "5", positive=["4", 3]), rejected),
    "link of the wrong type": (lambda: edit(base(), "5", positive=["1", 0]), invalid("5", "positive")),
    "required link removed": (lambda: without(base(), "5", "model"), invalid("5", "model")),
    "unknown node class": (lambda: base() | {"8": {"class_type": "NoSuchNode", "inputs": {}}}, rejected),
    "no output node": (lambda: {k: v for k, v in base().items() if k != "7"}, rejected),
    # the ControlNet: files, values, inputs that do not go together
    "controlnet not in the folders": (
        lambda: edit(base("controlnet"), "4", control_name="nope.safetensors"),
        invalid("4", "control_name"),
    ),
    "controlnet empty file": (
        lambda: edit(base("controlnet"), "4", control_name="empty.safetensors"),
        fails("ZImageControlNetLoader", "empty.safetensors"),
    ),
    "controlnet is a transformer": (
        lambda: edit(base("controlnet"), "4", control_name="a_transformer.safetensors"),
        fails("ZImageControlNetLoader", "a_transformer.safetensors", "not a Z-Image Fun ControlNet"),
    ),
    "controlnet strength out of range": (
        lambda: edit(base("controlnet"), "11", strength=11.0),
        invalid("11", "strength"),
    ),
    "controlnet start after end": (
        lambda: edit(base("controlnet"), "11", start_percent=0.8, end_percent=0.2),
        fails("ZImageControlNetApply", "start_percent", "end_percent"),
    ),
    "controlnet without images": (
        lambda: without(base("controlnet"), "11", "image"),
        fails("ZImageControlNetApply", "control image"),
    ),
    "controlnet mask without the inpaint image": (
        lambda: edit(base("controlnet"), "11", mask=["5", 1]),
        fails("ZImageControlNetApply", "inpaint image"),
    ),
    "controlnet in place of the model": (
        lambda: edit(base("controlnet"), "11", controlnet=["1", 0]),
        invalid("11", "controlnet"),
    ),
}


@pytest.fixture(scope="session")
def bad_files(server, models):
    """Broken and foreign files in the server's model folders, and inputs for the battery."""
    from helpers import SMALL, reference_transformer

    root = server.base / "models"
    good = (models / "transformer.safetensors").read_bytes()
    for folder in ("diffusion_models", "text_encoders", "vae", "clip_vision", "loras", "model_patches"):
        (root / folder / "empty.safetensors").write_bytes(b"")
        (root / folder / "truncated.safetensors").write_bytes(good[: len(good) // 2])
        (root / folder / "corrupt.safetensors").write_bytes(b"\x40\x00\x00\x00\x00\x00\x00\x00{not json at all")
        for kind in ("transformer", "text_encoder", "vae"):
            target = root / folder / f"a_{kind}.safetensors"
            if not target.exists():
                target.symlink_to(models / f"{kind}.safetensors")
    table = root / "diffusion_models" / "z_image_small_table"  # a diffusers folder whose position table is small
    if not table.exists():
        config = dict(SMALL, cap_feat_dim=64, axes_lens=[256, 64, 64])
        reference_transformer(config).to(torch.bfloat16).save_pretrained(table)
    for name, value in (("nan", NAN), ("inf", INF)):
        z = torch.zeros(1, 16, 8, 8)
        z[0, 3, 2, 2] = value
        save_file(
            {"latent_tensor": z, "latent_format_version_0": torch.tensor([])}, server.base / "input" / f"{name}.latent"
        )
    Image.new("RGB", (48, 64), (200, 30, 90)).save(server.base / "input" / "small.png")
    return root


def image_of(server, result: Outcome) -> np.ndarray:
    (image,) = saved(server, result.entry)
    return image


@pytest.mark.hosts(NEWEST, "0.3.64")  # the newest and the oldest way of reporting errors
def test_every_bad_input_gets_a_clear_error_and_the_server_goes_on(server, client, bad_files):
    """At least 40 cases; after each, the server answers and a valid prompt gives the image it gave before."""
    references = {seed: image_of(server, outcome(client, edit(base(), "5", seed=seed))) for seed in (101, 102)}
    unclear, passed = [], 0
    for i, (name, (build, check)) in enumerate(CASES.items()):
        graph = build()
        result = outcome(client, graph)
        assert server.process.poll() is None, f"{name}: the server died:\n{server.tail()}"
        try:
            check(result)
        except (AssertionError, KeyError) as e:
            pytest.fail(f"{name} on ComfyUI {server.version}: {e!r}")
        if why := clear(result, graph):
            unclear.append(f"{name}: {why}")
        seed = (101, 102)[i % 2]  # the other seed than last time: the sampler runs again, it is not cached
        again = outcome(client, edit(base(), "5", seed=seed))
        assert again.stage == "success" and np.array_equal(image_of(server, again), references[seed]), name
        passed += 1
    assert not unclear, "\n".join(unclear)
    REPORT.setdefault(server.version, {})["battery"] = f"{passed} of {len(CASES)} cases passed"
    assert len(CASES) >= 40


# ---- fuzz ----

VALUES = [-1, 0, 1, 2, 3, 16, 17, 48, 10**6, 2**64, -(2**63), NAN, INF, -INF, -0.5, 0.5, 2.5, 1e9, True, None, "",
          "abc", "../../x", "\x00", "☃" * 10, [], {}, ["1"], ["999", 0], {"__value__": 3}, [1, 2, 3]]  # fmt: skip


def mutate(graph: dict, rng: random.Random) -> tuple[dict, str]:
    """One to three random changes: a value of the wrong type or out of range, a broken or foreign link, a node
    removed or duplicated, an input removed."""
    graph, done = copy.deepcopy(graph), []
    for _ in range(rng.randint(1, 3)):
        nodes = sorted(graph)
        if not nodes:
            break
        node = rng.choice(nodes)
        inputs = graph[node]["inputs"]
        op = rng.choice(["value", "value", "value", "link", "remove node", "duplicate node", "remove input"])
        if op == "value" and inputs:
            name = rng.choice(sorted(inputs))
            inputs[name] = rng.choice(VALUES)
        elif op == "link" and inputs:
            name = rng.choice(sorted(inputs))
            inputs[name] = [rng.choice([*nodes, "404"]), rng.randint(0, 2)]
        elif op == "remove node":
            del graph[node]
        elif op == "duplicate node":
            graph[str(100 + len(graph))] = copy.deepcopy(graph[node])
        elif op == "remove input" and inputs:
            name = rng.choice(sorted(inputs))
            del inputs[name]
        else:
            continue
        done.append(f"{op} {node}.{name}" if op in ("value", "link", "remove input") else f"{op} {node}")
    return graph, "; ".join(done)


@pytest.mark.hosts(NEWEST)  # one host, the newest
def test_a_seeded_fuzz_of_300_prompts_never_kills_hangs_or_garbles(server, client, bad_files):
    rng = random.Random(20261202)
    bases = [base("t2i"), base("inpaint"), base("native"), base("edit")]
    counts, errors, unclear = {}, {}, []
    for i in range(300):
        graph, what = mutate(rng.choice(bases), rng)
        result = outcome(client, graph, timeout=120)
        counts[result.stage] = counts.get(result.stage, 0) + 1
        if result.stage == "execution":
            kind = f"{result.details.get('node_type')}: {result.details.get('exception_type', '').rsplit('.', 1)[-1]}"
            errors[kind] = errors.get(kind, 0) + 1
        assert server.process.poll() is None, f"fuzz {i} ({what}): the server died:\n{server.tail()}"
        if why := clear(result, graph):
            unclear.append(f"fuzz {i} ({what}): {why}")
    assert server.get("/system_stats")["system"]
    assert not unclear, "\n".join(unclear)
    REPORT.setdefault(server.version, {})["fuzz"] = (
        f"300 prompts: {counts}, 0 deaths, 0 hangs, 0 unclear; execution errors: {errors}"
    )


# ---- soak ----


def rss_and_files(server) -> tuple[int, int]:
    """The server process's resident memory (bytes) and open file descriptors (Linux /proc)."""
    with open(f"/proc/{server.process.pid}/status", encoding="utf-8") as f:
        rss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    return rss, len(os.listdir(f"/proc/{server.process.pid}/fd"))


def executed(client: Client, graph: dict, timeout: float = 300) -> tuple[dict, set]:
    """Run `graph`; its history entry and the nodes ComfyUI served from its cache."""
    events = []
    entry = client.wait(client.queue(graph), on_event=events.append, timeout=timeout)
    assert failure(entry) is None, failure(entry)
    return entry, {n for m in events if m["type"] == "execution_cached" for n in m["data"]["nodes"]}


@pytest.mark.hosts(NEWEST)  # our nodes' memory over a long queue, measured on one host
def test_a_soak_of_150_prompts_leaks_neither_memory_nor_files(server, client, bad_files):
    rng = random.Random(5)
    sizes = [(64, 64), (96, 64), (64, 112), (112, 112), (80, 96)]
    job = lambda seed, w, h: edit(base(), "5", seed=seed, width=w, height=h, steps=1)
    batch = lambda: [job(rng.randrange(2**32), *rng.choice(sizes)) for _ in range(10)]
    probe = job(4242, 96, 96)
    ran = 0

    def queued(jobs: list[dict]):  # queued at once: the server never idles between them
        nonlocal ran
        for prompt_id in [client.queue(job) for job in jobs]:
            assert failure(client.wait(prompt_id, timeout=300)) is None
        ran += len(jobs)

    for w, h in sizes * 4:  # warm-up: every size, one at a time
        executed(client, job(rng.randrange(2**32), w, h))
        ran += 1
    # Warm-up of a busy queue too: the first queued batches raise the floor a step or two (0.8.0 +3%; 0.3.64 after
    # the bad-input battery +4%), then it stays. Queue until a batch moves it by under 0.5% (at most 8 batches): a
    # leak never settles, and still shows in the 10 batches measured after.
    warm = [rss_and_files(server)[0]]
    while len(warm) < 9 and (len(warm) < 3 or warm[-1] - warm[-2] > 0.005 * warm[-2]):
        queued(batch())
        warm.append(rss_and_files(server)[0])
    first, _ = executed(client, probe)
    idle = [rss_and_files(server)]  # (RSS, open files) each time the queue has run dry
    for _ in range(10):
        queued(batch())
        idle.append(rss_and_files(server))
    last, cached = executed(client, probe)
    idle.append(rss_and_files(server))
    assert "5" not in cached  # the sampler ran again: the same seed gives the same image at the start and the end
    assert np.array_equal(
        image_of(server, Outcome("success", entry=first)), image_of(server, Outcome("success", entry=last))
    )
    # Idle RSS moves by a few percent either way as the allocator keeps or returns freed memory; leaked memory can
    # never be returned, so a leak shows as a rising floor: the lowest of the first readings against the last ones.
    # The allocator also steps up once in a while and stays (CI: +3.1% between two batches, then +0.06% over nine);
    # a leak grows with every prompt, so the floor must also hold still from the middle readings to the last ones.
    rss = [r for r, _ in idle]
    before, middle, after = min(rss[:4]), min(rss[4:8]), min(rss[-4:])
    growth, late = (after - before) / before, (after - middle) / middle
    readings = f"({before / 1e6:.0f} -> {middle / 1e6:.0f} -> {after / 1e6:.0f} MB): {rss}"
    assert growth <= 0.05 and late <= 0.015, f"idle RSS floor grew {growth:.1%}, {late:.1%} of it late {readings}"
    files0, files1 = idle[0][1], idle[-1][1]
    assert files1 <= files0 + 2, f"open files {files0} -> {files1}"
    REPORT.setdefault(server.version, {})["soak"] = (
        f"{ran + 2} prompts ({len(warm) - 1} warm-up batches), idle RSS floor after warm-up {before / 1e6:.0f} MB -> {after / 1e6:.0f} MB "
        f"({growth:+.2%}, {late:+.2%} from the middle readings; readings {min(rss) / 1e6:.0f}-{max(rss) / 1e6:.0f} MB), "
        f"open files {files0} -> {files1}")  # fmt: skip


# ---- interrupts ----


def progress_of(client: Client, prompt_id: str) -> int:
    with client.changed:
        steps = [m["data"]["value"] for m in client.events.get(prompt_id, []) if m["type"] == "progress"]
    return max(steps, default=0)


def running(client: Client, prompt_id: str, node: str) -> bool:
    with client.changed:
        return any(m["type"] == "executing" and m["data"].get("node") == node for m in client.events.get(prompt_id, []))


@pytest.mark.hosts(NEWEST)  # every host: test_server.py's interrupt within one evaluation
def test_interrupts_at_every_step_and_during_decode_leave_the_server_and_its_cache_intact(server, client, bad_files):
    full = lambda: edit(base(), "3", name=FULL_WIDTH_VAE)  # whose decode is slow enough to be interrupted
    references = {seed: image_of(server, outcome(client, edit(full(), "5", seed=seed))) for seed in (101, 102)}
    steps, tried = 6, []
    slow = edit(full(), "5", steps=steps, width=1024, height=1024)  # about 0.1 s per evaluation on 2 CPU cores
    decode = edit(full(), "5", steps=1, width=512, height=512)  # seconds here
    trials = [("step", k, slow) for k in range(1, steps)] + [("decode", None, decode)]
    for i, (kind, at, graph) in enumerate(trials):
        prompt_id = client.queue(edit(graph, "5", seed=1000 + i))  # a new seed: the sampler runs every time
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (
            progress_of(client, prompt_id) >= at if kind == "step" else running(client, prompt_id, "6")
        ):
            time.sleep(0.01)
        client.call("/interrupt", {})
        events = []
        entry = client.wait(prompt_id, on_event=events.append, timeout=120)
        last = max((m["data"]["value"] for m in events if m["type"] == "progress"), default=0)
        assert failure(entry)["type"] == "execution_interrupted", (kind, at, failure(entry))
        if kind == "step":
            assert at <= last <= at + 1, (at, last)  # stopped before the next evaluation (or the one in flight)
        entry, cached = executed(client, edit(full(), "5", seed=(101, 102)[i % 2]))
        assert {"1", "2", "3"} <= cached, cached  # the loaded models survived the interrupt
        assert np.array_equal(image_of(server, Outcome("success", entry=entry)), references[(101, 102)[i % 2]])
        tried.append(f"{kind} {at}" if at else kind)
    REPORT.setdefault(server.version, {})["interrupts"] = f"{len(tried)} ({', '.join(tried)}), all recovered"


# ---- two clients ----


def test_two_clients_with_different_models_never_get_each_others_results(server, bad_files, tmp_path):
    """Client A runs the Turbo file, client B another transformer; they queue alternately from two threads."""
    from helpers import QWEN3_SMALL, SMALL, reference_transformer, to_comfy

    other = server.base / "models" / "diffusion_models" / "z_image_other.safetensors"
    if not other.exists():
        sd = to_comfy(reference_transformer(dict(SMALL, cap_feat_dim=QWEN3_SMALL["hidden_size"]), seed=9).state_dict())
        save_file({k: v.to(torch.bfloat16).contiguous() for k, v in sd.items()}, other)
    graphs = {
        "a": edit(edit(base(), "1", name="z_image_turbo_bf16.safetensors"), "7", filename_prefix="client-a"),
        "b": edit(edit(base(), "1", name=other.name), "7", filename_prefix="client-b"),
    }
    seeds = [11, 12, 13, 14]
    solo = Client(server.url, retries=2, backoff=0.2)
    solo.listen()
    expected = {(who, s): image_of(server, outcome(solo, edit(copy.deepcopy(g), "5", seed=s)))
                for who, g in graphs.items() for s in seeds}  # fmt: skip
    solo.close()
    assert not np.array_equal(expected["a", 11], expected["b", 11])  # the two models differ
    results, seen, errors = {}, {}, []

    def work(who: str):
        client = Client(server.url, retries=2, backoff=0.2)
        client.listen()
        try:
            for s in seeds:
                prompt_id = client.queue(edit(copy.deepcopy(graphs[who]), "5", seed=s))
                entry = client.wait(prompt_id, on_event=lambda m, w=who: seen.setdefault(w, set()).add(
                    m["data"]["prompt_id"]), timeout=300)  # fmt: skip
                results[who, s] = (prompt_id, entry)
        except Exception as e:  # noqa: BLE001 (reported below, in the test thread)
            errors.append(f"client {who}: {e!r}")
        finally:
            client.close()

    threads = [threading.Thread(target=work, args=(who,)) for who in graphs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert not errors, errors
    for (who, s), (prompt_id, entry) in results.items():
        assert failure(entry) is None
        (ref,) = [r for out in entry["outputs"].values() for r in out["images"]]
        assert ref["filename"].startswith(f"client-{who}")
        assert np.array_equal(image_of(server, Outcome("success", entry=entry)), expected[who, s]), (who, s)
    ids = {who: {results[who, s][0] for s in seeds} for who in graphs}
    assert seen["a"] <= ids["a"] and seen["b"] <= ids["b"]  # each socket heard only of its own prompts
    REPORT.setdefault(server.version, {})["two clients"] = (
        f"{len(results)} prompts from two threads with two models, each image equal to its solo run, 0 crossed"
    )
