// floe client SDK: rooms over floe signaling, peer connections with
// perfect negotiation, ICE server refresh, and path/offload stats.

export { createRoom, getRoom, joinRoom, Room } from "./room.js";
export type { CreateRoomOptions, JoinOptions, KeyValueStore, ReconnectOptions, RoomEvents } from "./room.js";
export { PeerLink } from "./peer.js";
export type { ConnectOptions, PathStats, PeerLinkEvents } from "./peer.js";
export { FloeError, FINAL_CLOSE_CODES } from "./protocol.js";
export type { CreatedRoom, IceServers, PeerInfo, RoomInfo, ServerMessage, Welcome } from "./protocol.js";
export { Emitter } from "./emitter.js";
