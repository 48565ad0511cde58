"""Queue API-format workflows on a running ComfyUI server: `python -m zimage_core.client WORKFLOW [options]`.

Standard library plus `websocket-client` (`pip install websocket-client`); no torch. One job per prompt line
(or one job), at most `--concurrency` in flight, progress followed over the websocket (with `/history` polled as
a safety net), images saved, a JSON-lines log of every job, and a non-zero exit with the server's error when a
prompt is rejected, fails or leaves the queue unfinished. Only requests that got no answer are retried, with
exponential back-off; a prompt is queued under an id chosen here, and the server is asked for that id before a
prompt is sent again, so a lost answer never queues a job twice.
"""

from __future__ import annotations

import argparse
import copy
import http.client
import json
import os
import struct
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

DONE = {"execution_success", "execution_error", "execution_interrupted"}
TRANSIENT = (urllib.error.URLError, ConnectionError, http.client.HTTPException, TimeoutError)  # no answer came
TEXT_NODES = {"ZImageTextEncode": "text", "CLIPTextEncode": "text", "ZImageEditConditioning": "prompt"}
SEED_INPUTS = ("seed", "noise_seed")


class ServerError(Exception):
    """The server rejected a prompt (HTTP 4xx/5xx) or a prompt failed; `details` is the server's JSON."""

    def __init__(self, message: str, details: dict | None = None):
        super().__init__(message)
        self.details = details or {}


def describe_rejection(body: dict) -> str:
    """One readable line per node error of a rejected prompt (ComfyUI's `error` and `node_errors`)."""
    lines = [body.get("error", {}).get("message", "prompt rejected")]
    for node, err in body.get("node_errors", {}).items():
        for e in err.get("errors", []):
            lines.append(f"node {node} ({err.get('class_type')}): {e.get('message')}: {e.get('details')}")
    return "; ".join(lines)


def in_queue(queue: dict, prompt_id: str) -> bool:
    """Whether a `/queue` answer holds the prompt, running or pending (an item's second field is its id)."""
    return any(item[1] == prompt_id for key in ("queue_running", "queue_pending") for item in queue.get(key) or [])


class Client:
    """One ComfyUI server: HTTP calls with retries on connection errors, and a websocket reader of its events."""

    def __init__(self, server: str, token: str | None = None, retries: int = 5, backoff: float = 1.0, poll=2.0,
                 timeout: float = 60.0):  # fmt: skip
        self.base = server if "://" in server else f"http://{server}"
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.retries, self.backoff, self.poll, self.timeout = retries, backoff, poll, timeout
        self.client_id = uuid.uuid4().hex
        self.events: dict[str, list[dict]] = {}
        self.changed = threading.Condition()
        self.closed = False
        self.reader: threading.Thread | None = None

    def send(self, path: str, body: dict | None = None, raw: bool = False, raw_body: tuple | None = None):
        """One request. The server's answers (4xx, 5xx) raise ServerError; no answer raises one of `TRANSIENT`."""
        data = None if body is None else json.dumps(body).encode()
        headers = {**self.headers, **({"Content-Type": "application/json"} if data else {})}
        if raw_body is not None:
            data, headers["Content-Type"] = raw_body
        request = urllib.request.Request(self.base + path, data=data, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                payload = response.read()
        except urllib.error.HTTPError as e:
            text = e.read().decode(errors="replace")
            try:
                details = json.loads(text)
            except json.JSONDecodeError:
                details = {"error": {"message": text.strip() or e.reason}}
            message = describe_rejection(details) if isinstance(details, dict) else text
            raise ServerError(f"{path}: HTTP {e.code}: {message}", details) from None
        return payload if raw else json.loads(payload or b"null")

    def pause(self, attempt: int):
        time.sleep(min(self.backoff * 2**attempt, 30))

    def call(self, path: str, body: dict | None = None, raw: bool = False, raw_body: tuple | None = None):
        """A request sent again, with exponential back-off, when no answer came; the server's answers never are.
        Only for requests that are safe to repeat: `queue` has its own rule."""
        for attempt in range(self.retries + 1):
            try:
                return self.send(path, body, raw, raw_body)
            except TRANSIENT as e:
                if attempt == self.retries:
                    raise ConnectionError(f"{self.base}{path}: {e} (after {self.retries} retries)") from None
                self.pause(attempt)
        raise AssertionError("unreachable")

    def known(self, prompt_id: str) -> bool | None:
        """Whether the server holds the prompt (queued, running or in its history); None when it cannot be asked."""
        try:
            queue = self.send("/queue")
            if in_queue(queue, prompt_id):
                return True
            return bool(self.send(f"/history/{prompt_id}"))
        except TRANSIENT:
            return None

    def queue(self, prompt: dict) -> str:
        """Queue `prompt` under an id chosen here, so that a lost answer never makes a second job: after a POST that
        got no answer, the server is asked for that id (`known`) before anything is sent again, and the prompt is
        sent again only when the server answers that it does not have it. Each question or POST after the first
        takes one of `retries`, with the back-off of `call`."""
        prompt_id = str(uuid.uuid4())  # the canonical form: ComfyUI 0.33 refuses any other
        body = {"prompt": prompt, "client_id": self.client_id, "prompt_id": prompt_id}
        held, error = False, None  # held: the last answer of `known`; not None here after a POST that got no answer
        for attempt in range(self.retries + 1):
            if attempt:
                self.pause(attempt - 1)
                held = self.known(prompt_id)
                if held:
                    return prompt_id
                if held is None:  # the server cannot be asked: sending again could queue the prompt twice
                    continue
            try:
                answer = self.send("/prompt", body)
            except TRANSIENT as e:
                error = e
                continue
            if answer.get("node_errors"):  # queued, but some outputs failed validation and will not run
                raise ServerError(describe_rejection({"error": {"message": "prompt partly invalid"}, **answer}), answer)
            return answer.get("prompt_id", prompt_id)
        held = None if held is None else self.known(prompt_id)  # the last POST got no answer: did it arrive?
        if held:
            return prompt_id
        fate = "was not queued" if held is False else "may have been queued: the server could not be asked"
        raise ConnectionError(f"{self.base}/prompt: {error} (after {self.retries} retries); prompt {prompt_id} {fate}")

    def listen(self):
        """Start reading the websocket in the background (reconnecting with back-off)."""
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        import websocket  # websocket-client

        url = self.base.replace("http", "ws", 1) + f"/ws?clientId={self.client_id}"
        header = [f"{k}: {v}" for k, v in self.headers.items()]
        failures = 0
        while not self.closed:
            try:
                ws = websocket.create_connection(url, header=header, timeout=5)
                failures = 0
                while not self.closed:
                    try:
                        message = ws.recv()
                    except websocket.WebSocketTimeoutException:
                        continue
                    if isinstance(message, str):
                        self._note(json.loads(message))
                ws.close()
            except (OSError, websocket.WebSocketException):
                failures += 1
                time.sleep(min(self.backoff * 2**failures, 30))

    def _note(self, message: dict):
        data = message.get("data") or {}
        if isinstance(data, dict) and data.get("prompt_id"):
            with self.changed:
                self.events.setdefault(data["prompt_id"], []).append(message)
                self.changed.notify_all()

    def wait(self, prompt_id: str, on_event=None, timeout: float | None = None) -> dict:
        """Follow one prompt to its end; returns its `/history` entry. `on_event(message)` sees each event.

        `/history` is asked every `poll` seconds too, so a missed websocket message (or no websocket) never hangs a
        job; a prompt that is in neither the history nor the queue raises ServerError rather than being waited for.
        """
        seen, start, last_poll, pause, settle = 0, time.monotonic(), 0.0, self.poll, 0.05
        while True:
            with self.changed:
                self.changed.wait_for(lambda n=seen: len(self.events.get(prompt_id, [])) > n, timeout=pause)
                events = list(self.events.get(prompt_id, []))
            for message in events[seen:]:
                if on_event is not None:
                    on_event(message)
            seen = len(events)
            finished = any(m["type"] in DONE for m in events)
            if finished or time.monotonic() - last_poll >= self.poll:  # the history is the record, events are news
                last_poll = time.monotonic()
                entry = self.call(f"/history/{prompt_id}").get(prompt_id)
                if entry and entry.get("status", {}).get("status_str") in ("success", "error"):
                    with self.changed:
                        self.events.pop(prompt_id, None)
                    return entry
                if not entry and self.vanished(prompt_id):
                    raise ServerError(
                        f"prompt {prompt_id} is no longer queued, running or in the server's history: it was deleted "
                        "from the queue, or the server restarted",
                        {"error": {"type": "prompt_vanished", "message": "the prompt left the queue unfinished"}},
                    )
                if finished:  # ComfyUI announces the end a moment before it files the entry: ask again soon
                    pause, settle = min(settle, self.poll), settle * 2
            if timeout is not None and time.monotonic() - start > timeout:
                raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout} s")

    def vanished(self, prompt_id: str) -> bool:
        """Neither queued, nor running, nor finished: asked in that order, so a prompt finishing in between is not
        taken for gone (ComfyUI moves a finished prompt into its history and out of the queue in one step)."""
        queue = self.call("/queue")
        if in_queue(queue, prompt_id):
            return False
        return not self.call(f"/history/{prompt_id}")

    def upload(self, path: Path, data: bytes | None = None) -> str:
        """Send an image (the file, or `data` under its name) to the server's input folder (`/upload/image`);
        returns the name LoadImage knows it by."""
        boundary, data = uuid.uuid4().hex, path.read_bytes() if data is None else data
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{path.name}\"\r\n"
                f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + (
                f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"overwrite\"\r\n\r\ntrue\r\n"
                f"--{boundary}--\r\n").encode()  # fmt: skip
        answer = self.call("/upload/image", raw_body=(body, f"multipart/form-data; boundary={boundary}"))
        return f"{answer['subfolder']}/{answer['name']}" if answer.get("subfolder") else answer["name"]

    def image(self, ref: dict) -> bytes:
        query = urllib.parse.urlencode({k: ref.get(k, "") for k in ("filename", "subfolder", "type")})
        return self.call(f"/view?{query}", raw=True)

    def close(self):
        self.closed = True


def failure(entry: dict) -> dict | None:
    """The error of a finished `/history` entry, or None when it succeeded."""
    status = entry.get("status", {})
    if status.get("status_str") == "success":
        return None
    for kind, data in status.get("messages", []):
        if kind in ("execution_error", "execution_interrupted"):
            return {"type": kind, **{k: data.get(k) for k in ("node_id", "node_type", "exception_message")}}
    return {"type": status.get("status_str", "unknown")}


def parse_set(spec: str) -> tuple[str, str, object]:
    """`NODE.INPUT=VALUE`: VALUE as JSON when it parses (numbers, true, lists), else as a string."""
    target, sep, value = spec.partition("=")
    node, dot, name = target.partition(".")
    if not sep or not dot or not node or not name:
        raise ValueError(f'--set {spec!r}: expected NODE.INPUT=VALUE, e.g. 6.text="a cat"')
    try:
        return node, name, json.loads(value)
    except json.JSONDecodeError:
        return node, name, value


def find_prompt_field(workflow: dict) -> tuple[str, str]:
    """The positive prompt's text input: the one text-encode node, or the one whose title names the prompt."""
    texts = [(i, TEXT_NODES[n["class_type"]]) for i, n in workflow.items() if n.get("class_type") in TEXT_NODES]
    titled = [(i, f) for i, f in texts if "negative" not in workflow[i].get("_meta", {}).get("title", "").lower()]
    if len(texts) == 1 or len(titled) == 1:
        return texts[0] if len(texts) == 1 else titled[0]
    raise ValueError("cannot tell which node holds the prompt; name it with --prompt-field NODE.INPUT")


def job_prompt(workflow: dict, sets, prompt=None, prompt_field=None, seed=None, size=None) -> dict:
    """A copy of `workflow` with the overrides applied; every override must name an existing node and input."""
    graph = copy.deepcopy(workflow)

    def put(node, name, value, what):
        if node not in graph:
            raise ValueError(f"{what}: the workflow has no node {node!r} (nodes: {', '.join(graph)})")
        inputs = graph[node]["inputs"]
        if name not in inputs:
            raise ValueError(f"{what}: node {node} ({graph[node]['class_type']}) has no input {name!r}")
        inputs[name] = value

    for node, name, value in sets:
        put(node, name, value, f"--set {node}.{name}")
    if prompt is not None:
        node, name = prompt_field or find_prompt_field(graph)
        put(node, name, prompt, "--prompts")
    sized = [i for i, n in graph.items() if {"width", "height"} <= n["inputs"].keys()]
    for node in sized if size else ():
        put(node, "width", size[0], "--size")
        put(node, "height", size[1], "--size")
    seeded = [(i, k) for i, n in graph.items() for k in SEED_INPUTS if isinstance(n["inputs"].get(k), int)]
    for node, name in seeded if seed is not None else ():
        put(node, name, seed, "--seed")
    if size and not sized:
        raise ValueError("--size: no node of this workflow has width and height inputs")
    if seed is not None and not seeded:
        raise ValueError("--seed: no node of this workflow has a seed input")
    return graph


def describe(graph: dict) -> dict:
    """What a job log says of a prompt before it runs: its text, seed and size, as the graph holds them."""
    record = {"prompt": None, "seed": None, "size": None}
    for node in graph.values():
        inputs = node["inputs"]
        if node["class_type"] in TEXT_NODES and record["prompt"] is None:
            record["prompt"] = inputs.get(TEXT_NODES[node["class_type"]])
        record["seed"] = next((inputs[k] for k in SEED_INPUTS if isinstance(inputs.get(k), int)), record["seed"])
        if {"width", "height"} <= inputs.keys():
            record["size"] = [inputs["width"], inputs["height"]]
    return record


def write_atomic(path: Path, data: bytes):
    """Write under a temporary name, then rename: a reader (or a retried job) never sees half a file."""
    part = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.part")
    part.write_bytes(data)
    os.replace(part, path)


def execute(client: Client, graph: dict, name, on_event=None) -> dict:
    """Queue one prompt, follow it to its end and save its output images as `name(node, index, ref)` (a Path);
    returns the job's log record (prompt id, prompt, seed, size, seconds, outputs, error)."""
    record = {"prompt_id": None, **describe(graph)}
    start = time.monotonic()
    files, error = [], None
    try:
        record["prompt_id"] = client.queue(graph)
        entry = client.wait(record["prompt_id"], on_event=on_event)
        error = failure(entry)
        for node, output in entry.get("outputs", {}).items():
            refs = [ref for ref in output.get("images", []) if ref.get("type") == "output"]
            for index, ref in enumerate(refs):
                path, data = name(node, index, ref), client.image(ref)
                write_atomic(path, data)
                files.append(str(path))
                if data[12:16] == b"IHDR":  # a PNG: the size it came out at (img2img: the input's)
                    record["size"] = list(struct.unpack(">II", data[16:24]))
    except (ServerError, ConnectionError, TimeoutError) as e:
        error = {"type": type(e).__name__, "message": str(e), **getattr(e, "details", {})}
    return record | {"seconds": round(time.monotonic() - start, 3), "outputs": files, "error": error}


def run_job(client: Client, index: int, graph: dict, out: Path, log, lock, quiet: bool) -> bool:
    def show(message):
        if not quiet and message["type"] == "progress":
            data = message["data"]
            print(f"job {index}: node {data['node']} {data['value']}/{data['max']}", file=sys.stderr)

    name = lambda node, _, ref: out / f"{index:05d}_{node}_{Path(ref['filename']).name}"
    record = {"job": index} | execute(client, graph, name, show)
    with lock:
        log.write(json.dumps(record, ensure_ascii=False) + "\n")
        log.flush()
        if record["error"]:
            print(f"job {index} failed: {json.dumps(record['error'], ensure_ascii=False)}", file=sys.stderr)
        elif not quiet:
            print(f"job {index} done in {record['seconds']} s: {', '.join(record['outputs'])}", file=sys.stderr)
    return record["error"] is None


def add_job_options(p: argparse.ArgumentParser):
    """The options that make jobs of a workflow: shared by the direct client and `--queue ... submit`."""
    p.add_argument("workflow", type=Path, help="an API-format workflow (workflows/api/*.json)")
    p.add_argument("--set", action="append", default=[], metavar="NODE.INPUT=VALUE", help="override an input")
    p.add_argument("--prompts", type=Path, help="a text file: one job per non-empty line, its prompt")
    p.add_argument("--prompt-field", metavar="NODE.INPUT", help="where --prompts go (default: the prompt node)")
    p.add_argument("--seed", type=int, help="seed of the first job; job i gets seed + i")
    p.add_argument("--size", help="WxH for every node with width and height inputs")


def jobs_of(args) -> list[dict]:
    """One graph per job from `add_job_options`' arguments; OSError or ValueError naming the problem."""
    workflow = json.loads(args.workflow.read_text(encoding="utf-8"))
    if not isinstance(workflow, dict) or "nodes" in workflow:
        raise ValueError(f"{args.workflow}: not an API-format workflow (UI files are workflows/*.json)")
    sets = [parse_set(s) for s in args.set]
    field = tuple(args.prompt_field.split(".", 1)) if args.prompt_field else None
    size = tuple(int(v) for v in args.size.lower().split("x")) if args.size else None
    lines = [None]
    if args.prompts:
        lines = [line.strip() for line in args.prompts.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [job_prompt(workflow, sets, text, field, None if args.seed is None else args.seed + i, size)
            for i, text in enumerate(lines)]  # fmt: skip
