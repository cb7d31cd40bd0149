// Browser transfer throughput (a benchmark, not a test), in one Chromium:
//   node bench/transfer.mjs app  SIGNAL_URL SIZE_MIB [relay]   the app, two contexts
//   node bench/transfer.mjs bare SIZE_MIB                      a bare RTCDataChannel loop, two contexts
// Prints one JSON line: {mode, bytes, seconds, mbit_s, path} ($LABEL, when
// set, names the mode).

import { createHash, randomBytes } from "node:crypto";
import { mkdtempSync, writeFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";

const [mode, ...rest] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-features=WebRtcHideLocalIpsWithMdns"],
});
const pages = async () => [await (await browser.newContext()).newPage(), await (await browser.newContext()).newPage()];

async function app(signalUrl, sizeMiB, relay) {
  const size = sizeMiB * 1024 * 1024;
  const dir = mkdtempSync(join(tmpdir(), "floe-bench-web-"));
  const file = join(dir, "random.bin");
  const data = randomBytes(size);
  writeFileSync(file, data);
  const sha = createHash("sha256").update(data).digest("hex");
  const [a, b] = await pages();
  await a.goto(`${signalUrl}/${relay ? "?relay=1" : ""}`);
  await a.click("#create");
  await a.waitForSelector("#link-box:not([hidden])");
  await b.goto(await a.inputValue("#link"));
  for (const p of [a, b]) await p.waitForSelector("#files:not([disabled])", { timeout: 30_000 });
  const started = performance.now();
  await a.setInputFiles("#files", file);
  const row = await b.waitForSelector('#transfers li[data-direction="receive"][data-state="done"]', { timeout: 600_000 });
  const seconds = (performance.now() - started) / 1000;
  const got = await row.$eval("code.sha256", (c) => c.textContent);
  if (got !== sha) throw new Error(`SHA-256 mismatch: ${got} != ${sha}`);
  const path = await b.$eval("#path", (p) => p.dataset.path);
  rmSync(dir, { recursive: true, force: true });
  return { mode: relay ? "app-relayed" : "app-direct", bytes: size, seconds, path };
}

/** The ceiling: one data channel between the same two contexts, the same
 * chunk size and backpressure as the app, no app on either side. */
async function bare(sizeMiB) {
  const size = sizeMiB * 1024 * 1024;
  const [a, b] = await pages();
  for (const p of [a, b]) await p.goto("about:blank");
  const init = () => {
    window.pc = new RTCPeerConnection();
    window.cands = [];
    window.pc.onicecandidate = (e) => e.candidate && window.cands.push(e.candidate.toJSON());
  };
  await a.evaluate(init);
  await b.evaluate(init);
  await a.evaluate(() => (window.ch = window.pc.createDataChannel("bench", { ordered: true })));
  await b.evaluate(() => {
    window.received = 0;
    window.pc.ondatachannel = (e) => {
      e.channel.binaryType = "arraybuffer";
      e.channel.onmessage = (m) => (window.received += m.data.byteLength);
    };
  });
  const offer = await a.evaluate(async () => (await window.pc.setLocalDescription(), window.pc.localDescription.toJSON()));
  const answer = await b.evaluate(async (o) => {
    await window.pc.setRemoteDescription(o);
    await window.pc.setLocalDescription();
    return window.pc.localDescription.toJSON();
  }, offer);
  await a.evaluate((d) => window.pc.setRemoteDescription(d), answer);
  await new Promise((r) => setTimeout(r, 500));
  for (const c of await a.evaluate(() => window.cands)) await b.evaluate((c) => window.pc.addIceCandidate(c), c);
  for (const c of await b.evaluate(() => window.cands)) await a.evaluate((c) => window.pc.addIceCandidate(c), c);
  await a.waitForFunction(() => window.ch.readyState === "open", null, { timeout: 30_000 });
  const started = performance.now();
  await a.evaluate(async (size) => {
    const ch = window.ch;
    const chunk = new ArrayBuffer(Math.min(256 * 1024, window.pc.sctp.maxMessageSize));
    ch.bufferedAmountLowThreshold = 2 * 1024 * 1024;
    for (let sent = 0; sent < size; sent += chunk.byteLength) {
      if (ch.bufferedAmount > 8 * 1024 * 1024) await new Promise((r) => (ch.onbufferedamountlow = r));
      ch.send(sent + chunk.byteLength <= size ? chunk : chunk.slice(0, size - sent));
    }
  }, size);
  await b.waitForFunction((size) => window.received >= size, size, { timeout: 600_000, polling: 50 });
  const seconds = (performance.now() - started) / 1000;
  return { mode: "bare-datachannel", bytes: size, seconds, path: "direct" };
}

try {
  const r = mode === "app" ? await app(rest[0], Number(rest[1]), rest[2] === "relay") : await bare(Number(rest[0]));
  r.mode = process.env.LABEL ?? r.mode;
  r.mbit_s = (r.bytes * 8) / r.seconds / 1e6;
  console.log(JSON.stringify(r));
} finally {
  await browser.close();
}
