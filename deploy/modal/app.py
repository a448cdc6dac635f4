"""flowhost on Modal: ComfyUI + flowhost on one L40S, models and plugins on volumes.

    modal deploy deploy/modal/app.py                              # the HTTP service
    modal run deploy/modal/app.py::download_models                # fill the models volume
    modal run deploy/modal/app.py::install_default_plugins        # (re)publish the bundled plugins
    modal volume put flowhost-plugins my_plugin.wasm /            # publish a plugin

Settings are read from the environment of the machine running `modal deploy` (see SETTINGS
below and docs/deploy-modal.md). This file owns the Modal wiring only: it never implements
endpoint logic (plugins do) nor talks to ComfyUI (flowhost does).
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import modal

# --- settings (one place; each overridable by an environment variable at deploy time) -------

APP_NAME = os.environ.get("FLOWHOST_APP_NAME", "flowhost")
COMFYUI_COMMIT = os.environ.get("FLOWHOST_COMFYUI_COMMIT", "a125cd84b054a57729b5eecab930ca9408719832")  # v0.3.64
TORCH_VERSION = os.environ.get("FLOWHOST_TORCH_VERSION", "2.9.1")  # what the captured ComfyUI 0.3.64 ran
RUST_TOOLCHAIN = os.environ.get("FLOWHOST_RUST_TOOLCHAIN", "1.95.0")
GPU = os.environ.get("FLOWHOST_GPU", "L40S")

MODELS_VOLUME_NAME = os.environ.get("FLOWHOST_MODELS_VOLUME", "ryla-models")
PLUGINS_VOLUME_NAME = os.environ.get("FLOWHOST_PLUGINS_VOLUME", "flowhost-plugins")
HF_CACHE_VOLUME_NAME = os.environ.get("FLOWHOST_HF_CACHE_VOLUME", "flowhost-hf-cache")

# Modal secrets (created with `modal secret create`); an empty name leaves that secret out.
API_KEYS_SECRET = os.environ.get("FLOWHOST_API_KEYS_SECRET", "flowhost-api-keys")  # FLOWHOST_API_KEYS[, FLOWHOST_ADMIN_KEYS]
POSTHOG_SECRET = os.environ.get("FLOWHOST_POSTHOG_SECRET", "flowhost-posthog")  # POSTHOG_API_KEY[, POSTHOG_HOST]
HF_SECRET = os.environ.get("FLOWHOST_HF_SECRET", "huggingface")  # HF_TOKEN
# Shared state for many containers (docs/deploy-modal.md, "Many containers"): a secret with
# FLOWHOST_DATABASE_URL (PostgreSQL job store), FLOWHOST_BLOB_STORE (s3://bucket/prefix) and the
# bucket's AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_ENDPOINT_URL / AWS_REGION, which
# `flowhost serve` reads from its environment. Off by default: one container, SQLite on its disk
# (jobs end with the container; /health says `"jobs": {"durability": "instance"}`).
SHARED_STATE_SECRET = os.environ.get("FLOWHOST_SHARED_STATE_SECRET", "")

# Cold start (docs/deploy-modal.md, "Cold start"). GPU snapshot (Modal alpha): flowhost, ComfyUI
# and the warmed-up models on the GPU are started before the snapshot and restored from it; it
# implies the CPU memory snapshot. The CPU snapshot alone captures only this Python process (the
# GPU is absent before a CPU snapshot, so ComfyUI cannot start there).
GPU_SNAPSHOT = os.environ.get("FLOWHOST_GPU_SNAPSHOT", "0").lower() in ("1", "true", "yes")
MEMORY_SNAPSHOT = GPU_SNAPSHOT or os.environ.get("FLOWHOST_MEMORY_SNAPSHOT", "0").lower() in ("1", "true", "yes")
# A ComfyUI launch profile (`flowhost serve --comfyui-profile`, docs/operations.md): default,
# highvram, fp8 (changes images), fast. Opt-in.
COMFYUI_PROFILE = os.environ.get("FLOWHOST_COMFYUI_PROFILE", "default")
COMFYUI_PROFILES = ("default", "highvram", "fp8", "fast", "speed", "speed-compiled")
if COMFYUI_PROFILE not in COMFYUI_PROFILES:
    raise ValueError(f"FLOWHOST_COMFYUI_PROFILE={COMFYUI_PROFILE!r}: expected one of {', '.join(COMFYUI_PROFILES)}")

# Warm-up before ready (`flowhost serve --warm-up`): `auto` runs each plugin's declared warm-up
# request (flux-dev: 1 step at 256²) before /health answers 200, so the weights are on the GPU
# before the first request, and before a GPU snapshot is taken. `off` skips it.
WARM_UP = os.environ.get("FLOWHOST_WARM_UP", "auto")
if WARM_UP not in ("auto", "off"):
    raise ValueError(f"FLOWHOST_WARM_UP={WARM_UP!r}: expected auto or off")

# The identity routes' environment, pinned in one file (deploy/identity.lock.json): each custom
# node pack at a full commit, the node classes it must register, the Python packages the packs'
# requirements.txt name (pinned; the CPU onnxruntime left out, it would shadow the GPU build).
IDENTITY_LOCK_PATH = Path(__file__).resolve().parents[1] / "identity.lock.json"
IDENTITY_LOCK = json.loads(IDENTITY_LOCK_PATH.read_text())
CUSTOM_NODES = [(pack["repo"], pack["commit"]) for pack in IDENTITY_LOCK["custom_nodes"]]
# Node classes the import check requires each custom node package to register.
REQUIRED_NODE_CLASSES = {pack["name"]: pack["classes"] for pack in IDENTITY_LOCK["custom_nodes"]}
CUSTOM_NODE_PIP = list(IDENTITY_LOCK["pip"]["gpu"])
BUNDLED_PLUGIN_PACKAGES = ["flux-dev", "flux-lora", "flux-instantid", "flux-pulid", "workflow"]

# --- paths inside the container ------------------------------------------------------------

PORT = 8000
COMFYUI_DIR = "/root/comfyui"
STATE_DIR = "/root/flowhost-state"  # jobs database + output blobs (container-local: jobs live as long as the container)
MODELS_DIR = "/root/models"
# Model files requests name by reference (a LoRA by URL or uploaded asset), fetched once per
# container onto its own disk: `flowhost serve --model-cache`.
MODEL_CACHE_DIR = "/root/flowhost-model-cache"
# The loopback port of the models-volume reloader flowhost calls on a miss (`--models-refresh-url`).
RELOAD_PORT = 8001
RELOAD_URL = f"http://127.0.0.1:{RELOAD_PORT}/reload"
PLUGINS_DIR = "/root/plugins"
HF_CACHE_DIR = "/cache"
BUNDLED_PLUGINS_DIR = "/opt/flowhost/plugins"
BUILD_DIR = "/opt/flowhost/build"
SRC_DIR = "/opt/flowhost/src"
FLOWHOST_BIN = "/usr/local/bin/flowhost"

MAX_IN_FLIGHT = 5  # equals the per-container concurrency below: flowhost admits what Modal routes
JOB_TIMEOUT_S = 120
# Container start: flowhost boots ComfyUI (torch + custom nodes import) before /health is ready.
# ~30 s on CPU measured locally; GPU containers add CUDA init and volume warm-up. Generous.
STARTUP_TIMEOUT_S = 600
REQUEST_TIMEOUT_S = 600  # per HTTP request, above JOB_TIMEOUT_S plus queueing and upload time
SCALEDOWN_WINDOW_S = 300
# The most containers Modal runs at once (`FLOWHOST_MAX_CONTAINERS`, unset: no cap). With the
# shared PostgreSQL store each container opens up to FLOWHOST_DATABASE_MAX_CONNECTIONS (default
# 16) + 1 connections: cap the containers so the product stays under the server's limit
# (docs/operations.md, "Connection budget").
MAX_CONTAINERS = int(os.environ.get("FLOWHOST_MAX_CONTAINERS", "0") or "0") or None
PLUGIN_RELOAD_INTERVAL_S = 5.0
# A LoRA committed to the models volume after this container started is seen after the next
# reload: every MODELS_RELOAD_INTERVAL_S, and at once when a request names a missing file.
MODELS_RELOAD_INTERVAL_S = 60.0
DOWNLOAD_TIMEOUT_S = 4 * 60 * 60  # ~60 GB over one container

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPTS = Path(__file__).resolve().parent / "build"


# Tunables the app sets only where the operator's secrets say nothing: flowhost reads each
# FLOWHOST_* variable itself, and a flag on the command line would silently win over it. The
# paths (listen address, ComfyUI, volumes, state dir) stay fixed: they are where this image and
# its volumes put things.
TUNABLES = [
    ("--max-in-flight", "FLOWHOST_MAX_IN_FLIGHT", str(MAX_IN_FLIGHT)),
    ("--job-timeout", "FLOWHOST_JOB_TIMEOUT", str(JOB_TIMEOUT_S)),
    ("--log-format", "FLOWHOST_LOG_FORMAT", "json"),
    ("--model-cache-max-gb", "FLOWHOST_MODEL_CACHE_MAX_GB", "40"),
]


def serve_command(profile: str = "", env: dict[str, str] | None = None) -> list[str]:
    """The exact `flowhost serve` command line the web server runs (`env`: the container's)."""
    env = os.environ if env is None else env
    profile = profile or COMFYUI_PROFILE
    command = [
        FLOWHOST_BIN,
        "serve",
        "--listen", f"0.0.0.0:{PORT}",
        "--comfyui-dir", COMFYUI_DIR,
        "--models", MODELS_DIR,
        "--plugins", PLUGINS_DIR,
        "--state-dir", STATE_DIR,
        "--model-cache", MODEL_CACHE_DIR,
        "--models-refresh-url", RELOAD_URL,
    ]  # fmt: skip
    for flag, variable, value in TUNABLES:
        if not env.get(variable):
            command += [flag, value]
    # The launch profile and warm-up are the deploy's own settings (read where `modal deploy`
    # runs, not from a secret), so they stay flags.
    if profile != "default":
        command += ["--comfyui-profile", profile]
    if WARM_UP == "off":
        command += ["--warm-up", "off"]
    return command


def pull_command(only: list[str]) -> list[str]:
    """`flowhost models pull` onto the models volume with the shipped manifest."""
    command = [FLOWHOST_BIN, "models", "pull", "--models", MODELS_DIR]
    for selector in only:
        command += ["--only", selector]
    return command


def _repo_ignored(path: Path) -> bool:
    """Files not copied into the image build context (build outputs, VCS, caches)."""
    parts = set(path.parts)
    return bool(parts & {"target", ".git", "__pycache__", ".pytest_cache", ".venv", "node_modules"})


# --- image ---------------------------------------------------------------------------------

image = (
    modal.Image.debian_slim(python_version="3.11")
    .apt_install("git", "curl", "ca-certificates", "build-essential", "pkg-config", "libgl1", "libglib2.0-0")
    .add_local_dir(BUILD_SCRIPTS, BUILD_DIR, copy=True)
    .run_commands(f"bash {BUILD_DIR}/install_comfyui.sh {COMFYUI_COMMIT} {TORCH_VERSION} {COMFYUI_DIR} {MODELS_DIR}")
    .run_commands(
        f"bash {BUILD_DIR}/install_custom_nodes.sh {COMFYUI_DIR} "
        + " ".join(f"{url}@{commit}" for url, commit in CUSTOM_NODES)
    )
    .pip_install(*CUSTOM_NODE_PIP)
    .run_commands(
        f"cd {COMFYUI_DIR} && python {BUILD_DIR}/check_custom_nodes.py "
        + " ".join(f"{node}={','.join(classes)}" for node, classes in REQUIRED_NODE_CLASSES.items())
        + " && python -c 'import insightface, onnxruntime; "
        "assert \"CUDAExecutionProvider\" in onnxruntime.get_available_providers(), onnxruntime.get_available_providers()'"
    )
    .add_local_dir(REPO_ROOT, SRC_DIR, copy=True, ignore=_repo_ignored)
    # Each pack is at the commit the lock pins (and the lock itself is well formed).
    .run_commands(f"python {SRC_DIR}/deploy/check_identity_lock.py --comfyui {COMFYUI_DIR}")
    .run_commands(
        f"bash {BUILD_DIR}/build_flowhost.sh {SRC_DIR} {RUST_TOOLCHAIN} {BUNDLED_PLUGINS_DIR} "
        + " ".join(BUNDLED_PLUGIN_PACKAGES)
    )
    .env({"HF_HOME": f"{HF_CACHE_DIR}/huggingface", "RUST_LOG": "info"})
)

app = modal.App(APP_NAME, image=image)

# --- volumes and secrets -------------------------------------------------------------------

models_volume = modal.Volume.from_name(MODELS_VOLUME_NAME, create_if_missing=True)
plugins_volume = modal.Volume.from_name(PLUGINS_VOLUME_NAME, create_if_missing=True)
hf_cache_volume = modal.Volume.from_name(HF_CACHE_VOLUME_NAME, create_if_missing=True)


def _secrets(*names: str) -> list[modal.Secret]:
    return [modal.Secret.from_name(name) for name in names if name]


# --- the service ---------------------------------------------------------------------------


def seed_plugins_if_empty(plugins_dir: str = PLUGINS_DIR, bundled_dir: str = BUNDLED_PLUGINS_DIR) -> list[str]:
    """First deploy convenience: an empty plugins volume gets the bundled plugins. A volume that
    holds any `.wasm` is left alone (it is the source of truth). Returns the files copied."""
    target = Path(plugins_dir)
    if any(target.glob("*.wasm")):
        return []
    copied = []
    for wasm in sorted(Path(bundled_dir).glob("*.wasm")):
        shutil.copy2(wasm, target / wasm.name)
        copied.append(wasm.name)
    return copied


def _reload_plugins_forever(interval_s: float) -> None:
    """Pick up `modal volume put` uploads: reload the volume; flowhost's rescan sees new files."""
    while True:
        time.sleep(interval_s)
        try:
            plugins_volume.reload()
        except Exception as error:  # keep serving; the next reload may succeed
            print(f"plugins volume reload failed: {error!r}", flush=True)


def _is_open_files_refusal(error: Exception) -> bool:
    """Modal refuses `Volume.reload()` while files on the volume are open in this container
    (ComfyUI reading a model): worth retrying once they are closed."""
    return "open file" in str(error).lower()


class VolumeReloader:
    """Reloads a mounted Modal volume so that files committed by others since this container
    started (a LoRA a trainer just committed) become visible, without a restart.

    One reload at a time (concurrent callers wait for it and share its outcome when it started
    after they asked). Modal refuses a reload while files on the volume are open: that refusal is
    retried with backoff (ComfyUI opens a model file only while loading it); any other error, or a
    refusal that outlasts the retries, is reported and left to the next call or period."""

    def __init__(self, volume, attempts: int = 6, first_delay_s: float = 0.25, sleep=time.sleep):
        self.volume = volume
        self.attempts = attempts
        self.first_delay_s = first_delay_s
        self.sleep = sleep
        self.lock = threading.Lock()
        self.last_success = 0.0

    def reload(self) -> bool:
        asked = time.monotonic()
        with self.lock:
            if self.last_success >= asked:
                return True  # a reload that started after we asked has just succeeded
            delay = self.first_delay_s
            for attempt in range(1, self.attempts + 1):
                started = time.monotonic()
                try:
                    self.volume.reload()
                    self.last_success = started
                    return True
                except Exception as error:  # noqa: BLE001 - Modal raises several kinds
                    if _is_open_files_refusal(error) and attempt < self.attempts:
                        self.sleep(delay)
                        delay *= 2
                        continue
                    print(f"models volume reload failed (attempt {attempt}): {error!r}", flush=True)
                    return False
            return False


def reload_forever(reloader: VolumeReloader, interval_s: float, stop: threading.Event | None = None) -> None:
    """Reload every `interval_s`, so a committed file shows up even without a miss."""
    stop = stop or threading.Event()
    while not stop.wait(interval_s):
        reloader.reload()


def serve_reload_requests(reloader: VolumeReloader, port: int = RELOAD_PORT) -> http.server.ThreadingHTTPServer:
    """`POST /reload` on loopback: what flowhost calls when a request names a model file the
    volume does not show (`--models-refresh-url`). 200 once reloaded, 503 when Modal refused."""

    class Reload(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's naming
            if self.path != "/reload":
                self.send_response(404)
                self.end_headers()
                return
            ok = reloader.reload()
            body = b"reloaded\n" if ok else b"the volume could not be reloaded now\n"
            self.send_response(200 if ok else 503)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Reload)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def wait_for_health(url: str, process: subprocess.Popen, deadline_s: float) -> dict:
    """Block until `url` (flowhost's /health: readiness) answers 200, failing fast if the
    process exits. Returns the /health document. A 503 (ComfyUI starting, websocket not yet
    connected, warm-up running) keeps waiting; /livez is for liveness probes, not for this."""
    deadline = time.monotonic() + deadline_s
    last_report = time.monotonic()
    status = None
    while time.monotonic() < deadline:
        code = process.poll()
        if code is not None:
            raise RuntimeError(f"flowhost exited with status {code} before {url} was ready")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return _json_or_empty(response.read())
        except urllib.error.HTTPError as error:  # 503 while not ready: read why
            doc = _json_or_empty(error.read())
            status = doc.get("status")
            if status == "warm_up_failed":
                # Not transient: the weights did not load (OOM, missing file). Fail the start
                # with the reason instead of waiting out the timeout.
                raise RuntimeError(f"flowhost's warm-up failed: {doc.get('reason') or 'see /health'}")
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() - last_report > 15:
            print(f"waiting for {url}: {status or 'no answer'}", flush=True)
            last_report = time.monotonic()
        time.sleep(0.25)
    raise TimeoutError(f"{url} not ready after {deadline_s:.0f} s")


def _json_or_empty(raw: bytes) -> dict:
    import json

    try:
        doc = json.loads(raw)
        return doc if isinstance(doc, dict) else {}
    except ValueError:
        return {}


HEALTH_URL = f"http://127.0.0.1:{PORT}/health"


def start_flowhost() -> subprocess.Popen:
    """Seed an empty plugins volume, start the volume reloader and `flowhost serve`."""
    copied = seed_plugins_if_empty()
    if copied:
        plugins_volume.commit()
        print(f"plugins volume was empty; installed bundled plugins: {', '.join(copied)}", flush=True)
    threading.Thread(target=_reload_plugins_forever, args=(PLUGIN_RELOAD_INTERVAL_S,), daemon=True).start()
    # LoRAs committed to the models volume after this container started: reloaded periodically
    # and when flowhost meets a missing file (docs/deploy-modal.md, "Fresh LoRAs").
    reloader = VolumeReloader(models_volume)
    serve_reload_requests(reloader)
    threading.Thread(target=reload_forever, args=(reloader, MODELS_RELOAD_INTERVAL_S), daemon=True).start()
    return subprocess.Popen(serve_command())


@app.cls(
    gpu=GPU,
    volumes={MODELS_DIR: models_volume, PLUGINS_DIR: plugins_volume, HF_CACHE_DIR: hf_cache_volume},
    secrets=_secrets(API_KEYS_SECRET, POSTHOG_SECRET, HF_SECRET, SHARED_STATE_SECRET),
    scaledown_window=SCALEDOWN_WINDOW_S,
    max_containers=MAX_CONTAINERS,
    timeout=REQUEST_TIMEOUT_S,
    startup_timeout=STARTUP_TIMEOUT_S,
    enable_memory_snapshot=MEMORY_SNAPSHOT,
    experimental_options={"enable_gpu_snapshot": True} if GPU_SNAPSHOT else None,
)
@modal.concurrent(max_inputs=MAX_IN_FLIGHT)
class Service:
    """flowhost + ComfyUI on one GPU. Start order, with and without snapshots:

    - no snapshot / CPU snapshot: `after_restore` starts flowhost (which starts ComfyUI) and
      returns once /health is ready; Modal routes traffic only after that.
    - GPU snapshot: `before_snapshot` starts flowhost and waits for /health ready (ComfyUI up,
      websocket connected, warm-up done: weights on the GPU); Modal then snapshots CPU and GPU
      memory. A restored container resumes with those processes; `after_restore` waits for
      /health again (the websocket reconnects if the restore dropped it)."""

    process: subprocess.Popen | None = None

    # Modal accepts snap=True only with memory snapshots on; without them this is a plain
    # method nobody calls, and `after_restore` is the ordinary start-up hook.
    @(modal.enter(snap=True) if MEMORY_SNAPSHOT else (lambda method: method))
    def before_snapshot(self) -> None:
        if GPU_SNAPSHOT:
            self.process = start_flowhost()
            health = wait_for_health(HEALTH_URL, self.process, STARTUP_TIMEOUT_S - 30)
            print(f"ready before the snapshot: {health.get('status')}", flush=True)

    @modal.enter(snap=False)
    def after_restore(self) -> None:
        if self.process is None:
            self.process = start_flowhost()
        # Returning only when /health is ready means no request meets a half-started ComfyUI.
        wait_for_health(HEALTH_URL, self.process, STARTUP_TIMEOUT_S - 30)

    # The label keeps the URL the function-based app had: https://<workspace>--flowhost-serve.modal.run
    @modal.web_server(port=PORT, startup_timeout=STARTUP_TIMEOUT_S, label=f"{APP_NAME}-serve")
    def serve(self) -> None:
        """Modal proxies HTTPS to flowhost on PORT; the process was started in an enter hook."""


# --- one-off jobs --------------------------------------------------------------------------


@app.function(
    volumes={MODELS_DIR: models_volume, HF_CACHE_DIR: hf_cache_volume},
    secrets=_secrets(HF_SECRET),
    timeout=DOWNLOAD_TIMEOUT_S,
)
def download_models(only: str = "") -> None:
    """Fill the models volume from the shipped manifest. `--only flux-dev,instantid` selects
    groups or files. Partial downloads are committed too, so a rerun resumes them."""
    selectors = [s.strip() for s in only.split(",") if s.strip()]
    result = subprocess.run(pull_command(selectors))
    models_volume.commit()
    if result.returncode != 0:
        raise RuntimeError(f"flowhost models pull failed (exit {result.returncode}); see the log above")


@app.function(volumes={PLUGINS_DIR: plugins_volume})
def install_default_plugins() -> None:
    """Copy the bundled plugins onto the plugins volume, replacing same-named files."""
    for wasm in sorted(Path(BUNDLED_PLUGINS_DIR).glob("*.wasm")):
        shutil.copy2(wasm, Path(PLUGINS_DIR) / wasm.name)
        print(f"installed {wasm.name}", flush=True)
    plugins_volume.commit()
