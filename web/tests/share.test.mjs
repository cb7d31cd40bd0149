// The file-share app in a real browser (Debian's chromium, driven by
// playwright-core) against a real `floe dev`: two browser contexts share a
// 32 MiB random file directly and through floe's TURN, the receiver's
// signaling socket is cut mid-transfer, a wrong password and a used
// one-time link are refused. Screenshots land in web/test-output/.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { createHash, randomBytes } from "node:crypto";
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { networkInterfaces, tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";
import { CHROMIUM_ARGS, floeDev, webDir } from "../test-support/floe.mjs";

const SIZE = 32 * 1024 * 1024;
const CHROMIUM = process.env.CHROMIUM ?? "/usr/bin/chromium";
const outDir = join(webDir, "test-output");

// Chromium gathers no ICE candidates when loopback is the only interface.
const interfaces = Object.values(networkInterfaces())
  .flat()
  .filter((i) => i && !i.internal);
const noNetwork =
  interfaces.length === 0 &&
  "this host has no network interface but loopback, and Chromium gathers no ICE candidates there: WebRTC cannot connect";

let dev, browser, dir, file, sha256;
before(async () => {
  if (noNetwork) return;
  dev = await floeDev();
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: CHROMIUM_ARGS,
  });
  mkdirSync(outDir, { recursive: true });
  const data = randomBytes(SIZE);
  dir = mkdtempSync(join(tmpdir(), "floe-share-"));
  file = join(dir, "random.bin");
  writeFileSync(file, data);
  sha256 = createHash("sha256").update(data).digest("hex");
});
after(async () => {
  await browser?.close();
  await dev?.stop();
  if (dir) rmSync(dir, { recursive: true, force: true });
});

async function page(path = "/") {
  const context = await browser.newContext();
  const p = await context.newPage();
  p.on("pageerror", (e) => console.error("page error:", e.message));
  await p.goto(`${dev.signal_url}${path}`);
  return p;
}

/** Creates a link on a new page; returns the page and the link. */
async function creator({ password, oneTime, relay } = {}) {
  const a = await page(relay ? "/?relay=1" : "/");
  if (password) await a.fill("#password", password);
  if (oneTime) await a.check("#one-time");
  await a.click("#create");
  await a.waitForSelector("#link-box:not([hidden])");
  return { a, link: await a.inputValue("#link") };
}

/** Opens a share link (served by this test's floe) on a new page. */
async function visit(link) {
  const u = new URL(link);
  return page(u.pathname + u.search + u.hash);
}

async function connected(p) {
  await p.waitForSelector("#files:not([disabled])", { timeout: 30_000 });
}

/** Sends the random file from `a` to `b`; returns b's finished row. */
async function transfer(a, b, { whileMoving } = {}) {
  await connected(a);
  await connected(b);
  await a.setInputFiles("#files", file);
  if (whileMoving) {
    await b.waitForFunction(
      () => {
        const row = document.querySelector('#transfers li[data-direction="receive"]');
        const bar = row?.querySelector("progress");
        return bar && bar.value > 0.2 && bar.value < 0.9;
      },
      null,
      { timeout: 60_000, polling: 20 },
    );
    await whileMoving();
  }
  const row = await b.waitForSelector('#transfers li[data-direction="receive"][data-state="done"]', {
    timeout: 120_000,
  });
  const got = await row.$eval("code.sha256", (c) => c.textContent);
  assert.equal(got, sha256, "the SHA-256 the receiver computed is the file's");
  return row;
}

/** Relayed bytes the control plane billed for `roomId`. */
async function billed(roomId) {
  const auth = Buffer.from(`${dev.api_key_id}:${dev.api_key_secret}`).toString("base64");
  const r = await fetch(`${dev.control_url}/v1/tenants/${dev.tenant}/usage`, {
    headers: { authorization: `Basic ${auth}` },
  });
  const report = await r.json();
  const t = report.rooms?.[roomId];
  return t ? t.bytes_in + t.bytes_out : 0;
}

test("a 32 MiB file goes browser to browser on a direct path, and nothing is billed", { skip: noNetwork }, async () => {
  const { a, link } = await creator();
  const b = await visit(link);
  await transfer(a, b);
  await b.waitForSelector('#path[data-path="direct"]', { timeout: 10_000 });
  await b.screenshot({ path: join(outDir, "transfer-direct.png"), fullPage: true });
  const roomId = new URL(link).hash.slice(1);
  // Give TURN a usage interval to report anything it might have relayed.
  await new Promise((r) => setTimeout(r, 3_000));
  assert.ok((await billed(roomId)) < SIZE / 100, "about nothing relayed on a direct path");
  await a.context().close();
  await b.context().close();
});

test("forced through floe's TURN, the file arrives and the room is billed for it", { skip: noNetwork }, async () => {
  const { a, link } = await creator({ relay: true });
  const url = new URL(link);
  assert.equal(url.searchParams.get("relay"), "1", "the link keeps the relay policy");
  const b = await visit(link);
  await transfer(a, b);
  await b.waitForSelector('#path[data-path="relayed"]', { timeout: 10_000 });
  await b.screenshot({ path: join(outDir, "transfer-relayed.png"), fullPage: true });
  const roomId = url.hash.slice(1);
  let bytes = 0;
  for (let i = 0; i < 60 && bytes < SIZE; i++) {
    await new Promise((r) => setTimeout(r, 500));
    bytes = await billed(roomId);
  }
  assert.ok(bytes >= SIZE, `billed ${bytes} B for a ${SIZE} B file`);
  await a.context().close();
  await b.context().close();
});

test("the receiver's signaling socket is cut mid-transfer: the transfer completes", { skip: noNetwork }, async () => {
  const { a, link } = await creator();
  const b = await visit(link);
  await transfer(a, b, {
    whileMoving: () => b.evaluate(() => window.floeShare.room.dropConnection()),
  });
  await b.waitForFunction(() => window.floeShare.room.connected, null, { timeout: 15_000 });
  await a.context().close();
  await b.context().close();
});

test("the data channel is lost mid-transfer: a new one resumes where the receiver stands", { skip: noNetwork }, async () => {
  const { a, link } = await creator();
  const b = await visit(link);
  await transfer(a, b, {
    // The receiver's channel closes (as a crashed SCTP association would).
    whileMoving: () => b.evaluate(() => window.floeShare.transfers.channel.close()),
  });
  await a.context().close();
  await b.context().close();
});

test("a wrong password is refused clearly, and a one-time link admits two browsers only", { skip: noNetwork }, async () => {
  const { a, link } = await creator({ password: "right horse" });
  const b = await visit(link);
  await b.waitForSelector("#join-form:not([hidden])");
  await b.fill("#join-password", "wrong horse");
  await b.click("#join-form button");
  await b.waitForFunction(() => document.querySelector("#status").textContent === "Wrong password.");
  await a.context().close();
  await b.context().close();

  const once = await creator({ oneTime: true });
  const second = await visit(once.link);
  await connected(second);
  const third = await visit(once.link);
  await third.waitForFunction(
    () => document.querySelector("#status").textContent === "This one-time link has been used already.",
  );
  await third.screenshot({ path: join(outDir, "one-time-refused.png") });
  for (const p of [once.a, second, third]) await p.context().close();
});
