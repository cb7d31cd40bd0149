// The floe signaling protocol's wire types (docs/signaling.md is the
// reference): REST bodies of the room API and the WebSocket messages.

/** `RTCConfiguration`-shaped ICE servers, with their credential expiry. */
export interface IceServers {
  iceServers: RTCIceServer[];
  /** Seconds the TURN credentials stay valid. */
  ttl: number;
  /** Unix seconds when the TURN credentials expire (0: STUN only). */
  expires: number;
  /** Why TURN was left out, when it was. */
  turnRefused?: string;
}

export interface PeerInfo {
  peer_id: string;
  session_id: string;
}

export interface RoomInfo {
  room_id: string;
  tenant: string;
  expires_at: number;
  max_peers: number;
  one_time: boolean;
  public: boolean;
  has_password: boolean;
  peer_count: number;
  /** Only for the owner key, the creator's token and the tenant's API keys. */
  peers?: string[];
}

export interface CreatedRoom extends RoomInfo {
  /** Deletes the room (`DELETE /v1/rooms/{id}`); shown only once. */
  owner_key: string;
}

export interface Welcome {
  type: "welcome";
  room_id: string;
  peer_id: string;
  session_id: string;
  peers: PeerInfo[];
  room_expires_at: number;
  reconnect_secret: string;
  ice_servers: IceServers;
}

export type ServerMessage =
  | Welcome
  | { type: "peer-joined"; peer_id: string; session_id: string }
  | { type: "peer-left"; peer_id: string; session_id: string; reason: string }
  | { type: "signal"; from: string; from_sid: string; payload: unknown }
  | { type: "broadcast"; from: string; payload: unknown }
  | { type: "ice-servers"; ice_servers: IceServers }
  | { type: "error"; code: string; message: string }
  | { type: "room-closed"; reason: string }
  | { type: "pong" };

/** Close codes after which reconnecting cannot help (docs/signaling.md). */
export const FINAL_CLOSE_CODES: ReadonlySet<number> = new Set([
  1000, // left
  1009, // message too large
  4001, // replaced by a newer connection of this client
  4003, // refused at join (the `error` before it says why)
  4004, // room closed
  4005, // access revoked
]);

/** An error the server answered with, typed by its stable code. */
export class FloeError extends Error {
  constructor(
    readonly code: string,
    message: string,
    readonly status?: number,
  ) {
    super(message);
    this.name = "FloeError";
  }
}
