#!/usr/bin/env python3
"""The official Comfy API v2 Python SDK (`comfy-sdk==0.5.0`, unchanged) drives flowhost.

Starts `flowhost serve --simulate` on a free loopback port with a temporary state folder,
points the SDK at it with COMFY_BASE_URL, and does what a user of the SDK does: upload an
input asset twice (the second time through the by-hash fast path, checked on flowhost's own
request counters; a third time under the first name: from-hash returns the same asset), submit
a workflow naming it by file name and one that references it, iterate its events to the end, wait,
download every output (checked against the input: the double's LoadImage→SaveImage keeps the
size, so the output proves the asset reached ComfyUI), read the workflow back, list jobs,
cancel a slow job, see an Idempotency-Key reuse refused. Then all of it again with API keys on
(plus: no key → Unauthorized).

Usage: comfy_sdk_e2e.py FLOWHOST_BINARY PLUGINS_DIR  (the plugins are not needed; any folder)
Exit status 0 only when every check passed; a missing `comfy_sdk` is a failure.
"""

from __future__ import annotations

import os
import re
import socket
import struct
import subprocess
import sys
import tempfile
import json
import time
import urllib.error
import urllib.request
import uuid
import zlib

try:
    import comfy_sdk
    from comfy_sdk import Comfy, IdempotencyKeyReuse, StatusChange, Unauthorized
except ImportError as exc:  # a missing SDK must fail the run, never skip it
    print(f"FAIL: comfy_sdk is not importable ({exc}); install comfy-sdk==0.5.0", file=sys.stderr)
    sys.exit(2)

EXPECTED_SDK = "0.5.0"
STEP_LATENCY_MS = "150"


def png(width: int, height: int) -> bytes:
    """A real RGB PNG (no Pillow needed)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    raw = b"".join(b"\x00" + b"".join(bytes((x % 256, y % 256, 200)) for x in range(width)) for y in range(height))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, body: bytes | None = None, key: str | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, method=method)
    if body is not None:
        request.add_header("Content-Type", "application/json")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


class Flowhost:
    def __init__(self, binary: str, plugins: str, env: dict[str, str]):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.tmp = tempfile.TemporaryDirectory(prefix="flowhost-sdk-")
        self.log = open(os.path.join(self.tmp.name, "flowhost.log"), "w+")
        argv = [
            binary, "serve", "--simulate",
            "--listen", f"127.0.0.1:{self.port}",
            "--plugins", plugins,
            "--cache-dir", os.path.join(self.tmp.name, "cache"),
            "--state-dir", os.path.join(self.tmp.name, "state"),
        ]
        full_env = dict(os.environ)
        full_env.pop("FLOWHOST_API_KEYS", None)
        full_env.pop("FLOWHOST_ADMIN_KEYS", None)
        full_env.update(env)
        full_env["FLOWHOST_SIMULATE_STEP_LATENCY_MS"] = STEP_LATENCY_MS
        self.process = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, env=full_env)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"flowhost exited with {self.process.returncode}:\n{self.logs()}")
            try:
                status, _ = http("GET", f"{self.base}/api/v2/health")
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"flowhost did not become healthy:\n{self.logs()}")

    def logs(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-8000:]

    def counter(self, route: str, status: int, admin_key: str | None) -> int:
        code, body = http("GET", f"{self.base}/metrics", key=admin_key)
        assert code == 200, f"/metrics answered {code}"
        pattern = re.compile(r'^flowhost_http_requests_total\{(.*)\} (\d+)', re.M)
        total = 0
        for labels, value in pattern.findall(body.decode()):
            if f'route="{route}"' in labels and f'status="{status}"' in labels:
                total += int(value)
        return total

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()
        self.tmp.cleanup()


def check(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


def slow_graph(nodes: int) -> dict:
    """EmptyImage → `nodes` × ImageInvert → SaveImage: on the slowed-down double each node
    takes STEP_LATENCY_MS, so the job runs for seconds (long enough to cancel it running)."""
    graph = {"0": {"class_type": "EmptyImage", "inputs": {"width": 16, "height": 16, "batch_size": 1, "color": 0}}}
    for i in range(1, nodes + 1):
        graph[str(i)] = {"class_type": "ImageInvert", "inputs": {"image": [str(i - 1), 0]}}
    graph["save"] = {"class_type": "SaveImage", "inputs": {"images": [str(nodes), 0], "filename_prefix": "slow"}}
    return graph


def scenario(server: Flowhost, key: str | None, admin_key: str | None) -> None:
    os.environ["COMFY_BASE_URL"] = server.base
    if key:
        os.environ["COMFY_API_KEY"] = key
    else:
        os.environ.pop("COMFY_API_KEY", None)
    client = Comfy(timeout=60)

    # -- assets: upload, then the same bytes again through the by-hash fast path
    image = png(64, 48)
    first = client.assets.from_bytes(image, filename="photo.png", content_type="image/png")
    first.commit()
    check(first.created_new is True, f"the first upload stores new bytes (created_new={first.created_new})")
    uploads_before = server.counter("/api/v2/assets", 201, admin_key) + server.counter("/api/v2/assets", 200, admin_key)
    second = client.assets.from_bytes(image, filename="photo-again.png", content_type="image/png")
    second.commit()
    check(second.id != first.id, "a second asset record is minted")
    check(second.hash == first.hash and first.hash.startswith("blake3:"), "both assets name the same blake3 blob")
    check(second.created_new is False, f"the second asset is a dedup hit (created_new={second.created_new})")
    uploads_after = server.counter("/api/v2/assets", 201, admin_key) + server.counter("/api/v2/assets", 200, admin_key)
    check(uploads_after == uploads_before, "the second commit sent no bytes (no POST /api/v2/assets)")
    check(server.counter("/api/v2/assets/by-hash/{hash}", 200, admin_key) >= 1, "the SDK probed HEAD by-hash and got 200")
    check(server.counter("/api/v2/assets/from-hash", 201, admin_key) == 1, "the fast path minted through from-hash")
    # The same bytes under the same name again: from-hash answers the identical reference (200).
    third = client.assets.from_bytes(image, filename="photo.png", content_type="image/png")
    third.commit()
    check(third.id == first.id, f"the same bytes and file_path are the same asset ({third.id} vs {first.id})")
    check(server.counter("/api/v2/assets/from-hash", 200, admin_key) == 1, "from-hash returned the existing reference as is")

    # -- a workflow naming the upload by file name (what most SDK users write)
    by_name = client.run(client.workflows.from_json({
        "1": {"class_type": "LoadImage", "inputs": {"image": "photo.png"}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "sdk-name"}},
    }))
    check(by_name.status == "succeeded", f"the job by file name ended {by_name.status}: {by_name.error}")
    named = by_name.get_outputs("2")
    check(len(named) == 1 and png_size(named[0].to_bytes()) == (64, 48), "the file name reached ComfyUI as the uploaded image")

    # -- a workflow that references the asset; events to the end; wait; download
    graph = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "placeholder.png"}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "sdk"}},
    }
    workflow = client.workflows.from_json(graph)
    workflow.set_input("1", "image", second)
    job = client.submit(workflow)
    check(job.status in ("queued", "running", "succeeded"), f"submitted job status {job.status}")
    events = list(job.events())
    check(len(events) >= 1 and isinstance(events[0], StatusChange), f"the stream opens with a status snapshot: {events[:1]}")
    check(isinstance(events[-1], StatusChange) and events[-1].status == "succeeded", f"the stream ends with the terminal status: {events[-1:]}")
    job.wait(timeout=60)
    check(job.status == "succeeded", f"job ended {job.status}: {job.error}")
    outputs = job.get_outputs("2")
    check(len(outputs) == 1 and len(job.outputs) == 1, f"one output from node 2, got {job.outputs}")
    for output in job.outputs:
        data = output.to_bytes()
        check(len(data) == output.size_bytes, "the download has the advertised size")
        check(png_size(data) == (64, 48), f"the output is the uploaded 64x48 image run through ComfyUI, got {png_size(data)}")
        check(output.job_id == job.id, "the output names its job")
        head = output.to_bytes(range=(0, 7))
        check(head == data[:8], "a ranged download returns exactly those bytes")
    back = job.get_workflow()
    check(back.format == "api", f"workflow format {back.format}")
    check(back.graph["2"]["class_type"] == "SaveImage", "the workflow comes back")
    listed = [summary.id for summary in client.list_jobs()]
    check(job.id in listed, "the job is listed")

    # -- cancel a slow job (a long chain of nodes on the slowed-down double)
    slow = client.submit(client.workflows.from_json(slow_graph(40)))
    deadline = time.monotonic() + 30
    while slow.refresh().status == "queued" and time.monotonic() < deadline:
        time.sleep(0.05)
    check(slow.status == "running", f"the slow job runs (status {slow.status})")
    slow.cancel()
    check(slow.status in ("canceling", "canceled"), f"cancel answers canceling/canceled, got {slow.status}")
    slow.wait(timeout=30)
    check(slow.status == "canceled", f"the slow job ended {slow.status}")
    again = slow.cancel()
    check(again.status == "canceled", "cancel is idempotent")

    # -- Idempotency-Key: single use
    key_value = str(uuid.uuid4())
    client.submit(client.workflows.from_json(graph_with(second)), idempotency_key=key_value).wait(timeout=60)
    try:
        client.submit(client.workflows.from_json(graph_with(second)), idempotency_key=key_value)
    except IdempotencyKeyReuse as err:
        check(err.code == "idempotency_key_reuse", f"code {err.code}")
    else:
        raise AssertionError("a reused Idempotency-Key was accepted")

    if key:
        os.environ.pop("COMFY_API_KEY", None)
        anonymous = Comfy(timeout=30)
        try:
            anonymous.jobs.get(job.id)
        except Unauthorized:
            pass
        else:
            raise AssertionError("a request without a key was served while keys are on")


def graph_with(asset) -> dict:
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": asset.as_reference()}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "idem"}},
    }


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    version = getattr(comfy_sdk, "__version__", None)
    if version is None:
        from importlib.metadata import version as dist_version

        version = dist_version("comfy-sdk")
    if version != EXPECTED_SDK:
        print(f"FAIL: comfy-sdk {version} installed, the test is written for {EXPECTED_SDK}", file=sys.stderr)
        return 2
    binary, plugins = sys.argv[1], sys.argv[2]
    runs = [
        ("without API keys", {}, None, None),
        ("with API keys", {"FLOWHOST_API_KEYS": "sdk:k-sdk-user-123", "FLOWHOST_ADMIN_KEYS": "ops:k-sdk-admin-456"}, "k-sdk-user-123", "k-sdk-admin-456"),
    ]
    for name, env, key, admin in runs:
        server = Flowhost(binary, plugins, env)
        try:
            scenario(server, key, admin)
        except Exception:
            print(f"FAIL ({name}); flowhost log tail:\n{server.logs()}", file=sys.stderr)
            raise
        finally:
            server.stop()
        print(f"ok: comfy-sdk {version} against flowhost {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
