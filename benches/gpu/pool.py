#!/usr/bin/env python3
"""Worker-pool phase of the GPU benchmark (issues 13 and 16): `flowhost serve --comfyui-dir
--gpus LIST` (one supervised ComfyUI per entry; an entry may repeat to put two ComfyUIs on one
card), then an interleaved load over several model sets — /flux-lora at different strengths and
/flux-dev, each a different set for ComfyUI, so each change re-patches Flux — all submitted at
once, under `--dispatch affinity` and then `--dispatch fifo`.

Per dispatch policy it records: the start to ready (per-worker warm-up included), every job's
wall time (submission to JPEG), images per minute, p50/p95, and from /metrics the model switches
and affinity hits per worker. Writes OUT/pool.json and prints a markdown table.

    python3 pool.py --flowhost F --comfyui DIR --python PY --front-end-root FE --models M \
        --plugins P --cache-dir C --out OUT --gpus 0,0 --lora-id flux-random-lora
"""

import argparse
import json
import os
import re
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request

ARGS = None


def http(method, path, body=None, timeout=600, headers=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"http://127.0.0.1:{ARGS.port}{path}", data=data, method=method)
    req.add_header("content-type", "application/json")
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def sets():
    """The model sets of the interleave: LoRA strengths (each a different patch) and no LoRA."""
    out = []
    for s in ARGS.strengths.split(","):
        out.append(("lora", float(s)))
    out.append(("dev", None))
    return out


def body_for(kind, strength, i):
    body = {"prompt": f"pool bench {i}", "width": ARGS.size, "height": ARGS.size, "steps": ARGS.steps, "seed": 1000 + i}
    if kind == "lora":
        body.update({"lora_id": ARGS.lora_id, "lora_strength": strength})
    return body


def metrics():
    st, _, raw = http("GET", "/metrics", timeout=10)
    text = raw.decode("utf-8", "replace") if st == 200 else ""
    found = {"switches": {}, "hits": {}}
    for line in text.splitlines():
        m = re.match(r'flowhost_(model_switches|affinity_hits)_total\{worker="([^"]+)"\} ([0-9.e+]+)', line)
        if m:
            found["switches" if m.group(1) == "model_switches" else "hits"][m.group(2)] = float(m.group(3))
    return found


def run_policy(policy, deadline):
    state = os.path.join(ARGS.cache_dir, f"pool-state-{policy}")
    os.makedirs(state, exist_ok=True)
    cmd = [ARGS.flowhost, "serve", "--comfyui-dir", ARGS.comfyui, "--comfyui-python", ARGS.python,
           "--comfyui-arg=--front-end-root", f"--comfyui-arg={ARGS.front_end_root}",
           "--gpus", ARGS.gpus, "--dispatch", policy, "--max-in-flight", "1",
           "--affinity-wait-bound", str(ARGS.wait_bound), "--queue-depth", "200",
           "--models", ARGS.models, "--plugins", ARGS.plugins, "--listen", f"127.0.0.1:{ARGS.port}",
           "--cache-dir", ARGS.cache_dir, "--state-dir", state, "--job-timeout", "900"]
    log = open(os.path.join(ARGS.out, f"pool-flowhost-{policy}.log"), "wb")
    print("pool:", " ".join(cmd), flush=True)
    t0 = time.monotonic()
    fh = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    row = {"policy": policy, "gpus": ARGS.gpus}
    try:
        health = None
        while time.monotonic() - t0 < ARGS.start_timeout:
            if fh.poll() is not None:
                row["error"] = f"flowhost exited with {fh.returncode}"
                return row
            try:
                st, _, raw = http("GET", "/health", timeout=3)
                body = json.loads(raw or b"{}")
                if st == 200 and body.get("ready"):
                    health = body
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.2)
        row["start_to_ready_s"] = round(time.monotonic() - t0, 2)
        if health is None:
            row["error"] = "never ready"
            return row
        row["warm_up"] = health.get("warm_up")
        row["workers"] = [w.get("name") for w in health.get("workers") or []]
        before = metrics()
        plan = []
        model_sets = sets()
        for i in range(ARGS.jobs):
            kind, strength = model_sets[i % len(model_sets)]
            plan.append((i, kind, strength))
        results = [None] * len(plan)

        def one(i, kind, strength):
            route = "/flux-lora" if kind == "lora" else "/flux-dev"
            t = time.monotonic()
            st, hd, raw = http("POST", route, body_for(kind, strength, i), timeout=max(60, deadline - time.monotonic()))
            results[i] = {"i": i, "set": f"{kind}@{strength}" if strength is not None else kind, "status": st,
                          "wall_s": round(time.monotonic() - t, 3), "server_timing": hd.get("Server-Timing") or hd.get("server-timing"),
                          "bytes": len(raw) if st == 200 else raw[:300].decode("utf-8", "replace")}

        t = time.monotonic()
        threads = []
        for i, kind, strength in plan:
            th = threading.Thread(target=one, args=(i, kind, strength), daemon=True)
            th.start()
            threads.append(th)
            time.sleep(0.05)  # arrival order = plan order
        for th in threads:
            th.join(timeout=max(1, deadline - time.monotonic()))
        total = time.monotonic() - t
        after = metrics()
        done = [r for r in results if r and r["status"] == 200]
        walls = sorted(r["wall_s"] for r in done)
        pct = lambda q: walls[min(len(walls) - 1, int(q * len(walls)))] if walls else None
        row.update({
            "jobs": len(plan), "ok": len(done), "total_s": round(total, 2),
            "images_per_min": round(len(done) / total * 60, 2) if total else None,
            "p50_s": pct(0.5), "p95_s": pct(0.95),
            "switches": {w: after["switches"].get(w, 0) - before["switches"].get(w, 0) for w in after["switches"]},
            "hits": {w: after["hits"].get(w, 0) - before["hits"].get(w, 0) for w in after["hits"]},
            "warm_up_switches": before["switches"],
            "rows": results,
        })
        return row
    finally:
        if fh.poll() is None:
            os.killpg(fh.pid, signal.SIGTERM)
            try:
                fh.wait(timeout=40)
            except subprocess.TimeoutExpired:
                os.killpg(fh.pid, signal.SIGKILL)
                fh.wait()
        log.close()


def main():
    global ARGS
    ap = argparse.ArgumentParser()
    for a in ("--flowhost", "--comfyui", "--front-end-root", "--models", "--plugins", "--cache-dir", "--out"):
        ap.add_argument(a, required=True)
    ap.add_argument("--python", default="python3")
    ap.add_argument("--gpus", default="0,0")
    ap.add_argument("--lora-id", default="flux-random-lora")
    ap.add_argument("--strengths", default="0.6,0.8,1.0", help="LoRA strengths: each a model set of its own (plus no LoRA)")
    ap.add_argument("--jobs", type=int, default=16)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--wait-bound", type=float, default=120)
    ap.add_argument("--policies", default="affinity,fifo")
    ap.add_argument("--port", type=int, default=8010)
    ap.add_argument("--start-timeout", type=float, default=400)
    ap.add_argument("--budget-s", type=float, default=400, help="a policy starts only before this many seconds")
    ARGS = ap.parse_args()
    os.makedirs(ARGS.out, exist_ok=True)
    os.makedirs(ARGS.front_end_root, exist_ok=True)
    started = time.monotonic()
    report = {"gpus": ARGS.gpus, "jobs": ARGS.jobs, "size": ARGS.size, "steps": ARGS.steps, "sets": [f"{k}@{s}" if s is not None else k for k, s in sets()],
              "wait_bound_s": ARGS.wait_bound, "runs": []}
    path = os.path.join(ARGS.out, "pool.json")
    for policy in ARGS.policies.split(","):
        if time.monotonic() - started > ARGS.budget_s:
            report.setdefault("notes", []).append(f"{policy}: not started, out of time")
            break
        report["runs"].append(run_policy(policy, started + ARGS.budget_s + 240))
        with open(path, "w") as f:
            json.dump(report, f, indent=1)
    print(f"\n### Worker pool: --gpus {ARGS.gpus}, {ARGS.jobs} jobs over {len(sets())} model sets, {ARGS.size}²/{ARGS.steps}, all submitted at once\n")
    print("| dispatch | start → ready s | ok | total s | images/min | p50 s | p95 s | switches (per worker) | hits |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in report["runs"]:
        sw = r.get("switches") or {}
        print(f"| {r['policy']} | {r.get('start_to_ready_s')} | {r.get('ok')}/{r.get('jobs')} | {r.get('total_s')} | {r.get('images_per_min')} | {r.get('p50_s')} | {r.get('p95_s')} | "
              f"{int(sum(sw.values()))} ({', '.join(f'{k}: {int(v)}' for k, v in sorted(sw.items()))}) | {int(sum((r.get('hits') or {}).values()))} |"
              + (f" error: {r['error']}" if r.get("error") else ""))


if __name__ == "__main__":
    main()
