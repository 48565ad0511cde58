"""Z-Image ControlNet Loader and Apply: a Fun ControlNet Union file (`zimage_core.controlnet`) beside a Z-Image
MODEL of this pack. Apply hands back a MODEL clone that carries the control in its transformer options and the
ControlNet as an additional model, so the host loads and offloads it with the MODEL, under KSampler or the
Z-Image Sampler."""

import comfy.model_management as mm
import comfy.model_patcher
import folder_paths
import torch
from comfy_api.v0_0_2 import io

from ..zimage_core import limits
from ..zimage_core.controlnet import Control, ControlRequest, ZImageControlNet, control_context, load_controlnet
from ..zimage_core.loaders import stamp
from ..zimage_core.sampling import PATCH
from ..zimage_core.vae import crop_to
from .loaders import CACHE, ZImageVAE, check_choices, expect, ready, transformer_of
from .model import CONTROL, HOST_OPS, Patcher, cast_per_call

ZImageControlNetType = io.Custom("ZIMAGE_CONTROLNET")
FOLDERS = ("model_patches", "controlnet")  # ComfyUI's ModelPatchLoader reads these files from model_patches


def files() -> dict[str, str]:
    """The .safetensors files of both folders by listed name, the first folder's winning."""
    found: dict[str, str] = {}
    for folder in (f for f in FOLDERS if f in folder_paths.folder_names_and_paths):
        for name in folder_paths.get_filename_list(folder):
            if name.lower().endswith((".safetensors", ".sft")) and name not in found:
                found[name] = folder_paths.get_full_path(folder, name)
    return dict(sorted(found.items()))


class ZImageControlNetLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ZImageControlNetLoader",
            display_name="Z-Image ControlNet Loader",
            category="Z-Image/loaders",
            description="Loads a Z-Image Fun ControlNet Union file (1.0, 2.0, 2.1 and its Tile/8-step/2601 "
            "releases, lite, the Base Union-2.1) from models/model_patches or models/controlnet; the version is "
            "told from the file.",
            inputs=[
                io.Combo.Input(
                    "control_name",
                    options=list(files()),
                    tooltip="A Z-Image-Turbo-Fun-Controlnet-Union*.safetensors (bf16, fp32 or fp8).",
                )
            ],
            outputs=[ZImageControlNetType.Output()],
        )

    @classmethod
    def validate_inputs(cls, control_name):
        return check_choices(("control_name", control_name, list(files())))

    @classmethod
    def fingerprint_inputs(cls, control_name):
        path = files().get(control_name)
        return stamp(path) if path else control_name

    @classmethod
    def execute(cls, control_name) -> io.NodeOutput:
        path = files().get(control_name)
        if path is None:
            raise ValueError(f"control_name: '{control_name}' is not in models/model_patches or models/controlnet")
        load_device, offload_device = mm.get_torch_device(), mm.unet_offload_device()
        dtype = torch.bfloat16 if mm.should_use_bf16(load_device) else torch.float32

        def build():
            net = cast_per_call(load_controlnet(path, offload_device, dtype, ops=HOST_OPS), dtype)
            return Patcher(net, load_device=load_device, offload_device=offload_device)

        return io.NodeOutput(CACHE.get("controlnet", path, (), build))


class ZImageControlNetApply(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ZImageControlNetApply",
            display_name="Z-Image ControlNet Apply",
            category="Z-Image/conditioning",
            description="Steers a Z-Image MODEL with a control image (canny, depth, pose, HED, MLSD, tile) and, "
            "with a 2.x ControlNet, inpaints: the inpaint image and a mask (white = repaint). For the Z-Image "
            "Sampler or KSampler; images of another size than the latent are resized to it.",
            inputs=[
                io.Model.Input("model", tooltip="From Z-Image Transformer Loader (LoRA loaders may sit between)."),
                ZImageControlNetType.Input("controlnet", tooltip="From Z-Image ControlNet Loader."),
                ZImageVAE.Input("vae", tooltip="From Z-Image VAE Loader: encodes the control and inpaint images."),
                io.Float.Input(
                    "strength",
                    default=0.75,
                    min=limits.CONTROL_STRENGTH.low,
                    max=limits.CONTROL_STRENGTH.high,
                    step=0.01,
                    tooltip="How strongly it steers; the model card says 0.65-1.0 (inpainting with 2.0: 0.6-0.7).",
                ),
                io.Float.Input(
                    "start_percent",
                    default=0.0,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="Where in the process it starts acting (0 = the start).",
                ),
                io.Float.Input(
                    "end_percent", default=1.0, min=0.0, max=1.0, step=0.01, tooltip="Where it stops (1 = the end)."
                ),
                io.Image.Input("image", optional=True, tooltip="The control image."),
                io.Image.Input("inpaint_image", optional=True, tooltip="2.x: the image to repaint."),
                io.Mask.Input("mask", optional=True, tooltip="2.x, with inpaint_image: 1 = repaint."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, controlnet, vae, strength, start_percent, end_percent, image=None, inpaint_image=None,
                mask=None) -> io.NodeOutput:  # fmt: skip
        transformer_of(model)
        expect(
            "controlnet", controlnet, comfy.model_patcher.ModelPatcher, "a ControlNet from Z-Image ControlNet Loader"
        )
        expect("controlnet", controlnet.model, ZImageControlNet, "a ControlNet from Z-Image ControlNet Loader")
        limits.number("strength", strength, limits.CONTROL_STRENGTH)
        if not 0 <= start_percent <= end_percent <= 1:
            raise ValueError(f"start_percent {start_percent} and end_percent {end_percent}: 0 <= start <= end <= 1")
        for name, x in (("image", image), ("inpaint_image", inpaint_image), ("mask", mask)):
            if x is not None:
                expect(name, x, torch.Tensor, "an IMAGE" if name != "mask" else "a MASK")
        vae_model, layout = ready(vae, "vae"), controlnet.model.layout
        factor = vae_model.cfg.factor
        images = [None if x is None else x[..., :3] for x in (image, inpaint_image)]
        mask = None if mask is None else mask.reshape(-1, *mask.shape[-2:])
        cut = [None if x is None else crop_to(x, factor * PATCH) for x in images]  # as the Z-Image VAE Encode cuts
        cut_mask = None if mask is None else crop_to(mask[..., None], factor * PATCH)[..., 0]
        context = control_context(vae_model, layout, *cut, cut_mask)
        request = ControlRequest("", *images, mask)

        def refit(h: int, w: int) -> torch.Tensor:
            """The input again for latents h x w (the images resized), the sampler's models put back after."""
            in_use = mm.loaded_models(only_currently_used=True)
            scaled = request.resized(w * factor, h * factor)
            fitted = control_context(ready(vae, "vae"), layout, *scaled)
            mm.load_models_gpu(in_use)
            return fitted.to(mm.intermediate_device())

        schedule = model.get_model_object("model_sampling")  # KSampler's sigmas; the Z-Image Sampler maps its own
        sigmas = (float(schedule.percent_to_sigma(start_percent)), float(schedule.percent_to_sigma(end_percent)))
        patched = model.clone()
        options = patched.model_options["transformer_options"] = dict(
            patched.model_options.get("transformer_options", {})
        )
        control = Control(controlnet.model, context.to(mm.intermediate_device()), strength, sigmas, refit)
        options[CONTROL] = {"control": control, "range": (start_percent, end_percent)}
        patched.set_additional_models(CONTROL, [controlnet])
        return io.NodeOutput(patched)
