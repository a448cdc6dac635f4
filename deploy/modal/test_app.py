"""Offline checks of deploy/modal/app.py: no Modal account, no network.

The Modal configuration is read from what the installed `modal` keeps locally (pinned in
run_tests.sh, because part of it is private): a Function's `_spec` (image, GPU, volumes,
secrets), its `_webhook_config` (web server port and startup timeout), and the variables its
loader closes over (timeouts, scaledown window, concurrency, memory snapshot).
"""

from __future__ import annotations

import http.server
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest

warnings.filterwarnings("ignore", category=DeprecationWarning)

import modal  # noqa: E402
from modal._utils.async_utils import synchronizer  # noqa: E402
from modal_proto import api_pb2  # noqa: E402

HERE = Path(__file__).resolve().parent
SETTINGS_ENV = [
    "FLOWHOST_MODELS_VOLUME",
    "FLOWHOST_PLUGINS_VOLUME",
    "FLOWHOST_MEMORY_SNAPSHOT",
    "FLOWHOST_GPU_SNAPSHOT",
    "FLOWHOST_COMFYUI_PROFILE",
    "FLOWHOST_GPU",
    "FLOWHOST_POSTHOG_SECRET",
    "FLOWHOST_API_KEYS_SECRET",
    "FLOWHOST_HF_SECRET",
    "FLOWHOST_COMFYUI_COMMIT",
    "FLOWHOST_SHARED_STATE_SECRET",
    "FLOWHOST_MAX_CONTAINERS",
]


def load_app(monkeypatch, **env):
    """Import app.py afresh with the given deploy-time environment."""
    for name in SETTINGS_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    spec = importlib.util.spec_from_file_location("flowhost_modal_app", HERE / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def app_module(monkeypatch):
    return load_app(monkeypatch)


def impl(obj):
    return synchronizer._translate_in(obj)


def loader_settings(function) -> dict:
    load = impl(function)._load
    return dict(zip(load.__code__.co_freevars, (cell.cell_contents for cell in load.__closure__)))


def volume_names(function) -> dict[str, str]:
    return {str(path): volume.name for path, volume in impl(function)._spec.volumes.items()}


def secret_names(function) -> list[str]:
    return [secret.name for secret in impl(function)._spec.secrets]


def service(module):
    """The class-service Function behind the `Service` class (GPU, volumes, snapshots...)."""
    return impl(module.Service)._class_service_function


def webhook_of(module):
    return impl(module.Service)._method_partials["serve"].params.webhook_config


def hooks(module) -> dict[str, list[str]]:
    """Which methods Modal runs before the snapshot and after the restore (or at start)."""
    from modal._partial_function import _find_partial_methods_for_user_cls, _PartialFunctionFlags

    user_cls = impl(module.Service)._user_cls
    return {
        "pre_snapshot": list(_find_partial_methods_for_user_cls(user_cls, _PartialFunctionFlags.ENTER_PRE_SNAPSHOT)),
        "post_snapshot": list(_find_partial_methods_for_user_cls(user_cls, _PartialFunctionFlags.ENTER_POST_SNAPSHOT)),
    }


def image_commands(image) -> list[str]:
    """Every Dockerfile line of an image and its bases, base first."""
    settings = dict(zip(image._load.__code__.co_freevars, (c.cell_contents for c in image._load.__closure__)))
    commands = []
    for base in (settings.get("base_images") or {}).values():
        commands += image_commands(base)
    if settings.get("dockerfile_function"):
        commands += settings["dockerfile_function"]("2025.06").commands
    return commands


class TestServe:
    def test_runs_on_an_l40s_with_five_concurrent_inputs(self, app_module):
        settings = loader_settings(service(app_module))
        assert impl(service(app_module))._spec.gpus == "L40S"
        assert settings["max_concurrent_inputs"] == 5
        assert settings["scaledown_window"] == 300
        assert settings["enable_memory_snapshot"] is False
        assert not settings["experimental_options"]

    def test_volumes_are_mounted_where_flowhost_looks(self, app_module):
        assert volume_names(service(app_module)) == {
            "/root/models": "ryla-models",
            "/root/plugins": "flowhost-plugins",
            "/cache": "flowhost-hf-cache",
        }

    def test_secrets_are_attached_by_name(self, app_module):
        assert secret_names(service(app_module)) == ["flowhost-api-keys", "flowhost-posthog", "huggingface"]

    def test_is_a_web_server_on_port_8000_with_startup_time_for_comfyui(self, app_module):
        webhook = webhook_of(app_module)
        settings = loader_settings(service(app_module))
        assert webhook.type == api_pb2.WEBHOOK_TYPE_WEB_SERVER
        assert webhook.web_server_port == 8000
        # The URL stays https://<workspace>--flowhost-serve.modal.run (as the function-based app had).
        assert webhook.requested_suffix == "flowhost-serve"
        # ComfyUI boots in ~30 s on CPU here; the container gets far more before Modal gives up.
        assert webhook.web_server_startup_timeout >= 300
        assert settings["startup_timeout"] >= webhook.web_server_startup_timeout
        # A request may take a whole job (120 s) plus queueing and uploads.
        assert settings["timeout"] > 120

    def test_serve_command_line_is_exact(self, app_module):
        assert app_module.serve_command() == [
            "/usr/local/bin/flowhost", "serve",
            "--listen", "0.0.0.0:8000",
            "--comfyui-dir", "/root/comfyui",
            "--models", "/root/models",
            "--plugins", "/root/plugins",
            "--state-dir", "/root/flowhost-state",
            "--model-cache", "/root/flowhost-model-cache",
            "--models-refresh-url", "http://127.0.0.1:8001/reload",
            "--max-in-flight", "5",
            "--job-timeout", "120",
            "--log-format", "json",
            "--model-cache-max-gb", "40",
        ]  # fmt: skip

    def test_tunables_in_the_operators_secret_win_over_the_apps_defaults(self, app_module):
        # FLOWHOST_* variables from a secret reach flowhost's environment; a flag would win over
        # them without a word, so the app passes its default only where the secret says nothing.
        command = app_module.serve_command(env={"FLOWHOST_JOB_TIMEOUT": "300", "FLOWHOST_LOG_FORMAT": "text"})
        assert "--job-timeout" not in command and "--log-format" not in command
        assert command[command.index("--max-in-flight") + 1] == "5"
        assert command[command.index("--state-dir") + 1] == "/root/flowhost-state", "paths stay the image's"

    def test_every_flag_is_known_to_flowhost_serve(self, app_module):
        binary = os.environ.get("FLOWHOST_BIN")
        if not binary:
            pytest.skip("FLOWHOST_BIN not set: point it at a built `flowhost` to check flags against `serve --help`")
        help_text = subprocess.run([binary, "serve", "--help"], capture_output=True, text=True, check=True).stdout
        known = set(re.findall(r"--[a-z][a-z0-9-]*", help_text))
        flags = [arg for arg in app_module.serve_command("fp8") if arg.startswith("--")]
        assert [flag for flag in flags if flag not in known] == []

    def test_containers_are_uncapped_unless_a_cap_is_set(self, monkeypatch, app_module):
        # The connection budget (docs/operations.md): N containers x (16 + 1) PostgreSQL connections.
        assert loader_settings(service(app_module))["autoscaler_settings"].max_containers == 0
        module = load_app(monkeypatch, FLOWHOST_MAX_CONTAINERS="4")
        assert loader_settings(service(module))["autoscaler_settings"].max_containers == 4

    def test_models_volume_name_follows_the_environment(self, monkeypatch):
        module = load_app(monkeypatch, FLOWHOST_MODELS_VOLUME="staging-models")
        assert volume_names(service(module))["/root/models"] == "staging-models"
        assert volume_names(module.download_models)["/root/models"] == "staging-models"

    def test_an_empty_secret_name_leaves_that_secret_out(self, monkeypatch):
        module = load_app(monkeypatch, FLOWHOST_POSTHOG_SECRET="")
        assert secret_names(service(module)) == ["flowhost-api-keys", "huggingface"]

    def test_shared_state_is_opt_in_through_a_secret_flowhost_reads_from_its_environment(self, monkeypatch, app_module):
        # Default: one container, no shared-state secret (SQLite on the container's disk).
        assert "flowhost-shared" not in secret_names(service(app_module))
        module = load_app(monkeypatch, FLOWHOST_SHARED_STATE_SECRET="flowhost-shared")
        assert secret_names(service(module)) == ["flowhost-api-keys", "flowhost-posthog", "huggingface", "flowhost-shared"]
        # The database URL and bucket come from the secret's environment, never the command line
        # (a URL with a password must not show in `ps` or Modal's logs).
        assert not any(arg in ("--database-url", "--blob-store") for arg in module.serve_command())

    def test_launch_profile_is_opt_in_and_reaches_the_command_line(self, monkeypatch, app_module):
        assert "--comfyui-profile" not in app_module.serve_command()
        module = load_app(monkeypatch, FLOWHOST_COMFYUI_PROFILE="fp8")
        assert module.serve_command()[-2:] == ["--comfyui-profile", "fp8"]

    def test_warm_up_is_on_by_default_and_can_be_switched_off(self, monkeypatch, app_module):
        assert "--warm-up" not in app_module.serve_command(), "auto is flowhost's default"
        module = load_app(monkeypatch, FLOWHOST_WARM_UP="off")
        assert module.serve_command()[-2:] == ["--warm-up", "off"]
        with pytest.raises(ValueError, match="sometimes"):
            load_app(monkeypatch, FLOWHOST_WARM_UP="sometimes")

    def test_an_unknown_launch_profile_fails_the_deploy(self, monkeypatch):
        with pytest.raises(ValueError, match="turbo"):
            load_app(monkeypatch, FLOWHOST_COMFYUI_PROFILE="turbo")


class TestColdStart:
    """Snapshots are opt-in; what runs before the snapshot and what after the restore."""

    def started(self, module, monkeypatch):
        """Run the hooks Modal would run, in its order, recording what they start and wait for."""
        calls = []
        monkeypatch.setattr(module, "start_flowhost", lambda: calls.append("start") or "process")
        monkeypatch.setattr(module, "wait_for_health", lambda url, process, deadline: calls.append(f"ready:{url}") or {"status": "ready"})
        obj = impl(module.Service)._user_cls()
        found = hooks(module)
        for name in found["pre_snapshot"]:
            calls.append("-- snapshot taken after this --")
            getattr(obj, name)()
        calls.append("-- restored / started --")
        for name in found["post_snapshot"]:
            getattr(obj, name)()
        return calls

    def test_without_snapshots_flowhost_starts_in_one_hook_and_waits_for_readiness(self, app_module, monkeypatch):
        assert hooks(app_module) == {"pre_snapshot": [], "post_snapshot": ["after_restore"]}
        assert self.started(app_module, monkeypatch) == ["-- restored / started --", "start", "ready:http://127.0.0.1:8000/health"]

    def test_cpu_snapshot_alone_starts_flowhost_after_the_restore(self, monkeypatch):
        module = load_app(monkeypatch, FLOWHOST_MEMORY_SNAPSHOT="1")
        settings = loader_settings(service(module))
        assert settings["enable_memory_snapshot"] is True and not settings["experimental_options"]
        # No GPU before a CPU snapshot: ComfyUI must not start there.
        assert self.started(module, monkeypatch) == [
            "-- snapshot taken after this --", "-- restored / started --", "start", "ready:http://127.0.0.1:8000/health",
        ]

    def test_gpu_snapshot_starts_and_warms_before_the_snapshot_and_rechecks_after(self, monkeypatch):
        module = load_app(monkeypatch, FLOWHOST_GPU_SNAPSHOT="1")
        settings = loader_settings(service(module))
        assert settings["enable_memory_snapshot"] is True
        assert settings["experimental_options"] == {"enable_gpu_snapshot": "True"}
        assert self.started(module, monkeypatch) == [
            "-- snapshot taken after this --", "start", "ready:http://127.0.0.1:8000/health",
            "-- restored / started --", "ready:http://127.0.0.1:8000/health",
        ]


class TestDownloadModels:
    def test_pulls_onto_the_models_volume_with_the_hf_token(self, app_module):
        assert volume_names(app_module.download_models)["/root/models"] == "ryla-models"
        assert secret_names(app_module.download_models) == ["huggingface"]
        assert impl(app_module.download_models)._spec.gpus is None
        assert loader_settings(app_module.download_models)["timeout"] >= 3600

    def test_pull_command_uses_the_shipped_manifest_and_selectors(self, app_module):
        assert app_module.pull_command([]) == ["/usr/local/bin/flowhost", "models", "pull", "--models", "/root/models"]
        assert app_module.pull_command(["flux-dev", "instantid"])[-4:] == ["--only", "flux-dev", "--only", "instantid"]


class TestImage:
    def test_pins_comfyui_custom_nodes_and_builds_flowhost(self, app_module):
        commands = "\n".join(image_commands(impl(app_module.image)))
        assert "install_comfyui.sh a125cd84b054a57729b5eecab930ca9408719832 2.9.1 /root/comfyui /root/models" in commands
        assert "https://github.com/cubiq/ComfyUI_InstantID@1ef34ef573581bd9727c1e0ac05aa956b356a510" in commands
        assert "https://github.com/lldacing/ComfyUI_PuLID_Flux_ll@ba90657fe6ffa8072ac169a949bfa5e4153bf48a" in commands
        assert "check_custom_nodes.py ComfyUI_InstantID=InstantIDModelLoader,InstantIDFaceAnalysis,ApplyInstantID," in commands
        assert " ComfyUI_PuLID_Flux_ll=PulidFluxModelLoader,PulidFluxInsightFaceLoader,PulidFluxEvaClipLoader,ApplyPulidFlux," in commands
        for pin in ("insightface==0.7.3", "onnxruntime-gpu==", "facexlib==0.3.0", "ftfy==", "timm=="):
            assert pin in commands, pin
        assert "onnxruntime==" not in commands, "the CPU onnxruntime would shadow onnxruntime-gpu"
        assert "check_identity_lock.py --comfyui /root/comfyui" in commands
        assert commands.index("install_custom_nodes.sh") < commands.index("check_identity_lock.py")
        assert "build_flowhost.sh /opt/flowhost/src 1.95.0 /opt/flowhost/plugins flux-dev flux-lora flux-instantid flux-pulid workflow" in commands
        # The import check runs after the node packages are installed, the flowhost build last.
        assert commands.index("install_custom_nodes.sh") < commands.index("check_custom_nodes.py") < commands.index("build_flowhost.sh")

    def test_comfyui_commit_is_one_setting(self, monkeypatch):
        module = load_app(monkeypatch, FLOWHOST_COMFYUI_COMMIT="0" * 40)
        assert f"install_comfyui.sh {'0' * 40} " in "\n".join(image_commands(impl(module.image)))

    @pytest.mark.parametrize("script", sorted(p.name for p in (HERE / "build").glob("*.sh")))
    def test_build_scripts_stop_at_the_first_failure(self, script):
        lines = [line for line in (HERE / "build" / script).read_text().splitlines() if line and not line.startswith("#")]
        assert lines[0] == "set -euo pipefail"

    def test_repo_copy_skips_build_outputs_and_vcs(self, app_module):
        assert app_module._repo_ignored(Path("target/release/flowhost"))
        assert app_module._repo_ignored(Path(".git/HEAD"))
        assert not app_module._repo_ignored(Path("host/src/main.rs"))


class TestIdentityLock:
    """deploy/identity.lock.json is what the image installs, and check_identity_lock.py names drift."""

    LOCK = HERE.parent / "identity.lock.json"
    CHECK = HERE.parent / "check_identity_lock.py"
    FIXTURES = HERE.parents[1] / "comfyui-double" / "fixtures"

    def run(self, *args):
        return subprocess.run([sys.executable, str(self.CHECK), *args], capture_output=True, text=True)

    def captured_object_info(self):
        import json

        info = json.loads((self.FIXTURES / "object_info.json").read_text())
        info.update(json.loads((self.FIXTURES / "identity-nodes.object_info.json").read_text()))
        return info

    def test_the_image_installs_every_pack_of_the_lock_at_its_commit(self, app_module):
        import json

        lock = json.loads(self.LOCK.read_text())
        assert [name for name, _ in app_module.REQUIRED_NODE_CLASSES.items()] == ["ComfyUI_InstantID", "ComfyUI_PuLID_Flux_ll"]
        assert app_module.CUSTOM_NODES == [(p["repo"], p["commit"]) for p in lock["custom_nodes"]]
        assert all(len(commit) == 40 for _, commit in app_module.CUSTOM_NODES)

    def test_the_lock_is_well_formed(self):
        result = self.run()
        assert result.returncode == 0, result.stderr

    def test_the_captured_catalogue_of_the_pinned_packs_passes(self, tmp_path):
        import json

        path = tmp_path / "object_info.json"
        path.write_text(json.dumps(self.captured_object_info()))
        result = self.run("--object-info", str(path))
        assert result.returncode == 0, result.stderr

    def test_another_pulid_pack_and_a_missing_class_are_named(self, tmp_path):
        import json

        info = self.captured_object_info()
        info["ApplyPulidFlux"]["python_module"] = "custom_nodes.ComfyUI-PuLID-Flux"
        del info["PulidFluxFaceDetector"]
        path = tmp_path / "object_info.json"
        path.write_text(json.dumps(info))
        result = self.run("--object-info", str(path))
        assert result.returncode == 1
        assert "ApplyPulidFlux: registered by custom_nodes.ComfyUI-PuLID-Flux" in result.stderr
        assert "route /flux-pulid: node classes missing: PulidFluxFaceDetector" in result.stderr

    def test_a_pack_at_another_commit_is_named(self, tmp_path):
        for name in ("ComfyUI_InstantID", "ComfyUI_PuLID_Flux_ll"):
            repo = tmp_path / "custom_nodes" / name
            repo.mkdir(parents=True)
            subprocess.run(["git", "init", "-q", str(repo)], check=True)
            subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "x"], check=True)
        result = self.run("--comfyui", str(tmp_path))
        assert result.returncode == 1
        assert "custom node ComfyUI_InstantID: at " in result.stderr and "the lock pins 1ef34ef573581bd9727c1e0ac05aa956b356a510" in result.stderr
        assert "custom node ComfyUI_PuLID_Flux_ll: at " in result.stderr

    def test_models_missing_empty_or_of_another_size_are_named(self, tmp_path):
        import json

        lock = json.loads(self.LOCK.read_text())
        for entry in lock["models"]:
            path = tmp_path / "models" / entry["path"]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"x" * 10)
        (tmp_path / "models" / "facexlib" / "parsing_bisenet.pth").write_bytes(b"")
        (tmp_path / "models" / "pulid" / "pulid_flux_v0.9.1.safetensors").unlink()
        lock["models"][0]["bytes"] = 11
        lock_path = tmp_path / "lock.json"
        lock_path.write_text(json.dumps(lock))
        result = self.run("--lock", str(lock_path), "--models", str(tmp_path / "models"))
        assert result.returncode == 1
        assert "model facexlib/parsing_bisenet.pth (for /flux-pulid): missing or empty" in result.stderr
        assert "model pulid/pulid_flux_v0.9.1.safetensors (for /flux-pulid): missing or empty" in result.stderr
        assert f"model {lock['models'][0]['path']}: 10 bytes, the lock says 11" in result.stderr


class TestCustomNodeImportCheck:
    """check_custom_nodes.py must turn what ComfyUI only logs into a failed build."""

    @pytest.fixture
    def comfyui(self, tmp_path):
        (tmp_path / "comfy").mkdir()
        (tmp_path / "comfy" / "__init__.py").write_text("")
        (tmp_path / "comfy" / "options.py").write_text("def enable_args_parsing():\n    pass\n")
        (tmp_path / "folder_paths.py").write_text("models_dir = 'models'\n")
        good = tmp_path / "custom_nodes" / "Good"
        good.mkdir(parents=True)
        (good / "nodes.py").write_text("import folder_paths\nNODE_CLASS_MAPPINGS = {'Apply': object}\n")
        (good / "__init__.py").write_text("from .nodes import NODE_CLASS_MAPPINGS\n")
        broken = tmp_path / "custom_nodes" / "Broken"
        broken.mkdir()
        (broken / "__init__.py").write_text("import insightface_that_is_not_installed\n")
        return tmp_path

    def run_check(self, comfyui, *specs):
        return subprocess.run(
            [sys.executable, str(HERE / "build" / "check_custom_nodes.py"), *specs],
            cwd=comfyui,
            capture_output=True,
            text=True,
        )

    def test_a_node_that_imports_and_registers_passes(self, comfyui):
        result = self.run_check(comfyui, "Good=Apply")
        assert result.returncode == 0, result.stderr

    def test_an_import_error_fails(self, comfyui):
        result = self.run_check(comfyui, "Good=Apply", "Broken=Anything")
        assert result.returncode == 1
        assert "Broken: import failed" in result.stderr and "insightface_that_is_not_installed" in result.stderr

    def test_a_missing_node_class_fails(self, comfyui):
        result = self.run_check(comfyui, "Good=Apply,ApplyInstantID")
        assert result.returncode == 1
        assert "ApplyInstantID" in result.stderr


@pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")
class TestCustomNodeInstall:
    @pytest.fixture
    def upstream(self, tmp_path):
        repo = tmp_path / "upstream" / "SomeNodes"
        repo.mkdir(parents=True)
        git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
        subprocess.run(["git", "init", "-q", str(repo)], check=True)
        (repo / "__init__.py").write_text("NODE_CLASS_MAPPINGS = {}\n")
        subprocess.run([*git, "add", "."], check=True)
        subprocess.run([*git, "commit", "-qm", "one"], check=True)
        first = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        (repo / "later.py").write_text("")
        subprocess.run([*git, "add", "."], check=True)
        subprocess.run([*git, "commit", "-qm", "two"], check=True)
        subprocess.run([*git, "config", "uploadpack.allowAnySHA1InWant", "true"], check=True)
        return repo, first

    def install(self, comfyui: Path, spec: str):
        (comfyui / "custom_nodes").mkdir(parents=True, exist_ok=True)
        return subprocess.run(
            ["bash", str(HERE / "build" / "install_custom_nodes.sh"), str(comfyui), spec], capture_output=True, text=True
        )

    def test_checks_out_the_pinned_commit_not_the_latest(self, upstream, tmp_path):
        repo, first = upstream
        result = self.install(tmp_path / "comfyui", f"file://{repo}@{first}")
        assert result.returncode == 0, result.stderr
        installed = tmp_path / "comfyui" / "custom_nodes" / "SomeNodes"
        assert (installed / "__init__.py").exists() and not (installed / "later.py").exists()

    def test_an_unknown_commit_fails(self, upstream, tmp_path):
        repo, _ = upstream
        result = self.install(tmp_path / "comfyui", f"file://{repo}@{'1' * 40}")
        assert result.returncode != 0


class TestStartup:
    def test_empty_plugins_volume_gets_the_bundled_plugins_once(self, app_module, tmp_path):
        bundled, volume = tmp_path / "bundled", tmp_path / "volume"
        bundled.mkdir()
        volume.mkdir()
        (bundled / "flux_dev.wasm").write_bytes(b"\0asm")
        assert app_module.seed_plugins_if_empty(str(volume), str(bundled)) == ["flux_dev.wasm"]
        (bundled / "workflow.wasm").write_bytes(b"\0asm")
        assert app_module.seed_plugins_if_empty(str(volume), str(bundled)) == []
        assert sorted(p.name for p in volume.iterdir()) == ["flux_dev.wasm"]

    def test_wait_for_health_returns_once_health_answers(self, app_module):
        class Health(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200 if self.path == "/health" else 404)
                self.end_headers()

            def log_message(self, *args):
                pass

        server = http.server.HTTPServer(("127.0.0.1", 0), Health)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
        try:
            app_module.wait_for_health(f"http://127.0.0.1:{server.server_port}/health", process, 20)
        finally:
            process.kill()
            server.shutdown()

    def test_wait_for_health_waits_through_503_until_ready(self, app_module):
        answers = [503, 503, 200]

        class Health(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                code = answers.pop(0) if len(answers) > 1 else answers[0]
                body = b'{"status": "%s"}' % (b"ready" if code == 200 else b"starting")
                self.send_response(code)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        server = http.server.HTTPServer(("127.0.0.1", 0), Health)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
        try:
            health = app_module.wait_for_health(f"http://127.0.0.1:{server.server_port}/health", process, 20)
        finally:
            process.kill()
            server.shutdown()
        assert health == {"status": "ready"}
        assert answers == [200], "it asked again after each 503"

    def test_wait_for_health_fails_when_flowhost_exits(self, app_module):
        process = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
        with pytest.raises(RuntimeError, match="status 3"):
            app_module.wait_for_health("http://127.0.0.1:9/health", process, 20)

    def test_wait_for_health_fails_at_once_with_the_reason_when_the_warm_up_failed(self, app_module):
        class Health(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                body = b'{"status": "warm_up_failed", "reason": "warm-up failed: /flux-dev: CUDA out of memory"}'
                self.send_response(503)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        server = http.server.HTTPServer(("127.0.0.1", 0), Health)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
        started = time.monotonic()
        try:
            with pytest.raises(RuntimeError, match="CUDA out of memory"):
                app_module.wait_for_health(f"http://127.0.0.1:{server.server_port}/health", process, 20)
        finally:
            process.kill()
            server.shutdown()
        assert time.monotonic() - started < 10, "a failed warm-up is not waited out"


class FakeVolume:
    """A Modal volume as a running container sees it: `mount` shows what was committed as of
    the last `reload()`; `commit(name, bytes)` is another container's (the trainer's) commit.
    While `open_files` > 0, `reload()` is refused the way Modal refuses it."""

    def __init__(self, mount: Path):
        self.mount = mount
        self.committed: dict[str, bytes] = {}
        self.open_files = 0
        self.reloads = 0
        self.refusals = 0

    def commit(self, name: str, data: bytes) -> None:
        self.committed[name] = data

    def reload(self) -> None:
        if self.open_files > 0:
            self.open_files -= 1
            self.refusals += 1
            raise RuntimeError("there are open files preventing the operation")
        self.reloads += 1
        for name, data in self.committed.items():
            path = self.mount / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)


def _post(url: str) -> int:
    request = urllib.request.Request(url, data=b"", method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


import json  # noqa: E402
import urllib.error  # noqa: E402
import urllib.request  # noqa: E402


class TestFreshModels:
    def test_a_reload_refused_while_files_are_open_is_retried_until_it_succeeds(self, app_module, tmp_path):
        volume = FakeVolume(tmp_path)
        volume.commit("loras/alice.safetensors", b"weights")
        volume.open_files = 2
        reloader = app_module.VolumeReloader(volume, sleep=lambda _s: None)
        assert reloader.reload() is True
        assert (volume.refusals, volume.reloads) == (2, 1)
        assert (tmp_path / "loras/alice.safetensors").read_bytes() == b"weights"

    def test_a_refusal_that_outlasts_the_retries_or_another_error_is_reported_not_raised(self, app_module, tmp_path):
        volume = FakeVolume(tmp_path)
        volume.open_files = 100
        assert app_module.VolumeReloader(volume, attempts=3, sleep=lambda _s: None).reload() is False
        assert volume.refusals == 3

        class Broken:
            def reload(self):
                raise ConnectionError("modal unreachable")

        assert app_module.VolumeReloader(Broken(), sleep=lambda _s: None).reload() is False

    def test_the_periodic_reload_picks_up_a_commit_without_a_request(self, app_module, tmp_path):
        volume = FakeVolume(tmp_path)
        reloader = app_module.VolumeReloader(volume, sleep=lambda _s: None)
        stop = threading.Event()
        threading.Thread(target=app_module.reload_forever, args=(reloader, 0.05, stop), daemon=True).start()
        volume.commit("loras/bob.safetensors", b"weights")
        deadline = time.monotonic() + 10
        while not (tmp_path / "loras/bob.safetensors").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        stop.set()
        assert (tmp_path / "loras/bob.safetensors").exists()

    def test_a_lora_committed_after_start_is_served_after_a_reload_without_a_restart(self, app_module, tmp_path):
        """The real flowhost (simulated ComfyUI) over a models folder that is a fake volume's
        mount, its --models-refresh-url pointing at the app's reload server: a LoRA committed
        after flowhost started is served on the first request, by the same process."""
        binary = os.environ.get("FLOWHOST_BIN")
        if not binary:
            pytest.skip("FLOWHOST_BIN not set: point it at a built `flowhost` (scripts/test.sh does)")
        bundled = Path(binary).resolve().parent.parent / "bundled-plugins" / "flux_lora.wasm"
        assert bundled.exists(), f"{bundled} is missing: run scripts/build-plugins.sh target/bundled-plugins"
        mount, plugins, state = tmp_path / "models", tmp_path / "plugins", tmp_path / "state"
        for folder in (mount, plugins, state):
            folder.mkdir()
        shutil.copy2(bundled, plugins / "flux_lora.wasm")
        for name in ("diffusion_models/flux1-dev.safetensors", "text_encoders/clip_l.safetensors", "text_encoders/t5xxl_fp16.safetensors", "vae/ae.safetensors"):
            (mount / name).parent.mkdir(parents=True, exist_ok=True)
            (mount / name).write_bytes(b"placeholder weights")
        volume = FakeVolume(mount)
        volume.open_files = 1  # the first reload meets an open file, as with ComfyUI loading
        reloader = app_module.VolumeReloader(volume, sleep=lambda _s: time.sleep(0.05))
        server = app_module.serve_reload_requests(reloader, port=0)
        port = _free_port()
        process = subprocess.Popen(
            [binary, "serve", "--simulate", "--warm-up", "off", "--listen", f"127.0.0.1:{port}", "--plugins", str(plugins),
             "--state-dir", str(state), "--cache-dir", str(tmp_path / "cache"), "--models", str(mount),
             "--models-refresh-url", f"http://127.0.0.1:{server.server_port}/reload"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            _wait_ready(f"http://127.0.0.1:{port}/health", process)
            body = {"prompt": "a portrait", "lora_id": "trained-after-start", "width": 256, "height": 256, "steps": 1}
            # Not committed yet: the reload finds nothing, the answer is the 404 naming the file.
            code, problem = _post_json(f"http://127.0.0.1:{port}/flux-lora", body)
            assert code == 404 and "loras/trained-after-start.safetensors" in problem["detail"], problem
            # The trainer commits; the same running process serves it on the next request.
            volume.commit("loras/trained-after-start.safetensors", b"weights committed by the trainer")
            pid = process.pid
            code, _ = _post_json(f"http://127.0.0.1:{port}/flux-lora", body)
            assert code == 200
            assert process.poll() is None and process.pid == pid, "no restart"
            assert volume.refusals == 1 and volume.reloads >= 2
        finally:
            process.kill()
            server.shutdown()


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_ready(url: str, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert process.poll() is None, "flowhost exited"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise TimeoutError(url)


def _post_json(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST", headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            response.read()
            return response.status, {}
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")
