// Rooms: creating one over REST, and one peer's WebSocket to it, with
// reconnects that keep the client's identity (client id plus reconnect
// secret, kept in storage so a page reload replaces the old socket).

import {
  type CreatedRoom,
  FINAL_CLOSE_CODES,
  FloeError,
  type IceServers,
  type PeerInfo,
  type RoomInfo,
  type ServerMessage,
  type Welcome,
} from "./protocol.js";
import { Emitter } from "./emitter.js";
import { PeerLink, type ConnectOptions } from "./peer.js";

export interface CreateRoomOptions {
  /** A join token with the `create` grant (from your back end). */
  token?: string;
  /** The tenant of an anonymous (public) room, when its plan allows them. */
  tenant?: string;
  password?: string;
  /** Admit only the first two clients, ever. */
  oneTime?: boolean;
  ttlSecs?: number;
  maxPeers?: number;
  fetch?: typeof fetch;
}

async function answer<T>(resp: Response): Promise<T> {
  const text = await resp.text();
  let body: unknown = undefined;
  try {
    body = text ? JSON.parse(text) : undefined;
  } catch {
    // Not JSON: reported below with the status.
  }
  if (!resp.ok) {
    const e = body as { code?: string; message?: string } | undefined;
    throw new FloeError(e?.code ?? "http_error", e?.message ?? `HTTP ${resp.status}`, resp.status);
  }
  return body as T;
}

function base(signalUrl: string): string {
  return signalUrl.replace(/\/+$/, "");
}

/** Creates a room with a join token, or anonymously for a public tenant. */
export async function createRoom(signalUrl: string, opts: CreateRoomOptions = {}): Promise<CreatedRoom> {
  const body: Record<string, unknown> = {};
  if (!opts.token && opts.tenant) body.tenant = opts.tenant;
  if (opts.password !== undefined) body.password = opts.password;
  if (opts.oneTime) body.one_time = true;
  if (opts.ttlSecs !== undefined) body.ttl_secs = opts.ttlSecs;
  if (opts.maxPeers !== undefined) body.max_peers = opts.maxPeers;
  const headers: Record<string, string> = { "content-type": "application/json" };
  if (opts.token) headers.authorization = `Bearer ${opts.token}`;
  const f = opts.fetch ?? fetch;
  return answer(await f(`${base(signalUrl)}/v1/rooms`, { method: "POST", headers, body: JSON.stringify(body) }));
}

/** What anyone may see of a room (peer ids only with credentials). */
export async function getRoom(signalUrl: string, roomId: string, f: typeof fetch = fetch): Promise<RoomInfo> {
  return answer(await f(`${base(signalUrl)}/v1/rooms/${encodeURIComponent(roomId)}`));
}

/** Where the SDK keeps a client's id and reconnect secrets. */
export interface KeyValueStore {
  getItem(key: string): string | null;
  setItem(key: string, value: string): void;
}

export interface ReconnectOptions {
  /** First delay, milliseconds (default 250). */
  initialMs?: number;
  /** Longest delay, milliseconds (default 10000). */
  maxMs?: number;
  /** Give up after this many attempts in a row (default: never). */
  maxAttempts?: number;
}

export interface JoinOptions {
  /** Stable client id; by default one kept in `storage`. */
  clientId?: string;
  /** A join token with the `join` grant. */
  token?: string;
  password?: string;
  /** Where the client id and reconnect secrets persist (default
   * `localStorage` where it exists; `null` keeps them in memory). */
  storage?: KeyValueStore | null;
  /** A WebSocket constructor (for Node, e.g. the `ws` package). */
  WebSocket?: typeof WebSocket;
  reconnect?: ReconnectOptions;
}

export interface RoomEvents {
  welcome: Welcome;
  "peer-joined": PeerInfo;
  "peer-left": PeerInfo & { reason: string };
  signal: { from: string; fromSid: string; payload: unknown };
  broadcast: { from: string; payload: unknown };
  "ice-servers": IceServers;
  error: FloeError;
  /** The socket dropped; a reconnect follows after `delayMs`. */
  reconnecting: { attempt: number; delayMs: number; code: number };
  /** The room is over for this client: it will not reconnect. */
  closed: { code: number; reason: string };
  "room-closed": { reason: string };
}

function defaultStorage(): KeyValueStore | null {
  try {
    return typeof localStorage === "undefined" ? null : localStorage;
  } catch {
    return null;
  }
}

function randomId(): string {
  const bytes = new Uint8Array(12);
  crypto.getRandomValues(bytes);
  return "c_" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

/** One peer's membership of a room. Emits {@link RoomEvents}. */
export class Room extends Emitter<RoomEvents> {
  readonly roomId: string;
  readonly clientId: string;
  peerId?: string;
  sessionId?: string;
  /** Peers present now, by peer id, with their current session id. */
  readonly peers = new Map<string, string>();
  iceServers?: IceServers;
  private ws?: WebSocket;
  private secret?: string;
  private attempts = 0;
  private timer?: ReturnType<typeof setTimeout>;
  private stopped = false;
  private readonly links = new Map<string, PeerLink>();
  /** Sessions that left: their late signals are stale and dropped. */
  private readonly ended = new Set<string>();
  private readonly url: string;
  private readonly WS: typeof WebSocket;
  private readonly store: KeyValueStore | null;

  constructor(
    signalUrl: string,
    roomId: string,
    private readonly opts: JoinOptions = {},
  ) {
    super();
    this.roomId = roomId;
    this.store = opts.storage === undefined ? defaultStorage() : opts.storage;
    this.clientId = opts.clientId ?? this.store?.getItem("floe.clientId") ?? randomId();
    this.store?.setItem("floe.clientId", this.clientId);
    this.secret = this.store?.getItem(this.secretKey()) ?? undefined;
    this.url = base(signalUrl).replace(/^http/, "ws") + `/v1/rooms/${encodeURIComponent(roomId)}/ws`;
    const WS = opts.WebSocket ?? (globalThis as { WebSocket?: typeof WebSocket }).WebSocket;
    if (!WS) throw new Error("no WebSocket: pass one in JoinOptions.WebSocket");
    this.WS = WS;
    this.open();
  }

  private secretKey(): string {
    return `floe.secret.${this.roomId}.${this.clientId}`;
  }

  private open(): void {
    const q = new URLSearchParams({ client_id: this.clientId });
    if (this.opts.token) q.set("token", this.opts.token);
    if (this.opts.password !== undefined) q.set("password", this.opts.password);
    if (this.secret) q.set("reconnect_secret", this.secret);
    const ws = new this.WS(`${this.url}?${q}`);
    this.ws = ws;
    ws.onmessage = (e: MessageEvent) => this.onMessage(String(e.data));
    // A failed socket also closes; the close decides about reconnecting.
    ws.onerror = () => {};
    ws.onclose = (e: CloseEvent) => {
      if (this.ws === ws) this.onClose(e.code, e.reason);
    };
  }

  private onMessage(text: string): void {
    let m: ServerMessage;
    try {
      m = JSON.parse(text) as ServerMessage;
    } catch {
      return;
    }
    switch (m.type) {
      case "welcome":
        this.attempts = 0;
        this.peerId = m.peer_id;
        this.sessionId = m.session_id;
        this.secret = m.reconnect_secret;
        this.store?.setItem(this.secretKey(), m.reconnect_secret);
        this.iceServers = m.ice_servers;
        this.peers.clear();
        for (const p of m.peers) this.peers.set(p.peer_id, p.session_id);
        for (const link of this.links.values()) link.setIceServers(m.ice_servers);
        this.emit("welcome", m);
        break;
      case "peer-joined":
        this.peers.set(m.peer_id, m.session_id);
        this.emit("peer-joined", { peer_id: m.peer_id, session_id: m.session_id });
        break;
      case "peer-left":
        // A stale departure (the peer is back with a new session) changes nothing.
        if (this.peers.get(m.peer_id) === m.session_id) this.peers.delete(m.peer_id);
        this.ended.add(m.session_id);
        if (this.ended.size > 1_000) this.ended.delete(this.ended.values().next().value as string);
        this.emit("peer-left", { peer_id: m.peer_id, session_id: m.session_id, reason: m.reason });
        break;
      case "signal":
        if (this.ended.has(m.from_sid)) break;
        this.links.get(m.from)?.onSignal(m.payload);
        this.emit("signal", { from: m.from, fromSid: m.from_sid, payload: m.payload });
        break;
      case "broadcast":
        this.emit("broadcast", { from: m.from, payload: m.payload });
        break;
      case "ice-servers":
        this.iceServers = m.ice_servers;
        for (const link of this.links.values()) link.setIceServers(m.ice_servers);
        this.emit("ice-servers", m.ice_servers);
        break;
      case "error":
        this.emit("error", new FloeError(m.code, m.message));
        break;
      case "room-closed":
        this.emit("room-closed", { reason: m.reason });
        break;
      case "pong":
        break;
    }
  }

  private onClose(code: number, reason: string): void {
    this.ws = undefined;
    this.peers.clear();
    const max = this.opts.reconnect?.maxAttempts ?? Infinity;
    if (this.stopped || FINAL_CLOSE_CODES.has(code) || this.attempts >= max) {
      this.stop(code, reason);
      return;
    }
    const initial = this.opts.reconnect?.initialMs ?? 250;
    const cap = this.opts.reconnect?.maxMs ?? 10_000;
    // Full jitter: a node's peers do not all come back at once.
    const delayMs = Math.round(Math.random() * Math.min(cap, initial * 2 ** this.attempts));
    this.attempts += 1;
    this.emit("reconnecting", { attempt: this.attempts, delayMs, code });
    this.timer = setTimeout(() => this.open(), delayMs);
  }

  private stop(code: number, reason: string): void {
    if (this.stopped && code !== 1000) return;
    this.stopped = true;
    clearTimeout(this.timer);
    for (const link of this.links.values()) link.close();
    this.links.clear();
    this.emit("closed", { code, reason });
  }

  /** Whether the socket is open and joined. */
  get connected(): boolean {
    return this.ws?.readyState === 1 && this.sessionId !== undefined;
  }

  private send(m: unknown): boolean {
    if (this.ws?.readyState !== 1) return false;
    this.ws.send(JSON.stringify(m));
    return true;
  }

  /** Sends `payload` to peer `to` (its current session, when known). */
  signal(to: string, payload: unknown): boolean {
    const sid = this.peers.get(to);
    return this.send(sid ? { type: "signal", to, sid, payload } : { type: "signal", to, payload });
  }

  /** Sends a small `payload` (8 KiB at most) to every other peer. */
  broadcast(payload: unknown): boolean {
    return this.send({ type: "broadcast", payload });
  }

  /** Reports bytes moved since the previous report, by path. */
  sendStats(directBytes: number, relayedBytes: number): boolean {
    if (directBytes <= 0 && relayedBytes <= 0) return true;
    return this.send({ type: "stats", direct_bytes: Math.max(0, Math.round(directBytes)), relayed_bytes: Math.max(0, Math.round(relayedBytes)) });
  }

  /** Cuts the socket as a network failure would (for tests): the room reconnects. */
  dropConnection(): void {
    this.ws?.close(4999, "dropped by the client");
  }

  /** Leaves the room for good. */
  leave(): void {
    this.send({ type: "leave" });
    const ws = this.ws;
    this.ws = undefined;
    ws?.close(1000, "left");
    this.stop(1000, "left");
  }

  /** A peer connection to `peerId`, negotiated over this room. */
  connect(peerId: string, options: ConnectOptions = {}): PeerLink {
    let link = this.links.get(peerId);
    if (!link) {
      link = new PeerLink(this, peerId, options);
      this.links.set(peerId, link);
      link.on("closed", () => this.links.delete(peerId));
    }
    return link;
  }
}

/** Joins a room: returns at once; listen for `welcome` (or `closed`). */
export function joinRoom(signalUrl: string, roomId: string, opts: JoinOptions = {}): Room {
  return new Room(signalUrl, roomId, opts);
}
