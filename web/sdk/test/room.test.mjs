// The SDK against a real `floe dev`: rooms, relay, reconnects that keep
// the client's identity, and the closes that must not reconnect. Node 20
// has no global WebSocket, so the `ws` package is injected.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import WebSocket from "ws";
import { sdk, floeDev, memoryStore, next } from "../../test-support/floe.mjs";

let floe, dev;
before(async () => {
  floe = await sdk();
  dev = await floeDev();
});
after(() => dev?.stop());

const join = (roomId, opts = {}) =>
  floe.joinRoom(dev.signal_url, roomId, { WebSocket, storage: memoryStore(), ...opts });

test("two peers meet, signal and broadcast", async () => {
  const room = await floe.createRoom(dev.signal_url, { tenant: dev.tenant, oneTime: true });
  assert.equal(room.one_time, true);
  const a = join(room.room_id, { clientId: "alice" });
  const wa = await next(a, "welcome");
  assert.equal(wa.peer_id, "alice");
  assert.ok(wa.reconnect_secret.length >= 16);
  assert.ok(wa.ice_servers.iceServers.length > 0);
  const b = join(room.room_id, { clientId: "bob" });
  const welcomeB = next(b, "welcome");
  const joined = await next(a, "peer-joined");
  assert.equal(joined.peer_id, "bob");
  await welcomeB;
  assert.deepEqual([...b.peers.keys()], ["alice"]);
  assert.ok(a.signal("bob", { sdp: "v=0" }));
  const got = await next(b, "signal");
  assert.deepEqual([got.from, got.payload], ["alice", { sdp: "v=0" }]);
  b.broadcast({ hello: 1 });
  assert.deepEqual((await next(a, "broadcast")).payload, { hello: 1 });
  a.leave();
  b.leave();
});

test("an abnormal close reconnects as the same client, with backoff", async () => {
  const room = await floe.createRoom(dev.signal_url, { tenant: dev.tenant });
  const a = join(room.room_id, { clientId: "a", reconnect: { initialMs: 50, maxMs: 200 } });
  const first = await next(a, "welcome");
  const b = join(room.room_id, { clientId: "b" });
  await next(b, "welcome");
  const bHears = next(b, "peer-joined");
  const reconnecting = next(a, "reconnecting");
  const welcomeAgain = next(a, "welcome");
  a.dropConnection();
  const again = await reconnecting;
  assert.equal(again.attempt, 1);
  assert.ok(again.delayMs <= 50);
  const second = await welcomeAgain;
  assert.equal(second.peer_id, "a");
  assert.notEqual(second.session_id, first.session_id);
  assert.equal(second.reconnect_secret, first.reconnect_secret);
  // b hears the new session and addresses it.
  assert.equal((await bHears).session_id, second.session_id);
  assert.equal(b.peers.get("a"), second.session_id);
  b.signal("a", { after: "reconnect" });
  assert.deepEqual((await next(a, "signal")).payload, { after: "reconnect" });
  a.leave();
  b.leave();
});

test("a reload (same storage) replaces the old socket, which stops for good", async () => {
  const room = await floe.createRoom(dev.signal_url, { tenant: dev.tenant });
  const storage = memoryStore();
  const tab = join(room.room_id, { storage });
  const w1 = await next(tab, "welcome");
  const tabClosed = next(tab, "closed");
  const reloaded = join(room.room_id, { storage });
  const w2 = await next(reloaded, "welcome");
  assert.equal(w2.peer_id, w1.peer_id, "the client id persisted");
  const closed = await tabClosed;
  assert.equal(closed.code, 4001);
  // Someone else who only knows the id is refused, and does not retry.
  const thief = join(room.room_id, { clientId: w1.peer_id });
  const [err, thiefClosed] = await Promise.all([next(thief, "error"), next(thief, "closed")]);
  assert.equal(err.code, "peer_id_taken");
  assert.equal(thiefClosed.code, 4003);
  reloaded.leave();
});

test("refusals are typed and final", async () => {
  await assert.rejects(floe.createRoom(dev.signal_url, { tenant: "no-such-tenant" }), (e) => {
    assert.ok(e instanceof floe.FloeError);
    assert.equal(e.code, "unknown_tenant");
    assert.equal(e.status, 404);
    return true;
  });
  const room = await floe.createRoom(dev.signal_url, { tenant: dev.tenant, password: "s3cret" });
  const info = await floe.getRoom(dev.signal_url, room.room_id);
  assert.equal(info.has_password, true);
  assert.equal(info.peers, undefined, "no peer ids without credentials");
  const wrong = join(room.room_id, { password: "nope" });
  const [err, closed] = await Promise.all([next(wrong, "error"), next(wrong, "closed")]);
  assert.equal(err.code, "wrong_password");
  assert.equal(closed.code, 4003);
  const right = join(room.room_id, { password: "s3cret" });
  await next(right, "welcome");
  right.leave();
});

test("stats reports reach the operator's metrics", async () => {
  const room = await floe.createRoom(dev.signal_url, { tenant: dev.tenant });
  const a = join(room.room_id);
  await next(a, "welcome");
  assert.ok(a.sendStats(1_000, 234));
  a.signal("nobody", {});
  assert.equal((await next(a, "error")).code, "peer_not_found", "the stats message was accepted first");
  const metrics = await (await fetch(`${dev.signal_ops_url}/metrics`)).text();
  assert.match(metrics, new RegExp(`floe_signal_reported_bytes_total\\{path="relayed",tenant="${dev.tenant}"\\} \\d+`));
  a.leave();
});
