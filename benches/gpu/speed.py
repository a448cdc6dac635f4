#!/usr/bin/env python3
"""Speed-profile measurements for issue 26 (benches/gpu/README.md, "Speed profile").

Two phases, each one process, writing into one JSON file (--out-json, rewritten after every
step so a run cut short still reports what it measured):

  profile     Flux.1-dev's diffusion model built in-process from ComfyUI's own classes
              (comfy.ldm.flux.model.Flux) with random weights in the real shapes, ONE
              sampling step (one forward) timed with CUDA events and profiled with
              torch.profiler, under the operations ComfyUI picks for each launch profile:
                bf16        `default`: comfy.ops.disable_weight_init, bf16 weights
                fp8_cast    `--fp8_e4m3fn-unet` alone: fp8 weights, manual_cast (weight cast
                            to bf16 in every Linear call, bf16 matmul)
                fp8_mm      `--fp8_e4m3fn-unet --fast fp8_matrix_mult`: comfy.ops.fp8_ops
                            (fp8_linear: clamp + cast of the activation, torch._scaled_mm)
                fp8_mm_compiled / bf16_compiled: the same under torch.compile (inductor,
                            TorchCompileModel's settings)
              Device time is split by op class (matmul bf16 / matmul fp8 / attention / casts
              and quantization / other) and matmul FLOPs (counted with forward hooks) over
              matmul time give the achieved rate, against the card's own ceilings measured
              here (an 8192³ bf16 matmul and an 8192³ fp8 _scaled_mm).
  candidates  two ComfyUI servers started here on one card (A: ComfyUI's defaults; B: the
              fp8 flags [+ --highvram]), a minimal direct client (POST /prompt, /history,
              /view) and the Flux.1-dev graph flowhost's /flux-dev builds, with the speed
              profile's graph transform applied per candidate (EasyCache, TorchCompileModel:
              ComfyUI 0.3.64 core nodes). Per-image time, interleaved, same seed per round;
              PSNR and SSIM of each candidate's decoded image against `default`'s.

Standard library + numpy + Pillow (+ torch for `profile`).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import statistics
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid

T0 = time.monotonic()
R: dict = {}
OUT_JSON = ""


def log(*a) -> None:
    print(f"[speed {time.monotonic() - T0:7.1f}s]", *a, flush=True)


def save() -> None:
    if not OUT_JSON:
        return
    try:
        with open(OUT_JSON) as f:
            old = json.load(f)
    except (OSError, ValueError):
        old = {}
    old.update(R)
    with open(OUT_JSON, "w") as f:
        json.dump(old, f, indent=1, default=str)


def left(deadline: float) -> float:
    return deadline - (time.monotonic() - T0)


FLUX_CFG = dict(
    image_model="flux", in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096,
    hidden_size=3072, mlp_ratio=4.0, num_heads=24, depth=19, depth_single_blocks=38,
    axes_dim=[16, 56, 56], theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True,
)

# --- phase 1: one Flux step, by op class ---------------------------------------------------

def classify(name: str) -> str:
    n = name.lower()
    if any(k in n for k in ("flash", "fmha", "attention", "sdpa", "attn")):
        return "attention"
    if any(k in n for k in ("gemm", "xmma", "nvjet", "cutlass", "cublas", "matmul", "_mm", "wgmma", "scaled_mm")):
        if any(k in n for k in ("e4m3", "f8", "fp8", "qqtst", "qqt", "_qq")):
            return "matmul_fp8"
        return "matmul_bf16"
    if n.startswith("triton_") or "triton" in n:
        return "fused_triton"
    if any(k in n for k in ("clamp", "copy", "convert", "float8", "cast", "to_copy")):
        return "cast_quantize"
    return "other"


def profile_main(a) -> int:
    sys.path.insert(0, os.path.abspath(a.comfyui))
    import torch

    import comfy.ops
    import comfy.ldm.flux.model

    import logging

    fallbacks = {"n": 0, "first": None}

    class FallbackCounter(logging.Handler):
        """fp8_ops.Linear logs "Exception during fp8 op" and falls back to a bf16 matmul."""

        def emit(self, record):
            msg = record.getMessage()
            if "fp8 op" in msg:
                fallbacks["n"] += 1
                fallbacks["first"] = fallbacks["first"] or msg[:300]

    logging.getLogger().addHandler(FallbackCounter())
    logging.getLogger().setLevel(logging.INFO)
    dev = torch.device("cuda")
    R["profile_compiled" if a.only_compiled else "profile"] = prof = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
                           "note": "random weights in Flux.1-dev's real shapes; one forward = one sampling step (cfg 1)"}

    def ev_time(fn, warm=2, reps=5):
        for _ in range(warm):
            fn()
        torch.cuda.synchronize()
        ts = []
        for _ in range(reps):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            ts.append(s.elapsed_time(e))
        return statistics.median(ts)

    # ceilings of this card
    try:
        n = 8192
        x = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
        y = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
        ms = ev_time(lambda: x @ y, 3, 10)
        prof["peak_bf16_tflops"] = round(2 * n**3 / ms / 1e9, 1)
        x8 = x.to(torch.float8_e4m3fn)
        y8 = y.to(torch.float8_e4m3fn).t().contiguous().t()
        one = torch.ones((), device=dev, dtype=torch.float32)
        ms = ev_time(lambda: torch._scaled_mm(x8, y8, scale_a=one, scale_b=one, out_dtype=torch.bfloat16), 3, 10)
        prof["peak_fp8_tflops"] = round(2 * n**3 / ms / 1e9, 1)
        del x, y, x8, y8
    except Exception as e:  # noqa: BLE001 — reported, never fatal
        prof["peak_error"] = repr(e)
    log("ceilings", prof.get("peak_bf16_tflops"), prof.get("peak_fp8_tflops"))
    save()

    with torch.no_grad():
        t = time.monotonic()
        m16 = comfy.ldm.flux.model.Flux(dtype=torch.bfloat16, device=dev, operations=comfy.ops.disable_weight_init, **FLUX_CFG)
        g = torch.Generator(device=dev)
        g.manual_seed(1234)
        for name, p in m16.named_parameters():
            if p.ndim >= 2:
                fan_in = math.prod(p.shape[1:])
                p.normal_(0.0, 0.5 / math.sqrt(fan_in), generator=g)
            elif "scale" in name or "norm" in name:
                p.fill_(1.0)
            else:
                p.zero_()
        m16.eval()
        m8 = comfy.ldm.flux.model.Flux(dtype=torch.float8_e4m3fn, device=dev, operations=comfy.ops.fp8_ops, **FLUX_CFG)
        m8.load_state_dict(m16.state_dict(), strict=False)
        m8.eval()
        prof["build_s"] = round(time.monotonic() - t, 1)
        n_lin = sum(1 for mod in m16.modules() if isinstance(mod, torch.nn.Linear))
        prof["linear_layers"] = n_lin
        log("models built", prof["build_s"], "s;", n_lin, "Linear layers")

        def inputs(res: int):
            h = res // 8
            return dict(
                x=torch.randn(1, 16, h, h, device=dev, dtype=torch.bfloat16, generator=g),
                timestep=torch.tensor([0.7], device=dev, dtype=torch.bfloat16),
                context=torch.randn(1, 512, 4096, device=dev, dtype=torch.bfloat16, generator=g),
                y=torch.randn(1, 768, device=dev, dtype=torch.bfloat16, generator=g),
                guidance=torch.tensor([3.5], device=dev, dtype=torch.bfloat16),
            )

        # matmul FLOPs of one forward, counted on the Linear calls themselves
        flops = {"n": 0}

        def hook(mod, inp, out):
            x = inp[0]
            flops["n"] += 2 * x.numel() // x.shape[-1] * mod.in_features * mod.out_features

        hs = [mod.register_forward_hook(hook) for mod in m16.modules() if isinstance(mod, torch.nn.Linear)]
        fl = {}
        for res in (1024, 512):
            flops["n"] = 0
            m16(**inputs(res))
            tokens = (res // 16) ** 2 + 512
            attn = (FLUX_CFG["depth"] + FLUX_CFG["depth_single_blocks"]) * 4 * tokens * tokens * FLUX_CFG["hidden_size"]
            fl[res] = {"matmul_tflop": flops["n"] / 1e12, "attention_tflop": attn / 1e12, "tokens": tokens}
        for h in hs:
            h.remove()
        prof["flops_per_step"] = {str(k): {kk: round(vv, 2) if isinstance(vv, float) else vv for kk, vv in v.items()} for k, v in fl.items()}
        log("flops", prof["flops_per_step"])
        save()

        variants = {}

        def run16(inp):
            return m16(**inp)

        def run8(inp):
            return m8(**inp)

        def set_cast(on: bool):
            # fp8_ops.Linear skips fp8_linear in training mode and casts the weight instead:
            # exactly `--fp8_e4m3fn-unet` without `--fast fp8_matrix_mult` (manual_cast).
            m8.train(on)

        variants["bf16"] = (lambda: None, run16)
        variants["fp8_cast"] = (lambda: set_cast(True), run8)
        variants["fp8_mm"] = (lambda: set_cast(False), run8)
        prof["step_ms"] = {}
        prof["by_class_ms"] = {}
        prof["top_kernels"] = {}
        prof["top_ops"] = {}

        def profile_variant(name, fn, inp):
            from torch.profiler import ProfilerActivity, profile as tprofile

            fn(inp)
            torch.cuda.synchronize()
            with tprofile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
                fn(inp)
                torch.cuda.synchronize()
            by = {}
            kern = []
            ops = []
            for ev in p.key_averages():
                dt = getattr(ev, "self_device_time_total", None)
                if dt is None:
                    dt = getattr(ev, "self_cuda_time_total", 0)
                if not dt:
                    continue
                dev_type = str(getattr(ev, "device_type", ""))
                if "CUDA" in dev_type or ev.key.startswith(("void", "sm90", "nvjet", "triton", "cutlass", "ampere", "kernel")) or "kernel" in ev.key.lower():
                    kern.append((ev.key, dt / 1e3, ev.count))
                else:
                    ops.append((ev.key, dt / 1e3, ev.count))
            # key_averages mixes CPU ops (with their device time) and kernels; classify kernels
            if not kern:
                kern = ops
            for k, ms, c in kern:
                by[classify(k)] = by.get(classify(k), 0.0) + ms
            prof["by_class_ms"][name] = {k: round(v, 2) for k, v in sorted(by.items(), key=lambda kv: -kv[1])}
            prof["top_kernels"][name] = [(k[:140], round(ms, 2), c) for k, ms, c in sorted(kern, key=lambda r: -r[1])[:14]]
            prof["top_ops"][name] = [(k[:80], round(ms, 2), c) for k, ms, c in sorted(ops, key=lambda r: -r[1])[:14]]

        for res in ((1024,) if not a.only_compiled else ()):
            inp = inputs(res)
            for name, (setup, fn) in variants.items():
                try:
                    setup()
                    fallbacks["n"] = 0
                    ms = ev_time(lambda: fn(inp))
                    prof["step_ms"][f"{name}@{res}"] = round(ms, 2)
                    prof.setdefault("fp8_fallbacks_per_step", {})[f"{name}@{res}"] = fallbacks["n"] / 7
                    prof["fp8_fallback_example"] = fallbacks["first"]
                    log(f"{name}@{res}: {ms:.1f} ms/step")
                    if res == 1024:
                        profile_variant(name, fn, inp)
                        log(f"  {name} by class:", prof["by_class_ms"][name])
                except Exception as e:  # noqa: BLE001
                    prof.setdefault("errors", {})[f"{name}@{res}"] = repr(e)[:500]
                    log(f"{name}@{res} failed: {e!r}")
                save()
        set_cast(False)

        # torch.compile, as TorchCompileModel does it (inductor, dynamic=None, not fullgraph)
        inp = inputs(1024)
        for name, model in (("fp8_mm_compiled", m8), ("bf16_compiled", m16)):
            if not a.compile or left(a.deadline_s) < 150:
                prof.setdefault("skipped", []).append(f"{name}: out of time")
                continue
            try:
                cm = torch.compile(model, backend="inductor")
                t = time.monotonic()
                cm(**inp)
                torch.cuda.synchronize()
                prof.setdefault("compile_s", {})[name] = round(time.monotonic() - t, 1)
                ms = ev_time(lambda: cm(**inp))
                prof["step_ms"][f"{name}@1024"] = round(ms, 2)
                log(f"{name}@1024: compile {prof['compile_s'][name]} s, {ms:.1f} ms/step")
                profile_variant(name, lambda i: cm(**i), inp)
                log(f"  {name} by class:", prof["by_class_ms"][name])
            except Exception as e:  # noqa: BLE001
                prof.setdefault("errors", {})[name] = repr(e)[:500]
                log(f"{name} failed: {e!r}")
            save()
    return 0


# --- phase 2: candidates through ComfyUI, interleaved ---------------------------------------

def flux_graph(size: int, steps: int, seed: int, prompt: str, transform: dict | None) -> dict:
    """flowhost's /flux-dev graph (sdk/src/flux.rs), with the speed transform's nodes
    (the same shape as comfy/src/speed.rs inserts: EasyCache, then TorchCompileModel,
    between the model loader and KSampler)."""
    g = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "flux1-dev.safetensors", "weight_dtype": "default"}},
        "2": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": "clip_l.safetensors", "clip_name2": "t5xxl_fp16.safetensors", "type": "flux"}},
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": "ae.safetensors"}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": ["2", 0]}},
        "5": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["4", 0], "guidance": 3.5}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["2", 0]}},
        "7": {"class_type": "EmptySD3LatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "8": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": seed, "steps": steps, "cfg": 1.0,
                                                   "sampler_name": "euler", "scheduler": "simple", "positive": ["5", 0],
                                                   "negative": ["6", 0], "latent_image": ["7", 0], "denoise": 1.0}},
        "9": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["3", 0]}},
        "10": {"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": "speed"}},
    }
    model = ["1", 0]
    t = transform or {}
    if t.get("easycache") is not None:
        g["flowhost_speed_easycache_1"] = {"class_type": "EasyCache", "inputs": {
            "model": model, "reuse_threshold": t["easycache"], "start_percent": 0.15, "end_percent": 0.95, "verbose": False}}
        model = ["flowhost_speed_easycache_1", 0]
    if t.get("compile"):
        g["flowhost_speed_compile_1"] = {"class_type": "TorchCompileModel", "inputs": {"model": model, "backend": "inductor"}}
        model = ["flowhost_speed_compile_1", 0]
    g["8"]["inputs"]["model"] = model
    return g


def http_json(port: int, method: str, path: str, body=None, timeout=30.0):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method,
                                 data=None if body is None else json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        raw = r.read()
    return json.loads(raw) if raw[:1] in (b"{", b"[") else raw


def run_prompt(port: int, graph: dict, timeout: float) -> dict:
    t = time.perf_counter()
    try:
        resp = http_json(port, "POST", "/prompt", {"prompt": graph, "client_id": uuid.uuid4().hex})
    except urllib.error.HTTPError as e:
        return {"error": f"POST /prompt {e.code}: {e.read()[:800].decode('utf-8', 'replace')}"}
    pid = resp.get("prompt_id")
    if not pid:
        return {"error": json.dumps(resp)[:800]}
    hist = None
    while time.perf_counter() - t < timeout:
        h = http_json(port, "GET", f"/history/{pid}")
        if isinstance(h, dict) and pid in h and h[pid].get("status", {}).get("completed") is not None:
            if h[pid]["status"].get("status_str") in ("success", "error"):
                hist = h[pid]
                break
        time.sleep(0.02)
    wall = time.perf_counter() - t
    if hist is None:
        return {"error": "timeout", "wall_s": wall}
    out = {"wall_s": round(wall, 3), "status": hist["status"].get("status_str")}
    stamps = {m[0]: m[1].get("timestamp") for m in hist["status"].get("messages", []) if isinstance(m, list) and len(m) == 2}
    if stamps.get("execution_start") and stamps.get("execution_success"):
        out["exec_s"] = round((stamps["execution_success"] - stamps["execution_start"]) / 1000, 3)
    if out["status"] != "success":
        out["error"] = json.dumps(hist["status"].get("messages", []))[-1500:]
        return out
    for node in hist.get("outputs", {}).values():
        for im in node.get("images", []):
            q = urllib.parse.urlencode({"filename": im["filename"], "subfolder": im.get("subfolder", ""), "type": im.get("type", "output")})
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/view?{q}", timeout=30) as r:
                out["_png"] = r.read()
            return out
    return out


def to_gray_array(png: bytes):
    import numpy as np
    from PIL import Image

    im = Image.open(io.BytesIO(png)).convert("RGB")
    return np.asarray(im, dtype=np.float64)


def psnr(a, b) -> float:
    import numpy as np

    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)


def ssim(a, b) -> float:
    """Mean SSIM over the RGB channels, 7×7 uniform window (scikit-image's defaults)."""
    import numpy as np

    def box(x, k=7):
        c = np.cumsum(np.cumsum(np.pad(x, ((1, 0), (1, 0))), 0), 1)
        return (c[k:, k:] - c[:-k, k:] - c[k:, :-k] + c[:-k, :-k]) / (k * k)

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    vals = []
    for ch in range(a.shape[2]):
        x, y = a[..., ch], b[..., ch]
        mx, my = box(x), box(y)
        cov_norm = 49 / 48
        vx = (box(x * x) - mx * mx) * cov_norm
        vy = (box(y * y) - my * my) * cov_norm
        vxy = (box(x * y) - mx * my) * cov_norm
        s = ((2 * mx * my + c1) * (2 * vxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
        vals.append(float(s[3:-3, 3:-3].mean()) if min(s.shape) > 6 else float(s.mean()))
    return sum(vals) / len(vals)


def start_comfy(a, port: int, flags: list[str], logf: str, env_extra: dict) -> subprocess.Popen:
    env = dict(os.environ)
    env.update(env_extra)
    cmd = [a.python, "main.py", "--listen", "127.0.0.1", "--port", str(port), "--front-end-root", a.front_end_root] + flags
    log("starting", " ".join(cmd[1:]))
    return subprocess.Popen(cmd, cwd=a.comfyui, stdout=open(logf, "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)


def wait_up(port: int, proc, timeout: float) -> float | None:
    t = time.monotonic()
    while time.monotonic() - t < timeout:
        if proc.poll() is not None:
            return None
        try:
            http_json(port, "GET", "/system_stats", timeout=2)
            return time.monotonic() - t
        except Exception:  # noqa: BLE001
            time.sleep(0.25)
    return None


def candidates_main(a) -> int:
    sizes = [tuple(int(v) for v in s.split("x")) for s in a.sizes.split(",") if s]
    servers = {"A": (a.port, a.flags_a.split()), "B": (a.port + 1, a.flags_b.split())}
    # name -> (server, transform)
    cands = {}
    for spec in a.candidates.split(","):
        name, _, rest = spec.partition("=")
        server, _, tr = rest.partition(":")
        t = {}
        for part in filter(None, tr.split("+")):
            if part == "compile":
                t["compile"] = True
            elif part.startswith("ec"):
                t["easycache"] = float(part[2:] or a.easycache)
        cands[name] = (server, t)
    base = a.baseline
    C = {"servers": {k: v[1] for k, v in servers.items()}, "candidates": {k: {"server": s, "transform": t} for k, (s, t) in cands.items()},
                           "baseline": base, "note": "random weights: images are noise; EasyCache's skip decisions follow the model's output change rate, which random weights don't reproduce",
                           "warm_up": {}, "rows": [], "summary": {}}
    R["candidates"] = C
    env = {"TORCHINDUCTOR_CACHE_DIR": a.inductor_cache, "TRITON_CACHE_DIR": a.triton_cache}
    procs = {}
    for k, (port, flags) in servers.items():
        if any(s == k for s, _ in cands.values()):
            procs[k] = start_comfy(a, port, flags, os.path.join(a.log_dir, f"comfy_{k}.log"), env)
    try:
        if a.profile_s > 0:
            # the in-process step profile runs while the servers import (they load no model
            # before their first prompt), in its own process so its GPU memory is freed after
            t = time.monotonic()
            cmd = [sys.executable, os.path.abspath(__file__), "profile", "--comfyui", a.comfyui, "--out-json", a.out_json,
                   "--deadline-s", str(a.profile_s)]
            try:
                rc = subprocess.run(cmd, timeout=a.profile_s + 30, env={**os.environ, **env}).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
            log(f"profile phase: rc {rc} after {time.monotonic() - t:.0f} s")
            C["profile_rc"] = rc
        for k, p in procs.items():
            up = wait_up(servers[k][0], p, 240)
            C.setdefault("server_start_s", {})[k] = up
            log(f"server {k} up after {up}")
            if up is None:
                C["error"] = f"server {k} did not start"
                save()
                return 1
        # per size: warm-up (load, compile: its cost shows here), then interleaved rounds
        for size, steps in sizes:
            # The two servers warm up at the same time (compiles are CPU-bound): warm-up times
            # are each candidate's load + compile under that overlap, not clean compile costs.
            def warm(server_key):
                for name, (server, t) in cands.items():
                    if server != server_key:
                        continue
                    if left(a.deadline_s) < 60:
                        C.setdefault("skipped", []).append(f"warm-up {name} {size}: out of time")
                        continue
                    r = run_prompt(servers[server][0], flux_graph(size, steps, 1, "warm-up", t), max(30, left(a.deadline_s) - 20))
                    r.pop("_png", None)
                    C["warm_up"][f"{name}@{size}x{steps}"] = r
                    log(f"warm-up {name} {size}x{steps}: {r}")
            import threading
            ths = [threading.Thread(target=warm, args=(k,)) for k in procs]
            for th in ths:
                th.start()
            for th in ths:
                th.join()
            save()
            names = [n for n in cands if C["warm_up"].get(f"{n}@{size}x{steps}", {}).get("status") == "success"]
            for rnd in range(a.rounds):
                per_round = 1.3 * sum(C["summary"].get(f"{n}@{size}x{steps}", {}).get("median_wall_s", 5) for n in names)
                if not names or left(a.deadline_s) < per_round + 10:
                    C.setdefault("skipped", []).append(f"{size}x{steps} round {rnd}: out of time")
                    break
                seed = 424242 + rnd
                prompt = f"round {rnd}: a lighthouse on a cliff at dawn"
                order = names[rnd % len(names):] + names[: rnd % len(names)]
                imgs = {}
                for name in order:
                    server, t = cands[name]
                    r = run_prompt(servers[server][0], flux_graph(size, steps, seed, prompt, t), 300)
                    png = r.pop("_png", None)
                    if png is not None:
                        imgs[name] = png
                        if rnd == 0 and size == sizes[0][0] and name in (base, a.keep_png_of):
                            with open(os.path.join(a.log_dir, f"{name}.png"), "wb") as f:
                                f.write(png)
                    r.update(candidate=name, size=size, steps=steps, round=rnd, seed=seed)
                    C["rows"].append(r)
                    log(f"{name} {size}x{steps} r{rnd}: wall {r.get('wall_s')} exec {r.get('exec_s')} {r.get('error', '')[:300]}")
                if base in imgs:
                    ref = to_gray_array(imgs[base])
                    for name, png in imgs.items():
                        if name == base:
                            continue
                        img = to_gray_array(png)
                        if img.shape == ref.shape:
                            for row in C["rows"][-len(order):]:
                                if row["candidate"] == name:
                                    row["psnr_db"] = round(psnr(ref, img), 2)
                                    row["ssim"] = round(ssim(ref, img), 4)
                summarize(C, base)
                save()
        summarize(C, base)
        save()
        print_table(C)
    finally:
        for p in procs.values():
            try:
                os.killpg(p.pid, 15)
            except OSError:
                pass
        for p in procs.values():
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, 9)
    if a.compile_profile and left(a.deadline_s) > 170:
        t = time.monotonic()
        cmd = [sys.executable, os.path.abspath(__file__), "profile", "--comfyui", a.comfyui, "--out-json", a.out_json,
               "--deadline-s", str(left(a.deadline_s) - 10), "--compile", "--only-compiled"]
        try:
            rc = subprocess.run(cmd, timeout=max(10, left(a.deadline_s) - 5), env={**os.environ, **env}).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        log(f"compiled profile: rc {rc} after {time.monotonic() - t:.0f} s")
    elif a.compile_profile:
        C.setdefault("skipped", []).append("compiled step profile: out of time")
    for k in procs:
        try:
            with open(os.path.join(a.log_dir, f"comfy_{k}.log")) as f:
                C.setdefault("easycache_log", {})[k] = [ln.strip() for ln in f if "EasyCache - skipped" in ln][-40:]
        except OSError:
            pass
    save()
    return 0


# --- phase 3: flowhost with the speed profile against default, interleaved ---------------

class Flowhost:
    """One `flowhost serve --comfyui-dir` (it spawns its own ComfyUI) with its own state dir."""

    def __init__(self, a, name: str, port: int, args: list[str], state_dir: str):
        self.a, self.name, self.port, self.args, self.state_dir = a, name, port, args, state_dir
        self.proc = None

    def start(self) -> dict:
        a = self.a
        os.makedirs(self.state_dir, exist_ok=True)
        cache = os.path.join(self.state_dir, "cache")
        cmd = [a.flowhost, "serve", "--comfyui-dir", a.comfyui, "--comfyui-python", a.python,
               "--comfyui-arg=--front-end-root", f"--comfyui-arg={a.front_end_root}", "--models", a.models,
               "--plugins", a.plugins, "--listen", f"127.0.0.1:{self.port}", "--cache-dir", cache,
               "--state-dir", self.state_dir, "--comfyui-startup-timeout", "300", "--job-timeout", "600"] + self.args
        log(f"{self.name}: flowhost", " ".join(cmd[1:]))
        t = time.monotonic()
        logf = open(os.path.join(a.log_dir, f"flowhost_{self.name}.log"), "a")
        env = dict(os.environ)
        env.setdefault("RUST_LOG", "info")
        self.proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        seen = {}
        while time.monotonic() - t < a.start_timeout:
            if self.proc.poll() is not None:
                return {"error": f"flowhost exited with {self.proc.returncode}"}
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{self.port}/health")
                with urllib.request.urlopen(req, timeout=2) as r:
                    body = json.loads(r.read())
                    code = r.status
            except urllib.error.HTTPError as e:
                code, body = e.code, None
            except Exception:  # noqa: BLE001 — not listening yet
                code, body = None, None
            if code is not None and "first_answer_s" not in seen:
                seen["first_answer_s"] = round(time.monotonic() - t, 2)
            if code == 200 and isinstance(body, dict) and body.get("status") == "ready":
                return {"ready_s": round(time.monotonic() - t, 2), **seen, "warm_up": body.get("warm_up")}
            if code == 503 and body is None:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                        body = json.loads(r.read())
                except urllib.error.HTTPError as e:
                    try:
                        body = json.loads(e.read())
                    except ValueError:
                        body = None
                except Exception:  # noqa: BLE001
                    body = None
            if isinstance(body, dict) and (body.get("warm_up") or {}).get("state") == "failed":
                return {"error": "warm-up failed", **seen, "warm_up": body.get("warm_up")}
            time.sleep(0.2)
        return {"error": "not ready in time", **seen}

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, 15)
            self.proc.wait(60)
        except (OSError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.proc.pid, 9)
            except OSError:
                pass
        self.proc = None
        time.sleep(2)

    def call(self, route: str, body: dict, keep=False) -> dict:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{route}", data=json.dumps(body).encode(),
                                     headers={"content-type": "application/json"}, method="POST")
        t = time.perf_counter()
        try:
            with urllib.request.urlopen(req, timeout=600) as r:
                raw, code, hd = r.read(), r.status, dict(r.headers)
        except urllib.error.HTTPError as e:
            raw, code, hd = e.read(), e.code, dict(e.headers)
        except Exception as e:  # noqa: BLE001
            return {"error": repr(e)[:300], "wall_s": round(time.perf_counter() - t, 3)}
        row = {"status": code, "wall_s": round(time.perf_counter() - t, 3), "server_timing": hd.get("Server-Timing") or hd.get("server-timing")}
        if code != 200:
            row["body"] = raw[:800].decode("utf-8", "replace")
        elif keep:
            row["_img"] = raw
        return row


def jpeg_metrics(ref: bytes, img: bytes) -> dict:
    a, b = to_gray_array(ref), to_gray_array(img)
    if a.shape != b.shape:
        return {}
    return {"psnr_db": round(psnr(a, b), 2), "ssim": round(ssim(a, b), 4)}


def flowhost_main(a) -> int:
    R["flowhost"] = F = {"rows": [], "note": "random weights; JPEG q90 outputs compared (fidelity here includes JPEG noise on both sides)"}
    save()
    os.makedirs(a.work, exist_ok=True)
    warm_file = os.path.join(a.work, f"warm-up-{a.size}.json")
    with open(warm_file, "w") as f:
        # the served size and step count: every branch EasyCache takes inside the compiled
        # model is compiled before ready, not in the first user request
        json.dump({"prompt": "warm-up", "width": a.size, "height": a.size, "steps": a.steps, "seed": 0}, f)
    speed_args = ["--comfyui-profile", "speed", "--warm-up-request", f"/flux-dev={warm_file}"]
    if a.lora_id:
        # /flux-lora warms at the same size too: a second size would recompile (dynamic shapes)
        lora_file = os.path.join(a.work, f"warm-up-lora-{a.size}.json")
        with open(lora_file, "w") as f:
            json.dump({"prompt": "warm-up", "width": a.size, "height": a.size, "steps": a.steps, "seed": 0, "lora_id": a.lora_id, "lora_strength": 0.8}, f)
        speed_args += ["--warm-up-request", f"/flux-lora={lora_file}"]
    speed_args += a.speed_arg
    S = Flowhost(a, "speed", a.port, speed_args, os.path.join(a.work, "state-speed"))
    D = Flowhost(a, "default", a.port + 1, [], os.path.join(a.work, "state-default"))
    seq = [0]

    def body(size, steps, seed, tag):
        seq[0] += 1
        return {"prompt": f"{tag}: a lighthouse on a cliff at dawn", "width": size, "height": size, "steps": steps, "seed": seed}

    def first_and_warm(fh: Flowhost, key: str, n: int):
        first = fh.call("/flux-dev", body(a.size, a.steps, 77, f"first {key}"))
        log(f"{key} first: {first}")
        warm = []
        for i in range(n):
            warm.append(fh.call("/flux-dev", body(a.size, a.steps, 78 + i, f"warm {key}")))
        ok = [r["wall_s"] for r in warm if r.get("status") == 200]
        F[key] = {"first": first, "warm": warm}
        if first.get("status") == 200 and ok:
            F[key]["first_over_warm"] = round(first["wall_s"] / statistics.median(ok), 3)
        log(f"{key}: first ÷ warm {F[key].get('first_over_warm')} (warm {ok})")
        save()

    try:
        # 1. speed profile, compile cache cold (fresh state dir)
        F["start_speed_cache_cold"] = S.start()
        log("speed, cache cold:", F["start_speed_cache_cold"])
        save()
        if "error" in F["start_speed_cache_cold"]:
            return 1
        first_and_warm(S, "speed_cache_cold", 3)
        # 2. default alongside (same card), then interleaved per-image times
        F["start_default"] = D.start()
        log("default:", F["start_default"])
        save()
        if "error" in F["start_default"]:
            return 1
        first_and_warm(D, "default", 1)
        for size, steps in [(a.size, a.steps), (512, 4)]:
            for rnd in range(a.rounds):
                if left(a.deadline_s) < (40 if size == a.size else 150 if rnd == 0 else 10):
                    F.setdefault("skipped", []).append(f"{size}x{steps} round {rnd}")
                    break
                imgs = {}
                order = [D, S] if rnd % 2 == 0 else [S, D]
                for fh in order:
                    r = fh.call("/flux-dev", body(size, steps, 9000 + rnd, f"round {rnd}"), keep=True)
                    img = r.pop("_img", None)
                    if img:
                        imgs[fh.name] = img
                    r.update(profile=fh.name, size=size, steps=steps, round=rnd)
                    F["rows"].append(r)
                    log(f"{fh.name} {size}x{steps} r{rnd}: {r}")
                if len(imgs) == 2:
                    F["rows"][-1 if order[-1] is S else -2].update(jpeg_metrics(imgs["default"], imgs["speed"]))
                save()
        # 3. speed restarted on the same state dir: compile cache warm
        if left(a.deadline_s) > 150:
            S.stop()
            F["start_speed_cache_warm"] = S.start()
            log("speed, cache warm:", F["start_speed_cache_warm"])
            save()
            if "error" not in F["start_speed_cache_warm"]:
                first_and_warm(S, "speed_cache_warm", 2)
        else:
            F.setdefault("skipped", []).append("cache-warm restart")
        # 4. LoRA interleave under each profile (a switch re-patches the weights)
        if a.lora_id and left(a.deadline_s) > 60:
            for fh in (D, S):
                for i, kind in enumerate(a.lora_pattern.split(",")):
                    if left(a.deadline_s) < 30:
                        F.setdefault("skipped", []).append(f"lora {fh.name} from {i}")
                        break
                    b = body(a.size, a.steps, 500 + i, f"lora {kind}")
                    route = "/flux-dev"
                    if kind == "lora":
                        route = "/flux-lora"
                        b.update({"lora_id": a.lora_id, "lora_strength": 0.8})
                    r = fh.call(route, b)
                    r.update(profile=fh.name, lora_step=i, kind=kind)
                    F.setdefault("lora", []).append(r)
                    log(f"lora {fh.name} {i} {kind}: {r}")
                    save()
    finally:
        S.stop()
        D.stop()
        fl_summary(F)
        save()
    return 0


def fl_summary(F: dict) -> None:
    g = {}
    for r in F["rows"]:
        if r.get("status") == 200:
            g.setdefault(f"{r['profile']}@{r['size']}x{r['steps']}", []).append(r)
    S = {}
    for k, rows in g.items():
        w = [r["wall_s"] for r in rows]
        S[k] = {"n": len(w), "median_wall_s": round(statistics.median(w), 3), "all": w}
        ps = [r["psnr_db"] for r in rows if "psnr_db" in r]
        if ps:
            S[k]["psnr_db"] = round(statistics.median(ps), 2)
            S[k]["ssim"] = round(statistics.median([r["ssim"] for r in rows if "ssim" in r]), 4)
    for k, v in S.items():
        shape = k.partition("@")[2]
        b = S.get(f"default@{shape}")
        if b:
            v["vs_default"] = round(b["median_wall_s"] / v["median_wall_s"], 3)
    F["summary"] = S
    for k, v in S.items():
        print(f"| {k} | {v['n']} | {v['median_wall_s']} | {v.get('vs_default')} | {v.get('psnr_db', '')} | {v.get('ssim', '')} |")


def summarize(C: dict, base: str) -> None:
    groups = {}
    for r in C["rows"]:
        if r.get("status") == "success":
            groups.setdefault(f"{r['candidate']}@{r['size']}x{r['steps']}", []).append(r)
    S = {}
    for k, rows in groups.items():
        walls = [r["wall_s"] for r in rows]
        S[k] = {"n": len(rows), "median_wall_s": round(statistics.median(walls), 3),
                "median_exec_s": round(statistics.median([r.get("exec_s") or r["wall_s"] for r in rows]), 3)}
        ps = [r["psnr_db"] for r in rows if "psnr_db" in r]
        ss = [r["ssim"] for r in rows if "ssim" in r]
        if ps:
            S[k]["psnr_db"] = round(statistics.median(ps), 2)
            S[k]["ssim"] = round(statistics.median(ss), 4)
    for k, v in S.items():
        name, _, shape = k.partition("@")
        b = S.get(f"{base}@{shape}")
        if b:
            v["images_per_hour"] = round(3600 / v["median_wall_s"], 1)
            v["vs_default"] = round(b["median_wall_s"] / v["median_wall_s"], 3)
    C["summary"] = S


def print_table(C: dict) -> None:
    print("| candidate | shape | n | median s/image | ComfyUI exec s | images/h | × default | PSNR dB | SSIM |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for k, v in C["summary"].items():
        name, _, shape = k.partition("@")
        print(f"| {name} | {shape} | {v['n']} | {v['median_wall_s']} | {v['median_exec_s']} | {v.get('images_per_hour', '')} | {v.get('vs_default', '')} | {v.get('psnr_db', '')} | {v.get('ssim', '')} |")


def main() -> int:
    global OUT_JSON
    ap = argparse.ArgumentParser()
    ap.add_argument("phase", choices=["profile", "candidates", "flowhost"])
    ap.add_argument("--comfyui", required=True)
    ap.add_argument("--out-json", required=True)
    ap.add_argument("--deadline-s", type=float, default=300, help="seconds this process may use")
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--front-end-root", default="")
    ap.add_argument("--log-dir", default=".")
    ap.add_argument("--port", type=int, default=8291)
    ap.add_argument("--flags-a", default="")
    ap.add_argument("--flags-b", default="--fp8_e4m3fn-unet --fast fp8_matrix_mult --highvram")
    ap.add_argument("--candidates", default="default=A:,default_ec=A:ec,default_compile=A:compile,default_compile_ec=A:compile+ec,fp8=B:,fp8_compile=B:compile,fp8_compile_ec=B:compile+ec")
    ap.add_argument("--baseline", default="default")
    ap.add_argument("--keep-png-of", default="fp8_compile_ec")
    ap.add_argument("--easycache", type=float, default=0.2)
    ap.add_argument("--sizes", default="1024x20,512x4")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--profile-s", type=float, default=0, help="candidates: run the profile phase first, in this many seconds")
    ap.add_argument("--compile", action="store_true", help="profile: also the torch.compile'd steps")
    ap.add_argument("--compile-profile", action="store_true", help="candidates: after the servers stop, profile the torch.compile'd steps if time is left")
    ap.add_argument("--only-compiled", action="store_true", help="profile: skip the eager variants")
    ap.add_argument("--inductor-cache", default="/tmp/flowhost-gpu/compile-cache/inductor")
    ap.add_argument("--triton-cache", default="/tmp/flowhost-gpu/compile-cache/triton")
    ap.add_argument("--flowhost", default="")
    ap.add_argument("--models", default="")
    ap.add_argument("--plugins", default="")
    ap.add_argument("--work", default="/tmp/flowhost-gpu")
    ap.add_argument("--speed-arg", action="append", default=[], help="flowhost: more options for the speed flowhost")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--start-timeout", type=float, default=400)
    ap.add_argument("--lora-id", default="")
    ap.add_argument("--lora-pattern", default="lora,lora,dev,lora,dev")
    a = ap.parse_args()
    OUT_JSON = a.out_json
    if a.phase == "profile":
        return profile_main(a)
    if a.phase == "flowhost":
        return flowhost_main(a)
    return candidates_main(a)


if __name__ == "__main__":
    sys.exit(main())
