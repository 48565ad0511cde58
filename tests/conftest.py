import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

import comfyui
from helpers import SMALL, reference_transformer, write_diffusers_folder


def share_the_cores():
    """Under pytest-xdist each worker, and the servers and scripts it starts, computes on its share of the cores
    (`OMP_NUM_THREADS`, unless set). Two workers of two threads each on two cores spend their time in OpenMP
    barriers: measured here, two runs of the ControlNet parity tests side by side took 165 s each, against 30 s
    with one thread each (17 s alone with two)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cores // workers)))
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


share_the_cores()


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


def pytest_itemcollected(item):
    """Mark the tests that need a host (a server, or a checkout to run a script in), and group each host's server
    tests for pytest-xdist (under -n: one worker, the host started once; a script in a checkout runs on any worker);
    here, before any `pytest_collection_modifyitems`, since xdist's reads the groups there."""
    if {"server", "checkout"} & set(getattr(item, "fixturenames", ())):
        item.add_marker(pytest.mark.server)
    params = item.callspec.params if hasattr(item, "callspec") else {}
    if params.get("server"):
        item.add_marker(pytest.mark.xdist_group(f"ComfyUI {params['server']}"))
    elif params.get("browser_host"):  # tests/test_browser.py: its own server and page per host
        item.add_marker(pytest.mark.xdist_group(f"browser {params['browser_host']}"))


@pytest.hookimpl(trylast=True)  # after pytest has grouped the items by host
def pytest_collection_modifyitems(config, items):
    """A test (or a parameter) marked `hosts(...)` runs only against those versions (the rest are deselected). What
    depends on the host runs on every host; what only our code decides runs on the newest. The hosts' tests go first
    (a stable sort: each host's stay together), so under -n the longest groups start first and the short tests fill
    in beside them."""
    kept, dropped = [], []
    for item in items:
        params = item.callspec.params if hasattr(item, "callspec") else {}
        version = params.get("server", params.get("checkout"))
        only = [set(mark.args) for mark in item.iter_markers("hosts")]  # the test's and its parameter's
        (dropped if any(version not in hosts for hosts in only) else kept).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    items[:] = sorted(kept, key=lambda item: item.get_closest_marker("server") is None)


@pytest.fixture(autouse=True)
def one_heavy_test_at_a_time(request, tmp_path_factory):
    """Tests marked `heavy` hold gigabytes (real-width slices, a full-size text encoder): under -n two of them at once
    would page a 24 GB machine to a crawl, so they take turns (a lock in the run's shared temporary folder)."""
    if request.node.get_closest_marker("heavy") is None:
        yield
        return
    from filelock import FileLock

    with FileLock(tmp_path_factory.getbasetemp().parent / "heavy-tests.lock"):
        yield


REPORTED: dict[str, dict[str, str]] = {}  # comfyui.REPORT as the reports bring it, from this process or a worker


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """The figures travel with the test's report: under pytest-xdist the summary is printed by another process."""
    outcome = yield
    if call.when == "teardown" and comfyui.REPORT:
        outcome.get_result().user_properties.append(("comfyui", {k: dict(v) for k, v in comfyui.REPORT.items()}))


def pytest_runtest_logreport(report):
    for name, value in report.user_properties:
        if name == "comfyui":
            for version, rows in value.items():
                REPORTED.setdefault(version, {}).update(rows)


def pytest_terminal_summary(terminalreporter):
    """The hardening tests' figures per host (cases, fuzz, RSS drift, interrupts), for the record."""
    for version, rows in REPORTED.items():
        terminalreporter.write_line(f"ComfyUI {version}:")
        for key, value in rows.items():
            terminalreporter.write_line(f"  {key}: {value}")


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    comfyui.write_models(folder)
    return folder


def host_or_skip(version: str):
    """ComfyUI `version`'s checkout; without one the test is skipped with the reason, or fails under CI=true."""
    try:
        return comfyui.host(version)
    except comfyui.NoHost as e:
        if comfyui.in_ci():
            pytest.fail(f"CI=true: ComfyUI {version} is required: {e}")
        pytest.skip(f"ComfyUI {version}: {e}")


@pytest.fixture(scope="session", params=comfyui.versions())
def checkout(request):
    """Each supported ComfyUI version's checkout, for the tests that run a script in the host's own python."""
    return comfyui.Checkout(host_or_skip(request.param))


@pytest.fixture(scope="session", params=comfyui.versions())
def server(request, models, tmp_path_factory):
    """One server per supported ComfyUI version, one after another (pytest groups the tests by version)."""
    base = tmp_path_factory.mktemp(f"comfyui-{request.param}")
    server = comfyui.Server(host_or_skip(request.param), base, models)
    server = server.start(extra=["--preview-method", "latent2rgb"])
    yield server
    server.stop()


@pytest.fixture
def client(server):
    from zimage_core.client import Client

    client = Client(server.url, retries=2, backoff=0.2)
    client.listen()
    yield client
    client.close()
