"""Real ComfyUI servers for the server tests: which versions, where they come from, how they start, and the models
they are given.

The supported hosts are 0.33.0, 0.8.0 and 0.3.64. Each is set up on first use from the source archives in
`../shared/comfyui/` (or `$COMFYUI_ARCHIVES`) by their `setup-host.sh`, into `$COMFYUI_HOSTS` (default
`~/.cache/comfyui-zimage/`), one folder per version and test interpreter; later runs reuse it. `COMFYUI_PATH` (folders
separated by `os.pathsep`) names existing checkouts instead. Without a host the server tests are skipped with the
reason, except under `CI=true`, where a missing host fails them.
Each server runs with its checkout's `.venv/bin/python` when it has one (else `COMFYUI_PYTHON`, else this
interpreter), from a fresh base directory holding this pack in `custom_nodes/`, random-weight models under the
released file names, and the test images.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).parents[1]
VERSIONS = ("0.33.0", "0.8.0", "0.3.64")
NEWEST = VERSIONS[0]  # the tests that only our code decides run here alone (CI time)
PACK = "comfyui-zimage"
# Released names the shipped workflows expect, and the small random models written under them.
MODEL_FILES = {
    "diffusion_models": ["z_image_turbo_bf16.safetensors", "z_image_bf16.safetensors", "z_image_omni_bf16.safetensors"],
    "text_encoders": ["qwen_3_4b.safetensors"],
    "vae": ["ae.safetensors", "ae_full_width.safetensors"],
    "clip_vision": ["siglip2_so400m_patch16_naflex.safetensors"],
    "loras": ["zimage_lora.safetensors", "pixel_art_style_z_image_turbo.safetensors", "flux_style_lora.safetensors"],
    "model_patches": [
        "Z-Image-Turbo-Fun-Controlnet-Union-2.1-2601-8steps.safetensors",
        "Z-Image-Fun-Controlnet-Union-2.1.safetensors",
    ],
}
SOURCES = {  # which written model each released name gets
    "z_image_omni_bf16.safetensors": "omni", "diffusion_models": "transformer", "text_encoders": "text_encoder",
    "ae_full_width.safetensors": "vae_full_width", "vae": "vae", "clip_vision": "siglip", "loras": "lora",
    "pixel_art_style_z_image_turbo.safetensors": "lora_split", "flux_style_lora.safetensors": "lora_flux",
    "model_patches": "controlnet",
}  # fmt: skip
# ComfyUI's own VAELoader builds the Flux VAE at its real widths only, so graphs with native VAE nodes read this file;
# `ae.safetensors` is the same layout narrowed (helpers.VAE_NARROW), which our loader reads by its shapes.
FULL_WIDTH_VAE = "ae_full_width.safetensors"
INPUT_IMAGES = ("example.png", "example_inpaint.png")
REPORT: dict[str, dict[str, str]] = {}  # version -> what the hardening tests measured, printed at the end


class NoHost(Exception):
    """A host that cannot be had here; the message says why."""


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def listed() -> list[Path] | None:
    """The checkouts `COMFYUI_PATH` names, or None when it is unset."""
    value = os.environ.get("COMFYUI_PATH")
    return None if value is None else [Path(p).expanduser() for p in value.split(os.pathsep) if p]


def versions() -> list[str]:
    """The versions the server tests run against: those of `COMFYUI_PATH`'s checkouts, else all supported ones."""
    found = [version(p) for p in listed() or [] if (p / "main.py").is_file()]
    return found or list(VERSIONS)  # none found: each supported version then says why it is missing


def archives() -> Path | None:
    """The folder with the ComfyUI source archives and `setup-host.sh`."""
    given = os.environ.get("COMFYUI_ARCHIVES")
    candidates = [Path(given).expanduser()] if given else [p / "shared" / "comfyui" for p in ROOT.resolve().parents]
    return next((c for c in candidates if (c / "setup-host.sh").is_file()), None)


def host(wanted: str) -> Path:
    """A runnable ComfyUI `wanted`: a `COMFYUI_PATH` checkout, or one set up from the archives (once)."""
    paths = listed()
    if paths is not None:
        found = [p for p in paths if (p / "main.py").is_file() and version(p) == wanted]
        if not found:
            raise NoHost(f"COMFYUI_PATH={os.environ['COMFYUI_PATH']} has no ComfyUI {wanted}")
        return found[0]
    folder = archives()
    if folder is None:
        raise NoHost("no ComfyUI source archives (../shared/comfyui/ or $COMFYUI_ARCHIVES) and COMFYUI_PATH unset")
    # one set-up per test interpreter: its venv sits on top of that interpreter's torch
    key = hashlib.sha1(sys.prefix.encode()).hexdigest()[:8]
    dest = Path(os.environ.get("COMFYUI_HOSTS", Path.home() / ".cache" / "comfyui-zimage")).expanduser()
    dest = dest / f"{wanted}-{key}"
    if not (dest / ".setup-done").is_file():
        shutil.rmtree(dest, ignore_errors=True)
        result = subprocess.run(["bash", str(folder / "setup-host.sh"), wanted, str(dest), sys.executable],
                                capture_output=True, text=True, check=False)  # fmt: skip
        if result.returncode != 0:
            raise NoHost(f"setting up ComfyUI {wanted} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return dest


def version(checkout: Path) -> str:
    text = (checkout / "comfyui_version.py").read_text()
    return text.split("=")[1].strip().strip("\"'")


def small_transformer_config() -> dict:
    """The diffusers config of the servers' transformer (`transformer.safetensors`)."""
    from helpers import QWEN3_SMALL, SMALL

    return dict(SMALL, cap_feat_dim=QWEN3_SMALL["hidden_size"])


def write_models(folder: Path):
    """Random Z-Image models small enough for CPU, in ComfyUI's single-file layouts: a transformer with the real
    head size (its config is read from the shapes), a 3-layer Qwen3, and the Flux VAE narrowed (`vae`) and at its
    real widths (`vae_full_width`, for ComfyUI's own VAE loader, which only builds that architecture)."""
    from helpers import (
        QWEN3_SMALL,
        SMALL,
        VAE_NARROW,
        VAE_REAL,
        randomize_,
        reference_qwen3,
        reference_transformer,
        reference_vae,
        to_bfl,
        to_comfy,
    )
    from safetensors.torch import save_file
    from transformers import Siglip2VisionConfig, Siglip2VisionModel

    folder.mkdir(parents=True, exist_ok=True)
    bf16 = lambda sd: {k: v.to(torch.bfloat16).contiguous() for k, v in sd.items()}
    transformer = to_comfy(reference_transformer(small_transformer_config()).state_dict())
    save_file(bf16(transformer), folder / "transformer.safetensors")
    te = {"model." + k: v for k, v in reference_qwen3(QWEN3_SMALL).state_dict().items()}
    save_file(bf16(te), folder / "text_encoder.safetensors")
    save_file(bf16(to_bfl(reference_vae(VAE_NARROW).state_dict())), folder / "vae.safetensors")
    save_file(bf16(to_bfl(reference_vae(VAE_REAL).state_dict())), folder / "vae_full_width.safetensors")
    omni = reference_transformer(dict(SMALL, cap_feat_dim=QWEN3_SMALL["hidden_size"], siglip_feat_dim=64), seed=2)
    save_file(bf16(to_comfy(omni.state_dict())), folder / "omni.safetensors")
    siglip = Siglip2VisionModel(Siglip2VisionConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                                    num_attention_heads=1, patch_size=16, num_patches=64))  # fmt: skip
    save_file({f"vision_model.{k}": v.to(torch.bfloat16).contiguous() for k, v in
               randomize_(siglip, seed=4).state_dict().items()}, folder / "siglip.safetensors")  # fmt: skip
    save_file(lora_for(transformer), folder / "lora.safetensors")
    save_file(split_lora_for(transformer), folder / "lora_split.safetensors")
    save_file(bf16(controlnet_for_small()), folder / "controlnet.safetensors")
    flux = {f"lora_unet_double_blocks_0_img_attn_qkv.lora_{s}.weight": torch.zeros(8, 8) for s in ("up", "down")}
    save_file(flux, folder / "lora_flux.safetensors")


def controlnet_for_small() -> dict:
    """A Fun ControlNet Union 2.1 for the servers' transformer, in the released (diffusers) names: one control
    layer (at layer 0 of 2) and one control refiner block, 33 input channels, so it both controls and inpaints."""
    from helpers import SMALL, reference_controlnet

    net = reference_controlnet([0], 33, "control_noise_refiner", seed=12, dim=SMALL["dim"], n_heads=SMALL["n_heads"],
                               n_refiner_layers=SMALL["n_refiner_layers"])  # fmt: skip
    return {k: v for k, v in net.state_dict().items() if k.startswith("control_")}


def lora_for(transformer: dict, rank: int = 4) -> dict:
    """A random LoRA in kohya's names on ComfyUI's keys (`lora_up`/`lora_down`/`alpha`) for every block's fused
    qkv and first FFN projection: what ComfyUI's LoraLoaderModelOnly maps onto a Z-Image MODEL."""
    generator, lora = torch.Generator().manual_seed(9), {}
    for key, weight in transformer.items():
        if key.endswith(("attention.qkv.weight", "feed_forward.w1.weight")):
            name = "diffusion_model." + key.removesuffix(".weight")
            lora[name + ".lora_up.weight"] = torch.randn(weight.shape[0], rank, generator=generator) * 0.1
            lora[name + ".lora_down.weight"] = torch.randn(rank, weight.shape[1], generator=generator) * 0.1
            lora[name + ".alpha"] = torch.tensor(float(rank))
    return lora


def split_lora_for(transformer: dict, rank: int = 4) -> dict:
    """A random LoRA as kohya/musubi save it: diffusers' split `to_q/to_k/to_v` names with underscores, which no
    host maps onto the fused qkv, plus every block's `to_out.0` and second FFN projection."""
    generator, lora = torch.Generator().manual_seed(10), {}
    for key, weight in transformer.items():
        if key.endswith(("attention.qkv.weight", "attention.out.weight", "feed_forward.w2.weight")):
            block = key.removesuffix(".weight")
            dim = weight.shape[1]
            names = (
                [block.replace("qkv", f"to_{p}") for p in "qkv"]
                if "qkv" in block
                else [block.replace(".out", ".to_out.0")]
            )
            for name in names:
                kohya = "lora_unet_" + name.replace(".", "_")
                rows = dim if "qkv" in block else weight.shape[0]
                lora[kohya + ".lora_up.weight"] = torch.randn(rows, rank, generator=generator) * 0.1
                lora[kohya + ".lora_down.weight"] = torch.randn(rank, weight.shape[1], generator=generator) * 0.1
                lora[kohya + ".alpha"] = torch.tensor(rank / 2)
    return lora


def write_full_qwen3(folder: Path) -> Path:
    """`qwen_3_4b_full.safetensors`: the released text encoder's every name and shape, as ComfyUI's CLIPLoader
    detects it, sparse. The embeddings and layers 0, 34 and 35 are random; the other layers are holes (zero weights:
    they pass the residual stream on), so the file costs 1.4 GB, not 8. Layer 35 comes after the one Z-Image reads
    (the second to last), so an encoder reading the wrong layer gives other features."""
    from helpers import qwen3_specs, write_sparse

    specs, generator = qwen3_specs(), torch.Generator().manual_seed(11)
    for name, (shape, dtype) in specs.items():
        if name == "model.embed_tokens.weight" or name.startswith(("model.layers.0.", "model.layers.34.",
                                                                     "model.layers.35.")):  # fmt: skip
            w = torch.randn(shape, generator=generator)
            if name.endswith("norm.weight"):
                w = 1 + 0.1 * w
            elif len(shape) == 2 and "embed" not in name:
                w = w * shape[1] ** -0.5
            specs[name] = w.to(dtype)
    return write_sparse(folder / "qwen_3_4b_full.safetensors", specs)


def write_wide_caption_transformer(folder: Path) -> Path:
    """A small transformer that reads the full-size encoder's 2560-wide features."""
    from helpers import QWEN3_REAL, SMALL, reference_transformer, to_comfy
    from safetensors.torch import save_file

    sd = to_comfy(reference_transformer(dict(SMALL, cap_feat_dim=QWEN3_REAL["hidden_size"]), seed=3).state_dict())
    path = folder / "z_image_wide_caption.safetensors"
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in sd.items()}, path)
    return path


def write_images(folder: Path):
    """A picture for img2img, and the same with a transparent square (LoadImage's mask) for inpaint."""
    folder.mkdir(parents=True, exist_ok=True)
    y, x = 2 * np.mgrid[0:128, 0:128]
    rgb = np.stack([x, y, (x + y) // 2], -1).astype(np.uint8)
    Image.fromarray(rgb).save(folder / INPUT_IMAGES[0])
    alpha = np.full((128, 128), 255, np.uint8)
    alpha[32:96, 32:96] = 0
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(folder / INPUT_IMAGES[1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Checkout:
    """A ComfyUI host and the python that runs it (its checkout's `.venv` when it has one, else `COMFYUI_PYTHON`,
    else this interpreter): for scripts run inside the host, with no server."""

    def __init__(self, host: Path):
        self.host, self.version = host, version(host)
        venv = host / ".venv" / "bin" / "python"
        self.python = str(venv) if venv.exists() else os.environ.get("COMFYUI_PYTHON", sys.executable)


class Server(Checkout):
    """One ComfyUI server on a free port, from `base` (models, input, output, custom_nodes)."""

    def __init__(self, host: Path, base: Path, models: Path):
        super().__init__(host)
        self.base = base
        for sub in ("custom_nodes", "input", "output", "user", "models"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        (base / "custom_nodes" / PACK).symlink_to(ROOT, target_is_directory=True)
        for folder, names in MODEL_FILES.items():
            (base / "models" / folder).mkdir(exist_ok=True)
            for name in names:
                kind = SOURCES.get(name, SOURCES[folder])
                (base / "models" / folder / name).symlink_to(models / f"{kind}.safetensors")
        write_images(base / "input")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = base / "server.log"
        self.process: subprocess.Popen | None = None

    def start(self, extra: list[str] = (), timeout: float = 120):
        args = [self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
                "--disable-auto-launch", "--base-directory", str(self.base),
                "--database-url", f"sqlite:///{self.base / 'user' / 'comfyui.db'}", *extra]  # fmt: skip
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(args, cwd=self.host, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI {self.version} exited at start:\n{self.tail()}")
            try:
                self.get("/system_stats")
                return self
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"ComfyUI {self.version} did not answer within {timeout} s:\n{self.tail()}")

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return json.loads(response.read())

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def stop(self):
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
        shutil.rmtree(self.base / "temp", ignore_errors=True)


# ---- driving a server ----

SIZE = (128, 128)  # the full-width VAE costs seconds per 128 x 128 image on 2 cores, four times that at 256


def workflow(name: str) -> dict:
    """A shipped API-format workflow by name."""
    from workflow_api import shipped

    return json.loads(next(api for ui, api in shipped() if ui.stem == name).read_text())


def node_of(graph: dict, class_type: str) -> str:
    return next(i for i, n in graph.items() if n["class_type"] == class_type)


def small(graph: dict, steps: int = 4, seed: int = 5, size: tuple[int, int] = SIZE) -> dict:
    """The graph at `size` (img2img and inpaint: the input image's, 128 x 128; control images scaled to it),
    `steps` steps, `seed`; ComfyUI's own VAELoader given the full-width VAE."""
    from zimage_core.client import job_prompt

    sets = [(node_of(graph, "ZImageSampler"), "steps", steps)]
    sets += [(i, "vae_name", FULL_WIDTH_VAE) for i, n in graph.items() if n["class_type"] == "VAELoader"]
    sets += [(i, "largest_size", max(size)) for i, n in graph.items() if n["class_type"] == "ImageScaleToMaxDimension"]
    return job_prompt(graph, sets, seed=seed, size=size)


def run(client, graph: dict, events: list | None = None, timeout: float = 300) -> dict:
    """Queue `graph` and follow it to its end: its `/history` entry."""
    prompt_id = client.queue(graph)
    return client.wait(prompt_id, on_event=None if events is None else events.append, timeout=timeout)


def saved(server: Server, entry: dict) -> list[np.ndarray]:
    """The images a finished prompt's SaveImage nodes wrote."""
    refs = [ref for out in entry["outputs"].values() for ref in out.get("images", []) if ref["type"] == "output"]
    return [np.asarray(Image.open(server.base / "output" / r["subfolder"] / r["filename"])) for r in refs]


def set_up(wanted: str) -> tuple[str | None, str | None]:
    """(ready, missing): one of them says how `wanted` stands."""
    try:
        return f"{wanted} ({host(wanted)})", None
    except NoHost as e:
        return None, f"{wanted}: {e}"


if __name__ == "__main__":  # .ci/run: set every host up before the suite (side by side: pip waits on the network)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(versions())) as pool:
        outcomes = list(pool.map(set_up, versions()))
    ready = [r for r, _ in outcomes if r]
    missing = [m for _, m in outcomes if m]
    if ready:
        print(f"=== ComfyUI server tests: WILL RUN against {', '.join(ready)} ===")
    for line in missing:
        print(f"=== ComfyUI server tests: MISSING {line} ===")
    sys.exit(1 if missing and in_ci() else 0)
