import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

import comfyui
from helpers import SMALL, reference_transformer, write_diffusers_folder


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """Max absolute error relative to the reference's largest magnitude."""
    return ((ours.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


@pytest.fixture(scope="session")
def small_ref():
    """diffusers' transformer in the SMALL config (real head size and RoPE) with seeded random weights."""
    return reference_transformer(SMALL, seed=1)


@pytest.fixture(scope="session")
def small_folder(small_ref, tmp_path_factory):
    """The SMALL reference saved by diffusers as a sharded folder with an index."""
    return write_diffusers_folder(tmp_path_factory.mktemp("small") / "transformer", small_ref, "300KB")


# ---- real ComfyUI servers (tests/comfyui.py); every test using `server` is marked `server` ----


def pytest_collection_modifyitems(config, items):
    """Mark server tests; a test marked `hosts(...)` runs only against those versions (the rest are deselected)."""
    kept, dropped = [], []
    for item in items:
        if "server" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.server)
        only = item.get_closest_marker("hosts")
        version = getattr(item, "callspec", None) and item.callspec.params.get("server")
        (dropped if only and version not in only.args else kept).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


def pytest_terminal_summary(terminalreporter):
    """The hardening tests' figures per host (cases, fuzz, RSS drift, interrupts), for the record."""
    for version, rows in comfyui.REPORT.items():
        terminalreporter.write_line(f"ComfyUI {version}:")
        for key, value in rows.items():
            terminalreporter.write_line(f"  {key}: {value}")


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    comfyui.write_models(folder)
    return folder


@pytest.fixture(scope="session", params=comfyui.versions())
def server(request, models, tmp_path_factory):
    """One server per supported ComfyUI version, one after another (pytest groups the tests by version)."""
    try:
        checkout = comfyui.host(request.param)
    except comfyui.NoHost as e:
        if comfyui.in_ci():
            pytest.fail(f"CI=true: ComfyUI {request.param} is required: {e}")
        pytest.skip(f"ComfyUI {request.param}: {e}")
    base = tmp_path_factory.mktemp(f"comfyui-{request.param}")
    server = comfyui.Server(checkout, base, models).start(extra=["--preview-method", "latent2rgb"])
    yield server
    server.stop()


@pytest.fixture
def client(server):
    from zimage_core.client import Client

    client = Client(server.url, retries=2, backoff=0.2)
    client.listen()
    yield client
    client.close()
