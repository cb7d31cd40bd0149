//! The in-process bus: rooms and membership in a map, delivery straight
//! into the local hub. For `floe dev` and single-node deployments.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use axum::extract::ws::Utf8Bytes;

use super::{
    Bus, BusError, Creation, JoinOutcome, REPLACED_REASON, SendError, peer_info, peer_joined,
    peer_left, room_closed,
};
use crate::hub::{Hub, Target, close};
use crate::room::{self, Admission, Member, RoomRecord};

struct Room {
    record: RoomRecord,
    sealed: bool,
    members: Vec<Member>,
}

/// The in-process [`Bus`].
pub(crate) struct LocalBus {
    hub: Arc<Hub>,
    rooms: Mutex<HashMap<String, Room>>,
}

impl LocalBus {
    pub fn new(hub: Arc<Hub>) -> Self {
        Self {
            hub,
            rooms: Mutex::new(HashMap::new()),
        }
    }

    fn rooms(&self) -> std::sync::MutexGuard<'_, HashMap<String, Room>> {
        self.rooms.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait]
impl Bus for LocalBus {
    async fn create_room(
        &self,
        room: &RoomRecord,
        max_rooms: Option<u32>,
        now: u64,
    ) -> Result<Creation, BusError> {
        let mut rooms = self.rooms();
        rooms.retain(|_, r| r.record.expires_at > now);
        if rooms.contains_key(&room.id) {
            return Ok(Creation::Exists);
        }
        if let Some(max) = max_rooms {
            let live = rooms
                .values()
                .filter(|r| r.record.tenant == room.tenant)
                .count();
            if live >= max as usize {
                return Ok(Creation::TenantFull);
            }
        }
        rooms.insert(
            room.id.clone(),
            Room {
                record: room.clone(),
                sealed: false,
                members: Vec::new(),
            },
        );
        Ok(Creation::Done)
    }

    async fn room(&self, id: &str) -> Result<Option<RoomRecord>, BusError> {
        Ok(self.rooms().get(id).map(|r| r.record.clone()))
    }

    async fn delete_room(&self, id: &str, reason: &str) -> Result<bool, BusError> {
        let existed = self.rooms().remove(id).is_some();
        if existed {
            self.hub
                .close_room(id, Some(&room_closed(reason)), close::ROOM_CLOSED, reason);
        }
        Ok(existed)
    }

    async fn members(&self, id: &str) -> Result<Vec<Member>, BusError> {
        Ok(self
            .rooms()
            .get(id)
            .map(|r| r.members.clone())
            .unwrap_or_default())
    }

    async fn join(
        &self,
        record: &RoomRecord,
        member: &Member,
        now: u64,
    ) -> Result<JoinOutcome, BusError> {
        let (admission, others) = {
            let mut rooms = self.rooms();
            let Some(room) = rooms.get_mut(&record.id) else {
                return Ok(JoinOutcome::NoRoom);
            };
            let (admission, seal) =
                match room::admit(&room.record, &room.members, room.sealed, member, now) {
                    Ok(v) => v,
                    Err(refusal) => return Ok(JoinOutcome::Refused(refusal)),
                };
            room.sealed = seal;
            room.members.retain(|m| m.peer_id != member.peer_id);
            let others: Vec<_> = room.members.iter().map(peer_info).collect();
            room.members.push(member.clone());
            (admission, others)
        };
        if let Admission::Replaced { previous } = &admission {
            self.hub.close_peer(
                &record.id,
                &previous.peer_id,
                Some(&previous.session_id),
                close::REPLACED,
                REPLACED_REASON,
            );
        }
        self.hub.deliver(
            &record.id,
            Target::Room {
                except: Some(&member.peer_id),
            },
            &peer_joined(member),
        );
        Ok(JoinOutcome::Admitted {
            admission,
            peers: others,
        })
    }

    async fn leave(&self, room: &str, member: &Member, reason: &str) -> Result<(), BusError> {
        let removed = {
            let mut rooms = self.rooms();
            match rooms.get_mut(room) {
                Some(r) => {
                    let before = r.members.len();
                    r.members.retain(|m| {
                        !(m.peer_id == member.peer_id && m.session_id == member.session_id)
                    });
                    before != r.members.len()
                }
                None => false,
            }
        };
        if removed {
            self.hub.deliver(
                room,
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
        room: &str,
        _from: &Member,
        to: &str,
        sid: Option<&str>,
        text: Utf8Bytes,
    ) -> Result<(), SendError> {
        SendError::from_delivery(self.hub.deliver(
            room,
            Target::Peer {
                peer: to,
                session: sid,
            },
            &text,
        ))
    }

    async fn broadcast(&self, room: &str, from: &str, text: Utf8Bytes) -> Result<(), BusError> {
        self.hub
            .deliver(room, Target::Room { except: Some(from) }, &text);
        Ok(())
    }
}
