#!/usr/bin/env python3
"""The page at `GET /` (issue #27) in headless Chromium, against `flowhost serve --simulate`.

Starts flowhost (a child process with its own environment and a temporary plugin folder),
starts Debian's `chromedriver` with `chromium` headless and a fresh profile, and drives the page
through the W3C WebDriver protocol (a few HTTP calls, no client library): fill and run
`/flux-dev` and see progress, a preview frame and the final image (its seed, a download); run it
again from the job history; see the built graph; a 400 marks its fields; a plugin copied into
the plugin folder while the page is open appears without a reload; a hostile plugin's markup and
script (in its summary, its field descriptions and its error texts) stay inert text; with keys
on, no key → the page says so, a wrong key is refused, the right one works and stays out of URLs,
localStorage and the server's log; a 503 (models missing) shows its reason and Retry-After.

Usage: page_e2e.py FLOWHOST_BINARY BUNDLED_PLUGINS_DIR HOSTILE_WASM [--screenshot PNG] [--bench N]
  --screenshot PNG  save a screenshot of the page after a /flux-dev run (docs/page.png)
  --bench N         also load the page N times and print its size and time to interactive
Exit status 0 only when every check passed. A missing chromium or chromedriver is a failure,
never a skip (.ci/run installs Debian's `chromium` and `chromium-driver`).
"""

from __future__ import annotations

import base64
import gzip
import json
import os
import shutil
import socket
import statistics
import subprocess
import struct
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zlib

ELEMENT = "element-6066-11e4-a52e-4f735466cecf"
STEP_LATENCY_MS = "120"
USER_KEY = "page-test-user-key-7f3a9c"


def fail(message: str) -> None:
    print(f"FAIL: {message}", file=sys.stderr)
    sys.exit(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None, timeout: float = 30):
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers, err.read()


def find_tool(*names: str) -> str:
    for name in names:
        path = shutil.which(name) or (f"/usr/bin/{name}" if os.path.exists(f"/usr/bin/{name}") else None)
        if path:
            return path
    fail(f"none of {', '.join(names)} is installed (Debian: apt-get install chromium chromium-driver; .ci/run does it)")
    raise AssertionError


class Flowhost:
    """`flowhost serve --simulate` as a child with its own environment and plugin folder."""

    def __init__(self, binary: str, plugins: list[str], env: dict[str, str] | None = None, args: list[str] | None = None):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.tmp = tempfile.TemporaryDirectory(prefix="flowhost-page-")
        self.plugins = os.path.join(self.tmp.name, "plugins")
        os.makedirs(self.plugins)
        for path in plugins:
            shutil.copy(path, os.path.join(self.plugins, os.path.basename(path)))
        self.log_path = os.path.join(self.tmp.name, "flowhost.log")
        self.log = open(self.log_path, "w+")
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWHOST_")}
        full_env["FLOWHOST_SIMULATE_STEP_LATENCY_MS"] = STEP_LATENCY_MS
        full_env.update(env or {})
        argv = [
            binary, "serve", "--simulate",
            "--listen", f"127.0.0.1:{self.port}",
            "--plugins", self.plugins,
            "--cache-dir", os.path.join(self.tmp.name, "cache"),
            "--state-dir", os.path.join(self.tmp.name, "state"),
            *(args or []),
        ]
        self.process = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, env=full_env)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                fail(f"flowhost exited with {self.process.returncode}:\n{self.logs()}")
            try:
                # Up, not necessarily ready (a server without its models never is).
                status, _, body = http("GET", f"{self.base}/livez", timeout=5)
                if status == 200:
                    return
            except (OSError, ValueError):
                pass
            time.sleep(0.2)
        fail(f"flowhost did not become ready:\n{self.logs()}")

    def publish(self, path: str) -> None:
        """Copy a plugin in the way a deploy does: a hidden temporary name, then a rename."""
        name = os.path.basename(path)
        temporary = os.path.join(self.plugins, f".{name}.tmp")
        shutil.copy(path, temporary)
        os.rename(temporary, os.path.join(self.plugins, name))

    def logs(self) -> str:
        self.log.flush()
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()[-6000:]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()
        self.tmp.cleanup()


class Browser:
    """Headless Chromium through chromedriver, spoken to in W3C WebDriver over HTTP."""

    def __init__(self):
        chromium = find_tool("chromium", "chromium-browser")
        driver = find_tool("chromedriver")
        self.profile = tempfile.TemporaryDirectory(prefix="flowhost-page-chromium-")
        self.port = free_port()
        self.driver_log = open(os.path.join(self.profile.name, "chromedriver.log"), "w")
        self.driver = subprocess.Popen([driver, f"--port={self.port}"], stdout=self.driver_log, stderr=subprocess.STDOUT)
        self.base = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                status, _, body = http("GET", f"{self.base}/status", timeout=2)
                if status == 200 and json.loads(body)["value"]["ready"]:
                    break
            except (OSError, ValueError, KeyError):
                pass
            if time.monotonic() > deadline or self.driver.poll() is not None:
                fail("chromedriver did not start")
            time.sleep(0.1)
        args = [
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-dev-shm-usage", "--window-size=1400,1050",
            f"--user-data-dir={os.path.join(self.profile.name, 'profile')}",
        ]
        caps = {"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {"binary": chromium, "args": args}}}}
        value = self.call("POST", "/session", caps, session=False)
        self.session = value["sessionId"]

    def call(self, method: str, path: str, body=None, session: bool = True):
        url = f"{self.base}/session/{self.session}{path}" if session else f"{self.base}{path}"
        data = json.dumps(body if body is not None else {}).encode() if method == "POST" else None
        status, _, raw = http(method, url, data, {"Content-Type": "application/json"}, timeout=60)
        reply = json.loads(raw or b"{}")
        if status != 200:
            raise RuntimeError(f"WebDriver {method} {path}: {status} {reply}")
        return reply.get("value")

    def open(self, url: str) -> None:
        self.call("POST", "/url", {"url": url})

    def js(self, script: str, *args):
        return self.call("POST", "/execute/sync", {"script": script, "args": list(args)})

    def find(self, css: str):
        return self.call("POST", "/element", {"using": "css selector", "value": css})

    def click(self, css: str) -> None:
        self.call("POST", f"/element/{self.find(css)[ELEMENT]}/click")

    def type(self, css: str, text: str, clear: bool = True) -> None:
        element = self.find(css)[ELEMENT]
        if clear:
            self.call("POST", f"/element/{element}/clear")
        self.call("POST", f"/element/{element}/value", {"text": text})

    def screenshot(self) -> bytes:
        return base64.b64decode(self.call("GET", "/screenshot"))

    def wait(self, script: str, what: str, timeout: float = 30, *args):
        """Poll `script` (a function body returning a value) until it is truthy."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            last = self.js(script, *args)
            if last:
                return last
            time.sleep(0.1)
        state = self.js("return {access: document.getElementById('access').textContent, problem: document.getElementById('form-problem').textContent, status: document.body.dataset.jobStatus, job: document.getElementById('job-problem').textContent}")
        fail(f"timed out waiting for {what} (last {last!r}); page: {state}")

    def quit(self) -> None:
        try:
            self.call("DELETE", "")
        except Exception:  # noqa: BLE001 — tearing down; the result is already decided
            pass
        self.driver.terminate()
        self.driver.wait(timeout=20)
        self.driver_log.close()
        self.profile.cleanup()


def check(condition: bool, message: str) -> None:
    if not condition:
        fail(message)


def open_page(browser: Browser, server: Flowhost) -> None:
    browser.open(f"{server.base}/")
    browser.wait("return document.body.dataset.ready === 'true'", "the page to list the endpoints")


def select_endpoint(browser: Browser, route: str) -> None:
    browser.wait("return !!document.querySelector(`#endpoint-list li[data-route='${arguments[0]}']`)", f"{route} in the list", 30, route)
    browser.click(f"#endpoint-list li[data-route='{route}'] button")
    browser.wait("return document.getElementById('endpoint-route').textContent === arguments[0]", f"the {route} form", 10, route)


def case_headers(server: Flowhost) -> None:
    status, headers, body = http("GET", f"{server.base}/", headers={"Accept": "text/html,application/xhtml+xml;q=0.9,*/*;q=0.8"})
    check(status == 200 and headers.get("Content-Type", "").startswith("text/html"), f"GET / for a browser: {status} {headers}")
    csp = headers.get("Content-Security-Policy", "")
    for directive in ["default-src 'none'", "script-src 'self'", "connect-src 'self'", "img-src 'self' data: blob:"]:
        check(directive in csp, f"CSP lacks {directive!r}: {csp!r}")
    check("unsafe-inline" not in csp and "unsafe-eval" not in csp, f"CSP allows inline/eval: {csp!r}")
    check(headers.get("X-Content-Type-Options") == "nosniff", f"no nosniff: {headers}")
    check(b"<script>" not in body, "the page has an inline script")
    status, headers, body = http("GET", f"{server.base}/", headers={"Accept": "application/json"})
    check(status == 404 and headers.get("Content-Type", "").startswith("application/problem+json"), f"GET / for an API client: {status} {headers}")
    status, headers, _ = http("GET", f"{server.base}/_page/page.js")
    check(status == 200 and headers.get("Content-Type", "").startswith("text/javascript") and headers.get("X-Content-Type-Options") == "nosniff", f"page.js: {status} {headers}")
    print("ok: GET / serves the page to browsers under a strict CSP, the API's 404 to API clients")


def case_run_flux_dev(browser: Browser, server: Flowhost) -> None:
    open_page(browser, server)
    select_endpoint(browser, "/flux-dev")
    browser.js("window.__same_page = 'flux';")
    kinds = browser.js("return Object.fromEntries([...document.querySelectorAll('#fields .field')].map(f => [f.dataset.field, f.querySelector('input[type=range]') ? 'slider' : f.querySelector('select') ? 'select' : f.querySelector('textarea') ? 'textarea' : 'input']))")
    check(kinds.get("steps") == "slider" and kinds.get("prompt") == "textarea", f"fields from the schema: {kinds}")
    help_text = browser.js("return document.querySelector(\"#fields .field[data-field='steps'] .help\").textContent")
    check(help_text == "Sampling steps.", f"the steps field's help: {help_text!r}")
    default_steps = browser.js("return document.getElementById('f-steps').value")
    check(default_steps not in ("", None), "steps has no default value in the form")
    browser.type("#f-prompt", "a lighthouse at dawn")
    browser.type("#f-width", "256")
    browser.type("#f-height", "256")
    browser.type("#f-steps", "20")
    # Progress values seen while it runs (recorded by the page itself, read after).
    browser.js("window.__progress = []; new MutationObserver(() => window.__progress.push(document.body.dataset.progress)).observe(document.body, {attributes: true, attributeFilter: ['data-progress']});")
    browser.click("#run")
    browser.wait("return document.body.dataset.jobStatus === 'succeeded' && document.getElementById('output').complete && document.getElementById('output').naturalWidth > 0", "the final image", 60)
    progress = browser.js("return window.__progress")
    check(any(0 < float(p) < 1 for p in progress if p not in (None, "")), f"no intermediate progress shown: {progress}")
    previews = int(browser.js("return document.getElementById('preview').dataset.count"))
    check(previews >= 1, "no preview frame was shown")
    width = browser.js("return document.getElementById('output').naturalWidth")
    check(width == 256, f"the final image is {width} px wide, not 256")
    seed = browser.js("return document.querySelector('#facts dd[data-fact=seed]')?.textContent")
    check(seed is not None and seed.isdigit(), f"no seed shown: {seed!r}")
    timings = browser.js("return [...document.querySelectorAll('#facts dt')].map(d => d.textContent)")
    check("total" in timings and "execution" in timings, f"no timings shown: {timings}")
    href = browser.js("return document.getElementById('download').href")
    check(href.startswith("blob:"), f"download link: {href!r}")
    job_id = browser.js("return document.body.dataset.jobId")
    # The job history has it, with a thumbnail; "run again" refills the form.
    browser.wait("return document.querySelector(`#job-list li[data-job='${arguments[0]}'] img.thumb`)?.src.startsWith('blob:')", "the job's thumbnail in the history", 20, job_id)
    browser.type("#f-prompt", "something else")
    browser.click(f"#job-list li[data-job='{job_id}'] button[data-action='again']")
    refilled = browser.js("return [document.getElementById('f-prompt').value, document.getElementById('f-steps').value]")
    check(refilled == ["a lighthouse at dawn", "20"], f"run again refilled {refilled}")
    # The built graph (dry run).
    browser.click("#dry-run")
    browser.wait("return !document.getElementById('graph-panel').hidden && document.getElementById('graph').textContent.includes('KSampler')", "the built graph", 20)
    check(browser.js("return window.__same_page") == "flux", "the page reloaded")
    print("ok: /flux-dev ran from its form: progress, a preview, the final image with seed, timings and download; history, run again, graph")


def case_field_errors(browser: Browser) -> None:
    select_endpoint(browser, "/flux-dev")
    browser.type("#f-prompt", "   ")
    browser.type("#f-width", "100")
    browser.click("#run")
    browser.wait("return document.querySelector(\"#fields .field[data-field='width']\").getAttribute('aria-invalid') === 'true'", "the width field marked", 20)
    marked = browser.js("return [...document.querySelectorAll('#fields .field[aria-invalid=true]')].map(f => [f.dataset.field, f.querySelector('.field-error').textContent])")
    names = [name for name, _ in marked]
    check("prompt" in names and "width" in names, f"the 400's fields were not marked: {marked}")
    check(all(message for _, message in marked), f"a marked field has no message: {marked}")
    check(not browser.js("return document.querySelector(\"#fields .field[data-field='steps']\").hasAttribute('aria-invalid')"), "a valid field was marked")
    print(f"ok: a 400 marks its fields beside them: {marked}")


def png(width: int, height: int) -> bytes:
    """A real RGB PNG (no Pillow needed)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    raw = b"".join(b"\x00" + b"".join(bytes((x * 3 % 256, y * 5 % 256, 120)) for x in range(width)) for y in range(height))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def case_image_picker(browser: Browser, tmp: str) -> None:
    """/flux-instantid's reference image is a file picker; the picked file goes as a data URL."""
    select_endpoint(browser, "/flux-instantid")
    check(browser.js("return !!document.querySelector(\"#fields .field[data-field='reference_image'] input[type=file]\")"), "reference_image is not a file picker")
    face = os.path.join(tmp, "face <img id=pwned src=x>.png")
    with open(face, "wb") as f:
        f.write(png(64, 64))
    browser.type("#f-reference_image", face, clear=False)
    chosen = browser.js("return document.querySelector(\"#fields .field[data-field='reference_image'] .chosen\").textContent")
    check("face <img id=pwned src=x>.png" in chosen, f"the chosen file's name is not shown as text: {chosen!r}")
    browser.type("#f-prompt", "a portrait")
    browser.type("#f-width", "256")
    browser.type("#f-height", "256")
    browser.type("#f-steps", "2")
    browser.click("#run")
    browser.wait("return document.body.dataset.jobStatus === 'succeeded' && document.getElementById('output').naturalWidth > 0", "the /flux-instantid run with a picked image", 60)
    job_id = browser.js("return document.body.dataset.jobId")
    sent = browser.js("return JSON.parse(localStorage.getItem('flowhost.requests'))[arguments[0]].body", job_id)
    check('"reference_image":"data:image/png;base64,' in sent, f"the picked file was not sent as a data URL: {sent[:200]!r}")
    check(browser.js(INERT), "the file name became markup")
    print("ok: an image field is a file picker whose file is sent as a data URL")


def case_hot_load(browser: Browser, server: Flowhost, lora_wasm: str) -> None:
    check(not browser.js("return !!document.querySelector(\"#endpoint-list li[data-route='/flux-lora']\")"), "/flux-lora listed before it was loaded")
    server.publish(lora_wasm)
    browser.wait("return !!document.querySelector(\"#endpoint-list li[data-route='/flux-lora']\")", "the hot-loaded /flux-lora in the list", 30)
    check(browser.js("return window.__same_page") == "flux", "the page reloaded to show the plugin")
    select_endpoint(browser, "/flux-lora")
    print("ok: a plugin hot-loaded while the page is open appears in it without a reload")


INERT = """
const pwned = window.__pwned !== undefined || document.getElementById('pwned') !== null
  || document.querySelector('#endpoint-list b, #fields b, #form-problem b, #endpoint-summary b, #endpoint-list script, #fields script, #form-problem script');
return !pwned;
"""


def case_hostile(browser: Browser) -> None:
    select_endpoint(browser, "/hostile")
    summary = browser.js("return document.querySelector(\"#endpoint-list li[data-route='/hostile'] .sum\").textContent")
    check("<script>window.__pwned=2</script>" in summary and "<img id=\"pwned\"" in summary, f"the summary is not shown as text: {summary!r}")
    helps = browser.js("return [...document.querySelectorAll('#fields .help')].map(h => h.textContent).join(' ')")
    check("<b>bold</b>" in helps, f"the descriptions are not shown as text: {helps!r}")
    options = browser.js("return [...document.querySelectorAll('#f-mode option')].map(o => o.textContent)")
    check("markup-error" in options, f"mode options: {options}")
    browser.js("const s = document.getElementById('f-mode'); s.value = [...s.options].find(o => o.textContent === 'markup-error').value;")
    browser.click("#run")
    browser.wait("return document.querySelector(\"#fields .field[data-field='mode']\").getAttribute('aria-invalid') === 'true'", "the plugin's field error on mode", 20)
    message = browser.js("return document.querySelector(\"#fields .field[data-field='mode'] .field-error\").textContent")
    check("<script>window.__pwned=2</script>" in message, f"the plugin's error text is not shown as text: {message!r}")
    unplaced = browser.js("return document.getElementById('form-problem').textContent")
    check("<img id=\"pwned\"" in unplaced, f"the error on an unknown field is not listed as text: {unplaced!r}")
    time.sleep(0.5)  # an injected <img onerror> would have fired by now
    check(browser.js(INERT), "markup from the hostile plugin became live")
    print("ok: a hostile plugin's summary, descriptions and error texts render as inert text")


def case_keys(browser: Browser, binary: str, plugins: list[str]) -> None:
    server = Flowhost(binary, plugins, {"FLOWHOST_API_KEYS": f"page-user:{USER_KEY}"})
    try:
        open_page(browser, server)
        browser.js("sessionStorage.clear(); localStorage.clear();")
        open_page(browser, server)
        browser.wait("return document.body.dataset.access === 'missing'", "the page to say a key is needed", 20)
        said = browser.js("return document.getElementById('access').textContent")
        check("requires an API key" in said, f"without a key the page said {said!r}")
        check(browser.js("return document.getElementById('run').disabled"), "Run is enabled without a key")
        browser.type("#key", "not-the-key")
        browser.click("#key-use")
        browser.wait("return document.body.dataset.access === 'refused'", "a wrong key refused", 20)
        said = browser.js("return document.getElementById('access').textContent")
        check("refused" in said, f"with a wrong key the page said {said!r}")
        browser.type("#key", USER_KEY)
        browser.click("#key-use")
        browser.wait("return document.body.dataset.access === 'ok'", "the key accepted", 20)
        select_endpoint(browser, "/flux-dev")
        browser.type("#f-prompt", "with a key")
        browser.type("#f-width", "256")
        browser.type("#f-height", "256")
        browser.type("#f-steps", "2")
        browser.click("#run")
        browser.wait("return document.body.dataset.jobStatus === 'succeeded' && document.getElementById('output').naturalWidth > 0", "a run with the key", 60)
        where = browser.js("return [location.href, JSON.stringify(localStorage), sessionStorage.getItem('flowhost.key'), document.getElementById('key').value, document.documentElement.outerHTML.includes(arguments[0])]", USER_KEY)
        check(USER_KEY not in where[0], "the key is in the URL")
        check(USER_KEY not in where[1], "the key is in localStorage")
        check(where[2] == USER_KEY, "the key is not in sessionStorage")
        check(where[3] == "" and not where[4], "the key is left in the document")
        check(USER_KEY not in server.logs(), "the key is in the server's log")
        print("ok: with keys on the page says a key is needed, refuses a wrong one and works with the right one (header only)")
    finally:
        server.stop()


def case_unavailable(browser: Browser, binary: str, plugins: list[str]) -> None:
    """A server whose model volume lacks flux-dev's models: Run shows the 503's reason and Retry-After."""
    models = tempfile.TemporaryDirectory(prefix="flowhost-page-models-")
    server = Flowhost(binary, plugins, args=["--models", models.name, "--warm-up", "off"])
    try:
        open_page(browser, server)
        select_endpoint(browser, "/flux-dev")
        browser.type("#f-prompt", "no models here")
        browser.click("#run")
        browser.wait("return !document.getElementById('form-problem').hidden", "the 503 shown", 20)
        said = browser.js("return [document.getElementById('form-problem').textContent, document.getElementById('form-problem').dataset.retryAfter]")
        check(said[0].startswith("Unavailable: ") and ".safetensors" in said[0], f"the 503's reason: {said[0]!r}")
        check(said[1] and said[1].isdigit() and f"Retry after {said[1]} s." in said[0], f"the 503's Retry-After: {said}")
        print(f"ok: a 503 shows its reason and Retry-After: {said[0]!r}")
    finally:
        server.stop()
        models.cleanup()


def take_screenshot(browser: Browser, binary: str, bundled: str, path: str) -> None:
    """The page after a /flux-dev run, with the bundled plugins only (for docs/page.png)."""
    plugins = [os.path.join(bundled, f) for f in sorted(os.listdir(bundled)) if f.endswith(".wasm")]
    server = Flowhost(binary, plugins)
    try:
        browser.call("POST", "/window/rect", {"width": 1400, "height": 1250})
        open_page(browser, server)
        select_endpoint(browser, "/flux-dev")
        browser.type("#f-prompt", "a lighthouse at dawn")
        browser.type("#f-width", "512")
        browser.type("#f-height", "384")
        browser.type("#f-steps", "8")
        browser.click("#run")
        browser.wait("return document.body.dataset.jobStatus === 'succeeded' && document.getElementById('output').naturalWidth > 0", "the final image", 60)
        job_id = browser.js("return document.body.dataset.jobId")
        browser.wait("return document.querySelector(`#job-list li[data-job='${arguments[0]}'] img.thumb`)?.src.startsWith('blob:')", "the thumbnail", 20, job_id)
        browser.js("window.scrollTo(0, 0)")
        with open(path, "wb") as f:
            f.write(browser.screenshot())
        print(f"screenshot saved to {path}")
    finally:
        server.stop()
        browser.call("POST", "/window/rect", {"width": 1400, "height": 1050})


def bench(browser: Browser, server: Flowhost, runs: int) -> None:
    sizes = {}
    for path in ["/", "/_page/page.js", "/_page/page.css"]:
        _, _, body = http("GET", f"{server.base}{path}", headers={"Accept": "text/html"})
        sizes[path] = (len(body), len(gzip.compress(body, 9)))
    total = sum(s[0] for s in sizes.values()), sum(s[1] for s in sizes.values())
    interactive, dom = [], []
    for _ in range(runs):
        browser.open("about:blank")
        open_page(browser, server)
        marks = browser.js("const m = performance.getEntriesByName('flowhost-page-interactive')[0]; const n = performance.getEntriesByType('navigation')[0]; return [m.startTime, n.domInteractive]")
        interactive.append(marks[0])
        dom.append(marks[1])
    print(f"page size: {', '.join(f'{p} {b} B ({g} B gzip)' for p, (b, g) in sizes.items())}; total {total[0]} B ({total[1]} B gzip -9)")
    print(f"time to interactive over {runs} loads (navigation start → endpoint list and form built, performance mark): "
          f"median {statistics.median(interactive):.1f} ms, min {min(interactive):.1f}, max {max(interactive):.1f}; "
          f"domInteractive median {statistics.median(dom):.1f} ms")


def main() -> None:
    args = sys.argv[1:]
    screenshot = None
    runs = 0
    if "--screenshot" in args:
        i = args.index("--screenshot")
        screenshot = os.path.abspath(args[i + 1])
        del args[i:i + 2]
    if "--bench" in args:
        i = args.index("--bench")
        runs = int(args[i + 1])
        del args[i:i + 2]
    if len(args) != 3:
        fail(__doc__)
    binary, bundled, hostile = args
    flux_dev = os.path.join(bundled, "flux_dev.wasm")
    flux_lora = os.path.join(bundled, "flux_lora.wasm")
    for path in [binary, flux_dev, flux_lora, hostile]:
        check(os.path.exists(path), f"{path} is missing (build the binary and the plugins first)")
    browser = Browser()
    server = Flowhost(binary, [flux_dev, hostile, os.path.join(bundled, "flux_instantid.wasm")])
    try:
        case_headers(server)
        case_run_flux_dev(browser, server)
        case_field_errors(browser)
        case_hot_load(browser, server, flux_lora)
        case_hostile(browser)
        case_image_picker(browser, server.tmp.name)
        if runs:
            bench(browser, server, runs)
        case_keys(browser, binary, [flux_dev])
        case_unavailable(browser, binary, [flux_dev])
        if screenshot:
            take_screenshot(browser, binary, bundled, screenshot)
    finally:
        server.stop()
        browser.quit()
    print("page: every check passed")


if __name__ == "__main__":
    main()
