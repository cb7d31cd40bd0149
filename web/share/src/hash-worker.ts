// A streaming SHA-256 in a worker, so hashing never blocks the page.
// Messages in: {op: "update", data: ArrayBuffer} (transferred) or
// {op: "digest"}; out: {op: "digest", hex} after "digest".

import { createSHA256 } from "hash-wasm";

type In = { op: "update"; data: ArrayBuffer } | { op: "digest" };

const ready = createSHA256().then((h) => {
  h.init();
  return h;
});
// Updates are applied in order: each waits for the one before it.
let chain: Promise<unknown> = ready;

self.onmessage = (e: MessageEvent<In>) => {
  const m = e.data;
  chain = chain.then(async () => {
    const h = await ready;
    if (m.op === "update") {
      h.update(new Uint8Array(m.data));
    } else {
      (self as unknown as Worker).postMessage({ op: "digest", hex: h.digest("hex") });
      h.init();
    }
  });
};
