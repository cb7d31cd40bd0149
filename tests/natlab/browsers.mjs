// The NAT lab's browsers (tests/natlab/run.sh builds the network and
// starts floe, then runs this inside the public segment): one Chromium per
// site, driven by playwright-core, shares a file through floe's share app
// for each pair of NATs, and the path ICE chose is checked against what
// floe billed and what the SDK reported.
//
//   cone/cone                 direct (server-reflexive), about nothing billed
//   symmetric/symmetric       relayed through floe's TURN, the bytes billed
//   cone/symmetric            whichever path ICE chose; the bill agrees
//   symmetric/symmetric, a    fails clearly in the app ("relay is not
//   STUN-only plan            available on this plan"), does not hang
//
// Every wait is bounded; the run as a whole is bounded by run.sh.

import { createHash, randomBytes } from "node:crypto";
import { createRequire } from "node:module";
import { writeFileSync } from "node:fs";
import { join } from "node:path";

import { CHROMIUM_ARGS } from "../../web/test-support/floe.mjs";

const require = createRequire(new URL("../../web/package.json", import.meta.url));
const { chromium } = require("playwright-core");

const DIR = process.env.NATLAB_DIR;
const ADMIN = process.env.NATLAB_ADMIN;
const LABELS = (process.env.NATLAB_LABELS ?? "").split(",");
const CONTROL = "http://203.0.113.10:8090";
const SIGNAL = { paid: "http://203.0.113.10:8080", free: "http://203.0.113.10:8081" };
const SIGNAL_OPS = { paid: "http://203.0.113.10:9080", free: "http://203.0.113.10:9081" };
const SIZE = 8 * 1024 * 1024;
// Relayed bytes outside the data channel's payload: ICE consent checks
// through the relay, and what DTLS and SCTP add, per peer and case.
const SLACK = 64 * 1024;

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const failures = [];
function check(ok, what) {
  console.log(`  ${ok ? "ok  " : "FAIL"} ${what}`);
  if (!ok) failures.push(what);
}
const near = (x, y, rel = 0.02) => Math.abs(x - y) <= rel * Math.max(x, y) + SLACK;
const mib = (n) => `${(n / 1048576).toFixed(2)} MiB`;

/** The tenant's usage in room `room` (bytes out + in), from the control plane. */
async function billed(tenant, room) {
  const r = await fetch(`${CONTROL}/v1/tenants/${tenant}/usage`, { headers: { authorization: `Bearer ${ADMIN}` } });
  const t = (await r.json()).rooms?.[room];
  return t ? t.bytes_out + t.bytes_in : 0;
}

/** Billed bytes once TURN's usage reports have settled (two equal reads). */
async function settledBill(tenant, room) {
  let last = -1;
  for (let i = 0; i < 20; i++) {
    const now = await billed(tenant, room);
    if (now === last) return now;
    last = now;
    await sleep(1_500);
  }
  return last;
}

/** Bytes the SDK reported to signal by path: {direct, relayed}. */
async function reported(tenant) {
  const page = await (await fetch(`${SIGNAL_OPS[tenant]}/metrics`)).text();
  const out = { direct: 0, relayed: 0 };
  for (const line of page.split("\n")) {
    if (!line.startsWith("floe_signal_reported_bytes_total{") || !line.includes(`tenant="${tenant}"`)) continue;
    const path = /path="(\w+)"/.exec(line)?.[1];
    if (path in out) out[path] = Number(line.split(" ").pop());
  }
  return out;
}

/** The selected candidate pair of the page's peer connection. */
function pairOf(page) {
  return page.evaluate(async () => {
    const pc = window.floeShare.link?.pc;
    if (!pc) return null;
    const report = await pc.getStats();
    let pair;
    report.forEach((s) => {
      if (s.type === "transport" && s.selectedCandidatePairId) pair = report.get(s.selectedCandidatePairId);
    });
    if (!pair) return null;
    // Every pair that carried data (ICE may have switched pairs), with
    // the type of its local candidate.
    const carried = [];
    report.forEach((s) => {
      if (s.type !== "candidate-pair" || !(s.bytesSent || s.bytesReceived)) return;
      carried.push({
        local: report.get(s.localCandidateId)?.candidateType,
        remote: report.get(s.remoteCandidateId)?.candidateType,
        sent: s.bytesSent ?? 0,
        received: s.bytesReceived ?? 0,
      });
    });
    return {
      local: report.get(pair.localCandidateId)?.candidateType,
      remote: report.get(pair.remoteCandidateId)?.candidateType,
      sent: pair.bytesSent ?? 0,
      received: pair.bytesReceived ?? 0,
      carried,
    };
  });
}

/** What floe's TURN may bill for the pairs that carried data, from both
 * peers' getStats: [least, most]. An allocation of floe's relays a pair
 * whose local candidate is a relay candidate, and bills each byte as it
 * relays it: at least what reached the far ends, at most what the ends
 * sent (a datagram lost after TURN is billed, one lost before it is not).
 * A relay-to-relay path goes through two allocations and is billed twice. */
function billable(a, b) {
  let [low, high] = [0, 0];
  for (const [x, y] of [
    [a, b],
    [b, a],
  ]) {
    const through = x.carried.filter((p) => p.local === "relay");
    if (!through.length) continue;
    const towards = y.carried.filter((p) => p.remote === "relay");
    const sum = (pairs, k) => pairs.reduce((n, p) => n + p[k], 0);
    low += sum(through, "received") + sum(towards, "received");
    high += sum(through, "sent") + sum(towards, "sent");
  }
  return [low, high];
}

const data = randomBytes(SIZE);
const file = join(DIR, "shared.bin");
writeFileSync(file, data);
const sha256 = createHash("sha256").update(data).digest("hex");

const browsers = {};
async function browser(site) {
  browsers[site] ??= await chromium.launch({
    executablePath: join(DIR, `chromium-${site}`),
    args: [...CHROMIUM_ARGS, `--unsafely-treat-insecure-origin-as-secure=${SIGNAL.paid},${SIGNAL.free}`],
  });
  return browsers[site];
}

async function open(site, url) {
  const context = await (await browser(site)).newContext();
  const page = await context.newPage();
  page.on("pageerror", (e) => console.error(`  site ${site} page error: ${e.message}`));
  await page.goto(url);
  return page;
}

const connected = (p) => p.waitForSelector("#files:not([disabled])", { timeout: 60_000 });
const statusText = (p) => p.$eval("#status", (e) => e.textContent ?? "");

async function run({ name, a: siteA, b: siteB, tenant, expect }) {
  console.log(`natlab: ${name} (site ${siteA}: ${LABELS[siteA - 1]}, site ${siteB}: ${LABELS[siteB - 1]})`);
  const before = await reported(tenant);
  const a = await open(siteA, `${SIGNAL[tenant]}/`);
  await a.click("#create");
  await a.waitForSelector("#link-box:not([hidden])", { timeout: 15_000 });
  const link = await a.inputValue("#link");
  const room = new URL(link).hash.slice(1);
  const started = Date.now();
  const b = await open(siteB, link);
  const result = { case: name, sites: [LABELS[siteA - 1], LABELS[siteB - 1]] };

  if (expect === "refused") {
    await b.waitForFunction(
      () => (document.querySelector("#status")?.textContent ?? "").includes("relay is not available on this plan"),
      null,
      { timeout: 90_000, polling: 250 },
    );
    result.failed_after_ms = Date.now() - started;
    result.status = await statusText(b);
    check(true, `the app says so after ${(result.failed_after_ms / 1000).toFixed(1)} s: "${result.status}"`);
    result.billed = await settledBill(tenant, room);
    check(result.billed === 0, `nothing billed (${result.billed} B)`);
  } else {
    await Promise.all([connected(a), connected(b)]);
    result.connect_ms = Date.now() - started;

    await a.setInputFiles("#files", file);
    const row = await b.waitForSelector('#transfers li[data-direction="receive"][data-state="done"]', {
      timeout: 120_000,
    });
    check((await row.$eval("code.sha256", (c) => c.textContent)) === sha256, "the file arrived whole (SHA-256)");
    // Let both SDKs send their last stats report (every second).
    await sleep(2_500);
    const [pa, pb] = [await pairOf(a), await pairOf(b)];

    result.path = await b.$eval("#path", (e) => e.dataset.path);
    result.pairs = [pa, pb];
    const relayed = [pa, pb].some((p) => p.local === "relay" || p.remote === "relay");
    result.getstats_bytes = pa.sent + pa.received + pb.sent + pb.received;
    result.billed = await settledBill(tenant, room);
    result.expected_billed = billable(pa, pb);
    const after = await reported(tenant);
    result.reported = { direct: after.direct - before.direct, relayed: after.relayed - before.relayed };
    const total = result.reported.direct + result.reported.relayed;
    result.offload = total ? result.reported.direct / total : null;
    check(result.path === (relayed ? "relayed" : "direct"), `the app shows the ${result.path} path (${pa.local} → ${pa.remote})`);
    if (expect !== "either") check(result.path === expect, `ICE chose the ${expect} path`);
    check(near(total, result.getstats_bytes), `the SDK reported ${mib(total)}, getStats counted ${mib(result.getstats_bytes)}`);
    if (relayed) {
      check(result.billed >= SIZE, `the file's bytes are billed (${mib(result.billed)} for ${mib(SIZE)})`);
      const [low, high] = result.expected_billed;
      check(
        result.billed + SLACK >= low && result.billed <= high + SLACK,
        `billed ${mib(result.billed)}: between what getStats says the peers received (${mib(low)}) and sent (${mib(high)}) through floe's allocations`,
      );
      check(result.offload !== null && result.offload < 0.01, `offload ratio ${result.offload?.toFixed(3)} (all relayed)`);
    } else {
      check(result.billed < SIZE / 100, `about nothing billed (${result.billed} B)`);
      check(result.offload !== null && result.offload > 0.99, `offload ratio ${result.offload?.toFixed(3)} (all direct)`);
    }
    console.log(`  connected in ${(result.connect_ms / 1000).toFixed(1)} s`);
  }
  await a.context().close();
  await b.context().close();
  return result;
}

const cases = [
  { name: "cone/cone", a: 1, b: 2, tenant: "paid", expect: "direct" },
  { name: "symmetric/symmetric", a: 3, b: 4, tenant: "paid", expect: "relayed" },
  { name: "cone/symmetric", a: 1, b: 3, tenant: "paid", expect: "either" },
  { name: "symmetric/symmetric on a STUN-only plan", a: 3, b: 4, tenant: "free", expect: "refused" },
];
const results = [];
try {
  for (const c of cases) results.push(await run(c));
} finally {
  for (const b of Object.values(browsers)) await b.close();
}
console.log("natlab: results");
console.log(JSON.stringify(results, null, 2));
if (process.env.NATLAB_RESULTS) writeFileSync(process.env.NATLAB_RESULTS, JSON.stringify(results, null, 2));
if (failures.length) {
  console.error(`natlab: ${failures.length} check(s) failed`);
  process.exit(1);
}
console.log("natlab: every case passed");
