//! The in-process bus: rooms and membership in a map, delivery straight
//! into the local hub. For `floe dev` and single-node deployments.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use axum::extract::ws::Utf8Bytes;

use super::{
    Bus, BusError, Creation, JoinOutcome, MAX_LISTED_ROOMS, SendError, peer_info, peer_joined,
    peer_left, room_closed,
};
use crate::hub::{Hub, Target, close};
use crate::room::{self, Admission, Member, RoomRecord, RoomState};

struct Room {
    record: RoomRecord,
    state: RoomState,
}

#[derive(Default)]
struct Rooms {
    /// By room key.
    by_key: HashMap<String, Room>,
    /// Tenant of each server-chosen room id.
    global: HashMap<String, String>,
}

impl Rooms {
    fn remove(&mut self, key: &str) -> Option<Room> {
        let room = self.by_key.remove(key)?;
        if !room.record.named {
            self.global.remove(&room.record.id);
        }
        Some(room)
    }
}

/// The in-process [`Bus`].
pub(crate) struct LocalBus {
    hub: Arc<Hub>,
    rooms: Mutex<Rooms>,
}

impl LocalBus {
    pub fn new(hub: Arc<Hub>) -> Self {
        Self {
            hub,
            rooms: Mutex::default(),
        }
    }

    fn rooms(&self) -> std::sync::MutexGuard<'_, Rooms> {
        self.rooms.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait]
impl Bus for LocalBus {
    async fn create_room(
        &self,
        room: &RoomRecord,
        limit: Option<u32>,
        now: u64,
    ) -> Result<Creation, BusError> {
        let mut rooms = self.rooms();
        let expired: Vec<String> = rooms
            .by_key
            .iter()
            .filter(|(_, r)| r.record.expires_at <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for key in expired {
            rooms.remove(&key);
        }
        let key = room.key();
        if rooms.by_key.contains_key(&key) || (!room.named && rooms.global.contains_key(&room.id)) {
            return Ok(Creation::Exists);
        }
        if let Some(max) = limit {
            let live = rooms
                .by_key
                .values()
                .filter(|r| r.record.tenant == room.tenant && r.record.public == room.public)
                .count();
            if live >= max as usize {
                return Ok(Creation::TenantFull);
            }
        }
        if !room.named {
            rooms.global.insert(room.id.clone(), room.tenant.clone());
        }
        rooms.by_key.insert(
            key,
            Room {
                record: room.clone(),
                state: RoomState::default(),
            },
        );
        Ok(Creation::Done)
    }

    async fn resolve(&self, id: &str) -> Result<Option<String>, BusError> {
        Ok(self.rooms().global.get(id).cloned())
    }

    async fn room(&self, key: &str) -> Result<Option<RoomRecord>, BusError> {
        Ok(self.rooms().by_key.get(key).map(|r| r.record.clone()))
    }

    async fn rooms(&self, tenant: &str, now: u64) -> Result<Vec<RoomRecord>, BusError> {
        let mut out: Vec<RoomRecord> = self
            .rooms()
            .by_key
            .values()
            .filter(|r| r.record.tenant == tenant && r.record.expires_at > now)
            .map(|r| r.record.clone())
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out.truncate(MAX_LISTED_ROOMS);
        Ok(out)
    }

    async fn delete_room(&self, room: &RoomRecord, reason: &str) -> Result<bool, BusError> {
        let key = room.key();
        let existed = self.rooms().remove(&key).is_some();
        if existed {
            self.hub
                .close_room(&key, Some(&room_closed(reason)), close::ROOM_CLOSED, reason);
        }
        Ok(existed)
    }

    async fn members(&self, key: &str) -> Result<Vec<Member>, BusError> {
        Ok(self
            .rooms()
            .by_key
            .get(key)
            .map(|r| r.state.members.clone())
            .unwrap_or_default())
    }

    async fn join(
        &self,
        record: &RoomRecord,
        member: &Member,
        by_token: bool,
        now: u64,
    ) -> Result<JoinOutcome, BusError> {
        let key = record.key();
        let (admission, others) = {
            let mut rooms = self.rooms();
            let Some(room) = rooms.by_key.get_mut(&key) else {
                return Ok(JoinOutcome::NoRoom);
            };
            let decision = match room::admit(&room.record, &room.state, member, by_token, now) {
                Ok(d) => d,
                Err(refusal) => return Ok(JoinOutcome::Refused(refusal)),
            };
            if let Some(pair) = decision.pair {
                room.state.pair = pair;
            }
            let members = &mut room.state.members;
            members.retain(|m| m.peer_id != member.peer_id);
            let others: Vec<_> = members.iter().map(peer_info).collect();
            members.push(member.clone());
            (decision.admission, others)
        };
        Ok(JoinOutcome::Admitted {
            admission,
            peers: others,
        })
    }

    async fn announce(
        &self,
        room: &RoomRecord,
        member: &Member,
        admission: &Admission,
    ) -> Result<(), BusError> {
        let key = room.key();
        if let Admission::Replaced { previous } = admission {
            self.hub
                .close_replaced(&key, &previous.peer_id, Some(&previous.session_id));
        }
        self.hub.deliver(
            &key,
            Target::Room {
                except: Some(&member.peer_id),
            },
            &peer_joined(member),
        );
        Ok(())
    }

    async fn leave(&self, key: &str, member: &Member, reason: &str) -> Result<(), BusError> {
        let removed = match self.rooms().by_key.get_mut(key) {
            Some(r) => {
                let members = &mut r.state.members;
                let before = members.len();
                members.retain(|m| {
                    !(m.peer_id == member.peer_id && m.session_id == member.session_id)
                });
                before != members.len()
            }
            None => false,
        };
        if removed {
            self.hub.deliver(
                key,
                Target::Room {
                    except: Some(&member.peer_id),
                },
                &peer_left(member, reason),
            );
        }
        Ok(())
    }

    async fn send_to_peer(
        &self,
        key: &str,
        _from: &Member,
        to: &str,
        sid: Option<&str>,
        text: Utf8Bytes,
    ) -> Result<(), SendError> {
        SendError::from_delivery(self.hub.deliver(
            key,
            Target::Peer {
                peer: to,
                session: sid,
            },
            &text,
        ))
    }

    async fn broadcast(&self, key: &str, from: &str, text: Utf8Bytes) -> Result<(), BusError> {
        self.hub
            .deliver(key, Target::Room { except: Some(from) }, &text);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::suite;

    #[tokio::test]
    async fn suite_rooms() {
        suite::rooms(&LocalBus::new(Arc::new(Hub::new())), "t").await;
    }

    #[tokio::test]
    async fn suite_joins() {
        let hub = Arc::new(Hub::new());
        suite::joins(&LocalBus::new(hub.clone()), &hub, "t").await;
    }

    #[tokio::test]
    async fn suite_concurrent_joins() {
        suite::concurrent_joins(Arc::new(LocalBus::new(Arc::new(Hub::new()))), "t").await;
    }
}
