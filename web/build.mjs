// Builds the file-share app into share/dist: the page, its stylesheet, the
// app bundle (with the SDK) and the hashing worker (with hash-wasm). The
// output is deterministic, committed, and embedded in the floe binary;
// scripts/test.sh rebuilds it and fails when it differs from the commit.
// Usage: node build.mjs [OUTDIR]

import { build } from "esbuild";
import { copyFileSync, mkdirSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const out = process.argv[2] ?? join(here, "share", "dist");
mkdirSync(out, { recursive: true });
const common = {
  bundle: true,
  format: "esm",
  target: "es2022",
  minify: true,
  legalComments: "none",
  logLevel: "warning",
};
await build({ ...common, entryPoints: [join(here, "share/src/main.ts")], outfile: join(out, "app.js") });
await build({ ...common, entryPoints: [join(here, "share/src/hash-worker.ts")], outfile: join(out, "hash-worker.js") });
for (const f of ["index.html", "app.css"]) copyFileSync(join(here, "share/src", f), join(out, f));
