"""The `/prompt` client: overrides, and its protocol behaviour against a stand-in HTTP server (retries, back-off,
auth, bounded concurrency, history fallback). Against real ComfyUI servers it runs in test_server.py."""

import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from zimage_core.client import Client, ServerError, job_prompt, parse_set, run_job

ROOT = Path(__file__).parents[1]
WORKFLOW = json.loads((ROOT / "workflows/api/zimage_base_text_to_image.json").read_text())
PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 32


def test_set_values_are_json_when_they_parse():
    assert parse_set("5.steps=12") == ("5", "steps", 12)
    assert parse_set("5.cfg=4.5") == ("5", "cfg", 4.5)
    assert parse_set('4.text=a "quoted" cat') == ("4", "text", 'a "quoted" cat')
    assert parse_set('4.text="12"') == ("4", "text", "12")
    with pytest.raises(ValueError, match="NODE.INPUT=VALUE"):
        parse_set("steps=12")


def test_overrides_reach_their_inputs_and_name_what_is_wrong():
    graph = job_prompt(WORKFLOW, [("5", "steps", 12)], prompt="一只猫", seed=7, size=(512, 768))
    assert graph["5"]["inputs"]["steps"] == 12 and graph["5"]["inputs"]["seed"] == 7
    assert (graph["5"]["inputs"]["width"], graph["5"]["inputs"]["height"]) == (512, 768)
    assert graph["4"]["inputs"]["text"] == "一只猫" and graph["9"]["inputs"]["text"] != "一只猫"  # not the negative
    assert WORKFLOW["5"]["inputs"]["steps"] == 30  # the workflow itself is untouched
    with pytest.raises(ValueError, match="no node '42'"):
        job_prompt(WORKFLOW, [("42", "steps", 1)])
    with pytest.raises(ValueError, match="has no input 'stepz'"):
        job_prompt(WORKFLOW, [("5", "stepz", 1)])
    two_prompts = {k: v for k, v in WORKFLOW.items()}
    two_prompts["9"] = dict(WORKFLOW["9"], _meta={"title": "Style"})
    with pytest.raises(ValueError, match="--prompt-field"):
        job_prompt(two_prompts, [], prompt="x")
    assert job_prompt(two_prompts, [], prompt="x", prompt_field=("9", "text"))["9"]["inputs"]["text"] == "x"


class Stub(BaseHTTPRequestHandler):
    """A ComfyUI stand-in: /prompt queues (400 for prompts whose seed is 13), jobs finish after `delay`."""

    state: dict

    def log_message(self, *args):
        pass

    def reply(self, code, body, kind="application/json"):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        s = self.state
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with s["lock"]:
            s["auth"].append(self.headers.get("Authorization"))
            s["posts"] += 1
            if body["prompt"]["5"]["inputs"]["seed"] == 13:
                error = {"type": "value_smaller_than_min", "message": "Value smaller than min", "details": "steps"}
                return self.reply(400, {"error": {"message": "Prompt outputs failed validation"},
                                        "node_errors": {"5": {"errors": [error], "class_type": "ZImageSampler"}}})  # fmt: skip
            prompt_id = f"p{s['posts']}"
            s["started"][prompt_id] = time.monotonic()
            s["in_flight"] += 1
            s["most"] = max(s["most"], s["in_flight"])
        self.reply(200, {"prompt_id": prompt_id, "number": 0, "node_errors": {}})

    def do_GET(self):
        s = self.state
        if self.path.startswith("/view"):
            return self.reply(200, PNG, "image/png")
        prompt_id = self.path.rsplit("/", 1)[1]
        with s["lock"]:
            started = s["started"].get(prompt_id)
            if started is None or time.monotonic() - started < s["delay"]:
                return self.reply(200, {})
            if prompt_id not in s["done"]:
                s["done"].add(prompt_id)
                s["in_flight"] -= 1
        image = {"filename": f"{prompt_id}.png", "subfolder": "", "type": "output"}
        self.reply(200, {prompt_id: {"status": {"status_str": "success", "completed": True, "messages": []},
                                     "outputs": {"7": {"images": [image]}}}})  # fmt: skip


@pytest.fixture
def stub():
    state = {"lock": threading.Lock(), "auth": [], "posts": 0, "started": {}, "done": set(), "in_flight": 0,
             "most": 0, "delay": 0.3}  # fmt: skip
    handler = type("Handler", (Stub,), {"state": state})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server, state
    server.shutdown()


def test_jobs_run_with_bounded_concurrency_and_a_log_line_each(stub, tmp_path):
    server, state = stub
    client = Client(f"127.0.0.1:{server.server_port}", token="secret", retries=0, poll=0.05)  # no websocket
    lock = threading.Lock()
    jobs = [job_prompt(WORKFLOW, [], prompt=f"prompt {i}", seed=100 + i) for i in range(6)]
    with open(tmp_path / "jobs.jsonl", "w") as log, ThreadPoolExecutor(2) as pool:
        done = list(pool.map(lambda j: run_job(client, j[0], j[1], tmp_path, log, lock, True), enumerate(jobs)))
    assert done == [True] * 6 and state["most"] == 2 and state["auth"] == ["Bearer secret"] * 6
    records = [json.loads(line) for line in (tmp_path / "jobs.jsonl").read_text().splitlines()]
    assert sorted(r["seed"] for r in records) == list(range(100, 106))
    for r in records:
        assert r["error"] is None and r["prompt"].startswith("prompt ") and r["seconds"] >= 0.3
        assert Path(r["outputs"][0]).read_bytes() == PNG


def test_rejections_are_not_retried_and_name_the_node(stub):
    server, state = stub
    client = Client(f"127.0.0.1:{server.server_port}", retries=3, backoff=0.01)
    with pytest.raises(ServerError, match=r"node 5 \(ZImageSampler\): Value smaller than min: steps") as e:
        client.queue(job_prompt(WORKFLOW, [], seed=13))
    assert state["posts"] == 1 and e.value.details["node_errors"]["5"]["class_type"] == "ZImageSampler"


def test_connection_errors_are_retried_with_backoff():
    port = ThreadingHTTPServer(("127.0.0.1", 0), Stub).server_address[1]  # bound, closed: refuses connections
    client = Client(f"127.0.0.1:{port}", retries=3, backoff=0.05)
    start = time.monotonic()
    with pytest.raises(ConnectionError, match="after 3 retries"):
        client.call("/prompt", {"prompt": {}})
    assert time.monotonic() - start >= 0.05 + 0.1 + 0.2


def test_a_server_coming_up_late_is_reached_by_retrying(tmp_path):
    state = {"lock": threading.Lock(), "auth": [], "posts": 0, "started": {}, "done": set(), "in_flight": 0,
             "most": 0, "delay": 0}  # fmt: skip
    server = ThreadingHTTPServer(("127.0.0.1", 0), type("Handler", (Stub,), {"state": state}))
    port = server.server_address[1]
    server.server_close()

    def later():
        time.sleep(0.4)
        nonlocal server
        server = ThreadingHTTPServer(("127.0.0.1", port), type("Handler", (Stub,), {"state": state}))
        server.serve_forever()

    threading.Thread(target=later, daemon=True).start()
    client = Client(f"127.0.0.1:{port}", retries=6, backoff=0.1)
    assert client.queue(job_prompt(WORKFLOW, [], seed=1)) == "p1"
    server.shutdown()


def test_command_line_errors_exit_2_and_rejections_exit_1(stub, tmp_path):
    server, _ = stub
    cli = [sys.executable, "-m", "zimage_core.client"]
    ui = Path(__file__).parents[1] / "workflows" / "zimage_turbo_text_to_image.json"
    result = subprocess.run([*cli, str(ui)], capture_output=True, text=True, check=False, cwd=ROOT)
    assert result.returncode == 2 and "not an API-format workflow" in result.stderr
    api = Path(__file__).parents[1] / "workflows" / "api" / "zimage_base_text_to_image.json"
    result = subprocess.run(
        [*cli, str(api), "--set", "5.nope=1"], capture_output=True, text=True, check=False, cwd=ROOT
    )
    assert result.returncode == 2 and "has no input 'nope'" in result.stderr
    result = subprocess.run([*cli, str(api), "--server", f"127.0.0.1:{server.server_port}", "--seed", "13",
                             "--out", str(tmp_path)], capture_output=True, text=True, check=False, cwd=ROOT)  # fmt: skip
    assert result.returncode == 1 and "Value smaller than min" in result.stderr
    record = json.loads((tmp_path / "jobs.jsonl").read_text())
    assert record["error"]["node_errors"]["5"]["class_type"] == "ZImageSampler" and record["prompt_id"] is None


def test_the_client_never_imports_torch():
    code = "import sys, zimage_core.client; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
