// Moving files over one RTCDataChannel: the sender streams each file with
// File.slice in chunks as large as SCTP allows, paced by the channel's
// bufferedamountlow event; the receiver hashes as bytes arrive (SHA-256
// in a worker) and asks for the rest from where it stands, so a transfer
// resumes after the channel comes back. Control messages are JSON strings;
// file bytes are binary messages of the file being sent.

/** Sender → receiver and back. */
type Control =
  | { t: "file"; id: string; name: string; size: number; type: string }
  | { t: "want"; id: string; offset: number }
  | { t: "end"; id: string; sha256: string };

/** Largest chunk (Chromium's SCTP message limit is 256 KiB). */
const MAX_CHUNK = 256 * 1024;
/** Pause sending above this much buffered, resume below the low mark. */
const HIGH_WATER = 8 * 1024 * 1024;
const LOW_WATER = 2 * 1024 * 1024;
/** How much of a file one read takes (then sent as several chunks). */
const READ_SIZE = 1024 * 1024;
/** A transfer that moves nothing for this long on an open channel has a
 * broken channel (Chromium can leave a fresh channel that will not send
 * after another was closed): it is closed, and a new one replaces it. */
const STALL_MS = 8_000;
/** Received files larger than this held in memory get a warning. */
export const MEMORY_WARNING_BYTES = 512 * 1024 * 1024;

export interface Progress {
  id: string;
  name: string;
  size: number;
  direction: "send" | "receive";
  bytes: number;
  /** Bytes per second over the last second or so. */
  rate: number;
  state: "waiting" | "moving" | "verifying" | "done" | "failed";
  sha256?: string;
  /** Where a received file can be saved from (Blob fallback). */
  url?: string;
  error?: string;
}

export interface Sink {
  write(chunk: ArrayBuffer): Promise<void>;
  /** Finishes; returns a URL for an in-memory file. */
  close(): Promise<string | undefined>;
}

/** Where received files go: the File System Access API, or memory. */
export type SinkFactory = (name: string, size: number, type: string) => Promise<Sink>;

export function memorySink(type: string): Sink {
  const parts: ArrayBuffer[] = [];
  return {
    async write(chunk) {
      parts.push(chunk);
    },
    async close() {
      return URL.createObjectURL(new Blob(parts, { type: type || "application/octet-stream" }));
    },
  };
}

class Hasher {
  private worker = new Worker(new URL("./hash-worker.js", import.meta.url), { type: "module" });
  /** Hashes a copy; the caller keeps its buffer. */
  update(data: ArrayBuffer): void {
    this.give(data.slice(0));
  }
  /** Hashes `data` without a copy: it moves to the worker (detached here). */
  give(data: ArrayBuffer): void {
    this.worker.postMessage({ op: "update", data }, [data]);
  }
  /** Stops the worker without a digest. */
  close(): void {
    this.worker.terminate();
  }
  digest(): Promise<string> {
    return new Promise((resolve) => {
      this.worker.onmessage = (e: MessageEvent<{ hex: string }>) => {
        resolve(e.data.hex);
        this.worker.terminate();
      };
      this.worker.postMessage({ op: "digest" });
    });
  }
}

/** SHA-256 of a whole file, read in slices (never all in memory). */
export async function hashFile(file: Blob): Promise<string> {
  const h = new Hasher();
  for (let at = 0; at < file.size; at += READ_SIZE) {
    h.give(await file.slice(at, at + READ_SIZE).arrayBuffer());
  }
  return h.digest();
}

function newId(): string {
  const b = new Uint8Array(6);
  crypto.getRandomValues(b);
  return Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
}

interface Outgoing {
  file: File;
  progress: Progress;
  /** Hashes what is read for sending, while it is read in order. */
  hasher: Hasher;
  /** Bytes the hasher has seen (from 0, without gaps). */
  hashed: number;
}

interface Incoming {
  progress: Progress;
  type: string;
  sink?: Sink;
  hasher: Hasher;
  /** The channel this file was last asked for on: chunks carry no offset,
   * so the sender must be asked once per channel, or it sends twice. */
  wantedOn?: RTCDataChannel;
}

/** Both directions of file transfer between two browsers. */
export class Transfers {
  readonly all = new Map<string, Progress>();
  private queue: Outgoing[] = [];
  private sending?: Outgoing;
  private offset = 0;
  private incoming?: Incoming;
  private channel?: RTCDataChannel;
  private pumping = false;
  /** A pump was asked for while one ran (say, a new channel opened while
   * the old one's pump awaited a read): run again when it ends. */
  private pumpAgain = false;
  /** The channel the receiver last asked for the file being sent on. */
  private wantedOn?: RTCDataChannel;
  /** Incoming messages are handled one after another, in order. */
  private rx: Promise<void> = Promise.resolve();
  private rateMark = { at: performance.now(), bytes: 0 };

  /** When the channel last moved anything, and its buffer then. */
  private activity = { at: performance.now(), buffered: 0 };

  constructor(
    private readonly sinkFor: SinkFactory,
    private readonly onChange: (p: Progress) => void,
  ) {
    setInterval(() => this.checkStall(), 1_000);
  }

  private moved(): void {
    this.activity = { at: performance.now(), buffered: this.channel?.bufferedAmount ?? 0 };
  }

  /** Closes a channel on which a transfer has stalled (see STALL_MS). */
  private checkStall(): void {
    const ch = this.channel;
    if (!ch || ch.readyState !== "open") return;
    const busy = this.sending?.progress.state === "moving" || this.incoming?.progress.state === "moving";
    if (!busy || ch.bufferedAmount !== this.activity.buffered) return this.moved();
    if (performance.now() - this.activity.at > STALL_MS) {
      console.warn("floe share: the data channel stalled; opening another");
      this.moved();
      ch.close();
    }
  }

  /** Uses `channel` from now on (a new one after a reconnect). */
  attach(channel: RTCDataChannel): void {
    this.channel = channel;
    this.moved();
    channel.binaryType = "arraybuffer";
    channel.bufferedAmountLowThreshold = LOW_WATER;
    channel.onmessage = (e) => {
      this.rx = this.rx.then(() => this.onMessage(e.data, channel)).catch((err) => console.error("floe share:", err));
    };
    // Only the current channel drives sending: an old one emptying its
    // buffer as it closes must not resume from where it stopped.
    channel.onbufferedamountlow = () => {
      if (channel === this.channel) void this.pump();
    };
    channel.onopen = () => this.resume();
    if (channel.readyState === "open") this.resume();
  }

  /** After the channel (re)opens: offer what is waiting, ask for the rest. */
  private resume(): void {
    if (this.sending) this.send({ t: "file", ...this.describe(this.sending) });
    else this.next();
    if (this.incoming && this.incoming.progress.state === "moving") this.want(this.incoming);
  }

  /** Asks the sender for the rest of `i`, once per channel. */
  private want(i: Incoming): void {
    if (!this.channel || i.wantedOn === this.channel) return;
    i.wantedOn = this.channel;
    this.send({ t: "want", id: i.progress.id, offset: i.progress.bytes });
  }

  private describe(o: Outgoing): { id: string; name: string; size: number; type: string } {
    return { id: o.progress.id, name: o.file.name, size: o.file.size, type: o.file.type };
  }

  private send(m: Control): void {
    if (this.channel?.readyState === "open") this.channel.send(JSON.stringify(m));
  }

  private changed(p: Progress): void {
    this.all.set(p.id, p);
    this.onChange(p);
  }

  /** Queues files to send. */
  add(files: Iterable<File>): void {
    for (const file of files) {
      const progress: Progress = {
        id: newId(),
        name: file.name,
        size: file.size,
        direction: "send",
        bytes: 0,
        rate: 0,
        state: "waiting",
      };
      this.queue.push({ file, progress, hasher: new Hasher(), hashed: 0 });
      this.changed(progress);
    }
    if (!this.sending) this.next();
  }

  private next(): void {
    this.sending = this.queue.shift();
    if (this.sending) this.send({ t: "file", ...this.describe(this.sending) });
  }

  private async onMessage(data: string | ArrayBuffer, channel: RTCDataChannel): Promise<void> {
    if (channel === this.channel) this.moved();
    if (typeof data !== "string") return this.onChunk(data);
    let m: Control;
    try {
      m = JSON.parse(data) as Control;
    } catch {
      return;
    }
    if (m.t === "file") await this.onOffer(m);
    else if (m.t === "want") this.onWant(m, channel);
    else if (m.t === "end") await this.onEnd(m);
  }

  // ---- sending ----

  private onWant(m: { id: string; offset: number }, channel: RTCDataChannel): void {
    const o = this.sending;
    // A want says where to go on its own channel; one that arrives on a
    // channel already replaced is stale.
    if (!o || o.progress.id !== m.id || channel !== this.channel) return;
    this.wantedOn = channel;
    this.offset = Math.max(0, Math.min(m.offset, o.file.size));
    o.progress.state = "moving";
    o.progress.bytes = this.offset;
    this.changed(o.progress);
    void this.pump();
  }

  private chunkSize(): number {
    const sctp = (this.channel as unknown as { sctp?: RTCSctpTransport } | undefined)?.sctp;
    return Math.min(MAX_CHUNK, sctp?.maxMessageSize || 64 * 1024);
  }

  /** Sends slices until the buffer is full; the low-water event resumes.
   * Each read is hashed as it goes out (one pass over the file); after a
   * resume that went back, the hash is taken in a pass of its own. */
  private async pump(): Promise<void> {
    if (this.pumping) {
      this.pumpAgain = true;
      return;
    }
    const o = this.sending;
    const ch = this.channel;
    // Nothing goes out on a channel before the receiver said where to start.
    if (!o || !ch || ch !== this.wantedOn || o.progress.state !== "moving") return;
    this.pumping = true;
    try {
      const size = this.chunkSize();
      while (this.offset < o.file.size && ch.readyState === "open" && ch.bufferedAmount < HIGH_WATER) {
        const start = this.offset;
        const end = Math.min(start + READ_SIZE, o.file.size);
        const data = await o.file.slice(start, end).arrayBuffer();
        if (ch.readyState !== "open" || this.sending !== o) return;
        // A want moved the offset while this slice was read: read again.
        if (this.offset !== start) continue;
        for (let at = 0; at < data.byteLength; at += size) {
          ch.send(new Uint8Array(data, at, Math.min(size, data.byteLength - at)));
        }
        this.offset = end;
        // send() has copied the bytes: the buffer can move to the hasher.
        if (start === o.hashed) {
          o.hasher.give(data);
          o.hashed = end;
        }
        this.tick(o.progress, end);
      }
      if (this.offset >= o.file.size && ch.readyState === "open") {
        o.progress.state = "verifying";
        this.changed(o.progress);
        let sha256: string;
        if (o.hashed === o.file.size) {
          sha256 = await o.hasher.digest();
        } else {
          o.hasher.close();
          sha256 = await hashFile(o.file);
        }
        o.progress.sha256 = sha256;
        this.send({ t: "end", id: o.progress.id, sha256 });
        o.progress.state = "done";
        o.progress.rate = 0;
        this.changed(o.progress);
        this.next();
      }
    } catch (e) {
      o.progress.state = "failed";
      o.progress.error = String(e);
      this.changed(o.progress);
      this.next();
    } finally {
      this.pumping = false;
      if (this.pumpAgain) {
        this.pumpAgain = false;
        void this.pump();
      }
    }
  }

  private tick(p: Progress, bytes: number): void {
    p.bytes = bytes;
    const now = performance.now();
    const dt = now - this.rateMark.at;
    if (dt >= 500) {
      p.rate = ((bytes - this.rateMark.bytes) * 1000) / dt;
      this.rateMark = { at: now, bytes };
      this.changed(p);
    } else if (bytes < this.rateMark.bytes) {
      this.rateMark = { at: now, bytes };
    }
  }

  // ---- receiving ----

  private async onOffer(m: { id: string; name: string; size: number; type: string }): Promise<void> {
    const known = this.incoming;
    if (known && known.progress.id === m.id) {
      // The sender offers again after a reconnect: continue where we are.
      this.want(known);
      return;
    }
    const progress: Progress = {
      id: m.id,
      name: m.name,
      size: m.size,
      direction: "receive",
      bytes: 0,
      rate: 0,
      state: "moving",
    };
    if (m.size > MEMORY_WARNING_BYTES) progress.error = "large file: it is held in memory until saved";
    const incoming: Incoming = { progress, type: m.type, hasher: new Hasher() };
    this.incoming = incoming;
    this.changed(progress);
    try {
      incoming.sink = await this.sinkFor(m.name, m.size, m.type);
    } catch (e) {
      progress.state = "failed";
      progress.error = `cannot save: ${e}`;
      this.changed(progress);
      return;
    }
    this.want(incoming);
  }

  private async onChunk(chunk: ArrayBuffer): Promise<void> {
    const i = this.incoming;
    if (!i?.sink || i.progress.state !== "moving") return;
    i.hasher.update(chunk);
    await i.sink.write(chunk);
    this.tick(i.progress, i.progress.bytes + chunk.byteLength);
  }

  private async onEnd(m: { id: string; sha256: string }): Promise<void> {
    const i = this.incoming;
    if (!i || i.progress.id !== m.id || !i.sink) return;
    i.progress.state = "verifying";
    this.changed(i.progress);
    const got = await i.hasher.digest();
    i.progress.sha256 = got;
    i.progress.rate = 0;
    if (got === m.sha256 && i.progress.bytes === i.progress.size) {
      i.progress.url = await i.sink.close();
      i.progress.state = "done";
    } else {
      i.progress.state = "failed";
      i.progress.error = `SHA-256 mismatch: sent ${m.sha256}, received ${got}`;
    }
    this.incoming = undefined;
    this.changed(i.progress);
  }
}
