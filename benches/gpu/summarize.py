#!/usr/bin/env python3
"""Markdown tables from one or more bench.py results.json files (and nvsmi.csv beside them).

  python3 summarize.py RUN_DIR_OR_RESULTS_JSON [...]
"""

from __future__ import annotations

import csv
import json
import os
import statistics
import sys


def mmm(xs, fmt="{:.2f}"):
    xs = [x for x in xs if x is not None]
    if not xs:
        return "–", "–", "–", 0
    return fmt.format(min(xs)), fmt.format(statistics.median(xs)), fmt.format(max(xs)), len(xs)


def load(path):
    if os.path.isdir(path):
        path = os.path.join(path, "results.json")
    with open(path) as f:
        return path, json.load(f)


def nvsmi_peak(results_path):
    p = os.path.join(os.path.dirname(results_path), "nvsmi.csv")
    if not os.path.exists(p):
        return None
    rows = list(csv.reader(open(p)))[1:]
    used = [int(r[1].split()[0]) for r in rows if len(r) > 4 and r[1].strip().split()[0].isdigit()]
    power = [float(r[4].split()[0]) for r in rows if len(r) > 4 and r[4].strip().split()[0].replace(".", "").isdigit()]
    return {"samples": len(rows), "mem_peak_mib": max(used, default=None), "power_max_w": max(power, default=None)}


def med(stat):
    return (stat or {}).get("median")


def headline(R):
    """The figures issue #15 asks for, one table."""
    P = R["phases"]
    s = P.get("start", {})
    w = (P.get("warm") or {}).get("summary") or {}
    first = (P.get("first") or {}).get("response") or {}
    a = R.get("args") or {}
    sz = f"{a.get('size', 1024)}²/{a.get('steps', 20)}"
    rows = [
        ("ComfyUI process start → /system_stats 200 (s)", s.get("comfyui_to_system_stats_s")),
        ("flowhost start → /livez 200 (s)", s.get("flowhost_first_livez_200_s")),
        ("flowhost start → /health 200, serving (s)", s.get("flowhost_to_health_ready_s")),
        ("flowhost start → /health \"ready\" (s; none = stayed degraded)", s.get("flowhost_to_status_ready_s")),
        ("/health status when serving", (s.get("health") or {}).get("status")),
        ("warm-up round before ready (ms; none = off or old flowhost)", ((s.get("health") or {}).get("warm_up") or {}).get("duration_ms")),
        ("warm-up per route (ms)", ", ".join(f"{r.get('route')} {r.get('state')} {r.get('duration_ms')}" for r in (((s.get("health") or {}).get("warm_up") or {}).get("routes") or [])) or None),
        ("first /flux-dev after ready, wall (s)", first.get("wall_s")),
        ("first request's Server-Timing queue (ms)", (first.get("server_timing") or {}).get("queue")),
        (f"warm /flux-dev {sz}, median wall (s)", med(w.get("flowhost_wall_s"))),
        ("first ÷ warm median", w.get("first_over_warm_median")),
        ("direct client (SaveImage + /view), median wall (s)", med(w.get("direct_wall_s"))),
        ("direct client (SaveImageWebsocket), median wall (s)", med(w.get("direct_ws_wall_s"))),
        ("flowhost wall − ComfyUI execution, median (ms)", med(w.get("flowhost_wall_minus_history_exec_ms") or w.get("flowhost_wall_minus_exec_ms"))),
        ("direct client wall − ComfyUI execution, median (ms)", med(w.get("direct_wall_minus_history_exec_ms") if w.get("flowhost_wall_minus_history_exec_ms") else w.get("direct_wall_minus_exec_ms"))),
        ("  (execution measured from)", w.get("overhead_basis")),
        ("flowhost's time beyond the direct client's (ms)", w.get("overhead_ms_median_of_added")),
        ("flowhost Server-Timing encode (raster or PNG → JPEG), median (ms)", med(w.get("flowhost_encode_ms"))),
        ("flowhost ComfyUI execution as it saw it (Server-Timing comfyui), median (ms)", med(w.get("flowhost_comfyui_exec_ms"))),
        ("flowhost wall − ComfyUI execution by its own stamps (comfyui_clock), median (ms)", med(w.get("flowhost_wall_minus_clock_ms"))),
        ("files transport wall − ComfyUI's own stamps, median (ms)", med(w.get("files_wall_minus_clock_ms"))),
        ("files transport (--output-transport files), median wall (s)", med(w.get("files_wall_s"))),
        ("files transport wall − ComfyUI execution, median (ms)", med(w.get("files_wall_minus_exec_ms"))),
        ("files transport ComfyUI execution (Server-Timing comfyui), median (ms)", med(w.get("files_comfyui_exec_ms"))),
        ("files transport Server-Timing encode (PNG→JPEG), median (ms)", med(w.get("files_encode_ms"))),
        ("default transport − files transport, median wall (ms)", w.get("raster_minus_files_wall_ms")),
        ("ComfyUI execution, SaveImage graph, median (ms)", med(w.get("history_exec_ms_direct"))),
        ("ComfyUI execution, SaveImageWebsocket graph, median (ms)", med(w.get("history_exec_ms_direct_ws"))),
    ]
    ex = (P.get("extra") or {}).get("summary") or {}
    for k, v in ex.items():
        rows.append((f"warm {k}, median wall (s)", med(v.get("wall_s"))))
    c = (P.get("conc_5") or {}).get("summary")
    if c:
        answers = sorted(round(r["wall_s"], 1) for r in P["conc_5"].get("rows", []) if r.get("status") == 200)
        rows.append(("5 concurrent: answers at (s)", answers))
    base = med(w.get("flowhost_wall_s"))
    for name, e in ((P.get("profiles") or {}).items()):
        pw = med((e.get("summary") or {}).get("wall_s"))
        st = e.get("start") or {}
        ratio = f" ({pw / base:.2f}× default)" if pw and base else ""
        rows.append((f"profile {name}: warm {sz} median wall (s)", f"{pw}{ratio}" if pw else e.get("error")))
        fw = (e.get("first") or {}).get("wall_s")
        first_ratio = f" ({fw / pw:.2f}× its warm)" if fw and pw else ""
        rows.append((f"profile {name}: first request wall (s) / start → /health 200, warm-up included (s)", f"{fw}{first_ratio} / {st.get('flowhost_to_health_ready_s')}"))
    print("| measure | value |\n|---|---|")
    for k, v in rows:
        print(f"| {k} | {v if v is not None else '–'} |")
    print()


def main(paths):
    for path in paths:
        path, R = load(path)
        P = R["phases"]
        print(f"## {path}\n")
        headline(R)
        s = P.get("start", {})
        print("| start | seconds |\n|---|---:|")
        print(f"| mode | {s.get('mode', 'url (--comfyui-url)')} |")
        print(f"| ComfyUI process start → /system_stats 200 | {s.get('comfyui_to_system_stats_s')} |")
        print(f"| flowhost start → /health 200 | {s.get('flowhost_to_health_ready_s')} |")
        h = s.get("health") or {}
        print(f"| /health status then | {h.get('status')} |\n")
        f = (P.get("first") or {}).get("response", {})
        print("| first request | value |\n|---|---|")
        for k in ("status", "wall_s", "x_generation_ms", "server_timing", "content_type", "jpeg_size", "bytes"):
            print(f"| {k} | {f.get(k)} |")
        print()
        w = P.get("warm", {})
        rows = w.get("rows", [])
        fh = [r for r in rows if r.get("route") and r.get("status") == 200]
        dc = [r for r in rows if r.get("path") == "direct" and r.get("status") == 200]
        dw = [r for r in rows if r.get("path") == "direct_ws" and r.get("status") == 200]
        print("| warm 1024² 20 steps | min | median | max | n |\n|---|---:|---:|---:|---:|")
        for label, xs in (
            ("flowhost wall s", [r["wall_s"] for r in fh]),
            ("direct client wall s", [r["wall_s"] for r in dc]),
            ("flowhost Server-Timing comfyui ms", [r["server_timing"].get("comfyui") for r in fh]),
            ("flowhost Server-Timing queue ms", [r["server_timing"].get("queue") for r in fh]),
            ("flowhost Server-Timing encode ms", [r["server_timing"].get("encode") for r in fh]),
            ("flowhost Server-Timing build ms", [r["server_timing"].get("build") for r in fh]),
            ("ComfyUI exec (its history stamps), flowhost runs, ms", [r.get("history_exec_ms") for r in fh]),
            ("ComfyUI exec (ws stamps), direct runs, ms", [r.get("comfy_exec_ms") for r in dc]),
            ("flowhost wall − ComfyUI exec ms", [r["wall_s"] * 1000 - r["history_exec_ms"] for r in fh if r.get("history_exec_ms")]),
            ("direct wall − ComfyUI exec ms", [r["wall_s"] * 1000 - r["comfy_exec_ms"] for r in dc if r.get("comfy_exec_ms")]),
            ("direct (SaveImageWebsocket) wall s", [r["wall_s"] for r in dw]),
            ("direct (SaveImageWebsocket) wall − ComfyUI exec ms", [r["wall_s"] * 1000 - r["comfy_exec_ms"] for r in dw if r.get("comfy_exec_ms")]),
        ):
            a, b, c, n = mmm(xs, "{:.3f}" if "wall s" in label else "{:.1f}")
            print(f"| {label} | {a} | {b} | {c} | {n} |")
        print()
        print("per-image flowhost wall s:", [r["wall_s"] for r in fh])
        print("per-image direct wall s:  ", [r["wall_s"] for r in dc])
        print("summary:", json.dumps({k: v for k, v in (w.get("summary") or {}).items() if k in (
            "median_diff_s", "pairwise_flowhost_minus_direct_s", "overhead_ms_median_of_added")}))
        print()
        for name in sorted(k for k in P if k.startswith("conc_")):
            c = P[name]["summary"]
            print(f"| {name} | total s | statuses | latency min/median/max s (200s) | queue median ms | images/min |")
            print("|---|---:|---|---|---:|---:|")
            l = c["ok_latency_s"] or {}
            print(f"| | {c['total_s']} | {c['statuses']} | {l.get('min')}/{l.get('median')}/{l.get('max')} | "
                  f"{(c['ok_queue_ms'] or {}).get('median')} | {c['images_per_min']} |")
            lat = sorted((r.get("wall_s"), r.get("status"), r.get("retry_after")) for r in P[name].get("rows", []))
            print("per-request (wall s, status, Retry-After):", lat)
            print()
        ex = (P.get("extra") or {}).get("summary") or {}
        if ex:
            print("| extra | wall min/median/max s | ComfyUI exec median ms |\n|---|---|---:|")
            for k, v in ex.items():
                print(f"| {k} | {v['wall_s']['min']}/{v['wall_s']['median']}/{v['wall_s']['max']} | {v['exec_ms']['median']} |")
            print()
        lo = P.get("lora") or {}
        if lo:
            print("| lora phase | route | status | wall s | ComfyUI ms |\n|---|---|---|---:|---:|")
            for r in lo.get("rows", []):
                print(f"| {r.get('i')} {r.get('kind', '')} | {r.get('route')} | {r.get('status')} | {r.get('wall_s')} | {r.get('server_timing', {}).get('comfyui')} |")
            if "flux_dev_after" in lo:
                r = lo["flux_dev_after"]
                print(f"| after | {r.get('route')} | {r.get('status')} | {r.get('wall_s')} | {r.get('server_timing', {}).get('comfyui')} |")
            print()
        print("GPU (nvidia-smi):", nvsmi_peak(path), "| notes:", R.get("notes"), "| bench total s:", R.get("total_s"))
        print()


if __name__ == "__main__":
    main(sys.argv[1:])
