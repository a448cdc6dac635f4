#!/usr/bin/env python3
"""The identity routes executed end to end: `flowhost serve --comfyui-dir` (flowhost starts a real
ComfyUI with the pinned InstantID and PuLID-Flux packs) on random-weight models from
make_models.py + make_identity_models.py, then through flowhost's HTTP API:

  1. /flux-instantid with reference-face.png   -> 200 image/jpeg of the requested size
  2. /flux-pulid     with reference-face.png   -> 200 image/jpeg of the requested size
  3. both again with reference-noface.png      -> 422 problem+json naming reference_image
  4. (--warm N) N more of each with new seeds  -> warm seconds per image

Offline by construction: ComfyUI inherits HF_HUB_OFFLINE=1 and a dead HTTP(S) proxy, so a node
that tries to download fails its request; HOME is a fresh folder, and any file a node writes there
(insightface's ~/.insightface, EVA-CLIP's ~/.cache) fails the run too. Exit status 0 only when every
expectation held. Results: OUT/identity.json (+ flowhost.log, the JPEGs). Run it with a flowhost
built from this checkout: the identity plugins' model folders (facexlib/) must be known to the host.

  python3 identity.py --flowhost BIN --comfyui DIR --python PY --models DIR --plugins DIR \
      --images DIR --out DIR [--size 256] [--steps 2] [--warm 0] [--cpu] [--tiny-flux]
"""

from __future__ import annotations

import argparse
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


MODEL_SUFFIXES = (".onnx", ".pth", ".pt", ".bin", ".safetensors", ".ckpt", ".zip", ".part", ".incomplete")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(port, method, path, body=None, timeout=1800.0):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    data = json.dumps(body).encode() if body is not None else None
    conn.request(method, path, body=data, headers={"content-type": "application/json"} if data else {})
    r = conn.getresponse()
    payload = r.read()
    headers = {k.lower(): v for k, v in r.getheaders()}
    conn.close()
    return r.status, headers, payload


def jpeg_size(b: bytes):
    i = 2
    while i + 9 < len(b):
        if b[i] != 0xFF:
            return None
        marker, length = b[i + 1], int.from_bytes(b[i + 2:i + 4], "big")
        if marker in (0xC0, 0xC1, 0xC2):
            return int.from_bytes(b[i + 7:i + 9], "big"), int.from_bytes(b[i + 5:i + 7], "big")
        i += 2 + length
    return None


def data_url(path: str) -> str:
    with open(path, "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode()


def main() -> int:
    ap = argparse.ArgumentParser()
    for a in ("--flowhost", "--comfyui", "--python", "--models", "--plugins", "--images", "--out"):
        ap.add_argument(a, required=True)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--warm", type=int, default=0)
    ap.add_argument("--cpu", action="store_true", help="ComfyUI --cpu (no GPU)")
    ap.add_argument("--face-provider", default="CPU")
    ap.add_argument("--tiny-flux", action="store_true",
                    help="the Flux file has 1 double block (make_models.py --profile tiny): ComfyUI_PuLID_Flux_ll's "
                         "sampling hook reads the text stream the last of Flux-dev's 19 double blocks leaves, so "
                         "/flux-pulid is expected to run face detection, alignment, EVA-CLIP and the PuLID encoder "
                         "(ApplyPulidFlux) and then fail in KSampler with KeyError 'double_blocks_txt'")
    ap.add_argument("--startup-timeout", type=float, default=600)
    ap.add_argument("--comfyui-arg", action="append", default=[],
                    help="one more ComfyUI option, passed on as flowhost's --comfyui-arg (e.g. --front-end-root=DIR)")
    args = ap.parse_args()
    # A caller's `timeout` sends SIGTERM: end through `finally`, so identity.json and the
    # server's shutdown still happen.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    os.makedirs(args.out, exist_ok=True)
    home = tempfile.mkdtemp(prefix="identity-home-")
    env = dict(os.environ, HOME=home, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9",
               http_proxy="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9",
               NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost",
               RUST_LOG=os.environ.get("RUST_LOG", "info"))
    port = free_port()
    cache = tempfile.mkdtemp(prefix="identity-cache-")
    cmd = [args.flowhost, "serve", "--comfyui-dir", args.comfyui, "--comfyui-python", args.python,
           "--models", args.models, "--plugins", args.plugins, "--listen", f"127.0.0.1:{port}",
           "--cache-dir", cache, "--warm-up", "off", "--job-timeout", "1800",
           "--comfyui-startup-timeout", str(int(args.startup_timeout))]
    if args.cpu:
        cmd.append("--comfyui-arg=--cpu")
    cmd += [f"--comfyui-arg={a}" for a in args.comfyui_arg]
    R = {"cmd": cmd, "size": args.size, "steps": args.steps, "device": "cpu" if args.cpu else "gpu", "runs": [], "checks": []}
    log = open(os.path.join(args.out, "flowhost.log"), "wb")
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    ok = True

    def check(what, cond, detail=""):
        nonlocal ok
        R["checks"].append({"what": what, "ok": bool(cond), "detail": detail})
        print(("PASS " if cond else "FAIL ") + what + (f" ({detail})" if detail else ""), flush=True)
        ok = ok and bool(cond)

    try:
        health = None
        while time.monotonic() - t0 < args.startup_timeout:
            if proc.poll() is not None:
                raise SystemExit(f"flowhost exited with {proc.returncode}")
            try:
                st, _, body = request(port, "GET", "/health", timeout=5)
                health = json.loads(body)
                # "degraded" still serves (e.g. a comfy_extras module of ComfyUI's own that lacks a
                # package on this image); the checks below say whether the identity packs ran.
                if health.get("comfyui", {}).get("status") in ("ready", "degraded"):
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.5)
        R["startup_s"] = round(time.monotonic() - t0, 1)
        R["health"] = health
        status = (health or {}).get("comfyui", {})
        check("flowhost /health: ComfyUI serving", status.get("status") in ("ready", "degraded"),
              f"{R['startup_s']} s, {status.get('status')} {status.get('reason') or ''}".strip())
        if not ok:
            return 1
        face, noface = (data_url(os.path.join(args.images, n)) for n in ("reference-face.png", "reference-noface.png"))
        prompt = "a portrait photo of a person in a park"
        common = {"prompt": prompt, "width": args.size, "height": args.size, "steps": args.steps, "face_provider": args.face_provider}

        def run(route, reference, seed, label):
            body = dict(common, reference_image=reference, seed=seed)
            t = time.monotonic()
            st, headers, payload = request(port, "POST", route, body)
            row = {"route": route, "label": label, "status": st, "seconds": round(time.monotonic() - t, 2),
                   "content_type": headers.get("content-type"), "server_timing": headers.get("server-timing")}
            if st == 200:
                row["jpeg_size"] = jpeg_size(payload)
                with open(os.path.join(args.out, f"{route.strip('/')}-{label}.jpg"), "wb") as f:
                    f.write(payload)
            else:
                try:
                    row["problem"] = json.loads(payload)
                except ValueError:
                    row["body"] = payload[:500].decode(errors="replace")
            R["runs"].append(row)
            print(json.dumps(row), flush=True)
            return row

        for route in ("/flux-instantid", "/flux-pulid"):
            first = run(route, face, 7, "first")
            if route == "/flux-pulid" and args.tiny_flux:
                node = (first.get("problem") or {}).get("node") or {}
                check(f"{route} with a face on the 1-double-block Flux: ApplyPulidFlux ran, KSampler lacks block 18's text stream",
                      first["status"] == 500 and node.get("class_type") == "KSampler" and "double_blocks_txt" in node.get("exception_message", ""),
                      f"{first['status']} in {first['seconds']} s")
                continue
            check(f"{route} with a face: 200 image/jpeg {args.size}x{args.size}",
                  first["status"] == 200 and first["content_type"] == "image/jpeg" and first.get("jpeg_size") == (args.size, args.size),
                  f"{first['status']} in {first['seconds']} s")
        for route in ("/flux-instantid", "/flux-pulid"):
            # Same prompt and seed as the first run: ComfyUI's cache answers the unchanged nodes.
            row = run(route, noface, 7, "noface")
            problem = row.get("problem") or {}
            named = problem.get("field") == "reference_image" or "reference_image" in json.dumps(problem)
            check(f"{route} without a face: 422 naming reference_image", row["status"] == 422 and named,
                  f"{row['status']}: {problem.get('detail', row.get('body', ''))}")
        for i in range(args.warm):
            for route in ("/flux-instantid",) if args.tiny_flux else ("/flux-instantid", "/flux-pulid"):
                row = run(route, face, 100 + i, f"warm{i}")
                check(f"{route} warm {i}: 200", row["status"] == 200)
        # Font caches and onnxruntime's telemetry id may appear; weights or archives must not.
        fetched = [os.path.join(d, f) for d, _, fs in os.walk(home) for f in fs
                   if f.endswith(MODEL_SUFFIXES) or any(part in d for part in ("/.insightface", "/huggingface", "/clip", "/torch/hub"))]
        check("nothing downloaded under HOME (no weights, archives or hub caches)", not fetched, ", ".join(fetched[:5]))
        return 0 if ok else 1
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
        R["ok"] = ok
        R["total_s"] = round(time.monotonic() - t0, 1)
        with open(os.path.join(args.out, "identity.json"), "w") as f:
            json.dump(R, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
