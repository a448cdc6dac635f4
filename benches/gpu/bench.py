#!/usr/bin/env python3
"""End-to-end GPU measurement of flowhost in front of a real ComfyUI (benches/gpu/README.md).

With --mode dir (the default, as on Modal) `flowhost serve --comfyui-dir` spawns ComfyUI
itself: timed to ComfyUI's first /system_stats answer, flowhost's first /livez 200, first
/health 200 (serving: ready or degraded) and first `"status": "ready"`. With --mode url
ComfyUI is started here and flowhost pointed at it. Then:

  first     the first /flux-dev request after ready (loads every model onto the GPU, unless
            warm-up did), and its ratio to the warm median
  warm      sequential /flux-dev requests, interleaved with the same graph (from
            ?dry_run=true) submitted by a minimal direct ComfyUI client (ws + POST /prompt +
            wait + GET /view) and by the same client with SaveImageWebsocket as the output
            node (the image comes back on the websocket: no disk write, no /view);
            distinct prompts and seeds. flowhost's time beyond ComfyUI's own execution
            (wall − ComfyUI's execution_start→execution_success) against the direct client's
  conc_N    N concurrent /flux-dev requests (all statuses kept)
  extra     (if time is left) other sizes/step counts
  lora      (if time is left) /flux-lora and /flux-dev interleaved
  profiles  (if time is left) flowhost restarted with each --profiles launch profile:
            cold start, first request, warm per-image time

Writes results.json into --out after every phase, so a run cut short still reports what
it measured. Needs only the standard library and aiohttp (for the direct client's
websocket). Every path comes from the command line.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import signal
import statistics
import struct
import subprocess
import sys
import threading
import time
import uuid
from urllib.parse import urlencode

T0 = time.monotonic()
R: dict = {"phases": {}, "notes": []}
ARGS = None


def log(*a) -> None:
    print(f"[{time.monotonic() - T0:7.1f}s]", *a, flush=True)


def save() -> None:
    # written in place (no temporary file): $OUT may hold only 8 files
    with open(os.path.join(ARGS.out, "results.json"), "w") as f:
        json.dump(R, f, indent=1, default=str)


def elapsed() -> float:
    return time.monotonic() - T0


# --- HTTP helpers ---------------------------------------------------------------------


def http_req(port: int, method: str, path: str, body=None, timeout: float = 30.0):
    """One request on a fresh connection: (status, headers, bytes, seconds)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    data = None if body is None else json.dumps(body).encode()
    headers = {"content-type": "application/json"} if data is not None else {}
    t = time.perf_counter()
    try:
        conn.request(method, path, body=data, headers=headers)
        r = conn.getresponse()
        raw = r.read()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, raw, time.perf_counter() - t
    finally:
        conn.close()


def get_json(port: int, path: str, timeout: float = 10.0):
    st, _, raw, _ = http_req(port, "GET", path, timeout=timeout)
    try:
        return st, json.loads(raw)
    except ValueError:
        return st, raw[:500].decode("utf-8", "replace")


def jpeg_size(b: bytes):
    """(width, height) from a JPEG's SOF marker, or None."""
    if len(b) < 4 or b[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 9 < len(b):
        if b[i] != 0xFF:
            i += 1
            continue
        marker = b[i + 1]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        seg_len = struct.unpack(">H", b[i + 2 : i + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF):
            h, w = struct.unpack(">HH", b[i + 5 : i + 9])
            return w, h
        i += 2 + seg_len
    return None


def png_size(b: bytes):
    if b[:8] == b"\x89PNG\r\n\x1a\n" and len(b) >= 24:
        return struct.unpack(">II", b[16:24])
    return None


def server_timing(h: str | None) -> dict:
    out = {}
    for part in (h or "").split(","):
        name, _, rest = part.strip().partition(";")
        if rest.startswith("dur="):
            try:
                out[name] = float(rest[4:])
            except ValueError:
                pass
    return out


def stats(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None
    return {"n": len(xs), "min": round(min(xs), 3), "median": round(statistics.median(xs), 3),
            "mean": round(statistics.fmean(xs), 3), "max": round(max(xs), 3)}


# --- the two clients ------------------------------------------------------------------

_seq = [0]


def flux_body(size: int, steps: int, tag: str) -> dict:
    _seq[0] += 1
    n = _seq[0]
    return {
        "prompt": f"{tag} #{n}: a lighthouse on a cliff at dawn, volumetric light, 35mm photo, seed-unique {uuid.uuid4().hex[:8]}",
        "width": size, "height": size, "steps": steps, "cfg": 1.0, "seed": 1000 + n * 7919, "guidance": 3.5,
    }


def flowhost_call(route: str, body: dict, timeout: float, keep_body=False, port=None) -> dict:
    t_wall = time.time()
    try:
        st, hd, raw, dt = http_req(port or ARGS.flowhost_port, "POST", route, body, timeout=timeout)
    except Exception as e:  # timeouts, resets: reported, never fatal
        return {"route": route, "status": None, "error": repr(e), "started_at": t_wall}
    row = {
        "route": route, "status": st, "wall_s": round(dt, 3), "started_at": round(t_wall, 3),
        "x_generation_ms": int(hd["x-generation-ms"]) if hd.get("x-generation-ms", "").isdigit() else None,
        "server_timing": server_timing(hd.get("server-timing")),
        "content_type": hd.get("content-type"), "bytes": len(raw),
        "x_request_id": hd.get("x-request-id"), "x_prompt_id": hd.get("x-prompt-id"), "x_seed": hd.get("x-seed"),
        "retry_after": hd.get("retry-after"),
        "prompt": body.get("prompt", "")[:40], "size": body.get("width"), "steps": body.get("steps"),
    }
    if st == 200 and (row["content_type"] or "").startswith("image/jpeg"):
        row["jpeg_size"] = jpeg_size(raw)
    else:
        row["body"] = raw[:2000].decode("utf-8", "replace")
    if keep_body:
        row["_raw"] = raw
    return row


async def _direct(graph: dict, timeout: float, via_ws: bool = False) -> dict:
    """One prompt through ComfyUI's own API. via_ws: the graph's output node is
    SaveImageWebsocket, whose PNG (compress_level 1) arrives as a binary websocket frame."""
    import aiohttp

    base = f"http://127.0.0.1:{ARGS.comfy_port}"
    cid = uuid.uuid4().hex
    out = {"path": "direct_ws" if via_ws else "direct"}
    t = time.perf_counter()
    out["started_at"] = round(time.time(), 3)
    png = None
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as s:
        async with s.ws_connect(f"{base}/ws?clientId={cid}", max_msg_size=0) as ws:
            async with s.post(f"{base}/prompt", json={"prompt": graph, "client_id": cid}) as r:
                resp = await r.json(content_type=None)
                out["post_status"] = r.status
            if r.status != 200 or resp.get("node_errors"):
                out["error"] = json.dumps(resp)[:1000]
                return out
            pid = resp["prompt_id"]
            out["prompt_id"] = pid
            images, t_start, t_end = None, None, None
            current = None  # binary frames carry no prompt id: they belong to the prompt executing now
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.BINARY:
                    # [u32 event=1 PREVIEW_IMAGE][u32 format=2 PNG][bytes]
                    b = msg.data
                    if via_ws and current == pid and len(b) > 8 and struct.unpack(">II", b[:8]) == (1, 2):
                        png = b[8:]
                    continue
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                m = json.loads(msg.data)
                d = m.get("data") or {}
                kind = m.get("type")
                if kind == "executing":
                    current = d.get("prompt_id")
                if d.get("prompt_id") != pid:
                    continue
                if kind == "execution_start":
                    t_start = d.get("timestamp")
                elif kind == "executed" and (d.get("output") or {}).get("images"):
                    images = d["output"]["images"]
                elif kind == "execution_success":
                    t_end = d.get("timestamp")
                    break
                elif kind in ("execution_error", "execution_interrupted"):
                    out["error"] = json.dumps(d)[:2000]
                    return out
            if not via_ws:
                if not images:
                    out["error"] = "no images"
                    return out
                img = images[0]
                q = urlencode({"filename": img["filename"], "subfolder": img.get("subfolder", ""), "type": img.get("type", "output")})
                async with s.get(f"{base}/view?{q}") as r:
                    png = await r.read()
                    out["view_status"] = r.status
            elif png is None:
                out["error"] = "no SaveImageWebsocket frame"
                return out
            else:
                out["view_status"] = 200
    out["wall_s"] = round(time.perf_counter() - t, 3)
    out["status"] = 200 if out.get("view_status") == 200 else out.get("view_status")
    out["comfy_exec_ms"] = (t_end - t_start) if (t_start and t_end) else None
    out["png_size"] = png_size(png)
    out["bytes"] = len(png)
    if ARGS.keep_png and not via_ws and not os.path.exists(ARGS.keep_png):
        with open(ARGS.keep_png, "wb") as f:
            f.write(png)
    return out


def direct_call(graph: dict, timeout: float, via_ws: bool = False) -> dict:
    try:
        return asyncio.run(_direct(graph, timeout, via_ws))
    except Exception as e:
        return {"path": "direct_ws" if via_ws else "direct", "status": None, "error": repr(e)}


def graph_for(template: dict, prompt: str, seed: int, via_ws: bool = False) -> dict:
    """The dry-run graph with a new positive prompt and seed (so nothing is a cache hit);
    via_ws: SaveImage replaced by SaveImageWebsocket (same image input)."""
    g = json.loads(json.dumps(template))
    if via_ws:
        for node in g.values():
            if node.get("class_type") == "SaveImage":
                node["class_type"] = "SaveImageWebsocket"
                node["inputs"] = {"images": node["inputs"]["images"]}
    for node in g.values():
        inputs = node.get("inputs", {})
        if node.get("class_type") == "KSampler":
            inputs["seed"] = seed
        if node.get("class_type") == "CLIPTextEncode" and inputs.get("text"):
            inputs["text"] = prompt
        if node.get("class_type") == "SaveImage":
            inputs["filename_prefix"] = "direct"
    return g


# --- processes ------------------------------------------------------------------------

PROCS: list = []
# /health answers 200 for both; "degraded" = serving, with a reason (e.g. node packs that failed to import)
SERVING = ("ready", "degraded")


def spawn(cmd, log_name, cwd=None, env=None):
    f = open(os.path.join(ARGS.out, log_name), "ab", buffering=0)
    p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=False)
    PROCS.append(p)
    return p


def stop_all():
    for p in reversed(PROCS):
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in reversed(PROCS):
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()


def wait_until(pred, timeout, interval=0.1):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            v = pred()
            if v:
                return v
        except Exception:
            pass
        time.sleep(interval)
    return None


# --- phases ---------------------------------------------------------------------------


def child_comfy_port(parent_pid: int):
    """The --port of the `main.py` child that `flowhost serve --comfyui-dir` spawned."""
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid != parent_pid:
                continue
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")
            if b"main.py" in cmd and b"--port" in cmd:
                return int(cmd[cmd.index(b"--port") + 1])
        except (OSError, ValueError, IndexError):
            continue
    return None


def phase_start_supervised(profile: str = "", key: str = "start"):
    """`flowhost serve --comfyui-dir`: flowhost spawns ComfyUI itself (the Modal path)."""
    fe = ARGS.front_end_root
    os.makedirs(fe, exist_ok=True)
    cmd = [ARGS.flowhost, "serve", "--comfyui-dir", ARGS.comfyui, "--comfyui-python", ARGS.python,
           "--comfyui-arg=--front-end-root", f"--comfyui-arg={fe}"] + [f"--comfyui-arg={a}" for a in ARGS.comfy_arg] + [
           "--models", ARGS.models, "--plugins", ARGS.plugins, "--listen", f"127.0.0.1:{ARGS.flowhost_port}",
           "--cache-dir", ARGS.cache_dir] + (["--comfyui-profile", profile] if profile else []) + ARGS.flowhost_arg
    log("flowhost (supervising ComfyUI):", " ".join(cmd))
    t = time.monotonic()
    fh = spawn(cmd, "flowhost.log")
    seen = {}

    def livez():
        if "livez_s" not in seen:
            try:
                if http_req(ARGS.flowhost_port, "GET", "/livez", timeout=2)[0] == 200:
                    seen["livez_s"] = time.monotonic() - t
            except OSError:
                pass

    def ready():
        if fh.poll() is not None:
            raise SystemExit(f"flowhost exited with {fh.returncode}")
        if "port" not in seen:
            port = child_comfy_port(fh.pid)
            if port:
                seen["port"] = port
                ARGS.comfy_port = port
        if "port" in seen and "comfy_s" not in seen:
            try:
                st, _ = get_json(seen["port"], "/system_stats", timeout=2)
                if st == 200:
                    seen["comfy_s"] = time.monotonic() - t
            except OSError:
                pass
        livez()
        st, body = get_json(ARGS.flowhost_port, "/health", timeout=2)
        now = time.monotonic() - t
        if "first_health" not in seen:
            seen["first_health"] = (now, st)
        status = body.get("status") if isinstance(body, dict) else None
        if status == "ready" and "status_ready_s" not in seen:
            seen["status_ready_s"] = now
        return body if st == 200 and status in SERVING else None

    health = wait_until(ready, ARGS.comfy_start_timeout, interval=0.05)
    fh_s = time.monotonic() - t
    stats_body = get_json(ARGS.comfy_port, "/system_stats")[1] if "port" in seen else None
    R["phases"][key] = {
        "mode": "supervised (--comfyui-dir)",
        "profile": profile or "default",
        "comfyui_port": seen.get("port"),
        "comfyui_to_system_stats_s": round(seen["comfy_s"], 3) if "comfy_s" in seen else None,
        "flowhost_first_livez_200_s": round(seen["livez_s"], 3) if "livez_s" in seen else None,
        "flowhost_first_health_answer": seen.get("first_health"),
        "flowhost_to_health_ready_s": round(fh_s, 3) if health else None,
        "flowhost_to_status_ready_s": round(seen["status_ready_s"], 3) if "status_ready_s" in seen else None,
        "system_stats": stats_body,
        "health": health,
    }
    save()
    log(f"supervised ({profile or 'default'}): ComfyUI (port {seen.get('port')}) answered after {seen.get('comfy_s')} s; /health 200 after {fh_s:.2f} s: {bool(health)}; status ready after {seen.get('status_ready_s')}")
    if health is None:
        raise SystemExit("flowhost never became ready")
    return fh


def phase_start():
    if ARGS.mode == "dir":
        return phase_start_supervised(ARGS.profile)
    fe = ARGS.front_end_root
    os.makedirs(fe, exist_ok=True)
    cmd = [ARGS.python, "main.py", "--listen", "127.0.0.1", "--port", str(ARGS.comfy_port), "--front-end-root", fe] + ARGS.comfy_arg
    log("ComfyUI:", " ".join(cmd))
    t = time.monotonic()
    comfy = spawn(cmd, "comfyui.log", cwd=ARGS.comfyui)

    def up():
        if comfy.poll() is not None:
            raise SystemExit(f"ComfyUI exited with {comfy.returncode}")
        st, body = get_json(ARGS.comfy_port, "/system_stats", timeout=2)
        return body if st == 200 else None

    stats_body = wait_until(up, ARGS.comfy_start_timeout)
    comfy_s = time.monotonic() - t
    if stats_body is None:
        R["phases"]["start"] = {"comfyui_ready": False, "after_s": comfy_s}
        save()
        raise SystemExit("ComfyUI did not answer /system_stats")
    log(f"ComfyUI answered /system_stats after {comfy_s:.2f} s")

    cmd = [ARGS.flowhost, "serve", "--comfyui-url", f"http://127.0.0.1:{ARGS.comfy_port}", "--models", ARGS.models,
           "--plugins", ARGS.plugins, "--listen", f"127.0.0.1:{ARGS.flowhost_port}", "--cache-dir", ARGS.cache_dir] + ARGS.flowhost_arg
    log("flowhost:", " ".join(cmd))
    t = time.monotonic()
    fh = spawn(cmd, "flowhost.log")
    first_answer = [None]

    def ready():
        if fh.poll() is not None:
            raise SystemExit(f"flowhost exited with {fh.returncode}")
        st, body = get_json(ARGS.flowhost_port, "/health", timeout=2)
        if first_answer[0] is None:
            first_answer[0] = (time.monotonic() - t, st)
        return body if st == 200 and isinstance(body, dict) and body.get("status") in SERVING else None

    health = wait_until(ready, 120, interval=0.05)
    fh_s = time.monotonic() - t
    R["phases"]["start"] = {
        "comfyui_to_system_stats_s": round(comfy_s, 3),
        "flowhost_first_health_answer": first_answer[0],
        "flowhost_to_health_ready_s": round(fh_s, 3) if health else None,
        "system_stats": stats_body,
        "health": health,
    }
    if health is None:
        st, body = get_json(ARGS.flowhost_port, "/health")
        R["phases"]["start"]["health_last"] = {"status": st, "body": body}
    save()
    log(f"flowhost /health ready after {fh_s:.2f} s: {bool(health)}")
    if health is None:
        raise SystemExit("flowhost never became ready")
    return fh


def phase_dry_run():
    body = flux_body(ARGS.size, ARGS.steps, "dry")
    st, hd, raw, dt = http_req(ARGS.flowhost_port, "POST", "/flux-dev?dry_run=true", body)
    doc = json.loads(raw)
    R["phases"]["dry_run"] = {"status": st, "wall_s": round(dt, 4), "response": doc}
    save()
    wf = doc.get("workflow") or doc.get("job", {}).get("workflow")
    if isinstance(wf, str):
        wf = json.loads(wf)
    log(f"dry run {st}: {len(wf or {})} nodes")
    return wf


def phase_first():
    body = flux_body(ARGS.size, ARGS.steps, "first")
    log("first /flux-dev request:", body)
    row = flowhost_call("/flux-dev", body, timeout=ARGS.request_timeout)
    R["phases"]["first"] = {"request": body, "response": row}
    log("first:", {k: row.get(k) for k in ("status", "wall_s", "x_generation_ms", "server_timing", "jpeg_size", "body")})
    save()
    if row.get("status") != 200:
        body2 = flux_body(ARGS.size, ARGS.steps, "first-retry")
        row2 = flowhost_call("/flux-dev", body2, timeout=ARGS.request_timeout)
        R["phases"]["first"]["retry"] = {"request": body2, "response": row2}
        log("first retry:", {k: row2.get(k) for k in ("status", "wall_s", "x_generation_ms", "server_timing", "body")})
        save()


def start_files_flowhost():
    """A second flowhost on the same supervised ComfyUI with `--output-transport files`
    (SaveImage PNG, /view, PNG→JPEG): the A/B for the raster transport, same GPU state."""
    if not ARGS.files_variant:
        return None
    cache = ARGS.cache_dir.rstrip("/") + "-files"
    state = ARGS.cache_dir.rstrip("/") + "-files-state"  # not under --out: nothing of it comes back
    cmd = [ARGS.flowhost, "serve", "--comfyui-url", f"http://127.0.0.1:{ARGS.comfy_port}/", "--output-transport", "files",
           "--warm-up", "off", "--models", ARGS.models, "--plugins", ARGS.plugins,
           "--listen", f"127.0.0.1:{ARGS.files_port}", "--cache-dir", cache, "--state-dir", state]
    log("flowhost (files transport, same ComfyUI):", " ".join(cmd))
    p = spawn(cmd, "flowhost-files.log")
    ok = wait_until(lambda: get_json(ARGS.files_port, "/health", timeout=2)[0] == 200, 60)
    R["phases"]["files_flowhost"] = {"ready": bool(ok), "port": ARGS.files_port}
    save()
    if not ok:
        R["notes"].append("files-transport flowhost never became ready; no A/B")
        return None
    return p


def phase_warm(template):
    files = start_files_flowhost()
    rows = []
    R["phases"]["warm"] = {"size": ARGS.size, "steps": ARGS.steps, "rows": rows}
    def one_flowhost(i):
        body = flux_body(ARGS.size, ARGS.steps, "warm")
        fh = flowhost_call("/flux-dev", body, timeout=ARGS.request_timeout, keep_body=(i == ARGS.warm - 1))
        raw = fh.pop("_raw", None)
        if raw and fh.get("status") == 200:
            with open(os.path.join(ARGS.out, "warm.jpg"), "wb") as f:
                f.write(raw)
        fh["i"] = i
        rows.append(fh)
        log("warm flowhost", i, {k: fh.get(k) for k in ("status", "wall_s", "x_generation_ms", "server_timing", "jpeg_size")})

    def one_files(i):
        body = flux_body(ARGS.size, ARGS.steps, "warm-files")
        fh = flowhost_call("/flux-dev", body, timeout=ARGS.request_timeout, port=ARGS.files_port)
        fh["i"] = i
        fh["path"] = "files"
        rows.append(fh)
        log("warm files   ", i, {k: fh.get(k) for k in ("status", "wall_s", "server_timing", "jpeg_size")})

    def one_direct(i):
        d = direct_call(graph_for(template, f"direct #{i}: a lighthouse on a cliff at dawn {uuid.uuid4().hex[:8]}", 5000 + i), ARGS.request_timeout)
        d["i"] = i
        rows.append(d)
        log("warm direct  ", i, {k: d.get(k) for k in ("status", "wall_s", "comfy_exec_ms", "png_size", "error")})

    def one_direct_ws(i):
        g = graph_for(template, f"direct-ws #{i}: a lighthouse on a cliff at dawn {uuid.uuid4().hex[:8]}", 7000 + i, via_ws=True)
        d = direct_call(g, ARGS.request_timeout, via_ws=True)
        d["i"] = i
        rows.append(d)
        log("warm direct_ws", i, {k: d.get(k) for k in ("status", "wall_s", "comfy_exec_ms", "png_size", "error")})

    for i in range(ARGS.warm):
        # rotate which path goes first, so none always follows another
        steps = [one_flowhost, one_direct] + ([one_direct_ws] if ARGS.ws_variant else []) + ([one_files] if files else [])
        k = i % len(steps)
        for step in steps[k:] + steps[:k]:
            if step is not one_flowhost and not template:
                continue
            step(i)
        save()
    fh_rows = [r for r in rows if r.get("route") and r.get("path") != "files" and r.get("status") == 200]
    files_rows = [r for r in rows if r.get("path") == "files" and r.get("status") == 200]
    dc_rows = [r for r in rows if r.get("path") == "direct" and r.get("status") == 200]
    ws_rows = [r for r in rows if r.get("path") == "direct_ws" and r.get("status") == 200]
    # ComfyUI's own view of each run (execution_start → execution_success, ms stamps from
    # its history), the same clock for both paths: wall − that = what the path adds.
    for r in fh_rows + dc_rows + ws_rows:
        r["history_exec_ms"] = history_exec_ms(r.get("x_prompt_id") or r.get("prompt_id"))
    summ = {
        "flowhost_wall_s": stats([r["wall_s"] for r in fh_rows]),
        "flowhost_comfyui_exec_ms": stats([r["server_timing"].get("comfyui") for r in fh_rows]),
        "flowhost_queue_ms": stats([r["server_timing"].get("queue") for r in fh_rows]),
        "flowhost_encode_ms": stats([r["server_timing"].get("encode") for r in fh_rows]),
        "flowhost_build_ms": stats([r["server_timing"].get("build") for r in fh_rows]),
        "flowhost_x_generation_ms": stats([r["x_generation_ms"] for r in fh_rows]),
        "direct_wall_s": stats([r["wall_s"] for r in dc_rows]),
        "direct_comfy_exec_ms": stats([r.get("comfy_exec_ms") for r in dc_rows]),
    }
    pairs = []
    for i in range(ARGS.warm):
        a = [r for r in fh_rows if r.get("i") == i]
        b = [r for r in dc_rows if r.get("i") == i]
        if a and b:
            pairs.append(a[0]["wall_s"] - b[0]["wall_s"])
    summ["pairwise_flowhost_minus_direct_s"] = stats(pairs)
    if summ["flowhost_wall_s"] and summ["direct_wall_s"]:
        summ["median_diff_s"] = round(summ["flowhost_wall_s"]["median"] - summ["direct_wall_s"]["median"], 4)
    # host-added inside flowhost: total − ComfyUI execution − queue wait
    summ["flowhost_wall_minus_exec_ms"] = stats([r["wall_s"] * 1000 - r["server_timing"].get("comfyui", 0) for r in fh_rows])
    summ["direct_wall_minus_exec_ms"] = stats([r["wall_s"] * 1000 - r["comfy_exec_ms"] for r in dc_rows if r.get("comfy_exec_ms")])
    summ["flowhost_wall_minus_history_exec_ms"] = stats([r["wall_s"] * 1000 - r["history_exec_ms"] for r in fh_rows if r.get("history_exec_ms")])
    summ["direct_wall_minus_history_exec_ms"] = stats([r["wall_s"] * 1000 - r["history_exec_ms"] for r in dc_rows if r.get("history_exec_ms")])
    summ["history_exec_ms_flowhost"] = stats([r.get("history_exec_ms") for r in fh_rows])
    summ["history_exec_ms_direct"] = stats([r.get("history_exec_ms") for r in dc_rows])
    a, b = summ["flowhost_wall_minus_history_exec_ms"], summ["direct_wall_minus_history_exec_ms"]
    if not a:
        # flowhost deletes each job's history entry when the job ends (durable jobs keep the
        # outputs), so ComfyUI's own stamps are gone by the time we ask: use execution as each
        # client saw it on its websocket (execution_start → terminal event) for both paths.
        a, b = summ["flowhost_wall_minus_exec_ms"], summ["direct_wall_minus_exec_ms"]
        summ["overhead_basis"] = "websocket execution_start→end (flowhost's Server-Timing comfyui; the direct client's own)"
    else:
        summ["overhead_basis"] = "ComfyUI history stamps"
    if a and b:
        summ["overhead_ms_median_of_added"] = round(a["median"] - b["median"], 1)
    # The raster transport (default, flowhost's node) against files (SaveImage + /view + PNG→JPEG),
    # same ComfyUI, interleaved.
    summ["files_wall_s"] = stats([r["wall_s"] for r in files_rows])
    summ["files_comfyui_exec_ms"] = stats([r["server_timing"].get("comfyui") for r in files_rows])
    summ["files_encode_ms"] = stats([r["server_timing"].get("encode") for r in files_rows])
    summ["files_wall_minus_exec_ms"] = stats([r["wall_s"] * 1000 - r["server_timing"].get("comfyui", 0) for r in files_rows])
    # ComfyUI's execution by its own stamps (Server-Timing comfyui_clock): its websocket messages
    # can reach a client late (its event loop waits for the GIL while the worker computes).
    summ["flowhost_wall_minus_clock_ms"] = stats([r["wall_s"] * 1000 - r["server_timing"]["comfyui_clock"] for r in fh_rows if "comfyui_clock" in r["server_timing"]])
    summ["files_wall_minus_clock_ms"] = stats([r["wall_s"] * 1000 - r["server_timing"]["comfyui_clock"] for r in files_rows if "comfyui_clock" in r["server_timing"]])
    if summ["files_wall_s"] and summ["flowhost_wall_s"]:
        summ["raster_minus_files_wall_ms"] = round((summ["flowhost_wall_s"]["median"] - summ["files_wall_s"]["median"]) * 1000, 1)
    summ["direct_ws_wall_s"] = stats([r["wall_s"] for r in ws_rows])
    summ["history_exec_ms_direct_ws"] = stats([r.get("history_exec_ms") for r in ws_rows])
    summ["direct_ws_wall_minus_history_exec_ms"] = stats([r["wall_s"] * 1000 - r["history_exec_ms"] for r in ws_rows if r.get("history_exec_ms")])
    first = (R["phases"].get("first") or {}).get("response") or {}
    if first.get("status") == 200 and summ["flowhost_wall_s"]:
        summ["first_over_warm_median"] = round(first["wall_s"] / summ["flowhost_wall_s"]["median"], 3)
    R["phases"]["warm"]["summary"] = summ
    save()
    log("warm summary:", json.dumps(summ))


def history_exec_ms(prompt_id):
    if not prompt_id:
        return None
    try:
        st, doc = get_json(ARGS.comfy_port, f"/history/{prompt_id}")
        msgs = dict((m[0], m[1]) for m in doc[prompt_id]["status"]["messages"])
        return msgs["execution_success"]["timestamp"] - msgs["execution_start"]["timestamp"]
    except Exception:
        return None


def phase_concurrent(n: int):
    rows = [None] * n
    barrier = threading.Barrier(n)

    def worker(i):
        body = flux_body(ARGS.size, ARGS.steps, f"conc{n}")
        barrier.wait()
        rows[i] = flowhost_call("/flux-dev", body, timeout=ARGS.request_timeout + 60 * n)
        rows[i]["i"] = i

    t = time.perf_counter()
    t_wall = time.time()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    total = time.perf_counter() - t
    ok = [r for r in rows if r and r.get("status") == 200]
    statuses = {}
    for r in rows:
        statuses[str(r.get("status"))] = statuses.get(str(r.get("status")), 0) + 1
    summ = {
        "n": n, "total_s": round(total, 3), "started_at": round(t_wall, 3), "statuses": statuses,
        "ok_latency_s": stats([r["wall_s"] for r in ok]),
        "ok_exec_ms": stats([r["server_timing"].get("comfyui") for r in ok]),
        "ok_queue_ms": stats([r["server_timing"].get("queue") for r in ok]),
        "images_per_min": round(len(ok) / total * 60, 2) if total > 0 else None,
        "last_ok_s": round(max((r["started_at"] + r["wall_s"] for r in ok), default=t_wall) - t_wall, 3),
    }
    key, k = f"conc_{n}", 2
    while key in R["phases"]:  # a repeated round keeps its own entry
        key, k = f"conc_{n}_{k}", k + 1
    R["phases"][key] = {"summary": summ, "rows": sorted(rows, key=lambda r: r.get("wall_s") or 0)}
    save()
    log(f"concurrent {n}:", json.dumps(summ))


def phase_extra():
    rows = []
    R["phases"]["extra"] = {"rows": rows}
    plans = []
    for size, steps in ARGS.extra_plan:
        plans += [("/flux-dev", size, steps)] * ARGS.extra_n
    for route, size, steps in plans:
        if elapsed() > ARGS.budget_s:
            R["notes"].append(f"extra: stopped at {elapsed():.0f} s (budget {ARGS.budget_s} s)")
            break
        body = flux_body(size, steps, "extra")
        row = flowhost_call(route, body, timeout=ARGS.request_timeout)
        rows.append(row)
        log("extra", size, steps, {k: row.get(k) for k in ("status", "wall_s", "server_timing", "jpeg_size")})
        save()
    by = {}
    for r in rows:
        if r.get("status") == 200:
            by.setdefault(f"{r['size']}px_{r['steps']}steps", []).append(r)
    R["phases"]["extra"]["summary"] = {
        k: {"wall_s": stats([r["wall_s"] for r in v]), "exec_ms": stats([r["server_timing"].get("comfyui") for r in v])}
        for k, v in by.items()
    }
    save()


def phase_lora():
    """/flux-lora and /flux-dev in the order --lora-pattern gives (each switch re-patches Flux)."""
    if not ARGS.lora_id:
        return
    rows = []
    R["phases"]["lora"] = {"pattern": ARGS.lora_pattern, "rows": rows}
    for i, kind in enumerate(ARGS.lora_pattern.split(",")):
        if elapsed() > ARGS.budget_s:
            R["notes"].append(f"lora: stopped at {elapsed():.0f} s")
            break
        body = flux_body(ARGS.size, ARGS.steps, kind)
        route = "/flux-dev"
        if kind == "lora":
            route = "/flux-lora"
            body.update({"lora_id": ARGS.lora_id, "lora_strength": 0.8})
            if "dry_run" not in R["phases"]["lora"]:
                st, hd, raw, dt = http_req(ARGS.flowhost_port, "POST", "/flux-lora?dry_run=true", body)
                R["phases"]["lora"]["dry_run"] = {"status": st, "body": raw[:6000].decode("utf-8", "replace")}
        row = flowhost_call(route, body, timeout=ARGS.request_timeout)
        row["i"], row["kind"] = i, kind
        rows.append(row)
        log("lora phase", i, kind, {k: row.get(k) for k in ("status", "wall_s", "server_timing", "jpeg_size", "body")})
        save()


def stop_flowhost(fh) -> None:
    """SIGTERM flowhost (it stops its ComfyUI child) and wait, so the GPU is free again."""
    if fh is None:
        return
    if fh.poll() is None:
        fh.send_signal(signal.SIGTERM)
        try:
            fh.wait(timeout=40)
        except subprocess.TimeoutExpired:
            fh.kill()
            fh.wait()
    if fh in PROCS:
        PROCS.remove(fh)
    # the supervised ComfyUI must be gone too before the next one loads 34 GB onto the GPU
    wait_until(lambda: ARGS.comfy_port is None or not port_open(ARGS.comfy_port), 30, interval=0.2)


def port_open(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def phase_profiles(fh):
    """Each launch profile: restart flowhost (and so ComfyUI) with it, then the first request
    and --profile-warm warm requests at the main size. The main phases are the baseline."""
    names = [p for p in ARGS.profiles.split(",") if p]
    if not names:
        return fh
    if ARGS.mode != "dir":
        R["notes"].append("profiles: need --mode dir (flowhost starts ComfyUI with the profile)")
        return fh
    out = R["phases"].setdefault("profiles", {})
    for name in names:
        if elapsed() > ARGS.budget_s:
            R["notes"].append(f"profile {name}: skipped at {elapsed():.0f} s (budget {ARGS.budget_s} s)")
            continue
        log(f"profile {name}: restarting flowhost + ComfyUI")
        stop_flowhost(fh)
        fh = None
        entry = out.setdefault(name, {"rows": []})
        save()
        try:
            fh = phase_start_supervised(name, key=f"start_{name}")
        except SystemExit as e:
            entry["error"] = str(e)
            save()
            continue
        entry["start"] = R["phases"].pop(f"start_{name}")
        body = flux_body(ARGS.size, ARGS.steps, f"first-{name}")
        entry["first"] = flowhost_call("/flux-dev", body, timeout=ARGS.request_timeout)
        log(f"profile {name} first:", {k: entry["first"].get(k) for k in ("status", "wall_s", "server_timing", "body")})
        save()
        for i in range(ARGS.profile_warm):
            if elapsed() > ARGS.budget_s + 60:
                R["notes"].append(f"profile {name}: warm stopped at {i} ({elapsed():.0f} s)")
                break
            body = flux_body(ARGS.size, ARGS.steps, f"warm-{name}")
            row = flowhost_call("/flux-dev", body, timeout=ARGS.request_timeout, keep_body=(i == 0))
            raw = row.pop("_raw", None)
            if raw and row.get("status") == 200 and ARGS.keep_profile_jpeg:
                with open(os.path.join(ARGS.keep_profile_jpeg, f"warm-{name}.jpg"), "wb") as f:
                    f.write(raw)
            row["i"] = i
            entry["rows"].append(row)
            log(f"profile {name} warm", i, {k: row.get(k) for k in ("status", "wall_s", "server_timing")})
            save()
        ok = [r for r in entry["rows"] if r.get("status") == 200]
        entry["summary"] = {
            "wall_s": stats([r["wall_s"] for r in ok]),
            "comfyui_exec_ms": stats([r["server_timing"].get("comfyui") for r in ok]),
        }
        save()
    return fh


def phase_final():
    try:
        st, _, raw, _ = http_req(ARGS.flowhost_port, "GET", "/metrics")
        R["phases"]["final"] = {"metrics_status": st, "metrics": raw.decode("utf-8", "replace")[-20000:]}
        R["phases"]["final"]["system_stats"] = get_json(ARGS.comfy_port, "/system_stats")[1]
        R["phases"]["final"]["health"] = get_json(ARGS.flowhost_port, "/health")[1]
    except Exception as e:
        R["phases"]["final"] = {"error": repr(e)}
    save()


def main() -> int:
    global ARGS
    ap = argparse.ArgumentParser()
    ap.add_argument("--comfyui", required=True)
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--comfy-arg", action="append", default=[])
    ap.add_argument("--comfy-port", type=int, default=8188)
    ap.add_argument("--comfy-start-timeout", type=float, default=300)
    ap.add_argument("--front-end-root", required=True)
    ap.add_argument("--flowhost", required=True)
    ap.add_argument("--flowhost-arg", action="append", default=[])
    ap.add_argument("--flowhost-port", type=int, default=8000)
    ap.add_argument("--models", required=True)
    ap.add_argument("--plugins", required=True)
    ap.add_argument("--cache-dir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warm", type=int, default=6)
    ap.add_argument("--concurrency", default="5")
    ap.add_argument("--extra", default="512x4", help="SIZExSTEPS list for the extra phase ('' = none)")
    ap.add_argument("--extra-n", type=int, default=3)
    ap.add_argument("--lora-id", default="")
    ap.add_argument("--lora-pattern", default="lora,lora,dev", help="order of /flux-lora (lora) and /flux-dev (dev) calls")
    ap.add_argument("--profile", default="", help="launch profile for the main run (--mode dir); '' = default")
    ap.add_argument("--profiles", default="", help="comma list of launch profiles to compare after the main phases (--mode dir)")
    ap.add_argument("--profile-warm", type=int, default=3, help="warm requests per compared profile")
    ap.add_argument("--keep-profile-jpeg", default="", help="folder for one warm JPEG per compared profile")
    ap.add_argument("--ws-variant", action=argparse.BooleanOptionalAction, default=True,
                    help="also time the direct client with SaveImageWebsocket as the output node")
    ap.add_argument("--files-variant", action=argparse.BooleanOptionalAction, default=True,
                    help="also time a second flowhost with --output-transport files on the same ComfyUI (--mode dir)")
    ap.add_argument("--files-port", type=int, default=8011)
    ap.add_argument("--keep-png", default="", help="write one PNG the direct client got from /view here")
    ap.add_argument("--mode", choices=["url", "dir"], default="dir",
                    help="url: start ComfyUI here, flowhost --comfyui-url; dir: flowhost --comfyui-dir spawns it")
    ap.add_argument("--request-timeout", type=float, default=300)
    ap.add_argument("--budget-s", type=float, default=480, help="optional phases start only before this many seconds")
    ARGS = ap.parse_args()
    ARGS.extra_plan = [tuple(int(x) for x in p.split("x")) for p in ARGS.extra.split(",") if p]
    os.makedirs(ARGS.out, exist_ok=True)

    def on_term(signum, frame):
        raise SystemExit(f"signal {signum} at {elapsed():.0f} s")

    signal.signal(signal.SIGTERM, on_term)
    R["args"] = {k: v for k, v in vars(ARGS).items()}
    R["started_at"] = time.time()
    save()
    fh = None
    try:
        fh = phase_start()
        template = phase_dry_run()
        phase_first()
        phase_warm(template)
        for n in [int(x) for x in ARGS.concurrency.split(",") if x]:
            if elapsed() > ARGS.budget_s + 60:
                R["notes"].append(f"conc_{n}: skipped at {elapsed():.0f} s")
                continue
            phase_concurrent(n)
        if elapsed() < ARGS.budget_s:
            phase_extra()
        if elapsed() < ARGS.budget_s:
            phase_lora()
        phase_final()
        fh = phase_profiles(fh)
    except SystemExit as e:
        R["notes"].append(f"stopped: {e}")
        log("stopped:", e)
    finally:
        R["total_s"] = round(elapsed(), 1)
        save()
        stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
