#!/usr/bin/env python3
"""Every identity graph the plugins build (defaults, each enum value, range edges), validated by a
real ComfyUI's own `execution.validate_prompt` in-process, with the pinned node packs loaded and
the models folder the runs use (so model combos list real files). Nothing executes.

The graphs come from flowhost itself: `flowhost serve --simulate` with the built plugins answers
`POST /<route>?dry_run=true` with the job it would run; the reference upload's LoadImage is pointed
at a file in ComfyUI's input folder, as the host does before submitting.

  python3 validate_identity_graphs.py --flowhost BIN --plugins DIR --models DIR --comfyui DIR [--out FILE]

Exit 0 when ComfyUI accepts every graph; otherwise each refusal is printed with its node errors.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

PNG_1x1 = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC")


def variations(route: str) -> list[dict]:
    flux = [{}, {"width": 256, "height": 256}, {"width": 2048, "height": 2048}, {"width": 256, "height": 2048},
            {"width": 1040, "height": 784}, {"steps": 1}, {"steps": 100}, {"cfg": 0.0}, {"cfg": 30.0}, {"seed": 0},
            {"seed": 2**64 - 1}, {"negative_prompt": "blurry"}, {"prompt": "ünïcödé \"quotes\"\nnewline"},
            {"face_provider": "CPU"}, {"face_provider": "GPU"}, {"face_provider": "CUDA"},
            {"reference_image": "faces/alice.png"}]
    if route == "/flux-instantid":
        return flux + [{"instantid_strength": 0.0, "controlnet_strength": 0.0}, {"instantid_strength": 1.0, "controlnet_strength": 1.0}]
    return flux + [{"guidance": 0.0}, {"guidance": 100.0}, {"pulid_strength": -1.0}, {"pulid_strength": 0.0},
                   {"pulid_strength": 5.0}, {"start_at": 0.0, "end_at": 0.0}, {"start_at": 1.0, "end_at": 1.0},
                   {"start_at": 0.25, "end_at": 0.75}]


def post(port: int, path: str, body: dict):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", path, body=json.dumps(body), headers={"content-type": "application/json"})
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, data


def dry_run_graphs(args) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    inputs = tempfile.mkdtemp(prefix="identity-inputs-")
    os.makedirs(os.path.join(inputs, "faces"))
    with open(os.path.join(inputs, "faces", "alice.png"), "wb") as f:
        f.write(PNG_1x1)
    cmd = [args.flowhost, "serve", "--simulate", "--models", args.models, "--plugins", args.plugins, "--inputs", inputs,
           "--listen", f"127.0.0.1:{port}", "--cache-dir", tempfile.mkdtemp(prefix="identity-cache-"), "--warm-up", "off"]
    log = open(os.path.join(tempfile.gettempdir(), "identity-dry-run-flowhost.log"), "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    graphs = {}
    try:
        face = "data:image/png;base64," + base64.b64encode(PNG_1x1).decode()
        deadline = time.monotonic() + 300
        for route in ("/flux-instantid", "/flux-pulid"):
            for i, v in enumerate(variations(route)):
                body = dict({"prompt": "a portrait", "reference_image": face}, **v)
                while True:
                    try:
                        status, data = post(port, route + "?dry_run=true", body)
                        break
                    except OSError:
                        if time.monotonic() > deadline:
                            raise
                        time.sleep(0.3)
                if status != 200:
                    raise SystemExit(f"{route} {v}: dry run answered {status}: {data[:300]!r}")
                doc = json.loads(data)
                job = doc.get("job", doc)
                wf = job["workflow"]
                graphs[f"{route} {json.dumps(v)}"] = (json.loads(wf) if isinstance(wf, str) else wf, job.get("uploads", []))
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    return graphs


async def validate(args, graphs: dict) -> int:
    sys.path.insert(0, args.comfyui)
    os.chdir(args.comfyui)
    sys.argv = ["main.py", "--cpu"]
    import comfy.options

    comfy.options.enable_args_parsing()
    import folder_paths
    import execution
    import nodes

    await nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False)
    input_dir = folder_paths.get_input_directory()
    os.makedirs(input_dir, exist_ok=True)
    with open(os.path.join(input_dir, "identity-reference.png"), "wb") as f:
        f.write(PNG_1x1)
    refused = 0
    for name, (graph, uploads) in graphs.items():
        for up in uploads:
            graph[up["node_id"]]["inputs"][up["input_name"]] = "identity-reference.png"
        valid = await execution.validate_prompt("identity-check", graph, None)
        ok = valid[0]
        print(("ok      " if ok else "REFUSED ") + name, flush=True)
        if not ok:
            refused += 1
            print(json.dumps({"error": valid[1], "node_errors": valid[3]}, indent=1)[:3000])
    print(f"{len(graphs) - refused} of {len(graphs)} graphs accepted by ComfyUI's validate_prompt")
    return 1 if refused else 0


def main() -> int:
    ap = argparse.ArgumentParser()
    for a in ("--flowhost", "--plugins", "--models", "--comfyui"):
        ap.add_argument(a, required=True)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    args.comfyui = os.path.abspath(args.comfyui)
    graphs = dry_run_graphs(args)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({k: g for k, (g, _) in graphs.items()}, f, indent=1)
    return asyncio.run(validate(args, graphs))


if __name__ == "__main__":
    sys.exit(main())
