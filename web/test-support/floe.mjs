// Starts a real `floe dev` (the binary in $FLOE_BIN) on free loopback
// ports for the tests, and builds the SDK they import.

import { spawn, execFileSync } from "node:child_process";
import { mkdtempSync, readFileSync, existsSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, dirname } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
export const webDir = join(here, "..");

/** Flags of every headless Chromium the tests start: no background
 * traffic to the outside (this machine's network is closed), and host
 * candidates as addresses, not mDNS names the other side would have to
 * resolve. */
export const CHROMIUM_ARGS = [
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
  "--disable-features=WebRtcHideLocalIpsWithMdns",
];

/** Compiles the SDK (tsc) once per test process; returns its module. */
export async function sdk() {
  execFileSync(join(webDir, "node_modules", ".bin", "tsc"), ["-p", join(webDir, "sdk", "tsconfig.json")], {
    stdio: "inherit",
  });
  return import(join(webDir, "sdk", "dist", "index.js"));
}

/** A running `floe dev`; `stop()` ends it. */
export async function floeDev() {
  const bin = process.env.FLOE_BIN;
  if (!bin) throw new Error("FLOE_BIN must name the floe binary (scripts/test.sh sets it)");
  const dir = mkdtempSync(join(tmpdir(), "floe-web-"));
  const child = spawn(
    bin,
    ["dev", "--data-dir", join(dir, "data"), "--signal-port", "0", "--control-port", "0", "--turn-port", "0", "--turn-http-port", "0"],
    { stdio: ["ignore", "ignore", "pipe"], env: { ...process.env, FLOE_LOG: "warn" } },
  );
  let stderr = "";
  child.stderr.on("data", (d) => (stderr += d));
  const file = join(dir, "data", "endpoints.json");
  for (let i = 0; i < 300 && !existsSync(file); i++) {
    if (child.exitCode !== null) throw new Error(`floe dev exited: ${stderr}`);
    await new Promise((r) => setTimeout(r, 100));
  }
  // Written once complete; read until it parses.
  let ep;
  for (let i = 0; i < 50 && !ep; i++) {
    try {
      ep = JSON.parse(readFileSync(file, "utf8"));
    } catch {
      await new Promise((r) => setTimeout(r, 100));
    }
  }
  if (!ep) throw new Error(`floe dev did not start: ${stderr}`);
  return {
    ...ep,
    async stop() {
      child.kill("SIGTERM");
      await new Promise((r) => (child.exitCode !== null ? r() : child.once("exit", r)));
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

/** An in-memory `KeyValueStore` (what a browser tab's storage would be). */
export function memoryStore() {
  const m = new Map();
  return { getItem: (k) => (m.has(k) ? m.get(k) : null), setItem: (k, v) => m.set(k, String(v)) };
}

/** Resolves with the next `event` of `emitter`, or rejects after `ms`. */
export function next(emitter, event, ms = 5_000) {
  return Promise.race([
    emitter.once(event),
    new Promise((_, reject) => setTimeout(() => reject(new Error(`no ${event} within ${ms} ms`)), ms)),
  ]);
}
