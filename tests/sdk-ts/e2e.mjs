// The official Comfy API v2 TypeScript SDK (`@comfyorg/sdk`, pinned in package.json,
// unchanged) drives flowhost.
//
// Starts `flowhost serve --simulate` on a free loopback port with a temporary state folder,
// points the SDK at it with COMFY_BASE_URL (the service root), and does what a user of the
// SDK does: upload the same bytes twice (the second commit is the by-hash fast path and
// returns the same asset), submit a graph naming the upload by file name and one holding the
// asset handle, stream events to the end, wait, download, cancel a running job, see an
// Idempotency-Key reuse refused. Then all of it again with API keys on (plus: no key →
// Unauthorized).
//
// Usage: node tests/sdk-ts/e2e.mjs FLOWHOST_BINARY PLUGINS_DIR
// Exit status 0 only when every check passed; a missing SDK is a failure.
import { spawn } from "node:child_process";
import { mkdtempSync, openSync, readFileSync, rmSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { randomUUID } from "node:crypto";
import { deflateSync } from "node:zlib";

const EXPECTED_SDK = "0.1.9";
const STEP_LATENCY_MS = "150";

let sdk;
try {
  sdk = await import("@comfyorg/sdk");
} catch (err) {
  console.error(`FAIL: @comfyorg/sdk is not importable (${err.message}); run npm ci in tests/sdk-ts`);
  process.exit(2);
}
const { Comfy, IdempotencyKeyReuse, Unauthorized } = sdk;

function check(condition, message) {
  if (!condition) throw new Error(`check failed: ${message}`);
}

/** A real RGB PNG. */
function png(width, height) {
  const crcTable = Array.from({ length: 256 }, (_, n) => {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    return c >>> 0;
  });
  const crc = (buf) => {
    let c = 0xffffffff;
    for (const b of buf) c = crcTable[(c ^ b) & 0xff] ^ (c >>> 8);
    return (c ^ 0xffffffff) >>> 0;
  };
  const chunk = (kind, data) => {
    const len = Buffer.alloc(4);
    len.writeUInt32BE(data.length);
    const body = Buffer.concat([Buffer.from(kind, "ascii"), data]);
    const sum = Buffer.alloc(4);
    sum.writeUInt32BE(crc(body));
    return Buffer.concat([len, body, sum]);
  };
  const rows = [];
  for (let y = 0; y < height; y++) {
    const row = Buffer.alloc(1 + width * 3);
    for (let x = 0; x < width; x++) row.set([x % 256, y % 256, 120], 1 + x * 3);
    rows.push(row);
  }
  const ihdr = Buffer.alloc(13);
  ihdr.writeUInt32BE(width, 0);
  ihdr.writeUInt32BE(height, 4);
  ihdr.set([8, 2, 0, 0, 0], 8);
  return Buffer.concat([
    Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]),
    chunk("IHDR", ihdr),
    chunk("IDAT", deflateSync(Buffer.concat(rows))),
    chunk("IEND", Buffer.alloc(0)),
  ]);
}

function pngSize(bytes) {
  const buf = Buffer.from(bytes);
  check(buf.subarray(1, 4).toString("ascii") === "PNG", "the output is a PNG");
  return [buf.readUInt32BE(16), buf.readUInt32BE(20)];
}

function freePort() {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function startFlowhost(binary, plugins, env) {
  const port = await freePort();
  const base = `http://127.0.0.1:${port}`;
  const dir = mkdtempSync(join(tmpdir(), "flowhost-sdk-ts-"));
  const logPath = join(dir, "flowhost.log");
  const log = openSync(logPath, "w");
  const childEnv = { ...process.env, ...env, FLOWHOST_SIMULATE_STEP_LATENCY_MS: STEP_LATENCY_MS };
  if (!env.FLOWHOST_API_KEYS) {
    delete childEnv.FLOWHOST_API_KEYS;
    delete childEnv.FLOWHOST_ADMIN_KEYS;
  }
  const child = spawn(
    binary,
    ["serve", "--simulate", "--listen", `127.0.0.1:${port}`, "--plugins", plugins,
      "--cache-dir", join(dir, "cache"), "--state-dir", join(dir, "state")],
    { env: childEnv, stdio: ["ignore", log, log] },
  );
  let exited = null;
  child.on("exit", (code) => (exited = code));
  const logs = () => readFileSync(logPath, "utf8").slice(-8000);
  const stop = async () => {
    if (exited === null) {
      child.kill("SIGTERM");
      for (let i = 0; i < 200 && exited === null; i++) await sleep(100);
      if (exited === null) child.kill("SIGKILL");
    }
    rmSync(dir, { recursive: true, force: true });
  };
  const deadline = Date.now() + 60_000;
  while (Date.now() < deadline) {
    if (exited !== null) throw new Error(`flowhost exited with ${exited}:\n${logs()}`);
    try {
      const res = await fetch(`${base}/api/v2/health`);
      if (res.status === 200) return { base, logs, stop };
    } catch {
      // not listening yet
    }
    await sleep(200);
  }
  await stop();
  throw new Error("flowhost did not become healthy");
}

/** EmptyImage → `nodes` × ImageInvert → SaveImage: seconds on the slowed-down double. */
function slowGraph(nodes) {
  const graph = { 0: { class_type: "EmptyImage", inputs: { width: 16, height: 16, batch_size: 1, color: 0 } } };
  for (let i = 1; i <= nodes; i++) graph[String(i)] = { class_type: "ImageInvert", inputs: { image: [String(i - 1), 0] } };
  graph.save = { class_type: "SaveImage", inputs: { images: [String(nodes), 0], filename_prefix: "slow" } };
  return graph;
}

const loadAndSave = (image) => ({
  1: { class_type: "LoadImage", inputs: { image } },
  2: { class_type: "SaveImage", inputs: { images: ["1", 0], filename_prefix: "sdk-ts" } },
});

async function scenario(server, key) {
  process.env.COMFY_BASE_URL = server.base; // the service root, not …/api/v2
  const client = key ? new Comfy({ apiKey: key, timeoutMs: 60_000 }) : new Comfy({ timeoutMs: 60_000 });

  // -- upload twice: the second commit is the dedup fast path and returns the same asset
  const image = png(48, 32);
  const first = client.assets.fromBytes(image, { filename: "ts-portrait.png", contentType: "image/png" });
  const firstId = await first.commit();
  check(first.createdNew === true, `the first upload stores new bytes (createdNew=${first.createdNew})`);
  const second = client.assets.fromBytes(image, { filename: "ts-portrait.png", contentType: "image/png" });
  const secondId = await second.commit();
  check(secondId === firstId, `the same bytes under the same name are the same asset (${firstId} vs ${secondId})`);
  check((await first.hash()) === (await second.hash()), "both handles hash the same");

  // -- submit by file name (what most SDK users write): the upload named so is loaded
  const byName = await client.run(client.workflows.fromJson(loadAndSave("ts-portrait.png")), { timeoutMs: 60_000 });
  check(byName.status === "succeeded", `the job by file name ended ${byName.status}`);
  const [named] = byName.getOutputs("2");
  check(named !== undefined, "the job by file name has node 2's output");
  const namedSize = pngSize(await named.toBytes());
  check(namedSize[0] === 48 && namedSize[1] === 32, `the file name reached ComfyUI as the upload (got ${namedSize})`);

  // -- submit by asset handle; stream events to the end; wait; download
  const workflow = client.workflows.fromJson(loadAndSave("placeholder.png"));
  workflow.setInput("1", "image", second);
  const job = await client.submit(workflow);
  const events = [];
  for await (const event of job.events()) events.push(event);
  check(events.length >= 1 && events[0].kind === "statusChange", `the stream opens with a status: ${JSON.stringify(events[0])}`);
  const last = events[events.length - 1];
  check(last.kind === "statusChange" && last.status === "succeeded", `the stream ends with the terminal status: ${JSON.stringify(last)}`);
  await job.wait(60_000);
  check(job.status === "succeeded", `the job by handle ended ${job.status}`);
  check(job.outputs.length === 1, `one output, got ${job.outputs.length}`);
  const bytes = await job.outputs[0].toBytes();
  check(bytes.length === job.outputs[0].sizeBytes, "the download has the advertised size");
  const size = pngSize(bytes);
  check(size[0] === 48 && size[1] === 32, `the output is the uploaded image (got ${size})`);
  const head = await job.outputs[0].toBytes({ range: [0, 7] });
  check(Buffer.from(head).equals(Buffer.from(bytes.subarray(0, 8))), "a ranged download returns exactly those bytes");

  // -- cancel a running job
  const slow = await client.submit(client.workflows.fromJson(slowGraph(40)));
  const deadline = Date.now() + 30_000;
  while ((await slow.refresh()).status === "queued" && Date.now() < deadline) await sleep(50);
  check(slow.status === "running", `the slow job runs (status ${slow.status})`);
  await slow.cancel();
  check(["canceling", "canceled"].includes(slow.status), `cancel answers canceling/canceled, got ${slow.status}`);
  await slow.wait(30_000);
  check(slow.status === "canceled", `the slow job ended ${slow.status}`);

  // -- Idempotency-Key: single use
  const idem = randomUUID();
  await (await client.submit(client.workflows.fromJson(loadAndSave("ts-portrait.png")), { idempotencyKey: idem })).wait(60_000);
  let refused = null;
  try {
    await client.submit(client.workflows.fromJson(loadAndSave("ts-portrait.png")), { idempotencyKey: idem });
  } catch (err) {
    refused = err;
  }
  check(refused instanceof IdempotencyKeyReuse && refused.code === "idempotency_key_reuse", `a reused key is refused: ${refused}`);

  if (key) {
    const anonymous = new Comfy({ timeoutMs: 30_000 });
    let denied = null;
    try {
      await anonymous.jobs.get(job.id);
    } catch (err) {
      denied = err;
    }
    check(denied instanceof Unauthorized, `a request without a key is refused while keys are on: ${denied}`);
  }
}

async function main() {
  const [binary, plugins] = process.argv.slice(2);
  if (!binary || !plugins) {
    console.error("usage: node tests/sdk-ts/e2e.mjs FLOWHOST_BINARY PLUGINS_DIR");
    return 2;
  }
  const installed = JSON.parse(readFileSync(new URL("./node_modules/@comfyorg/sdk/package.json", import.meta.url), "utf8")).version;
  if (installed !== EXPECTED_SDK) {
    console.error(`FAIL: @comfyorg/sdk ${installed} installed, the test is written for ${EXPECTED_SDK}`);
    return 2;
  }
  const runs = [
    ["without API keys", {}, null],
    ["with API keys", { FLOWHOST_API_KEYS: "sdk:k-sdk-ts-user-123", FLOWHOST_ADMIN_KEYS: "ops:k-sdk-ts-admin-456" }, "k-sdk-ts-user-123"],
  ];
  for (const [name, env, key] of runs) {
    const server = await startFlowhost(binary, plugins, env);
    try {
      await scenario(server, key);
    } catch (err) {
      console.error(`FAIL (${name}); flowhost log tail:\n${server.logs()}`);
      throw err;
    } finally {
      await server.stop();
    }
    console.log(`ok: @comfyorg/sdk ${installed} on node ${process.version} against flowhost ${name}`);
  }
  return 0;
}

process.exit(await main());
