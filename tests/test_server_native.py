"""Our MODEL and CONDITIONING among native nodes in real ComfyUI servers (0.33.0, 0.8.0, 0.3.64), and our models in
each host's own python with no server (the tests taking `checkout`: any pytest-xdist worker runs them)."""

from __future__ import annotations

import json
import subprocess
import time

import numpy as np
import pytest
import torch
from comfyui import (
    FULL_WIDTH_VAE,
    NEWEST,
    REPORT,
    ROOT,
    SIZE,
    run,
    saved,
    write_full_qwen3,
    write_wide_caption_transformer,
)
from PIL import Image

from zimage_core.client import failure

STEPS, SEED = 4, 21


def graph(
    sampler: str = "native",
    lora: float | None = None,
    sampler_name: str = "euler",
    method: str = "official",
    variety: float = 0.0,
) -> dict:
    """Our loaders and Text Encode; then KSampler and native VAE Decode, or our sampler (the same schedule:
    ComfyUI's `simple` on shift 3 is the official one) with the same decode. fp32 throughout."""
    width, height = SIZE
    nodes = {
        "1": {"class_type": "ZImageTransformerLoader",
              "inputs": {"name": "z_image_turbo_bf16.safetensors", "weight_dtype": "fp32", "device": "default"}},
        "2": {"class_type": "ZImageTextEncoderLoader",
              "inputs": {"name": "qwen_3_4b.safetensors", "weight_dtype": "fp32", "device": "default"}},
        "3": {"class_type": "ZImageTextEncode",
              "inputs": {"text_encoder": ["2", 0], "text": "a lighthouse in a storm", "max_length": 512}},
        "4": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["3", 0]}},
        "5": {"class_type": "EmptySD3LatentImage", "inputs": {"width": width, "height": height, "batch_size": 1}},
        "7": {"class_type": "VAELoader", "inputs": {"vae_name": FULL_WIDTH_VAE}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["7", 0]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": sampler}},
    }  # fmt: skip
    model = ["1", 0]
    if lora is not None:
        nodes["10"] = {
            "class_type": "LoraLoaderModelOnly",
            "inputs": {"model": model, "lora_name": "zimage_lora.safetensors", "strength_model": lora},
        }
        model = ["10", 0]  # fmt: skip
    if sampler == "native":
        nodes["6"] = {"class_type": "KSampler", "inputs": {
            "model": model, "seed": SEED, "steps": STEPS, "cfg": 1.0, "sampler_name": sampler_name,
            "scheduler": "simple", "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["5", 0],
            "denoise": 1.0}}  # fmt: skip
    else:
        nodes["6"] = {"class_type": "ZImageSampler", "inputs": {
            "model": model, "positive": ["3", 0], "latent": ["5", 0], "seed": SEED, "steps": STEPS, "cfg": 1.0,
            "width": width, "height": height, "batch_size": 1, "denoise": 1.0, "shift": 3.0, "variety": variety,
            "method": method}}  # fmt: skip
    return nodes


def image(server, client, nodes: dict) -> np.ndarray:
    entry = run(client, nodes)
    assert failure(entry) is None, failure(entry)
    (out,) = saved(server, entry)
    return out.astype(int)


def test_native_ksampler_samples_our_model_as_our_sampler_does(server, client):
    """Our loader -> KSampler (euler, simple) -> native VAE Decode gives our sampler's image: the MODEL's time,
    sign, latent format and shift are ComfyUI's."""
    native, ours = image(server, client, graph("native")), image(server, client, graph("ours"))
    difference = np.abs(native - ours)
    assert ours.std() > 1 and difference.max() <= 2 and difference.mean() <= 0.05, (difference.max(), difference.mean())


def test_every_native_sampler_runs_our_model(server, client):
    """res_multistep (ComfyUI's Turbo template) and others run; they differ from euler, as samplers do."""
    euler = image(server, client, graph("native"))
    for name in ("res_multistep", "dpmpp_2m"):
        other = image(server, client, graph("native", sampler_name=name))
        assert other.std() > 1 and np.abs(other - euler).mean() > 0.1, name


def test_sampler_custom_advanced_and_model_sampling_aura_flow_drive_our_model(server, client):
    """SamplerCustomAdvanced (RandomNoise, BasicGuider, KSamplerSelect euler, BasicScheduler simple) behind
    ModelSamplingAuraFlow at our shift gives KSampler's image; another shift gives another image."""

    def custom(shift: float) -> dict:
        nodes = graph("native")
        nodes |= {
            "20": {"class_type": "ModelSamplingAuraFlow", "inputs": {"model": ["1", 0], "shift": shift}},
            "21": {"class_type": "BasicGuider", "inputs": {"model": ["20", 0], "conditioning": ["3", 0]}},
            "22": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
            "23": {"class_type": "BasicScheduler",
                   "inputs": {"model": ["20", 0], "scheduler": "simple", "steps": STEPS, "denoise": 1.0}},
            "24": {"class_type": "RandomNoise", "inputs": {"noise_seed": SEED}},
            "6": {"class_type": "SamplerCustomAdvanced", "inputs": {
                "noise": ["24", 0], "guider": ["21", 0], "sampler": ["22", 0], "sigmas": ["23", 0],
                "latent_image": ["5", 0]}},
        }  # fmt: skip
        return nodes

    ksampler, same, shifted = (
        image(server, client, graph("native")),
        image(server, client, custom(3.0)),
        image(server, client, custom(6.0)),
    )
    assert ksampler.std() > 1 and np.abs(same - ksampler).max() <= 1, np.abs(same - ksampler).max()
    assert np.abs(shifted - ksampler).mean() > 0.1


def test_our_sampler_gives_comfyuis_turbo_template_image_on_request(server, client):
    """method comfyui_template: our sampler gives what KSampler (res_multistep, simple, shift 3, ConditioningZeroOut
    negative) gives, and refuses what KSampler cannot do (seed variety) by name."""
    template = image(server, client, graph("ours", method="comfyui_template"))
    native = image(server, client, graph("native", sampler_name="res_multistep"))
    official = image(server, client, graph("ours"))
    assert template.std() > 1 and np.abs(template - native).max() <= 1, np.abs(template - native).max()
    assert np.abs(template - official).mean() > 0.1
    entry = run(client, graph("ours", method="comfyui_template", variety=0.5))
    assert "method comfyui_template" in failure(entry)["exception_message"]


def test_our_vae_converts_to_comfyuis_vae_without_loss(server, client):
    """Z-Image VAE to VAE: native VAE Decode with the converted VAE gives the image native VAE Decode gives with
    ComfyUI's own VAELoader on the same file, and our decoder's within 2/255."""
    nodes = graph("ours")
    nodes |= {
        "11": {"class_type": "ZImageVAELoader", "inputs": {"name": FULL_WIDTH_VAE, "weight_dtype": "default",
                                                            "device": "default"}},
        "12": {"class_type": "ZImageVAEToVAE", "inputs": {"vae": ["11", 0]}},
        "13": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["12", 0]}},
        "14": {"class_type": "SaveImage", "inputs": {"images": ["13", 0], "filename_prefix": "converted"}},
        "15": {"class_type": "ZImageVAEDecode", "inputs": {"vae": ["11", 0], "samples": ["6", 0], "tiled": "off"}},
        "16": {"class_type": "SaveImage", "inputs": {"images": ["15", 0], "filename_prefix": "ours_decode"}},
    }  # fmt: skip
    entry = run(client, nodes)
    assert failure(entry) is None, failure(entry)
    native, converted, ours = (
        np.asarray(Image.open(server.base / "output" / ref["subfolder"] / ref["filename"])).astype(int)
        for ref in (entry["outputs"][i]["images"][0] for i in ("9", "14", "16"))
    )
    assert native.std() > 1 and np.abs(converted - native).max() <= 1, np.abs(converted - native).max()
    assert np.abs(ours - native).max() <= 2, np.abs(ours - native).max()


def test_native_samplers_refuse_an_omni_model_by_name(server, client):
    """KSampler cannot carry reference images: an Omni/Edit MODEL under it fails naming the node to use."""
    nodes = graph("native")
    nodes["1"]["inputs"]["name"] = "z_image_omni_bf16.safetensors"
    error = failure(run(client, nodes))
    assert error["node_type"] == "KSampler" and "Z-Image Sampler" in error["exception_message"], error


def test_native_lora_loader_patches_our_model_and_both_samplers_see_it(server, client):
    """LoraLoaderModelOnly maps every key of a kohya-named LoRA onto our MODEL (no "lora key not loaded"), the
    image changes, both samplers give the patched model's image, and the unpatched model comes back after."""
    plain = image(server, client, graph("native"))
    patched = image(server, client, graph("native", lora=1.0))
    ours = image(server, client, graph("ours", lora=1.0))
    again = image(server, client, graph("native"))
    assert "lora key not loaded" not in server.tail(400)
    assert np.abs(patched - plain).mean() > 2, np.abs(patched - plain).mean()
    assert np.abs(patched - ours).max() <= 2
    assert np.abs(again - plain).max() <= 1


@pytest.mark.parametrize(
    "lora",
    [None, pytest.param("native", marks=pytest.mark.hosts(NEWEST)), pytest.param("ours", marks=pytest.mark.hosts(NEWEST))],
    ids=["plain", "native lora", "our lora"],
)  # every host's partial loading; LoRA patches under it are the host's and ours in test_server.py and below
def test_a_partial_load_gives_the_full_loads_output(checkout, models, lora):
    """In the host's own process: our MODEL loaded with a budget a third of its size (ComfyUI casts the other
    modules per call) predicts what the full load predicts, with and without a LoRA patched in: a fused-name one
    by the host's LoRA loader, or a split q/k/v one (patches at row offsets of qkv) by ours."""
    script = ROOT / "tests" / "partial_load.py"
    args = [checkout.python, str(script), str(ROOT), "transformer", str(models / "transformer.safetensors")]
    if lora:
        args += [str(models / ("lora.safetensors" if lora == "native" else "lora_split.safetensors")), lora]
    done = subprocess.run(args, cwd=checkout.host, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["lowvram_modules"] > 0 and result["partial_bytes"] < result["model_bytes"] / 2, result
    assert result["max_abs_diff"] <= 1e-5 * result["scale"], result
    if lora:
        assert result["lora_changed"] > 1e-3 * result["scale"], result


def test_quantized_models_stay_compact_inside_comfyui_and_take_loras(checkout, models, tmp_path):
    """In the host's own process, for int8 ConvRot, MXFP8 and NVFP4 (comfy-kitchen's quantizers) and GGUF Q8_0 and
    Q4_K (gguf-py's): the block weights stay in their stored form in the host's Linear, the prediction equals the
    same model on the reference-dequantized weights, a LoRA applies per call as it applies in place to those weights,
    a partial load gives the full load's result, and the LoRA leaves with its patcher (tests/quant_in_host.py)."""
    script = ROOT / "tests" / "quant_in_host.py"
    done = subprocess.run([checkout.python, str(script), str(ROOT), str(models), str(tmp_path)], cwd=checkout.host,
                          capture_output=True, text=True, timeout=600, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    REPORT.setdefault(checkout.version, {})["quantized inside the host (held/dense bytes; forward, LoRA rel. error)"] = (
        ", ".join(f"{k}: {r['held_bytes'] / r['dense_bytes']:.2f}; {r['forward']:.0e}, {r['lora']:.0e}"
                  for k, r in results.items())
    )  # fmt: skip
    storage = {
        "int8_tensorwise": "torch.int8",
        "mxfp8": "torch.float8_e4m3fn",
        "nvfp4": "torch.uint8",
        "GGUF": "torch.uint8",
    }
    assert len(results) == 5, results
    for label, r in results.items():
        assert r["compact_layers"] >= r["block_layers"] // 2 and r["held_bytes"] <= 0.6 * r["dense_bytes"], (label, r)
        assert r["stored_dtypes_after_lora"] == [storage[label.split()[0]]], (label, r)
        assert max(r["forward"], r["lora"], r["partial_lora"], r["after_unpatch"]) <= 1e-5, (label, r)
        assert r["lora_change"] > 0.02, (label, r)


@pytest.mark.parametrize("form", ["safetensors", pytest.param("GGUF Q8_0", marks=pytest.mark.hosts(NEWEST))])
def test_a_partial_load_of_our_text_encoder_gives_the_full_loads_features(checkout, models, tmp_path, form):
    """Our text encoder from the host's layers (its Linear, Embedding and RMSNorm), loaded partially (the host
    streaming the rest per call) at two budgets, encodes as the full load does, and as our own layers do; from a
    GGUF file (gguf-py's Q8_0, token embedding included) the host's Embedding holds the table in its blocks."""
    from helpers import QWEN3_SMALL, llama_cpp_names, write_gguf
    from safetensors.torch import load_file

    weights = models / "text_encoder.safetensors"
    if form != "safetensors":
        te = llama_cpp_names({k: v.float() for k, v in load_file(weights).items()}, QWEN3_SMALL["num_hidden_layers"])
        weights = write_gguf(tmp_path / "Qwen3-4B-Q8_0.gguf", te, lambda n: "Q8_0", "qwen3")[0]
    script = ROOT / "tests" / "partial_load.py"
    args = [checkout.python, str(script), str(ROOT), "text_encoder", str(weights)]
    done = subprocess.run(args, cwd=checkout.host, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["embedding"] == ("torch.float32" if form == "safetensors" else "torch.uint8"), result
    third, _ = result["loads"]  # budgets: a third of the size, and 1.5 times it (hosts decide differently)
    assert third["lowvram_modules"] > 0 and third["resident"] < result["model_bytes"] / 3, result
    assert any(load["lowvram_modules"] > 0 and load["resident"] > 0 for load in result["loads"]), result
    assert max(load["max_abs_diff"] for load in result["loads"]) <= 1e-5 * result["scale"], result
    assert result["host_vs_own"] <= 1e-5 * result["scale"], result


@pytest.mark.hosts("0.33.0")  # the host whose Linear and Embedding are built empty under dynamic VRAM
def test_our_models_load_under_dynamic_vram_and_cast_only_where_held_in_another_dtype(checkout, models):
    """0.33.0 turns dynamic VRAM on by default on NVIDIA GPUs, and then builds its Linear and Embedding without a
    weight for its own loader to fill: our transformer, text encoder and ControlNet, built from those layers, load
    and compute as they do without it (forced on here, on the CPU; tests/host_layers.py). Layers cast their weight
    per call only where it is held in another dtype than it computes in (fp8), as the host's `pick_operations`.
    The host's Linear takes the fp8 GEMMs as ours does; on a CPU the host gets none unasked."""
    script = ROOT / "tests" / "host_layers.py"
    done = subprocess.run([checkout.python, str(script), str(ROOT), str(models)], cwd=checkout.host,
                          capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["cast"] == 0 and result["fp8_cast"] == result["layers"] > 20, result
    assert result["control_parameters"][0] == result["control_parameters"][1] > 0, result
    assert max(result["plain"], result["fp8"], result["features"]) <= 1e-6, result
    assert 1e-3 < result["fp8_vs_plain"] < 0.2, result  # fp8 really held and computed from (about 5 % here)
    difference, taking = result["lowp_host_vs_ours"]
    assert difference <= 1e-5 and taking >= 15 and result["host_gemms_on_cpu"] == [], result


@pytest.mark.hosts(NEWEST, "0.3.64")  # the newest and the oldest flag handling
def test_comfyuis_dtype_flags_choose_our_loaders_default_dtypes(checkout, models):
    """--fp16-text-enc, --fp8_e4m3fn-text-enc, --bf16-vae: our loaders' `default` holds the weights in what the host
    picks for its own models under the same flags (fp8: the weights, with the layers' own compute dtype)."""
    script = ROOT / "tests" / "dtype_flags.py"
    seen = {}
    for flags in ((), ("fp16_text_enc", "bf16_vae"), ("fp8_e4m3fn_text_enc", "fp32_vae")):
        done = subprocess.run([checkout.python, str(script), str(ROOT), str(models), *flags], cwd=checkout.host,
                              capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        seen[flags] = result = json.loads(done.stdout.strip().splitlines()[-1])
        for component, picked in result.items():
            if flags:  # without flags ours are fp32 on CPU (the official dtype), the host's fp16 for encoders
                assert picked["host"] in picked["ours"], (flags, component, picked)
    assert seen[("fp16_text_enc", "bf16_vae")]["vae"]["ours"] == ["torch.bfloat16"]
    assert seen[()]["text_encoder"]["ours"] == seen[()]["vae"]["ours"] == ["torch.float32"]


@pytest.mark.heavy
@pytest.mark.hosts(NEWEST)  # the newest native NextDiT (0.8.0's too before CI outgrew its time)
def test_our_model_under_ksampler_equals_comfyuis_native_z_image(checkout, tmp_path):
    """One real-width slice file, loaded by ComfyUI's own loader (its NextDiT) and by ours, through the KSampler node
    in fp32: the same prediction and the same samples (euler; other samplers are the host's code), and the same kohya LoRA maps every key
    onto both and changes both the same way (tests/native_parity.py; q/k eps aligned); on ComfyUI's model, the same
    LoRA saved with split q/k/v names (musubi's) through the Z-Image LoRA Loader gives the host's result. The same slice quantized
    by comfy-kitchen in each format the host's loader knows predicts alike in both loaders: MXFP8 and NVFP4 to fp32
    rounding; int8 to the error of the host's activation quantization, which ours does not do (1e-2 measured)."""
    script = ROOT / "tests" / "native_parity.py"
    done = subprocess.run([checkout.python, str(script), str(ROOT), str(tmp_path)], cwd=checkout.host,
                          capture_output=True, text=True, timeout=900, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    keys = ("forward", "euler", "lora", "our_loader_split_on_native")
    REPORT.setdefault(checkout.version, {})[f"native parity (rel. error: {', '.join(keys)})"] = ", ".join(
        f"{result[k]:.1e}" for k in keys
    )
    assert result["host"] == checkout.version and result["native_class"] == "NextDiT", result
    assert result["keys_only_in_file"] == result["keys_only_in_native"] == 0 and result["eps_aligned"] == 12, result
    assert max(result[k] for k in ("forward", "euler", "lora")) <= 1e-5, result
    assert result["our_loader_split_on_native"] <= 1e-5, result  # a musubi LoRA by our loader = fused by the host's
    assert result["lora_unmatched_native"] == result["lora_unmatched_ours"] == 0 and result["lora_keys"] == 4, result
    assert result["lora_change"] > 0.02 and result["lora_delta"] <= 1e-4, result
    quantized = {k.removeprefix("quantized "): v for k, v in result.items() if k.startswith("quantized ")}
    expected = {"0.33.0": 3, "0.8.0": 1}[checkout.version]  # 0.8.0's QUANT_ALGOS has nvfp4 of these; 0.33.0 all three
    assert len(quantized) == expected, result
    for label, error in quantized.items():  # 0.33.0's int8 Linear also quantizes its input per token (W8A8);
        assert error <= (3e-2 if label.startswith("int8") else 1e-5), result  # ours dequantizes the weight only
    REPORT[checkout.version]["the same quantized file in ComfyUI's loader and ours (rel. error)"] = ", ".join(
        f"{k}: {v:.1e}" for k, v in quantized.items()
    )


@pytest.fixture(scope="session")
def full_encoder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("full-encoder")
    return write_full_qwen3(folder), write_wide_caption_transformer(folder)


def encoded_by(encoder: str, te_name: str, transformer_name: str) -> dict:
    """A prompt encoded by ComfyUI's CLIPLoader (lumina2) + CLIPTextEncode or by ours, then our sampler and the
    native decode; the latent is saved too."""
    if encoder == "native":
        loader = {"class_type": "CLIPLoader", "inputs": {"clip_name": te_name, "type": "lumina2"}}
        encode = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": "a lighthouse in a storm"}}
    else:
        loader = {"class_type": "ZImageTextEncoderLoader",
                  "inputs": {"name": te_name, "weight_dtype": "bf16", "device": "default"}}  # fmt: skip
        encode = {"class_type": "ZImageTextEncode",
                  "inputs": {"text_encoder": ["2", 0], "text": "a lighthouse in a storm", "max_length": 512}}  # fmt: skip
    return {
        "1": {"class_type": "ZImageTransformerLoader",
              "inputs": {"name": transformer_name, "weight_dtype": "fp32", "device": "default"}},
        "2": loader, "3": encode,
        "5": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 1}},
        "6": {"class_type": "ZImageSampler", "inputs": {
            "model": ["1", 0], "positive": ["3", 0], "latent": ["5", 0], "seed": SEED, "steps": STEPS, "cfg": 1.0,
            "width": 128, "height": 128, "batch_size": 1, "denoise": 1.0, "shift": 3.0, "variety": 0.0}},
        "7": {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": f"latents/{encoder}"}},
        "8": {"class_type": "VAELoader", "inputs": {"vae_name": FULL_WIDTH_VAE}},
        "9": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["8", 0]}},
        "10": {"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": encoder}},
    }  # fmt: skip


@pytest.mark.heavy
@pytest.mark.hosts(NEWEST)  # 0.3.64's CLIPLoader does not know Qwen3-4B; 0.8.0's is the same lumina2 path
def test_native_clip_text_encode_feeds_our_sampler(server, client, full_encoder):
    """A full-size qwen_3_4b file through ComfyUI's CLIPLoader (lumina2) and CLIPTextEncode, into our sampler, gives
    the image our own encoder gives from the same file: the same template, tokens and layer. ComfyUI runs its encoder
    in fp16 on CPU, ours runs in bf16 (the file's dtype); the rest in fp32. Models are freed after each prompt (8 GB each)."""
    from safetensors.torch import load_file

    for path, folder in zip(full_encoder, ("text_encoders", "diffusion_models"), strict=True):
        (server.base / "models" / folder / path.name).symlink_to(path)
    latents, images = {}, {}
    for encoder in ("native", "ours"):
        entry = run(client, encoded_by(encoder, *(p.name for p in full_encoder)), timeout=900)
        client.call("/free", {"unload_models": True, "free_memory": True})
        time.sleep(3)  # the server frees between prompts, when its queue is idle
        assert failure(entry) is None, failure(entry)
        (images[encoder],) = saved(server, entry)
        (ref,) = [r for out in entry["outputs"].values() for r in out.get("latents", [])]
        latents[encoder] = load_file(server.base / "output" / ref["subfolder"] / ref["filename"])["latent_tensor"]
    error = float((latents["ours"] - latents["native"]).abs().max() / latents["native"].abs().max())
    difference = np.abs(images["ours"].astype(int) - images["native"].astype(int))
    REPORT.setdefault(server.version, {})["CLIPTextEncode -> our sampler vs our encoder (latent rel. error, image)"] = (
        f"{error:.1e}, max {difference.max()}/255, mean {difference.mean():.2f}"
    )
    assert images["native"].std() > 1 and error <= 1e-2, error  # measured 9.5e-4 (native runs fp16 on CPU)
    assert difference.mean() <= 0.5, (difference.max(), difference.mean())


def test_our_lora_loader_gives_our_merged_weights_for_every_format(checkout, models, tmp_path):
    """In the host's own process: a LoRA file of each format (tests/test_lora.py writes them on the test models'
    diffusers layer names) through the Z-Image LoRA Loader's path (the host's adapters and ModelPatcher) predicts
    what `zimage_core.lora` merged into our transformer predicts (tests/lora_in_host.py)."""
    import torch
    from comfyui import small_transformer_config
    from diffusers import ZImageTransformer2DModel
    from helpers import write_file
    from test_lora import FORMATS, linears, lora_file

    with torch.device("meta"):
        layers = linears(ZImageTransformer2DModel(**small_transformer_config()))
    for fmt in FORMATS:
        write_file(tmp_path / f"{fmt.replace(' ', '_')}.safetensors", lora_file(fmt, layers, seed=5, deltas=False)[0])
    script = ROOT / "tests" / "lora_in_host.py"
    done = subprocess.run([checkout.python, str(script), str(ROOT), str(models / "transformer.safetensors"),
                           str(tmp_path)], cwd=checkout.host, capture_output=True, text=True, timeout=600, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])["formats"]
    REPORT.setdefault(checkout.version, {})["our LoRA loader vs zimage_core merge (rel. error / change)"] = ", ".join(
        f"{k}: {r['error']:.0e} / {r['change']:.2f}" for k, r in results.items()
    )
    assert len(results) == len(FORMATS), results
    for fmt, r in results.items():
        assert r["error"] <= 1e-5 and r["change"] > 0.01, (fmt, r)


TURBO_CONTROLNET = "Z-Image-Turbo-Fun-Controlnet-Union-2.1-2601-8steps.safetensors"


def controlled(sampler: str, size: int = 96) -> dict:
    """`graph(sampler)` at `size` with our MODEL through Z-Image ControlNet Apply, its control image (128 x 128)
    of another size than the latent, so the control is made again at the latent's size."""
    nodes = graph(sampler)
    nodes["5"]["inputs"] |= {"width": size, "height": size}
    if sampler != "native":
        nodes["6"]["inputs"] |= {"width": size, "height": size}
    nodes |= {
        "30": {"class_type": "ZImageControlNetLoader", "inputs": {"control_name": TURBO_CONTROLNET}},
        "31": {"class_type": "ZImageVAELoader",
               "inputs": {"name": "ae.safetensors", "weight_dtype": "default", "device": "default"}},
        "32": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
        "33": {"class_type": "ZImageControlNetApply", "inputs": {
            "model": ["1", 0], "controlnet": ["30", 0], "vae": ["31", 0], "strength": 0.75, "start_percent": 0.0,
            "end_percent": 0.45, "image": ["32", 0]}},
    }  # fmt: skip
    nodes["6"]["inputs"]["model"] = ["33", 0]
    return nodes


def test_ksampler_and_our_sampler_steer_our_model_alike_through_our_controlnet(server, client):
    """A controlled MODEL under KSampler (euler, simple) gives our sampler's controlled image: the control reaches
    the transformer through the host's sampling, is made again at the latent's size (96, the control image is
    128) and acts only within end_percent 0.45 (ComfyUI's percent_to_sigma under KSampler, our shift in ours)."""
    native, ours = image(server, client, controlled("native")), image(server, client, controlled("ours"))
    difference = np.abs(native - ours)
    assert ours.std() > 1 and difference.max() <= 2 and difference.mean() <= 0.05, (difference.max(), difference.mean())
    plain = graph("ours")
    plain["5"]["inputs"] |= {"width": 96, "height": 96}
    plain["6"]["inputs"] |= {"width": 96, "height": 96}
    assert np.abs(ours - image(server, client, plain)).mean() > 0.1


@pytest.fixture(scope="session")
def native_controlnet(tmp_path_factory):
    """A full-width Union 1.0 in the released names, sparse (zeros): ComfyUI's ModelPatchLoader builds its
    ControlNets at the released width only, and 0.8.0's knows 1.0 and 2.x, not lite."""
    from diffusers.models.controlnets.controlnet_z_image import ZImageControlNetModel
    from helpers import write_sparse

    with torch.device("meta"):
        net = ZImageControlNetModel(control_layers_places=list(range(0, 30, 5)), control_refiner_layers_places=[0, 1],
                                    control_in_dim=16)  # fmt: skip
    specs = {k: (tuple(v.shape), torch.bfloat16) for k, v in net.state_dict().items() if k.startswith("control_")}
    return write_sparse(tmp_path_factory.mktemp("lite") / "Z-Image-Turbo-Fun-Controlnet-Union.safetensors",
                        specs)  # fmt: skip


@pytest.mark.hosts("0.33.0", "0.8.0")  # 0.3.64 has no ZImageFunControlnet
def test_native_z_image_fun_controlnet_on_our_model_says_to_use_ours(server, client, native_controlnet):
    """ComfyUI's ZImageFunControlnet patches its own NextDiT's refiner and layer loop, which our transformer does
    not run: rather than sampling without the control, the MODEL refuses it and names our nodes."""
    (server.base / "models" / "model_patches" / native_controlnet.name).symlink_to(native_controlnet)
    nodes = graph("native")
    nodes |= {
        "40": {"class_type": "ModelPatchLoader", "inputs": {"name": native_controlnet.name}},
        "41": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
        "42": {"class_type": "ZImageFunControlnet", "inputs": {
            "model": ["1", 0], "model_patch": ["40", 0], "vae": ["7", 0], "strength": 1.0, "image": ["41", 0]}},
    }  # fmt: skip
    nodes["6"]["inputs"]["model"] = ["42", 0]
    entry = run(client, nodes, timeout=600)
    client.call("/free", {"unload_models": True, "free_memory": True})
    message = (failure(entry) or {}).get("exception_message", "")
    assert "ZImageFunControlnet" in message and "Z-Image ControlNet Apply" in message, failure(entry)
    assert server.get("/system_stats")  # still serving
