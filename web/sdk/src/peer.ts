// A peer connection to one other peer of a room, negotiated over the
// room's signaling with "perfect negotiation": the peer whose id sorts
// first is polite (it yields on an offer collision), either side may
// renegotiate at any time, and candidates trickle. The connection restarts
// ICE when it fails, takes fresh ICE servers before the credentials
// expire, and reports whether its path is direct or relayed, and how many
// bytes moved each way, to the app and (as `stats`) to the server.

import { Emitter } from "./emitter.js";
import type { IceServers } from "./protocol.js";

/** What `Room.connect` needs of a room (kept narrow for tests). */
export interface SignalingRoom {
  readonly peerId?: string;
  readonly iceServers?: IceServers;
  signal(to: string, payload: unknown): boolean;
  sendStats(directBytes: number, relayedBytes: number): boolean;
}

export interface ConnectOptions {
  /** `"relay"` forces every byte through TURN. */
  iceTransportPolicy?: RTCIceTransportPolicy;
  /** How often to read `getStats()` and report, ms (default 2000; 0: never). */
  statsIntervalMs?: number;
  /** An `RTCPeerConnection` constructor (default: the browser's). */
  RTCPeerConnection?: typeof RTCPeerConnection;
}

/** The selected path and the bytes it carried so far. */
export interface PathStats {
  path: "direct" | "relayed" | "unknown";
  localCandidateType?: string;
  remoteCandidateType?: string;
  bytesSent: number;
  bytesReceived: number;
}

export interface PeerLinkEvents {
  /** A new `RTCPeerConnection` (the first one, or after the other side
   * started over): create negotiated data channels and tracks on it. */
  pc: RTCPeerConnection;
  connectionstatechange: RTCPeerConnectionState;
  datachannel: RTCDataChannel;
  stats: PathStats;
  /** No connection yet, `STALL_MS` after an offer/answer (and again after
   * each ICE restart that did not help): tell the user, especially when
   * `room.iceServers.turnRefused` says no relay will come to the rescue. */
  stalled: { turnRefused?: string };
  closed: void;
}

/** Signal payloads between two links. */
interface Payload {
  /** Id of the sender's `RTCPeerConnection`: a new one means start over. */
  pc: string;
  description?: RTCSessionDescriptionInit;
  candidate?: RTCIceCandidateInit;
}

/** How long a negotiated connection may sit without progress. */
const STALL_MS = 8_000;

function newId(): string {
  const b = new Uint8Array(8);
  crypto.getRandomValues(b);
  return Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
}

export class PeerLink extends Emitter<PeerLinkEvents> {
  pc!: RTCPeerConnection;
  /** Whether this side yields when both offer at once. */
  readonly polite: boolean;
  stats: PathStats = { path: "unknown", bytesSent: 0, bytesReceived: 0 };
  private id = "";
  private remoteId?: string;
  private makingOffer = false;
  private ignoreOffer = false;
  private answerPending = false;
  /** Candidates that came before a remote description they belong to
   * (after an ignored offer, say): added once one is set. */
  private early: RTCIceCandidateInit[] = [];
  private timer?: ReturnType<typeof setInterval>;
  private reported = { direct: 0, relayed: 0 };
  private closed = false;
  private watchdog?: ReturnType<typeof setTimeout>;
  private readonly PC: typeof RTCPeerConnection;

  constructor(
    private readonly room: SignalingRoom,
    readonly peerId: string,
    private readonly opts: ConnectOptions = {},
  ) {
    super();
    if (!room.peerId) throw new Error("connect after the room's welcome");
    this.polite = room.peerId < peerId;
    const PC = opts.RTCPeerConnection ?? (globalThis as { RTCPeerConnection?: typeof RTCPeerConnection }).RTCPeerConnection;
    if (!PC) throw new Error("no RTCPeerConnection here");
    this.PC = PC;
    this.start();
    const every = opts.statsIntervalMs ?? 2_000;
    if (every > 0) this.timer = setInterval(() => void this.readStats(), every);
  }

  private start(): void {
    this.id = newId();
    this.makingOffer = false;
    this.ignoreOffer = false;
    this.answerPending = false;
    this.early = [];
    const pc = new this.PC({
      iceServers: this.room.iceServers?.iceServers ?? [],
      iceTransportPolicy: this.opts.iceTransportPolicy ?? "all",
    });
    this.pc = pc;
    pc.onnegotiationneeded = async () => {
      try {
        this.makingOffer = true;
        await pc.setLocalDescription();
        // An offer that crossed the other side's offer may have been
        // rolled back (we were polite and answered) by now: sending it
        // late would make the other side answer credentials gone.
        if (pc.signalingState === "have-local-offer" && pc.localDescription?.type === "offer") {
          this.send({ description: pc.localDescription.toJSON() });
        }
      } catch (e) {
        console.warn("floe: offer failed", e);
      } finally {
        this.makingOffer = false;
      }
    };
    pc.onicecandidate = ({ candidate }) => {
      if (candidate) this.send({ candidate: candidate.toJSON() });
    };
    pc.onconnectionstatechange = () => {
      if (pc !== this.pc) return;
      this.emit("connectionstatechange", pc.connectionState);
      if (pc.connectionState === "failed") pc.restartIce();
    };
    pc.ondatachannel = (e) => this.emit("datachannel", e.channel);
    this.emit("pc", pc);
  }

  private send(p: Omit<Payload, "pc">): void {
    this.room.signal(this.peerId, { pc: this.id, ...p });
  }

  /** Handles a signal payload from this link's peer. */
  async onSignal(raw: unknown): Promise<void> {
    const p = raw as Partial<Payload> | null;
    if (!p || typeof p.pc !== "string" || this.closed) return;
    if (p.pc !== this.remoteId) {
      if (this.remoteId !== undefined) {
        // The other side started over (a reload, a new connection): only a
        // fresh offer opens the conversation; stale candidates are dropped.
        if (p.description?.type !== "offer") return;
        this.pc.close();
        this.start();
      }
      this.remoteId = p.pc;
    }
    const pc = this.pc;
    try {
      if (p.description) {
        const d = p.description;
        const ready = !this.makingOffer && (pc.signalingState === "stable" || this.answerPending);
        const collision = d.type === "offer" && !ready;
        this.ignoreOffer = !this.polite && collision;
        if (this.ignoreOffer) return;
        this.answerPending = d.type === "answer";
        await pc.setRemoteDescription(d);
        this.answerPending = false;
        this.watch(pc);
        // Candidates that waited for this description; ones for another
        // (an ICE generation gone) fail and are dropped.
        for (const c of this.early.splice(0)) await pc.addIceCandidate(c).catch(() => {});
        if (d.type === "offer") {
          await pc.setLocalDescription();
          if (pc.localDescription?.type === "answer") this.send({ description: pc.localDescription.toJSON() });
        }
      } else if (p.candidate) {
        if (!pc.remoteDescription) {
          this.early.push(p.candidate);
          return;
        }
        try {
          await pc.addIceCandidate(p.candidate);
        } catch (e) {
          // After an ignored offer its candidates may still be needed:
          // the other side answers ours with the same ICE credentials.
          if (this.ignoreOffer) this.early.push(p.candidate);
          else console.warn("floe: candidate refused", e);
        }
      }
    } catch (e) {
      console.warn("floe: negotiation step failed", e);
    }
  }

  /** After an offer/answer, a connection still not under way after a
   * while is reported (`stalled`, on both sides) and gets an ICE restart
   * from the impolite side (one side, so the two restarts do not collide):
   * it recovers from ICE that stalled, for instance candidates lost while
   * both sides offered at once. Restarts keep the connection from ever
   * reaching "failed", so `stalled` is what says it is not coming. */
  private watch(pc: RTCPeerConnection): void {
    clearTimeout(this.watchdog);
    this.watchdog = setTimeout(() => {
      const stalled = pc.connectionState === "new" || pc.connectionState === "connecting";
      if (pc !== this.pc || this.closed || !stalled) return;
      this.emit("stalled", { turnRefused: this.room.iceServers?.turnRefused });
      if (!this.polite) pc.restartIce();
    }, STALL_MS);
  }

  /** Swaps in fresh ICE servers (before the TURN credentials expire). */
  setIceServers(ice: IceServers): void {
    if (this.closed) return;
    this.pc.setConfiguration({ ...this.pc.getConfiguration(), iceServers: ice.iceServers });
  }

  /** Restarts ICE now (e.g. after the network changed). */
  restartIce(): void {
    this.pc.restartIce();
  }

  /** Reads the selected candidate pair; reports new bytes by path. */
  async readStats(): Promise<PathStats> {
    const pc = this.pc;
    const report = await pc.getStats();
    let pair: RTCIceCandidatePairStats | undefined;
    report.forEach((s) => {
      if (s.type === "transport" && s.selectedCandidatePairId) pair = report.get(s.selectedCandidatePairId);
    });
    if (!pair) {
      report.forEach((s) => {
        if (s.type === "candidate-pair" && s.state === "succeeded" && (s.nominated || s.selected)) pair = s;
      });
    }
    if (!pair) return this.stats;
    const local = report.get(pair.localCandidateId);
    const remote = report.get(pair.remoteCandidateId);
    const relayed = local?.candidateType === "relay" || remote?.candidateType === "relay";
    const next: PathStats = {
      path: relayed ? "relayed" : "direct",
      localCandidateType: local?.candidateType,
      remoteCandidateType: remote?.candidateType,
      bytesSent: pair.bytesSent ?? 0,
      bytesReceived: pair.bytesReceived ?? 0,
    };
    // Bytes of this pair since the last report (a new pair starts at 0).
    const total = next.bytesSent + next.bytesReceived;
    const before = this.stats.bytesSent + this.stats.bytesReceived;
    const delta = total >= before ? total - before : total;
    this.stats = next;
    if (delta > 0) {
      if (relayed) this.reported.relayed += delta;
      else this.reported.direct += delta;
      this.room.sendStats(relayed ? 0 : delta, relayed ? delta : 0);
    }
    this.emit("stats", next);
    return next;
  }

  /** Bytes reported to the server so far, by path. */
  get reportedBytes(): { direct: number; relayed: number } {
    return { ...this.reported };
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    clearInterval(this.timer);
    clearTimeout(this.watchdog);
    this.pc.close();
    this.emit("closed", undefined);
  }
}
