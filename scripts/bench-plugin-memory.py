#!/usr/bin/env python3
"""Host memory under hostile plugin calls (issue 28): RSS of a `flowhost serve --simulate`
process before, during and after 32 concurrent calls that each try to make the host hold
50 MiB (a 50 MiB log message, a 50 MiB upload, a 50 MiB workflow), once with the default
plugin memory budget and once with the budget effectively off (the behaviour before it).

Usage: scripts/bench-plugin-memory.py [--flowhost target/debug/flowhost] [--plugin PATH]
The hostile fixture is built (wasm32-wasip2, release) when --plugin is not given. Prints a
Markdown table for BENCHMARKS.md. A benchmark, not a test: it asserts nothing.
"""

import argparse
import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CALLS = 32
SIZE = 50 << 20


def rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(base, body, timeout=120):
    req = urllib.request.Request(f"{base}/hostile?dry_run=true", data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as e:
        e.read()
        return e.code


def build_plugin():
    subprocess.run(["cargo", "build", "--quiet", "--release", "--target", "wasm32-wasip2", "-p", "fixture-hostile"], cwd=ROOT, check=True)
    return os.path.join(ROOT, "target", "wasm32-wasip2", "release", "fixture_hostile.wasm")


def run(flowhost, plugin, budget_mb, modes):
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        plugins = os.path.join(tmp, "plugins")
        os.makedirs(plugins)
        with open(plugin, "rb") as src, open(os.path.join(plugins, "hostile.wasm"), "wb") as dst:
            dst.write(src.read())
        port = free_port()
        args = [flowhost, "serve", "--simulate", "--listen", f"127.0.0.1:{port}", "--plugins", plugins,
                "--cache-dir", os.path.join(tmp, "cache"), "--state-dir", os.path.join(tmp, "state"), "--warm-up", "off",
                "--plugin-concurrency", "64", "--plugin-timeout-ms", "30000", "--plugin-memory-budget-mb", str(budget_mb)]
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        base = f"http://127.0.0.1:{port}"
        try:
            for _ in range(600):
                try:
                    with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                        if json.load(r)["comfyui"]["status"] == "ready":
                            break
                except Exception:
                    pass
                time.sleep(0.1)
            for _ in range(5):
                post(base, {"mode": "ok"})
            time.sleep(1)
            for mode in modes:
                idle = rss_mb(proc.pid)
                peak = [idle]
                done = threading.Event()

                def sample():
                    while not done.is_set():
                        peak[0] = max(peak[0], rss_mb(proc.pid))
                        time.sleep(0.005)

                sampler = threading.Thread(target=sample)
                sampler.start()
                with concurrent.futures.ThreadPoolExecutor(CALLS) as pool:
                    statuses = list(pool.map(lambda _: post(base, {"mode": mode, "n": SIZE}), range(CALLS)))
                done.set()
                sampler.join()
                time.sleep(2)
                after = rss_mb(proc.pid)
                counts = {s: statuses.count(s) for s in sorted(set(statuses))}
                healthy = post(base, {"mode": "ok"}) == 200
                rows.append((budget_mb, mode, counts, idle, peak[0], after, healthy))
        finally:
            proc.terminate()
            proc.wait()
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--flowhost", default=os.path.join(ROOT, "target", "debug", "flowhost"))
    ap.add_argument("--plugin")
    ap.add_argument("--modes", default="big-log,big-upload,big-workflow")
    a = ap.parse_args()
    plugin = a.plugin or build_plugin()
    modes = a.modes.split(",")
    print("| budget | 32 calls × 50 MiB | answers | RSS idle | RSS peak | RSS 2 s after | next call |")
    print("|---|---|---|---|---|---|---|")
    for budget in (1024, 1 << 20):
        for budget_mb, mode, counts, idle, peak, after, healthy in run(a.flowhost, plugin, budget, modes):
            label = f"{budget_mb} MiB (default)" if budget_mb == 1024 else "off (1 TiB)"
            answers = ", ".join(f"{n}× {s}" for s, n in counts.items())
            print(f"| {label} | {mode} | {answers} | {idle:.0f} MB | {peak:.0f} MB | {after:.0f} MB | {'200' if healthy else 'FAILED'} |")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
