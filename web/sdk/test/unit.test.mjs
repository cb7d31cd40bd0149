// The Room's rules with a fake socket (no server): stale sessions' late
// signals are dropped, and only abnormal closes reconnect.

import { test, before } from "node:test";
import assert from "node:assert/strict";
import { sdk, memoryStore } from "../../test-support/floe.mjs";

let floe;
before(async () => {
  floe = await sdk();
});

/** A WebSocket the test drives: `last` is the newest one opened. */
class FakeSocket {
  static last;
  static opened = 0;
  readyState = 1;
  sent = [];
  constructor(url) {
    this.url = url;
    FakeSocket.last = this;
    FakeSocket.opened += 1;
  }
  send(text) {
    this.sent.push(JSON.parse(text));
  }
  close(code = 1000, reason = "") {
    this.readyState = 3;
    this.onclose?.({ code, reason });
  }
  deliver(m) {
    this.onmessage?.({ data: JSON.stringify(m) });
  }
}

const welcome = {
  type: "welcome",
  room_id: "r",
  peer_id: "me",
  session_id: "s_me",
  peers: [{ peer_id: "bob", session_id: "s1" }],
  room_expires_at: 0,
  reconnect_secret: "0123456789abcdef0123",
  ice_servers: { iceServers: [], ttl: 0, expires: 0 },
};

test("late signals of a session that left are dropped", () => {
  const room = floe.joinRoom("http://x", "r", { WebSocket: FakeSocket, storage: memoryStore() });
  const got = [];
  room.on("signal", (s) => got.push(s.payload));
  FakeSocket.last.deliver(welcome);
  FakeSocket.last.deliver({ type: "peer-left", peer_id: "bob", session_id: "s1", reason: "closed" });
  FakeSocket.last.deliver({ type: "peer-joined", peer_id: "bob", session_id: "s2" });
  FakeSocket.last.deliver({ type: "signal", from: "bob", from_sid: "s1", payload: "stale" });
  FakeSocket.last.deliver({ type: "signal", from: "bob", from_sid: "s2", payload: "fresh" });
  assert.deepEqual(got, ["fresh"]);
  assert.equal(room.peers.get("bob"), "s2");
  // Outgoing signals name the peer's current session.
  room.signal("bob", 1);
  assert.deepEqual(FakeSocket.last.sent.at(-1), { type: "signal", to: "bob", sid: "s2", payload: 1 });
});

test("abnormal closes reconnect with the secret; closes that mean stop do not", async () => {
  const storage = memoryStore();
  const room = floe.joinRoom("http://x", "r", {
    WebSocket: FakeSocket,
    storage,
    reconnect: { initialMs: 1, maxMs: 2 },
  });
  FakeSocket.last.deliver(welcome);
  const before = FakeSocket.opened;
  const reconnecting = room.once("reconnecting");
  FakeSocket.last.close(1006);
  assert.equal((await reconnecting).code, 1006);
  await new Promise((r) => setTimeout(r, 20));
  assert.equal(FakeSocket.opened, before + 1, "a new socket");
  assert.match(FakeSocket.last.url, /reconnect_secret=0123456789abcdef0123/);
  for (const code of [1000, 1009, 4001, 4003, 4004, 4005]) {
    const r = floe.joinRoom("http://x", "r", { WebSocket: FakeSocket, storage, reconnect: { initialMs: 1 } });
    const closed = r.once("closed");
    const opened = FakeSocket.opened;
    FakeSocket.last.close(code);
    assert.equal((await closed).code, code);
    await new Promise((res) => setTimeout(res, 10));
    assert.equal(FakeSocket.opened, opened, `no reconnect after ${code}`);
  }
  room.leave();
});

/** An RTCPeerConnection that never connects. */
class StuckPC {
  static last;
  connectionState = "new";
  signalingState = "stable";
  localDescription = null;
  remoteDescription = null;
  restarts = 0;
  constructor(config) {
    this.config = config;
    StuckPC.last = this;
  }
  async setRemoteDescription(d) {
    this.remoteDescription = d;
    this.signalingState = d.type === "offer" ? "have-remote-offer" : "stable";
  }
  async setLocalDescription() {
    const answer = { type: "answer", sdp: "" };
    this.localDescription = { ...answer, toJSON: () => answer };
    this.signalingState = "stable";
  }
  async addIceCandidate() {}
  restartIce() {
    this.restarts += 1;
  }
  close() {}
}

test("a link that never connects says so, and why no relay will help", async (t) => {
  t.mock.timers.enable({ apis: ["setTimeout"] });
  const room = floe.joinRoom("http://x", "r", { WebSocket: FakeSocket, storage: memoryStore() });
  FakeSocket.last.deliver({
    ...welcome,
    ice_servers: { iceServers: [{ urls: ["stun:stun.example.com"] }], ttl: 0, expires: 0, turnRefused: "turn_disabled" },
  });
  const link = room.connect("bob", { RTCPeerConnection: StuckPC, statsIntervalMs: 0 });
  const stalls = [];
  link.on("stalled", (s) => stalls.push(s));
  await link.onSignal({ pc: "bob-pc", description: { type: "offer", sdp: "" } });
  t.mock.timers.tick(7_999);
  assert.deepEqual(stalls, [], "not before the stall time");
  t.mock.timers.tick(1);
  assert.deepEqual(stalls, [{ turnRefused: "turn_disabled" }]);
  // Only the impolite side restarts ICE, so the two never collide.
  assert.equal(StuckPC.last.restarts, link.polite ? 0 : 1);
  // A connection under way is not reported.
  await link.onSignal({ pc: "bob-pc", description: { type: "offer", sdp: "" } });
  StuckPC.last.connectionState = "connected";
  t.mock.timers.tick(8_000);
  assert.equal(stalls.length, 1);
  link.close();
});
