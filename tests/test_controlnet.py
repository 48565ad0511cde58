"""The Fun ControlNet Union, every released layout, against diffusers' ZImageControlNetPipeline and
ZImageControlNetInpaintPipeline on the same tiny random components (real layer counts, tiny widths), with guidance
off and on.

diffusers computes the authors' hints but drops the refiner hints from its base transformer; VideoX-Fun (the
authors' code) and ComfyUI add them after each noise-refiner layer. The 2.x references here are diffusers'
pipelines with exactly that added (`authors_refiner`), so what is compared is everything else: 1.0 has no refiner
hints and is compared with diffusers unchanged.
"""

import contextlib
import json

import helpers
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, ZImageControlNetInpaintPipeline, ZImageControlNetPipeline
from diffusers.models.controlnets.controlnet_z_image import ZImageControlNetModel
from helpers import (
    QWEN3_TINY,
    REAL,
    VAE_TINY,
    reference_qwen3,
    reference_transformer,
    reference_vae,
    write_file,
)
from PIL import Image
from transformers import AutoTokenizer

from zimage_core.__main__ import main
from zimage_core.checkpoint import CheckpointError
from zimage_core.controlnet import Control, ControlRequest, control_context, load_controlnet
from zimage_core.loaders import load_text_encoder, load_transformer, load_vae
from zimage_core.sampling import control_range, noise, sample, sigmas
from zimage_core.text_encoder import BUNDLED_TOKENIZER

# diffusers' pipeline-test widths with the released 30 layers and 2 refiner layers, so the real places are used
TRANSFORMER = dict(REAL, dim=32, n_layers=30, n_refiner_layers=2, n_heads=2, n_kv_heads=2, cap_feat_dim=16,
                   axes_dims=[8, 4, 4], axes_lens=[256, 32, 32])  # fmt: skip
EVEN = list(range(0, 30, 2))
# version -> (diffusers' control_layers_places, control_in_dim, add_control_noise_refiner), from VideoX-Fun's configs
VERSIONS = {
    "1.0": ([0, 5, 10, 15, 20, 25], 16, None),
    "2.0": (EVEN, 33, "control_layers"),
    "2.1": (EVEN, 33, "control_noise_refiner"),
    "2.1 lite": ([0, 10, 20], 33, "control_noise_refiner"),
}


def reference_controlnet(version: str, seed: int) -> ZImageControlNetModel:
    return helpers.reference_controlnet(*VERSIONS[version], seed=seed)


def released_tensors(net: ZImageControlNetModel, version: str, with_refiner: bool = True) -> dict:
    """The file as alibaba-pai ships it: diffusers' names; a 2.0 file also carries the refiner it never used,
    with zero projections (ComfyUI and diffusers tell 2.0 by them)."""
    sd = {k: v.clone() for k, v in net.state_dict().items() if k.startswith("control_")}
    if version == "2.0" and with_refiner:
        unused = reference_controlnet("2.1", seed=99).state_dict()
        for k, v in unused.items():
            if k.startswith("control_noise_refiner."):
                sd[k] = torch.zeros_like(v) if "_proj." in k else v
    return sd


@pytest.fixture(scope="module")
def components(tmp_path_factory):
    root = tmp_path_factory.mktemp("controlnet")
    transformer = reference_transformer(TRANSFORMER, seed=0)
    text_encoder, vae = reference_qwen3(QWEN3_TINY, seed=1), reference_vae(VAE_TINY, seed=2)
    for name, model in (("transformer", transformer), ("text_encoder", text_encoder), ("vae", vae)):
        model.save_pretrained(root / name)
    nets, files = {}, {}
    for i, version in enumerate(VERSIONS):
        nets[version] = reference_controlnet(version, seed=10 + i)
        files[version] = write_file(root / f"control {version}.safetensors", released_tensors(nets[version], version))
    parts = {"scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0), "vae": vae, "text_encoder": text_encoder,
                 "tokenizer": AutoTokenizer.from_pretrained(str(BUNDLED_TOKENIZER)), "transformer": transformer}  # fmt: skip
    ours = (load_transformer(root / "transformer", dtype=torch.float32),
            load_text_encoder(root / "text_encoder", dtype=torch.float32), load_vae(root / "vae"))  # fmt: skip
    return parts, nets, files, ours, root


@contextlib.contextmanager
def authors_refiner(pipe):
    """diffusers' pipeline with the controlnet's refiner hints also added after the base model's noise-refiner
    layers, as VideoX-Fun's `BaseZImageTransformerBlock` adds them (the hints are diffusers' own, captured)."""
    net, transformer = pipe.controlnet, pipe.transformer
    if net.add_control_noise_refiner is None:
        yield
        return
    state = {"hints": None, "scale": 1.0, "on": False}
    net_forward, transformer_forward = net.forward, transformer.forward

    def controlnet(*args, conditioning_scale=1.0, **kwargs):
        state.update(hints=None, scale=conditioning_scale)
        return net_forward(*args, conditioning_scale=conditioning_scale, **kwargs)

    def base(*args, **kwargs):
        state["on"] = True
        try:
            return transformer_forward(*args, **kwargs)
        finally:
            state["on"] = False

    def capture(module, args, out):  # the refiner stage is the first call of its last block
        if state["hints"] is None:
            state["hints"] = torch.unbind(out)[:-1]

    def add(i):
        return lambda module, args, out: out + state["hints"][i] * state["scale"] if state["on"] else out

    stage = net.control_layers if net.add_control_noise_refiner == "control_layers" else net.control_noise_refiner
    hooks = [stage[-1].register_forward_hook(capture)]
    hooks += [layer.register_forward_hook(add(i)) for i, layer in enumerate(transformer.noise_refiner)]
    net.forward, transformer.forward = controlnet, base
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
        del net.forward, transformer.forward


def test_every_version_is_told_from_its_keys(components):
    _, nets, files, _, root = components
    expected = {"1.0": (6, "alone", 16), "2.0": (15, "control layers", 33), "2.1": (15, "hints", 33),
                "2.1 lite": (3, "hints", 33)}  # fmt: skip
    for version, path in files.items():
        net = load_controlnet(path, dtype=torch.float32)
        layout = net.layout
        assert (layout.version, layout.control_layers, layout.refiner, layout.in_channels) == (
            version,
            *expected[version],
        )
        assert list(layout.places(30)) == VERSIONS[version][0]
        assert net.info.version == version
    without = write_file(root / "2.0 without refiner.safetensors", released_tensors(nets["2.0"], "2.0", False))
    assert load_controlnet(without).layout.version == "2.0"  # diffusers' converted 2.0 drops the unused refiner
    assert not hasattr(load_controlnet(files["2.0"]), "control_noise_refiner")  # its zero refiner is not held


def images(seed: int, n: int = 1, size: int = 32) -> torch.Tensor:
    return torch.rand(n, size, size, 3, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("version", list(VERSIONS))
@pytest.mark.parametrize("scale,steps", [(0.0, 4), (2.5, 3)])
def test_control_equals_diffusers_pipeline(components, version, scale, steps):
    parts, nets, files, (transformer, encoder, vae), _ = components
    pipe = ZImageControlNetPipeline(**parts, controlnet=nets[version])
    prompts, seeds, strength = ["dance monkey", "a red fox"], [3, 4], 0.75
    control_images = images(5)

    def reference(output_type):
        with authors_refiner(pipe):
            return pipe(list(prompts), height=32, width=32, num_inference_steps=steps, guidance_scale=scale,
                        control_image=control_images.movedim(-1, 1) * 2 - 1, controlnet_conditioning_scale=strength,
                        generator=[torch.Generator().manual_seed(s) for s in seeds], output_type=output_type).images  # fmt: skip

    expected, expected_image = reference("latent"), torch.from_numpy(reference("np"))
    net = load_controlnet(files[version], dtype=torch.float32)
    control = Control(net, control_context(vae, net.layout, image=control_images), strength)
    cond, uncond = encoder.encode(prompts), encoder.encode(["", ""]) if scale > 0 else None
    latents = sample(transformer, noise((16, 16, 16), seeds), cond, uncond, sigmas(steps), scale, control=control)
    assert (latents - expected).abs().max() <= 1e-4
    assert (vae.decode(vae.cfg.denormalize(latents)) - expected_image).abs().max() <= 2 / 255
    plain = sample(transformer, noise((16, 16, 16), seeds), cond, uncond, sigmas(steps), scale)
    assert (plain - latents).abs().max() > 0.05  # the control changed the image


@pytest.mark.parametrize("version", ["2.0", "2.1", "2.1 lite"])
@pytest.mark.parametrize("scale", [0.0, 2.0])
def test_inpaint_equals_diffusers_inpaint_pipeline(components, version, scale):
    parts, nets, files, (transformer, encoder, vae), _ = components
    pipe = ZImageControlNetInpaintPipeline(**parts, controlnet=nets[version])
    prompts, seeds, steps = ["dance monkey", "a red fox"], [6, 7], 3
    control_images, pictures = images(8), images(9, 2)
    masks = torch.rand(2, 32, 32, generator=torch.Generator().manual_seed(10))  # grey levels: binarized at 0.5

    def reference(output_type):
        with authors_refiner(pipe):
            return pipe(list(prompts), image=pictures.movedim(-1, 1) * 2 - 1, mask_image=masks[:, None],
                        control_image=control_images.movedim(-1, 1) * 2 - 1, height=32, width=32,
                        num_inference_steps=steps, guidance_scale=scale, controlnet_conditioning_scale=0.9,
                        generator=[torch.Generator().manual_seed(s) for s in seeds], output_type=output_type).images  # fmt: skip

    expected, expected_image = reference("latent"), torch.from_numpy(reference("np"))
    net = load_controlnet(files[version], dtype=torch.float32)
    context = control_context(vae, net.layout, image=control_images, inpaint=pictures, mask=masks)
    assert context.shape == (2, 33, 16, 16)
    cond, uncond = encoder.encode(prompts), encoder.encode(["", ""]) if scale > 0 else None
    latents = sample(transformer, noise((16, 16, 16), seeds), cond, uncond, sigmas(steps), scale,
                     control=Control(net, context, 0.9))  # fmt: skip
    assert (latents - expected).abs().max() <= 1e-4
    assert (vae.decode(vae.cfg.denormalize(latents)) - expected_image).abs().max() <= 2 / 255


def test_strength_and_range_decide_which_evaluations_see_the_control(components):
    _, _, files, (transformer, encoder, vae), _ = components
    net = load_controlnet(files["2.1"], dtype=torch.float32)
    context = control_context(vae, net.layout, image=images(11))
    cond, start, schedule = encoder.encode(["a cat"]), noise((16, 16, 16), [1]), sigmas(4)
    plain = sample(transformer, start, cond, schedule=schedule)
    for off in (Control(net, context, 0.0), Control(net, context, 1.0, (0.0, 0.0))):
        assert (sample(transformer, start, cond, schedule=schedule, control=off) - plain).abs().max() <= 1e-6
    calls = []

    def counting(*args, **kwargs):
        calls.append("control" in kwargs)
        return transformer(*args, **kwargs)

    counting.cfg, counting.device, counting.dtype = transformer.cfg, transformer.device, transformer.dtype
    high, low = control_range(0.0, 0.5)
    sample(counting, start, cond, schedule=schedule, control=Control(net, context, 1.0, (high, low)))
    # sigmas 1, 0.9, 0.75, 0.5 (shift 3); the first half of the process ends at shift(0.5) = 0.75
    assert calls == [bool(low <= s <= high) for s in schedule[:-1].tolist()] == [True, True, True, False]


def test_a_control_refits_to_other_latent_sizes_once_each_and_odd_sizes_pad_as_comfyui(components):
    """A ComfyUI graph may make latents of another size than the control image (ComfyUI's own control patch
    then re-encodes its image at the latent's size), odd sizes included (padded circularly to whole patches, as
    ComfyUI's NextDiT pads them: with one step, the padded run cropped is the odd run)."""
    _, _, files, (transformer, encoder, vae), _ = components
    net = load_controlnet(files["2.1"], dtype=torch.float32)
    picture, calls = images(11), []
    request = ControlRequest("", picture)

    def refit(h, w):
        calls.append((h, w))
        return control_context(vae, net.layout, *request.resized(w * 2, h * 2))

    control = Control(net, control_context(vae, net.layout, image=picture), 1.0, refit=refit)
    assert control.fitted((16, 16)) is control and not calls
    odd = control.fitted((15, 13))
    assert control.fitted((15, 13)).context is odd.context and calls == [(15, 13)]
    assert tuple(odd.context.shape[2:]) == (15, 13)
    cond, start = encoder.encode(["a cat"]), noise((16, 15, 13), [3])
    got = sample(transformer, start, cond, schedule=sigmas(1), control=odd)
    pad = lambda x: torch.nn.functional.pad(x, (0, 1, 0, 1), mode="circular")
    whole = sample(transformer, pad(start), cond, schedule=sigmas(1), control=Control(net, pad(odd.context), 1.0))
    assert (got - whole[..., :15, :13]).abs().max() <= 1e-5
    plain = sample(transformer, start, cond, schedule=sigmas(1))
    assert (got - plain).abs().max() > 1e-3  # the control acted


def test_inputs_that_do_not_fit_are_refused_clearly(components):
    _, _, files, (transformer, encoder, vae), root = components
    v1 = load_controlnet(files["1.0"], dtype=torch.float32)
    with pytest.raises(ValueError, match=r"\(1.0\) cannot inpaint: use a 2.0 or 2.1"):
        control_context(vae, v1.layout, image=images(1), inpaint=images(2), mask=torch.ones(1, 32, 32))
    v21 = load_controlnet(files["2.1"]).layout
    with pytest.raises(ValueError, match="give them one size"):
        control_context(vae, v21, image=images(1), inpaint=images(2, size=48))
    keep_all = control_context(vae, v21, inpaint=images(2), mask=torch.zeros(1, 32, 32))
    loaded_without_alpha = control_context(vae, v21, inpaint=images(2), mask=torch.zeros(1, 64, 64))  # resized
    assert (loaded_without_alpha - keep_all).abs().max() <= 1e-6
    wrong_size = Control(v1, control_context(vae, v1.layout, image=images(1, size=48)))
    with pytest.raises(ValueError, match="resize the control image"):
        sample(transformer, noise((16, 16, 16), [0]), encoder.encode(["a"]), schedule=sigmas(2), control=wrong_size)
    flux = write_file(root / "flux_controlnet.safetensors", {"controlnet_blocks.0.weight": torch.zeros(4, 4),
                                                             "double_blocks.0.img_attn.qkv.weight": torch.zeros(4, 4)})  # fmt: skip
    lora = write_file(
        root / "style_lora.safetensors", {"lora_unet_layers_0_attention_qkv.lora_down.weight": torch.zeros(2, 4)}
    )
    for path, what in ((flux, "a Flux transformer"), (lora, "a LoRA"), (root / "transformer", "a Z-Image transformer")):
        with pytest.raises(CheckpointError, match=f"not a Z-Image Fun ControlNet: it looks like {what}"):
            load_controlnet(path)


def test_generate_command_follows_a_control_image_and_inpaints(components, tmp_path, capsys):
    """`generate --control --control-model` with the 2.1 inpaint inputs equals diffusers' inpaint pipeline (with the
    authors' refiner hints); the size comes from the control image, the strength and range go to the PNG."""
    parts, nets, files, _, root = components
    pictures = {name: (images(seed) * 255).round() / 255 for name, seed in (("control", 12), ("inpaint", 13))}
    mask = (torch.rand(1, 32, 32, generator=torch.Generator().manual_seed(14)) > 0.5).float()
    for name, x in pictures.items():
        Image.fromarray((x[0] * 255).byte().numpy()).save(tmp_path / f"{name}.png")
    Image.fromarray((mask[0] * 255).byte().numpy()).save(tmp_path / "mask.png")
    out = tmp_path / "out.png"
    assert main(["generate", "--prompt", "a red fox", "--model", str(root), "--steps", "3", "--cfg", "1",
                 "--seed", "21", "--dtype", "fp32", "--control", str(tmp_path / "control.png"),
                 "--control-model", str(files["2.1"]), "--control-strength", "0.8",
                 "--control-inpaint", str(tmp_path / "inpaint.png"), "--control-mask", str(tmp_path / "mask.png"),
                 "--out", str(out)]) == 0  # fmt: skip
    pipe = ZImageControlNetInpaintPipeline(**parts, controlnet=nets["2.1"])
    with authors_refiner(pipe):
        expected = pipe(["a red fox"], image=pictures["inpaint"].movedim(-1, 1) * 2 - 1, mask_image=mask[:, None],
                        control_image=pictures["control"].movedim(-1, 1) * 2 - 1, height=32, width=32,
                        num_inference_steps=3, guidance_scale=0.0, controlnet_conditioning_scale=0.8,
                        generator=[torch.Generator().manual_seed(21)], output_type="np").images  # fmt: skip
    with Image.open(out) as png:
        made = torch.from_numpy(np.asarray(png, dtype=np.float32) / 255)
        params = json.loads(png.text["parameters"])
    assert made.shape == (32, 32, 3) and (made - torch.from_numpy(expected[0])).abs().max() <= 2 / 255 + 1 / 510
    assert params["control"]["strength"] == 0.8 and params["control"]["range"] == [0.0, 1.0]
    assert main(["generate", "--prompt", "a", "--model", str(root), "--control", str(tmp_path / "control.png"),
                 "--out", str(out)]) != 0  # fmt: skip
    assert "need --control-model: the ControlNet file" in capsys.readouterr().err


def test_fp8_and_bf16_files_predict_as_the_values_they_hold(components, tmp_path):
    """An fp8 file stays fp8 in memory (cast per call) and predicts as an fp32 file of the same rounded values."""
    _, nets, _, (transformer, encoder, vae), _ = components
    sd = released_tensors(nets["2.1"], "2.1")
    fp8 = {k: v.to(torch.float8_e4m3fn) if v.dim() == 2 else v for k, v in sd.items()}
    held = load_controlnet(write_file(tmp_path / "fp8.safetensors", fp8), dtype=torch.float32)
    same = load_controlnet(write_file(tmp_path / "fp32.safetensors", {k: v.float() for k, v in fp8.items()}),
                           dtype=torch.float32)  # fmt: skip
    assert held.control_layers[0].attention.qkv.weight.dtype == torch.float8_e4m3fn
    bf16 = load_controlnet(write_file(tmp_path / "bf16.safetensors", {k: v.bfloat16() for k, v in sd.items()}))
    assert bf16.control_layers[0].attention.qkv.weight.dtype == torch.bfloat16 and bf16.info.version == "2.1"
    context = control_context(vae, held.layout, image=images(15))
    cond, start = encoder.encode(["a cat"]), noise((16, 16, 16), [2])
    a, b = (sample(transformer, start, cond, schedule=sigmas(3), control=Control(n, context)) for n in (held, same))
    assert (a - b).abs().max() <= 1e-5
