//! The room bus: room records, membership and message routing, behind one
//! trait with two backends. [`local`] keeps everything in this process
//! (`floe dev`, single nodes); [`redis`] shares rooms between nodes through
//! Redis keys with leases and pub/sub, so any node serves any peer.
//!
//! Both decide joins with [`crate::room::admit`] and deliver through the
//! local [`Hub`](crate::hub::Hub) of whichever node holds the target socket.
//! Rooms are addressed by their key ([`RoomRecord::key`]: tenant and id);
//! server-chosen ids are also indexed globally, so [`Bus::resolve`] finds
//! their tenant.

pub mod local;
pub mod redis;
#[cfg(test)]
pub(crate) mod suite;

use async_trait::async_trait;
use axum::extract::ws::Utf8Bytes;
use floe_proto::signal::{PeerInfo, ServerMessage};

use crate::room::{Admission, Member, Refusal, RoomRecord};

/// The bus backend cannot answer now.
#[derive(Debug, Clone, thiserror::Error)]
#[error("room bus unavailable: {0}")]
pub(crate) struct BusError(pub String);

/// How a join ended.
#[derive(Debug)]
pub(crate) enum JoinOutcome {
    /// In the room; `peers` are the others present.
    Admitted {
        admission: Admission,
        peers: Vec<PeerInfo>,
    },
    Refused(Refusal),
    NoRoom,
}

/// Why a message to one peer was not delivered. Never silent: the sender
/// gets an `error` naming it.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum SendError {
    #[error("no such peer in this room")]
    NoPeer,
    #[error("the peer has reconnected; its session id changed")]
    StaleSession,
    #[error("the peer could not be reached")]
    Unreachable,
    #[error(transparent)]
    Bus(#[from] BusError),
}

impl SendError {
    /// The outcome of a local delivery as a send result.
    pub fn from_delivery(d: crate::hub::Delivery) -> Result<(), Self> {
        use crate::hub::Delivery;
        match d {
            Delivery::Delivered => Ok(()),
            Delivery::NoPeer => Err(Self::NoPeer),
            Delivery::StaleSession => Err(Self::StaleSession),
            Delivery::Dropped => Err(Self::Unreachable),
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            Self::NoPeer => "peer_not_found",
            Self::StaleSession => "stale_session",
            Self::Unreachable => "peer_unreachable",
            Self::Bus(_) => "bus_unavailable",
        }
    }
}

/// How a room creation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Creation {
    Done,
    /// The tenant already has its maximum of live rooms.
    TenantFull,
    /// A live room has this id already.
    Exists,
}

/// Most rooms one listing returns.
pub(crate) const MAX_LISTED_ROOMS: usize = 1_000;

/// Rooms, membership and routing. `key` is always a room key
/// ([`RoomRecord::key`]).
#[async_trait]
pub(crate) trait Bus: Send + Sync + 'static {
    /// Stores a new room unless the tenant has `limit` live rooms of the
    /// same kind (public or token rooms are counted apart) or the id is
    /// taken (in the tenant, or globally for a server-chosen id).
    async fn create_room(
        &self,
        room: &RoomRecord,
        limit: Option<u32>,
        now: u64,
    ) -> Result<Creation, BusError>;
    /// The tenant of the room with the server-chosen id `id`.
    async fn resolve(&self, id: &str) -> Result<Option<String>, BusError>;
    async fn room(&self, key: &str) -> Result<Option<RoomRecord>, BusError>;
    /// The tenant's live rooms (at most [`MAX_LISTED_ROOMS`]), by id.
    async fn rooms(&self, tenant: &str, now: u64) -> Result<Vec<RoomRecord>, BusError>;
    /// Deletes a room and closes it for every member, wherever connected.
    async fn delete_room(&self, room: &RoomRecord, reason: &str) -> Result<bool, BusError>;
    async fn members(&self, key: &str) -> Result<Vec<Member>, BusError>;
    /// Admits `member` by the rules of [`crate::room::admit`]. Nobody is
    /// told yet: the caller registers the connection in its hub, then
    /// calls [`announce`](Bus::announce), so that answers to the
    /// announcement find it.
    async fn join(
        &self,
        room: &RoomRecord,
        member: &Member,
        by_token: bool,
        now: u64,
    ) -> Result<JoinOutcome, BusError>;
    /// Tells the room that `member` joined, and closes the connection it
    /// replaced, wherever that is.
    async fn announce(
        &self,
        room: &RoomRecord,
        member: &Member,
        admission: &Admission,
    ) -> Result<(), BusError>;
    /// Removes `member` if its session is still current, telling the others.
    async fn leave(&self, key: &str, member: &Member, reason: &str) -> Result<(), BusError>;
    /// Routes `text` to peer `to` (whose session must be `sid` if given).
    async fn send_to_peer(
        &self,
        key: &str,
        from: &Member,
        to: &str,
        sid: Option<&str>,
        text: Utf8Bytes,
    ) -> Result<(), SendError>;
    /// Routes `text` to every member but `from`.
    async fn broadcast(&self, key: &str, from: &str, text: Utf8Bytes) -> Result<(), BusError>;
}

pub(crate) fn peer_joined(m: &Member) -> Utf8Bytes {
    ServerMessage::PeerJoined {
        peer_id: m.peer_id.clone(),
        session_id: m.session_id.clone(),
    }
    .to_json()
    .into()
}

pub(crate) fn peer_left(m: &Member, reason: &str) -> Utf8Bytes {
    ServerMessage::PeerLeft {
        peer_id: m.peer_id.clone(),
        session_id: m.session_id.clone(),
        reason: reason.to_owned(),
    }
    .to_json()
    .into()
}

pub(crate) fn room_closed(reason: &str) -> Utf8Bytes {
    ServerMessage::RoomClosed {
        reason: reason.to_owned(),
    }
    .to_json()
    .into()
}

pub(crate) fn peer_info(m: &Member) -> PeerInfo {
    PeerInfo {
        peer_id: m.peer_id.clone(),
        session_id: m.session_id.clone(),
    }
}
