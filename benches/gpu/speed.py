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
    if t.get("lazycache") is not None:
        # LazyCache (core, same file as EasyCache) decides in a PREDICT_NOISE wrapper, i.e.
        # outside BaseModel.apply_model, where TorchCompileModel's compiled module runs.
        g["flowhost_speed_lazycache_1"] = {"class_type": "LazyCache", "inputs": {
            "model": model, "reuse_threshold": t["lazycache"], "start_percent": 0.15, "end_percent": 0.95, "verbose": False}}
        model = ["flowhost_speed_lazycache_1", 0]
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


LOG_KEYS = ("Requested to load", "loaded completely", "loaded partially", "nload", "Prompt executed", "skipped",
            "Recompiling", "recompil", "Exception during fp8", "Memory", "offload", "Traceback", "Error")


class LogTail:
    """New lines of a server's log since the last read (what ComfyUI said during one prompt)."""

    def __init__(self, path: str):
        self.path, self.pos = path, 0

    def skip(self) -> None:
        try:
            self.pos = os.path.getsize(self.path)
        except OSError:
            pass

    def read(self) -> dict:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.pos)
                raw = f.read()
                self.pos = f.tell()
        except OSError:
            return {}
        lines = raw.decode("utf-8", "replace").splitlines()
        out = {"loads": sum("Requested to load" in ln for ln in lines),
               "recompiles": sum("Recompiling function" in ln for ln in lines),
               "fp8_fallbacks": sum("Exception during fp8" in ln for ln in lines)}
        keep = [ln.strip()[:240] for ln in lines if any(k in ln for k in LOG_KEYS)]
        if keep:
            out["lines"] = keep[-12:]
        return out


def run_prompt(port: int, graph: dict, timeout: float, tail: "LogTail | None" = None) -> dict:
    if tail is not None:
        tail.skip()
    t = time.perf_counter()
    t_post = time.time()
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
    t_seen = time.time()
    if hist is None:
        return {"error": "timeout", "wall_s": wall}
    out = {"wall_s": round(wall, 3), "status": hist["status"].get("status_str")}
    stamps = {m[0]: m[1].get("timestamp") for m in hist["status"].get("messages", []) if isinstance(m, list) and len(m) == 2}
    if stamps.get("execution_start") and stamps.get("execution_success"):
        out["exec_s"] = round((stamps["execution_success"] - stamps["execution_start"]) / 1000, 3)
        # Where wall − exec goes (one clock: the servers run on this machine): POST → the
        # worker starts the prompt, and its end → the history shows it (20 ms polling).
        out["queue_s"] = round(stamps["execution_start"] / 1000 - t_post, 3)
        out["tail_s"] = round(t_seen - stamps["execution_success"] / 1000, 3)
    if tail is not None:
        out["log"] = tail.read()
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
    # 100 dB stands for identical pixels (JSON has no infinity)
    return 100.0 if mse == 0 else min(100.0, 10 * math.log10(255.0**2 / mse))


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


def parse_candidates(spec_text: str, default_threshold: float) -> list[dict]:
    """`name=SERVER:part+part,...`; `;` separates stages (servers a stage does not name are
    stopped before it, so three ComfyUIs never share the card at once)."""
    stages = []
    for stage in filter(None, (x.strip() for x in spec_text.split(";"))):
        cands = {}
        for spec in filter(None, (x.strip() for x in stage.split(","))):
            name, _, rest = spec.partition("=")
            server, _, tr = rest.partition(":")
            t = {}
            for part in filter(None, tr.split("+")):
                if part == "compile":
                    t["compile"] = True
                elif part.startswith("ec"):
                    t["easycache"] = float(part[2:] or default_threshold)
                elif part.startswith("lc"):
                    t["lazycache"] = float(part[2:] or default_threshold)
                else:
                    raise SystemExit(f"candidate {name}: unknown transform part {part!r} (compile, ecT, lcT)")
            cands[name] = (server, t)
        stages.append(cands)
    return stages


def stop_comfy(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, 15)
    except OSError:
        return
    try:
        p.wait(20)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(p.pid, 9)
        except OSError:
            pass


def candidates_main(a) -> int:
    import threading

    sizes = [tuple(int(v) for v in s.split("x")) for s in a.sizes.split(",") if s]
    all_servers = {"A": (a.port, a.flags_a.split()), "B": (a.port + 1, a.flags_b.split()), "C": (a.port + 2, a.flags_c.split())}
    stages = parse_candidates(a.candidates, a.easycache)
    base = a.baseline
    used = sorted({srv for st in stages for srv, _ in st.values()})
    servers = {k: all_servers[k] for k in used}
    tails = {k: LogTail(os.path.join(a.log_dir, f"comfy_{k}.log")) for k in servers}
    C = {"servers": {k: v[1] for k, v in servers.items()},
         "stages": [{k: {"server": s, "transform": t} for k, (s, t) in st.items()} for st in stages],
         "baseline": base, "note": "random weights: images are noise; EasyCache's skip decisions follow the model's output change rate, which random weights don't reproduce",
         "warm_up": {}, "rows": [], "summary": {}}
    R["candidates"] = C
    # TORCH_LOGS=recompiles: every recompile is a line in the server's log (counted per prompt)
    env = {"TORCHINDUCTOR_CACHE_DIR": a.inductor_cache, "TRITON_CACHE_DIR": a.triton_cache, "TORCH_LOGS": "recompiles"}
    procs: dict[str, subprocess.Popen] = {}

    def ensure(stage_servers: set) -> bool:
        for k in [k for k in procs if k not in stage_servers]:
            log(f"stopping server {k} (not in this stage)")
            stop_comfy(procs.pop(k))
            time.sleep(2)
        new = []
        for k in sorted(stage_servers):
            if k not in procs:
                procs[k] = start_comfy(a, servers[k][0], servers[k][1], os.path.join(a.log_dir, f"comfy_{k}.log"), env)
                new.append(k)
        return new

    try:
        first = ensure({srv for srv, _ in stages[0].values()})
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
        for si, cands in enumerate(stages):
            new = first if si == 0 else ensure({srv for srv, _ in cands.values()})
            for k in new:
                up = wait_up(servers[k][0], procs[k], 240)
                C.setdefault("server_start_s", {})[f"{k}@stage{si}"] = up
                log(f"stage {si}: server {k} up after {up}")
                if up is None:
                    C["error"] = f"server {k} did not start (stage {si})"
                    save()
                    return 1
            # per size: warm-up (load, compile: its cost shows here), then interleaved rounds
            for size, steps in sizes:
                # The servers warm up at the same time (compiles are CPU-bound): warm-up times
                # are each candidate's load + compile under that overlap, not clean compile costs.
                def warm(server_key):
                    for name, (server, t) in cands.items():
                        if server != server_key or f"{name}@{size}x{steps}" in C["warm_up"]:
                            continue
                        if left(a.deadline_s) < 60:
                            C.setdefault("skipped", []).append(f"warm-up {name} {size}: out of time")
                            continue
                        r = run_prompt(servers[server][0], flux_graph(size, steps, 1, "warm-up", t), max(30, left(a.deadline_s) - 20), tails[server])
                        r.pop("_png", None)
                        C["warm_up"][f"{name}@{size}x{steps}"] = r
                        log(f"warm-up {name} {size}x{steps}: wall {r.get('wall_s')} exec {r.get('exec_s')} {r.get('log', {}).get('recompiles')} recompiles {r.get('error', '')[:300]}")
                ths = [threading.Thread(target=warm, args=(k,)) for k in procs]
                for th in ths:
                    th.start()
                for th in ths:
                    th.join()
                save()
                names = [n for n in cands if C["warm_up"].get(f"{n}@{size}x{steps}", {}).get("status") == "success"]
                rounds = a.rounds if si == len(stages) - 1 or a.stage_rounds <= 0 else a.stage_rounds
                for rnd in range(rounds):
                    per_round = 1.3 * sum(C["summary"].get(f"s{si}:{n}@{size}x{steps}", {}).get("median_wall_s", 5) for n in names)
                    # an earlier stage leaves the later ones their share of the time
                    reserve = 0 if si == len(stages) - 1 else a.stage_reserve_s * (len(stages) - 1 - si)
                    if not names or left(a.deadline_s) < per_round + 10 + reserve:
                        C.setdefault("skipped", []).append(f"stage {si} {size}x{steps} round {rnd}: out of time")
                        break
                    seed = 424242 + rnd
                    prompt = f"round {rnd}: a lighthouse on a cliff at dawn"
                    order = names[rnd % len(names):] + names[: rnd % len(names)]
                    imgs = {}
                    for name in order:
                        server, t = cands[name]
                        r = run_prompt(servers[server][0], flux_graph(size, steps, seed, prompt, t), 300, tails[server])
                        png = r.pop("_png", None)
                        if png is not None:
                            imgs[name] = png
                            if rnd == 0 and size == sizes[0][0] and name in (base, a.keep_png_of) and si == 0:
                                with open(os.path.join(a.log_dir, f"{name}.png"), "wb") as f:
                                    f.write(png)
                        r.update(candidate=name, stage=si, size=size, steps=steps, round=rnd, seed=seed)
                        C["rows"].append(r)
                        lg = r.get("log", {})
                        log(f"s{si} {name} {size}x{steps} r{rnd}: wall {r.get('wall_s')} exec {r.get('exec_s')} queue {r.get('queue_s')} "
                            f"tail {r.get('tail_s')} loads {lg.get('loads')} recompiles {lg.get('recompiles')} {r.get('error', '')[:300]}")
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
            stop_comfy(p)
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
    for k in servers:
        try:
            with open(os.path.join(a.log_dir, f"comfy_{k}.log")) as f:
                C.setdefault("easycache_log", {})[k] = [ln.strip() for ln in f if "Cache - skipped" in ln][-60:]
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
               "--state-dir", self.state_dir, "--comfyui-startup-timeout", "300", "--job-timeout", "600"] + a.fh_arg + self.args
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
            # 200 = serving: "ready", or "degraded" with a reason (e.g. a node pack of ComfyUI's
            # own that failed to import for a missing package), as bench.py counts it
            if code == 200 and isinstance(body, dict) and (body.get("ready") or body.get("status") in ("ready", "degraded")):
                return {"ready_s": round(time.monotonic() - t, 2), **seen, "status": body.get("status"), "warm_up": body.get("warm_up")}
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
    """flowhost itself under each --comfyui-profile in --fh-profiles against `default`
    (two flowhosts on the card at a time: `default` stays up, each profile gets its turn):
    cold start → ready, first request ÷ warm, interleaved 1024²/20 and 512²/4, the first 512²
    request after ready (a compiled model recompiles on a new shape), for a compiling profile
    a restart on the same state dir (compile cache warm), and a LoRA interleave per profile."""
    R["flowhost"] = F = {"rows": [], "lora": [], "profiles": {},
                         "note": "random weights; JPEG q90 outputs compared (fidelity here includes JPEG noise on both sides)"}
    save()
    os.makedirs(a.work, exist_ok=True)
    warm_file = os.path.join(a.work, f"warm-up-{a.size}.json")
    with open(warm_file, "w") as f:
        # the served size and step count: a compiled model is compiled before ready, not in
        # the first user request
        json.dump({"prompt": "warm-up", "width": a.size, "height": a.size, "steps": a.steps, "seed": 0}, f)
    warm_args = ["--warm-up-request", f"/flux-dev={warm_file}"]
    if a.lora_id:
        lora_file = os.path.join(a.work, f"warm-up-lora-{a.size}.json")
        with open(lora_file, "w") as f:
            json.dump({"prompt": "warm-up", "width": a.size, "height": a.size, "steps": a.steps, "seed": 0, "lora_id": a.lora_id, "lora_strength": 0.8}, f)
        warm_args += ["--warm-up-request", f"/flux-lora={lora_file}"]
    seq = [0]

    def body(size, steps, seed, tag):
        seq[0] += 1
        return {"prompt": f"{tag}: a lighthouse on a cliff at dawn", "width": size, "height": size, "steps": steps, "seed": seed}

    def first_and_warm(fh: Flowhost, n: int) -> dict:
        first = fh.call("/flux-dev", body(a.size, a.steps, 77, f"first {fh.name}"))
        log(f"{fh.name} first: {first}")
        warm = [fh.call("/flux-dev", body(a.size, a.steps, 78 + i, f"warm {fh.name}")) for i in range(n)]
        ok = [r["wall_s"] for r in warm if r.get("status") == 200]
        out = {"first": first, "warm": warm}
        if first.get("status") == 200 and ok:
            out["first_over_warm"] = round(first["wall_s"] / statistics.median(ok), 3)
        log(f"{fh.name}: first ÷ warm {out.get('first_over_warm')} (warm {ok})")
        save()
        return out

    def lora_interleave(fh: Flowhost, pair: str) -> None:
        prev = "dev"  # the rounds before ran /flux-dev: a first `lora` is a switch
        for i, kind in enumerate(a.lora_pattern.split(",")):
            if left(a.deadline_s) < 40:
                F.setdefault("skipped", []).append(f"lora {fh.name} from {i}")
                return
            b = body(a.size, a.steps, 500 + i, f"lora {kind}")
            route = "/flux-dev"
            if kind == "lora":
                route = "/flux-lora"
                b.update({"lora_id": a.lora_id, "lora_strength": 0.8})
            r = fh.call(route, b)
            r.update(profile=fh.name, pair=pair, lora_step=i, kind=kind, switch=prev is not None and prev != kind)
            prev = kind
            F["lora"].append(r)
            log(f"lora {fh.name} {i} {kind}: {r}")
            save()

    D = Flowhost(a, "default", a.port, [], os.path.join(a.work, "state-default"))
    # LABEL=PROFILE[+ARG...]: e.g. compiled_lc30=speed-compiled+--speed-step-cache=0.3
    profiles = []
    for spec in filter(None, (x.strip() for x in a.fh_profiles.split(","))):
        label, _, rest = spec.partition("=")
        prof, *extra = (rest or label).split("+")
        profiles.append((label, prof, extra))
    try:
        F["start_default"] = D.start()
        log("default:", F["start_default"])
        save()
        if "error" in F["start_default"]:
            return 1
        F["default"] = first_and_warm(D, 2)
        for pi, (label, profile, extra) in enumerate(profiles):
            prof = label
            if left(a.deadline_s) < 120:
                F.setdefault("skipped", []).append(f"profile {prof}: out of time")
                continue
            compiles = profile == "speed-compiled"
            args = ["--comfyui-profile", profile] + warm_args + extra + a.speed_arg
            state = os.path.join(a.work, f"state-{prof}")
            subprocess.run(["rm", "-rf", state])
            P = Flowhost(a, prof, a.port + 1 + pi, args, state)
            PF = F["profiles"][prof] = {"args": args}
            try:
                PF["start_cold"] = P.start()
                log(f"{prof} (compile cache cold):", PF["start_cold"])
                save()
                if "error" in PF["start_cold"]:
                    continue
                PF["cold"] = first_and_warm(P, 2)
                # interleaved per-image times against default, same seed per round
                small = tuple(int(v) for v in a.small.split("x"))
                for size, steps in [(a.size, a.steps), small]:
                    for rnd in range(a.rounds):
                        reserve = (150 if compiles else 60) + 60 * (len(profiles) - 1 - pi)
                        if left(a.deadline_s) < reserve + (40 if size == a.size else 20):
                            F.setdefault("skipped", []).append(f"{prof} {size}x{steps} round {rnd}")
                            break
                        imgs = {}
                        order = [D, P] if rnd % 2 == 0 else [P, D]
                        for fh in order:
                            r = fh.call("/flux-dev", body(size, steps, 9000 + rnd, f"round {rnd}"), keep=True)
                            img = r.pop("_img", None)
                            if img:
                                imgs[fh.name] = img
                            r.update(profile=fh.name, pair=prof, size=size, steps=steps, round=rnd,
                                     first_of_shape=(size != a.size and rnd == 0))
                            F["rows"].append(r)
                            log(f"{fh.name} {size}x{steps} r{rnd}: {r}")
                        if len(imgs) == 2:
                            F["rows"][-1 if order[-1] is P else -2].update(jpeg_metrics(imgs["default"], imgs[prof]))
                        save()
                # restart on the same state dir: the compile cache is warm
                if compiles and left(a.deadline_s) > 150:
                    P.stop()
                    PF["start_warm"] = P.start()
                    log(f"{prof} (compile cache warm):", PF["start_warm"])
                    save()
                    if "error" not in PF["start_warm"]:
                        PF["warm_cache"] = first_and_warm(P, 2)
                elif compiles:
                    F.setdefault("skipped", []).append(f"{prof}: cache-warm restart")
                if a.lora_id and left(a.deadline_s) > 60 + 60 * (len(profiles) - 1 - pi):
                    lora_interleave(D, prof)
                    lora_interleave(P, prof)
            finally:
                P.stop()
                fl_summary(F)
                save()
    finally:
        D.stop()
        fl_summary(F)
        save()
    return 0


def fl_summary(F: dict) -> None:
    """Per pair (the profile `default` was interleaved with) and shape; the first request of
    a new shape (512² after ready) is kept apart from the warm figures."""
    g = {}
    for r in F["rows"]:
        if r.get("status") == 200 and not r.get("first_of_shape"):
            g.setdefault(f"{r['pair']}:{r['profile']}@{r['size']}x{r['steps']}", []).append(r)
    S = {}
    for k, rows in g.items():
        w = [r["wall_s"] for r in rows]
        S[k] = {"n": len(w), "median_wall_s": round(statistics.median(w), 3), "all": w}
        ps = [r["psnr_db"] for r in rows if "psnr_db" in r]
        if ps:
            S[k]["psnr_db"] = round(statistics.median(ps), 2)
            S[k]["ssim"] = round(statistics.median([r["ssim"] for r in rows if "ssim" in r]), 4)
    for k, v in S.items():
        pair, _, rest = k.partition(":")
        shape = rest.partition("@")[2]
        b = S.get(f"{pair}:default@{shape}")
        if b:
            v["vs_default"] = round(b["median_wall_s"] / v["median_wall_s"], 3)
    firsts = {f"{r['pair']}:{r['profile']}@{r['size']}x{r['steps']}": r.get("wall_s") for r in F["rows"] if r.get("first_of_shape")}
    if firsts:
        F["first_of_new_shape_s"] = firsts
    L = {}
    for r in F["lora"]:
        if r.get("status") == 200:
            L.setdefault(f"{r['pair']}:{r['profile']}", {"switch": [], "same": []})["switch" if r.get("switch") else "same"].append(r["wall_s"])
    for k, v in L.items():
        if v["switch"] and v["same"]:
            v["switch_cost_s"] = round(statistics.median(v["switch"]) - statistics.median(v["same"]), 3)
    F["summary"] = S
    F["lora_summary"] = L
    for k, v in S.items():
        print(f"| {k} | {v['n']} | {v['median_wall_s']} | {v.get('vs_default')} | {v.get('psnr_db', '')} | {v.get('ssim', '')} |")


def summarize(C: dict, base: str) -> None:
    """Per stage, candidate and shape; × default against the same stage's `default`."""
    groups = {}
    for r in C["rows"]:
        if r.get("status") == "success":
            groups.setdefault(f"s{r.get('stage', 0)}:{r['candidate']}@{r['size']}x{r['steps']}", []).append(r)
    S = {}
    med = lambda xs: round(statistics.median(xs), 3) if xs else None  # noqa: E731
    for k, rows in groups.items():
        walls = [r["wall_s"] for r in rows]
        S[k] = {"n": len(rows), "median_wall_s": med(walls),
                "median_exec_s": med([r.get("exec_s") or r["wall_s"] for r in rows]),
                "median_queue_s": med([r["queue_s"] for r in rows if "queue_s" in r]),
                "median_tail_s": med([r["tail_s"] for r in rows if "tail_s" in r]),
                "loads": sum(r.get("log", {}).get("loads", 0) for r in rows),
                "recompiles": sum(r.get("log", {}).get("recompiles", 0) for r in rows)}
        ps = [r["psnr_db"] for r in rows if "psnr_db" in r]
        ss = [r["ssim"] for r in rows if "ssim" in r]
        if ps:
            S[k]["psnr_db"] = round(statistics.median(ps), 2)
            S[k]["ssim"] = round(statistics.median(ss), 4)
    for k, v in S.items():
        stage, _, rest = k.partition(":")
        name, _, shape = rest.partition("@")
        b = S.get(f"{stage}:{base}@{shape}")
        v["images_per_hour"] = round(3600 / v["median_wall_s"], 1)
        if b:
            v["vs_default"] = round(b["median_wall_s"] / v["median_wall_s"], 3)
    C["summary"] = S


def print_table(C: dict) -> None:
    print("| stage:candidate | shape | n | median s/image | ComfyUI exec s | queue s | tail s | loads | recompiles | images/h | × default | PSNR dB | SSIM |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for k, v in C["summary"].items():
        name, _, shape = k.partition("@")
        print(f"| {name} | {shape} | {v['n']} | {v['median_wall_s']} | {v['median_exec_s']} | {v.get('median_queue_s')} | {v.get('median_tail_s')} | "
              f"{v.get('loads')} | {v.get('recompiles')} | {v.get('images_per_hour', '')} | {v.get('vs_default', '')} | {v.get('psnr_db', '')} | {v.get('ssim', '')} |")


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
    ap.add_argument("--flags-c", default="--fp8_e4m3fn-unet --fast fp8_matrix_mult --highvram",
                    help="server C: by default B's flags, for an fp8 server that only ever runs one patcher")
    ap.add_argument("--candidates", default=(
        # stage 0 (A + C): step-cache thresholds on ComfyUI's defaults; fp8 on a server that never switches
        "default=A:,default_ec20=A:ec0.2,default_ec25=A:ec0.25,default_ec30=A:ec0.3,default_lc20=A:lc0.2,default_lc30=A:lc0.3,fp8_dedicated=C:;"
        # stage 1 (A + B): fp8 switching between patchers as in the last run; compile + LazyCache
        "default=A:,fp8=B:,fp8_compile=B:compile,fp8_compile_lc20=B:compile+lc0.2,fp8_compile_lc30=B:compile+lc0.3"),
        help="name=SERVER:part+part (parts: compile, ecT EasyCache, lcT LazyCache); ',' between candidates, ';' between stages")
    ap.add_argument("--stage-rounds", type=int, default=0, help="rounds of every stage but the last (0: --rounds)")
    ap.add_argument("--stage-reserve-s", type=float, default=200, help="seconds an earlier stage leaves each later one")
    ap.add_argument("--baseline", default="default")
    ap.add_argument("--keep-png-of", default="default_ec30")
    ap.add_argument("--easycache", type=float, default=0.2)
    ap.add_argument("--sizes", default="1024x20")
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
    ap.add_argument("--speed-arg", action="append", default=[], help="flowhost: more options for every profiled flowhost")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--small", default="512x4", help="flowhost: the second, cheap shape SIZExSTEPS")
    ap.add_argument("--fh-arg", action="append", default=[], help="flowhost: an option for every flowhost (e.g. --comfyui-arg=--cpu)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--start-timeout", type=float, default=400)
    ap.add_argument("--lora-id", default="")
    ap.add_argument("--lora-pattern", default="lora,lora,dev,lora,dev")
    ap.add_argument("--fh-profiles", default="speed=speed,compiled_lc30=speed-compiled+--speed-step-cache=0.3",
                    help="flowhost: LABEL=PROFILE[+ARG...] compared with default, one at a time beside it")
    a = ap.parse_args()
    OUT_JSON = a.out_json
    # `timeout --signal=TERM` (run.sh) must still stop the ComfyUIs and flowhosts this process
    # started in their own sessions (finally blocks), or they hold the card for the next phase
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if a.phase == "profile":
        return profile_main(a)
    if a.phase == "flowhost":
        return flowhost_main(a)
    return candidates_main(a)


if __name__ == "__main__":
    sys.exit(main())
