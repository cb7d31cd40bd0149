// floe share: a P2P file-share app on the floe SDK. One page creates a
// room and a link; a browser that opens the link joins it, and files flow
// browser to browser over an RTCDataChannel (through floe's TURN only when
// no direct path exists, or when the link asks for `?relay=1`).

import { createRoom, FloeError, getRoom, joinRoom, type PeerLink, type Room } from "../../sdk/src/index.js";
import { MEMORY_WARNING_BYTES, memorySink, type Progress, type Sink, type SinkFactory, Transfers } from "./transfer.js";

interface AppConfig {
  tenant: string;
}

const $ = <T extends HTMLElement>(id: string) => document.getElementById(id) as T;
const params = new URLSearchParams(location.search);
const relayOnly = params.get("relay") === "1";
const signalUrl = location.origin;

function formatBytes(n: number): string {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i++;
  }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function status(text: string, kind: "info" | "error" | "ok" = "info"): void {
  const el = $("status");
  el.textContent = text;
  el.dataset.kind = kind;
}

/** What a refusal means to the person using the app. */
function explain(e: unknown): string {
  if (!(e instanceof FloeError)) return String(e);
  switch (e.code) {
    case "wrong_password":
      return "Wrong password.";
    case "room_sealed":
      return "This one-time link has been used already.";
    case "room_not_found":
      return "This link has expired or never existed.";
    case "room_full":
      return "This room is full.";
    case "rate_limited":
      return "Too many rooms created from here; try again in a minute.";
    default:
      return `${e.message} (${e.code})`;
  }
}

// ---- File System Access, where it exists (and a person is there to pick) ----

interface FileHandle {
  createWritable(): Promise<{ write(d: ArrayBuffer): Promise<void>; close(): Promise<void> }>;
}
type SavePicker = (o: { suggestedName: string }) => Promise<FileHandle>;
const picker = (window as unknown as { showSaveFilePicker?: SavePicker }).showSaveFilePicker;
const toDisk = $<HTMLInputElement>("to-disk");
if (picker && !navigator.webdriver) {
  toDisk.checked = true;
} else {
  toDisk.checked = false;
  toDisk.disabled = true;
  $("to-disk-label").title = "This browser cannot write files directly; received files are kept in memory.";
}

const sinkFor: SinkFactory = async (name, size, type): Promise<Sink> => {
  if (toDisk.checked && picker) {
    const handle = await picker({ suggestedName: name });
    const w = await handle.createWritable();
    return {
      write: (d) => w.write(d),
      close: async () => {
        await w.close();
        return undefined;
      },
    };
  }
  if (size > MEMORY_WARNING_BYTES) status(`${name} is large (${formatBytes(size)}): it is kept in memory until you save it.`);
  return memorySink(type);
};

// ---- the transfer list ----

function render(p: Progress): void {
  let row = document.getElementById(`t-${p.id}`);
  if (!row) {
    row = document.createElement("li");
    row.id = `t-${p.id}`;
    row.innerHTML = `<div class="name"></div><progress max="1" value="0"></progress><div class="meta"></div>`;
    $("transfers").append(row);
  }
  row.dataset.state = p.state;
  row.dataset.direction = p.direction;
  (row.querySelector(".name") as HTMLElement).textContent = `${p.direction === "send" ? "↑" : "↓"} ${p.name} (${formatBytes(p.size)})`;
  (row.querySelector("progress") as HTMLProgressElement).value = p.size ? p.bytes / p.size : 1;
  const meta = row.querySelector(".meta") as HTMLElement;
  const left = p.rate > 0 ? `${Math.ceil((p.size - p.bytes) / p.rate)} s left` : "";
  const rate = p.rate > 0 ? `${((p.rate * 8) / 1e6).toFixed(1)} Mbit/s` : "";
  meta.textContent = [formatBytes(p.bytes), rate, left, p.state, p.error ?? ""].filter(Boolean).join(" · ");
  if (p.sha256) {
    const sha = document.createElement("code");
    sha.className = "sha256";
    sha.textContent = p.sha256;
    meta.append(" SHA-256 ", sha, p.state === "done" ? " verified" : "");
  }
  if (p.url && !row.querySelector("a")) {
    const a = document.createElement("a");
    a.href = p.url;
    a.download = p.name;
    a.textContent = "Save";
    row.append(a);
  }
}

const transfers = new Transfers(sinkFor, render);

// ---- the room and the peer ----

let room: Room | undefined;
let link: PeerLink | undefined;

function showPath(): void {
  if (!link) return;
  const s = link.stats;
  $("path").textContent = `path: ${s.path}${s.localCandidateType ? ` (${s.localCandidateType} → ${s.remoteCandidateType})` : ""} · ↑ ${formatBytes(s.bytesSent)} ↓ ${formatBytes(s.bytesReceived)}`;
  $("path").dataset.path = s.path;
}

function connectTo(peerId: string): void {
  if (!room || link) return;
  link = room.connect(peerId, { iceTransportPolicy: relayOnly ? "relay" : "all", statsIntervalMs: 1_000 });
  // One side opens the channel and the other receives it: an offer from
  // each side at once (glare) is handled by perfect negotiation, but
  // Chromium can stall ICE gathering on the side that rolls back.
  const l = link;
  // A channel lost on a live connection is replaced; the transfer resumes
  // from what the receiver has. Each side counts the losses on the current
  // connection, and the sides take turns opening the replacement: the
  // impolite side opens the first channel and every even-numbered one, the
  // polite side the odd ones. Each side's channels take SCTP stream ids of
  // its own parity, so a replacement never reuses the stream just closed
  // (Chromium can drop what is sent on a stream reused while the other
  // side is still resetting it), and only one side opens at a time.
  let losses = 0;
  const open = (pc: RTCPeerConnection) => {
    const channel = pc.createDataChannel("files", { ordered: true });
    use(pc, channel);
  };
  const use = (pc: RTCPeerConnection, channel: RTCDataChannel) => {
    transfers.attach(channel);
    channel.addEventListener("close", () => {
      if (pc !== l.pc || pc.connectionState !== "connected") return;
      losses += 1;
      const opensNext = losses % 2 === 0 ? !l.polite : l.polite;
      if (opensNext) open(pc);
    });
  };
  const fresh = (pc: RTCPeerConnection) => {
    losses = 0;
    if (!l.polite) open(pc);
  };
  fresh(l.pc);
  l.on("pc", fresh);
  l.on("datachannel", (channel) => use(l.pc, channel));
  link.on("stats", showPath);
  // ICE that fails, or never gets under way (the SDK restarts it, so it
  // may never reach "failed"): say why, most of all when this plan has no
  // relay to fall back on.
  const noPath = () =>
    status(
      room?.iceServers?.turnRefused
        ? `No direct path, and relay is not available on this plan (${room.iceServers.turnRefused}). Retrying…`
        : "The connection failed; retrying…",
      "error",
    );
  link.on("connectionstatechange", (state) => {
    if (state === "connected") {
      status("Connected. Choose files to send.", "ok");
      $<HTMLInputElement>("files").disabled = false;
    } else if (state === "failed") {
      noPath();
    }
  });
  link.on("stalled", noPath);
}

function join(roomId: string, password?: string): void {
  $("join-form").hidden = true;
  $("share").hidden = false;
  status("Joining…");
  room = joinRoom(signalUrl, roomId, {
    password,
    // Per tab (and kept across a reload): two tabs of one browser are two clients.
    storage: sessionStorage,
  });
  room.on("welcome", (w) => {
    status(w.peers.length ? "Connecting to the other browser…" : "Waiting for the other browser to open the link…");
    const other = w.peers[0];
    if (other) connectTo(other.peer_id);
  });
  room.on("peer-joined", (p) => {
    if (!link) {
      status("Connecting to the other browser…");
      connectTo(p.peer_id);
    }
  });
  room.on("error", (e) => status(explain(e), "error"));
  room.on("reconnecting", () => status("Signaling connection lost; reconnecting (transfers continue)…"));
  room.on("closed", ({ code }) => {
    if (code !== 1000 && $("status").dataset.kind !== "error") status(`Disconnected (${code}).`, "error");
  });
}

async function openLink(roomId: string): Promise<void> {
  try {
    const info = await getRoom(signalUrl, roomId);
    if (info.has_password) {
      $("join-form").hidden = false;
      $("create-form").hidden = true;
      $<HTMLInputElement>("join-password").focus();
      $("join-form").onsubmit = (e) => {
        e.preventDefault();
        join(roomId, $<HTMLInputElement>("join-password").value);
      };
    } else {
      $("create-form").hidden = true;
      join(roomId);
    }
  } catch (e) {
    $("create-form").hidden = true;
    status(explain(e), "error");
  }
}

async function create(e: Event): Promise<void> {
  e.preventDefault();
  try {
    const config = (await (await fetch("/app-config.json")).json()) as AppConfig;
    const password = $<HTMLInputElement>("password").value;
    const created = await createRoom(signalUrl, {
      tenant: config.tenant,
      password: password || undefined,
      oneTime: $<HTMLInputElement>("one-time").checked,
    });
    const url = new URL(location.href);
    url.hash = created.room_id;
    $<HTMLInputElement>("link").value = url.toString();
    $("create-form").hidden = true;
    $("link-box").hidden = false;
    history.replaceState(null, "", url);
    join(created.room_id, password || undefined);
  } catch (err) {
    status(explain(err), "error");
  }
}

$("create-form").onsubmit = (e) => void create(e);
$("copy").onclick = () => void navigator.clipboard?.writeText($<HTMLInputElement>("link").value);
$<HTMLInputElement>("files").onchange = (e) => {
  const input = e.target as HTMLInputElement;
  if (input.files?.length) transfers.add(input.files);
  input.value = "";
};
setInterval(showPath, 1_000);

const fromLink = location.hash.slice(1);
if (fromLink) void openLink(fromLink);

// For tests and the curious: the app's state.
(window as unknown as { floeShare: unknown }).floeShare = {
  get room() {
    return room;
  },
  get link() {
    return link;
  },
  transfers,
};
