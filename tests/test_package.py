"""The pack as ComfyUI, the Comfy Registry and Manager see it."""

import ast
import hashlib
import re
import subprocess
import sys
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).parents[1]
HOST_MODULES = {"comfy", "comfy_extras", "comfy_api", "folder_paths", "server", "nodes", "execution", "latent_preview"}


def test_pyproject_for_the_registry():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    meta = project["project"]
    assert meta["name"] == "comfyui-zimage" and meta["version"] and meta["urls"]["Repository"]
    deps = " ".join(meta["dependencies"])
    for needed in ("safetensors", "transformers", "numpy", "pillow", "tqdm"):
        assert needed in deps
    assert "torch" not in deps and "diffusers" not in deps
    assert any(d.startswith("diffusers==") for d in meta["optional-dependencies"]["test"])
    assert {"PublisherId", "DisplayName", "Icon"} <= project["tool"]["comfy"].keys()


def test_the_floors_run_installs_exactly_the_declared_floors():
    """.ci/run tests the lowest versions promised: tests/floors.txt must pin each dependency at its floor."""
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    floors = dict(line.split("==") for line in (ROOT / "tests" / "floors.txt").read_text().splitlines()
                  if line and not line.startswith("#"))  # fmt: skip
    release = lambda v: tuple(int(p) for p in v.split(".")) + (0,) * (3 - v.count(".") - 1)
    for dep in declared:
        name, floor = dep.split(">=")
        assert release(floors[name]) == release(floor), (name, floors.get(name), floor)
    assert (ROOT / "requirements.txt").read_text().split("\n", 1)[1].split() == declared


def test_requirements_leave_torch_to_the_host():
    lines = [line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    names = {line.split(">")[0].split("=")[0].split("<")[0] for line in lines if line}
    assert names == {"safetensors", "transformers", "numpy", "pillow", "tqdm"}


def test_pack_imports_without_comfyui_and_without_torch():
    """Loaded the way ComfyUI loads a pack (a package from its folder's __init__.py), with no host present."""
    code = f"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location("zimage_pack", {str(ROOT / "__init__.py")!r},
                                              submodule_search_locations=[{str(ROOT)!r}])
pack = importlib.util.module_from_spec(spec)
sys.modules["zimage_pack"] = pack
spec.loader.exec_module(pack)
assert not hasattr(pack, "NODE_CLASS_MAPPINGS"), "a NODE_CLASS_MAPPINGS hides the V3 comfy_entrypoint from ComfyUI"
assert "torch" not in sys.modules, "importing the pack pulled in torch"
"""
    result = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


def test_core_never_imports_the_host():
    for path in (ROOT / "zimage_core").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            for name in names:
                assert name.split(".")[0] not in HOST_MODULES, f"{path}: imports {name}"


def shipped() -> list[str]:
    """The files of the Registry archive: tracked (and new, unignored) files minus `.comfyignore`."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
    ignored = [line for line in (ROOT / ".comfyignore").read_text().splitlines() if line and line[0] != "#"]
    return [f for f in listed if (ROOT / f).is_file() and not any(f == i or f.startswith(i) for i in ignored)]


NETWORK = {"socket", "urllib", "http", "requests", "aiohttp", "websocket", "websockets", "httpx", "ftplib"}


def test_shipped_files_never_unpickle_exec_install_or_touch_the_network():
    files = shipped()
    assert not any(f.startswith("zimage_core/client/") for f in files)
    assert not any(f.startswith(("tests/", "bench/")) for f in files)
    assert {"__init__.py", "nodes/sampler.py", "zimage_core/sampling.py", "pyproject.toml"} <= set(files)
    for path in (ROOT / f for f in files if f.endswith(".py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                func = ast.unparse(node.func)
                assert func not in {"eval", "exec", "torch.load", "pickle.load", "pickle.loads"}, f"{path}: {func}"
                runs = func.startswith(("subprocess.", "os.exec", "os.spawn", "pip.")) or func in {
                    "os.system",
                    "os.popen",
                }
                assert not runs, f"{path}: {func} (no programs or installs at run time)"
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            for name in names:
                assert name.split(".")[0] not in NETWORK, f"{path}: imports {name} (network code is flagged)"


def test_the_tokenizer_ships_with_the_pack():
    """ComfyUI's single text-encoder file has no tokenizer: the pack's own copy must be in every install form."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "qwen_tokenizer/*" in project["tool"]["setuptools"]["package-data"]["zimage_core"]
    files = shipped()
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        assert f"zimage_core/qwen_tokenizer/{name}" in files
        assert (ROOT / "zimage_core" / "qwen_tokenizer" / name).stat().st_size > 1000
    assert "zimage_core/qwen_tokenizer/PROVENANCE.md" in files


def test_the_tokenizer_provenance_note_gives_every_files_checksum():
    folder = ROOT / "zimage_core" / "qwen_tokenizer"
    note = (folder / "PROVENANCE.md").read_text(encoding="utf-8")
    rows = {name: (int(size), digest) for name, size, digest in
                re.findall(r"^\| `([^`]+)` \| (\d+) \| `([0-9a-f]{64})` \|$", note, re.MULTILINE)}  # fmt: skip
    assert "Apache License 2.0" in note and "Source" in note
    assert rows.keys() == {p.name for p in folder.iterdir() if p.name != "PROVENANCE.md"}
    for name, (size, digest) in rows.items():
        data = (folder / name).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (size, digest), name


def test_workflows_ship_where_comfyui_lists_templates():
    files = shipped()
    templates = [f for f in files if f.startswith("workflows/") and f.count("/") == 1 and f.endswith(".json")]
    assert len(templates) >= 5 and all(f"workflows/api/{t.split('/')[1]}" in files for t in templates)


def test_each_host_group_runs_on_one_worker(tmp_path):
    """CI's time rests on `-n 2 --dist loadgroup` keeping each host's server tests on one worker (tests/conftest.py
    groups them): with pytest 9.2 and pytest-xdist 3.8 the groups were silently ignored and every worker started
    every host. The same hooks on stand-in `server` and `browser_host` fixtures, run under xdist: each host's tests
    on one worker, and each host's browser tests on one worker."""
    (tmp_path / "conftest.py").write_text(f"""
import importlib.util, sys
import pytest

sys.path.insert(0, {str(ROOT / "tests")!r})
spec = importlib.util.spec_from_file_location("suite_conftest", {str(ROOT / "tests" / "conftest.py")!r})
suite = importlib.util.module_from_spec(spec)
spec.loader.exec_module(suite)
pytest_itemcollected, pytest_collection_modifyitems = suite.pytest_itemcollected, suite.pytest_collection_modifyitems

@pytest.fixture(scope="session", params=["0.33.0", "0.8.0"])
def server(request):
    return request.param

@pytest.fixture(scope="module", params=["0.8.0"])
def browser_host(request):
    return "browser " + request.param
""")
    (tmp_path / "test_groups.py").write_text("""
import os, pytest

@pytest.mark.parametrize("i", range(4))
def test_host(server, i, tmp_path_factory):
    (tmp_path_factory.getbasetemp().parent / f"{server}-{i}").write_text(os.environ["PYTEST_XDIST_WORKER"])

@pytest.mark.parametrize("i", range(4))
def test_in_a_browser(browser_host, i, tmp_path_factory):
    (tmp_path_factory.getbasetemp().parent / f"{browser_host}-{i}").write_text(os.environ["PYTEST_XDIST_WORKER"])

@pytest.mark.parametrize("i", range(4))
def test_other(i):
    pass
""")
    base = tmp_path / "run"
    args = ["-q", "-n", "2", "--dist", "loadgroup", "-p", "no:cacheprovider", f"--basetemp={base}", str(tmp_path)]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", *args], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout[-3000:]
    groups = ("0.33.0", "0.8.0", "browser 0.8.0")
    workers = {group: {(base / f"{group}-{i}").read_text() for i in range(4)} for group in groups}
    assert all(len(names) == 1 for names in workers.values()), workers
