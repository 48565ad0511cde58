"""The `/prompt` client: overrides, and its protocol behaviour against a stand-in HTTP server (retries that never
queue a prompt twice, back-off, auth, bounded concurrency, history fallback, prompts that leave the queue). Against
real ComfyUI servers it runs in test_server.py and test_server_client.py."""

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
from zimage_core.client.__main__ import main as client_main

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
    before = json.dumps(WORKFLOW, sort_keys=True)
    graph = job_prompt(WORKFLOW, [("5", "steps", 12)], prompt="一只猫", seed=7, size=(512, 768))
    assert graph["5"]["inputs"]["steps"] == 12 and graph["5"]["inputs"]["seed"] == 7
    assert (graph["5"]["inputs"]["width"], graph["5"]["inputs"]["height"]) == (512, 768)
    assert graph["4"]["inputs"]["text"] == "一只猫" and graph["9"]["inputs"]["text"] != "一只猫"  # not the negative
    assert json.dumps(WORKFLOW, sort_keys=True) == before  # the workflow itself is untouched
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
    """A ComfyUI stand-in: /prompt queues under the client's id (400 for prompts whose seed is 13); like ComfyUI's
    one worker, it runs the queued prompts one after another, `delay` s each; /queue lists the running and pending
    ones and deletes on request, /history/ID has the finished ones. With `stall` s the answer to a /prompt comes
    that late (after the prompt was queued); with `stall_queue` s, so does every answer to GET /queue."""

    state: dict

    def log_message(self, *args):
        pass

    def reply(self, code, body, kind="application/json"):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        try:
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up waiting: the answer is lost
            pass

    def do_POST(self):
        s = self.state
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path == "/queue":
            with s["lock"]:
                for prompt_id in body.get("delete", []):
                    s["started"].pop(prompt_id, None)
            return self.reply(200, {})
        with s["lock"]:
            s["auth"].append(self.headers.get("Authorization"))
            s["posts"] += 1
            if body["prompt"]["5"]["inputs"]["seed"] == 13:
                error = {"type": "value_smaller_than_min", "message": "Value smaller than min", "details": "steps"}
                return self.reply(400, {"error": {"message": "Prompt outputs failed validation"},
                                        "node_errors": {"5": {"errors": [error], "class_type": "ZImageSampler"}}})  # fmt: skip
            prompt_id = body.get("prompt_id") or f"p{s['posts']}"
            s["started"][prompt_id] = max(time.monotonic(), s["free"])  # when the worker gets to it
            s["free"] = s["started"][prompt_id] + s["delay"]
            s["queued"].append(prompt_id)
        time.sleep(s.get("stall", 0))
        self.reply(200, {"prompt_id": prompt_id, "number": 0, "node_errors": {}})

    def finished(self, prompt_id) -> bool:
        started = self.state["started"].get(prompt_id)
        return started is not None and time.monotonic() - started >= self.state["delay"]

    def do_GET(self):
        s = self.state
        if self.path.startswith("/view"):
            return self.reply(200, PNG, "image/png")
        if self.path == "/queue":
            time.sleep(s.get("stall_queue", 0))
            with s["lock"]:
                now, held = time.monotonic(), [(t, i) for i, t in s["started"].items() if not self.finished(i)]
                running = [[0, i, {}, {}, []] for t, i in held if t <= now]
                pending = [[0, i, {}, {}, []] for t, i in held if t > now]
            return self.reply(200, {"queue_running": running, "queue_pending": pending})
        prompt_id = self.path.rsplit("/", 1)[1]
        with s["lock"]:
            if not self.finished(prompt_id):
                return self.reply(200, {})
        image = {"filename": f"{prompt_id}.png", "subfolder": "", "type": "output"}
        self.reply(200, {prompt_id: {"status": {"status_str": "success", "completed": True, "messages": []},
                                     "outputs": {"7": {"images": [image]}}}})  # fmt: skip


def stub_state(**extra) -> dict:
    return {"lock": threading.Lock(), "auth": [], "posts": 0, "started": {}, "queued": [], "free": 0.0, "delay": 0.3,
            **extra}  # fmt: skip


def serve(state: dict, port: int = 0) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer(("127.0.0.1", port), type("Handler", (Stub,), {"state": state}))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def stub():
    state = stub_state()
    server = serve(state)
    yield server, state
    server.shutdown()


def watch(server, seen: list, stop: threading.Event):
    """Ask the server what it holds every 10 ms, as an operator's dashboard would."""
    client = Client(f"127.0.0.1:{server.server_port}", retries=0)
    while not stop.is_set():
        queue = client.call("/queue")
        seen.append(len(queue["queue_running"]) + len(queue["queue_pending"]))
        time.sleep(0.01)


def test_concurrency_is_what_the_server_holds_at_most(stub, tmp_path):
    """`--concurrency 2` with six jobs: the server, watched from outside, never holds more than two of them."""
    server, state = stub
    seen, stop = [], threading.Event()
    watcher = threading.Thread(target=watch, args=(server, seen, stop))
    watcher.start()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"prompt {i}\n" for i in range(6)))
    api = ROOT / "workflows" / "api" / "zimage_base_text_to_image.json"
    code = client_main([str(api), "--server", f"127.0.0.1:{server.server_port}", "--prompts", str(prompts),
                        "--concurrency", "2", "--out", str(tmp_path / "out"), "--quiet"])  # fmt: skip
    stop.set()
    watcher.join()
    records = [json.loads(line) for line in (tmp_path / "out" / "jobs.jsonl").read_text().splitlines()]
    assert code == 0 and len(state["queued"]) == 6 and max(seen) == 2, (code, max(seen))
    assert sorted(r["prompt_id"] for r in records if r["error"] is None) == sorted(state["queued"])


@pytest.mark.parametrize("delay", [3600, 0], ids=["still-queued", "already-finished"])
def test_a_lost_answer_never_queues_the_prompt_twice(delay):
    """The server queues the prompt but its answer comes after the client gave up: asked, it says it has that id
    (in its queue, or already in its history), so the prompt is not sent a second time."""
    state = stub_state(stall=1.0, delay=delay)
    server = serve(state)
    client = Client(f"127.0.0.1:{server.server_port}", retries=3, backoff=0.05, timeout=0.3)
    start = time.monotonic()
    prompt_id = client.queue(job_prompt(WORKFLOW, [], seed=1))
    assert state["queued"] == [prompt_id] and state["posts"] == 1 and time.monotonic() - start < 1
    server.shutdown()


def test_a_server_that_cannot_be_asked_is_not_sent_the_prompt_again():
    """The answer to the POST is lost and the server cannot say whether it has the prompt: the client gives up
    with the prompt's id rather than risk a second job."""
    state = stub_state(stall=1.0, stall_queue=1.0, delay=3600)
    server = serve(state)
    client = Client(f"127.0.0.1:{server.server_port}", retries=2, backoff=0.05, timeout=0.3)
    with pytest.raises(ConnectionError, match="may have been queued: the server could not be asked") as e:
        client.queue(job_prompt(WORKFLOW, [], seed=1))
    assert state["posts"] == 1 and state["queued"][0] in str(e.value)
    server.shutdown()


def test_a_prompt_deleted_from_the_queue_ends_with_an_error(stub, tmp_path):
    server, state = stub
    state["delay"] = 3600  # nothing finishes by itself: one prompt runs, the others wait their turn
    client = Client(f"127.0.0.1:{server.server_port}", retries=0, poll=0.05)  # no websocket
    _, pending, deleted = (client.queue(job_prompt(WORKFLOW, [], seed=s)) for s in (1, 2, 3))
    client.call("/queue", {"delete": [deleted]})
    start = time.monotonic()
    with pytest.raises(ServerError, match="no longer queued, running or in the server's history"):
        client.wait(deleted, timeout=30)
    assert time.monotonic() - start < 2
    with pytest.raises(TimeoutError):  # a prompt still waiting its turn is not taken for gone
        client.wait(pending, timeout=0.5)

    def delete_once_queued():
        while len(state["queued"]) < 4:
            time.sleep(0.01)
        client.call("/queue", {"delete": [state["queued"][3]]})

    threading.Thread(target=delete_once_queued, daemon=True).start()
    with open(tmp_path / "jobs.jsonl", "w") as log:
        assert run_job(client, 0, job_prompt(WORKFLOW, [], seed=4), tmp_path, log, threading.Lock(), True) is False
    record = json.loads((tmp_path / "jobs.jsonl").read_text())
    assert record["error"]["error"]["type"] == "prompt_vanished" and record["prompt_id"] == state["queued"][3]
    assert "no longer queued" in record["error"]["message"]


def test_a_prompt_pending_behind_slow_ones_is_followed_to_its_end(stub):
    """Pending, then running, then finished: the client checks the queue at every empty poll and never mistakes a
    prompt waiting its turn for a vanished one."""
    server, state = stub
    state["delay"] = 0.4
    client = Client(f"127.0.0.1:{server.server_port}", retries=0, poll=0.05)  # no websocket
    *_, last = (client.queue(job_prompt(WORKFLOW, [], seed=s)) for s in (1, 2, 3))
    start = time.monotonic()
    entry = client.wait(last, timeout=10)
    assert entry["status"]["status_str"] == "success" and time.monotonic() - start >= 0.8


def test_a_prompt_finishing_between_the_two_questions_is_not_taken_for_gone():
    """No history entry yet, then gone from the queue: it has just finished, and the history asked again has it."""
    entry = {"status": {"status_str": "success"}, "outputs": {}}
    answers = {"/history/p": [{}, {"p": entry}, {"p": entry}], "/queue": [{"queue_running": [], "queue_pending": []}]}
    asked = []

    class Scripted(Client):
        def send(self, path, body=None, raw=False, raw_body=None):
            asked.append(path)
            return answers[path].pop(0)

    assert Scripted("127.0.0.1:9", retries=0, poll=0.01).wait("p", timeout=5) == entry
    assert asked == ["/history/p", "/queue", "/history/p", "/history/p"]


def test_every_job_gets_a_log_line_and_its_images(stub, tmp_path):
    server, state = stub
    client = Client(f"127.0.0.1:{server.server_port}", token="secret", retries=0, poll=0.05)  # no websocket
    lock = threading.Lock()
    jobs = [job_prompt(WORKFLOW, [], prompt=f"prompt {i}", seed=100 + i) for i in range(6)]
    with open(tmp_path / "jobs.jsonl", "w") as log, ThreadPoolExecutor(2) as pool:
        done = list(pool.map(lambda j: run_job(client, j[0], j[1], tmp_path, log, lock, True), enumerate(jobs)))
    assert done == [True] * 6 and state["auth"] == ["Bearer secret"] * 6
    records = [json.loads(line) for line in (tmp_path / "jobs.jsonl").read_text().splitlines()]
    assert sorted(r["seed"] for r in records) == list(range(100, 106))
    assert sorted(r["prompt_id"] for r in records) == sorted(state["queued"])  # the ids the client chose
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
    state = stub_state(delay=0)
    probe = ThreadingHTTPServer(("127.0.0.1", 0), Stub)
    port = probe.server_address[1]
    probe.server_close()
    started = []
    threading.Timer(0.4, lambda: started.append(serve(state, port))).start()
    client = Client(f"127.0.0.1:{port}", retries=6, backoff=0.1)
    prompt_id = client.queue(job_prompt(WORKFLOW, [], seed=1))
    assert state["queued"] == [prompt_id] and state["posts"] == 1
    started[0].shutdown()


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
