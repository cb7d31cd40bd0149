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
