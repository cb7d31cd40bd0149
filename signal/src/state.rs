//! The node's shared state ([`App`]) and the checks both edges use: who a
//! caller is (join token, API key, owner key), which room an id names for
//! that caller, and what a room looks like to them. [`crate::api`] and
//! [`crate::ws`] build on this module and not on each other.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use axum::http::{HeaderMap, header};
use floe_common::Shutdown;
use floe_common::http::{basic, bearer};
use floe_common::ratelimit::RateLimiter;
use floe_proto::api::Tenant;
use floe_proto::signal::RoomInfo;
use floe_proto::time::unix_now;
use floe_proto::token::{self, JoinClaims};

use crate::bus::Bus;
use crate::config::Settings;
use crate::control::Control;
use crate::error::SignalError;
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::room::{RoomRecord, room_key};

type Result<T> = std::result::Result<T, SignalError>;

/// Shared state of every handler and connection.
pub(crate) struct App {
    pub settings: Settings,
    pub bus: Arc<dyn Bus>,
    pub hub: Arc<Hub>,
    pub control: Control,
    /// Mints ICE servers for joining peers.
    pub ice: crate::ice::Ice,
    pub metrics: Arc<Metrics>,
    /// Fires when the node starts draining.
    pub draining: Shutdown,
    pub create_limiter: Mutex<RateLimiter<IpAddr>>,
}

/// A verified join token and the tenant its key belongs to.
pub(crate) struct TokenHolder {
    pub claims: JoinClaims,
    pub tenant: String,
}

/// Who is calling the REST API, from its `Authorization` header.
pub(crate) enum Caller {
    /// No credentials.
    Anonymous,
    /// A valid join token.
    Token(TokenHolder),
    /// A live API key of `tenant` (HTTP Basic `key_id:secret`).
    ApiKey { tenant: String },
    /// A bearer that is not a join token: perhaps a room's owner key.
    OwnerKey(String),
}

impl Caller {
    /// The tenant the credentials belong to, if they name one.
    pub fn tenant(&self) -> Option<&str> {
        match self {
            Self::Token(h) => Some(&h.tenant),
            Self::ApiKey { tenant } => Some(tenant),
            Self::Anonymous | Self::OwnerKey(_) => None,
        }
    }

    /// Whether the caller may see who is in `room` and delete it: its
    /// owner key, a join token of its creator, or an API key of its tenant.
    pub fn owns(&self, room: &RoomRecord) -> bool {
        match self {
            Self::Anonymous => false,
            Self::OwnerKey(k) => room.owner.verify(k),
            Self::Token(h) => {
                h.tenant == room.tenant && room.creator.as_deref() == Some(h.claims.sub.as_str())
            }
            Self::ApiKey { tenant } => *tenant == room.tenant,
        }
    }
}

impl App {
    pub fn refuse(&self, e: SignalError) -> SignalError {
        self.metrics.refusals.with_label_values(&[e.code()]).inc();
        e
    }

    /// Verifies a join token with its API key (fetched from the control
    /// plane and cached).
    pub async fn verify_token(&self, token: &str) -> Result<TokenHolder> {
        let kid = token::key_id(token)?;
        let key = self
            .control
            .key(&kid)
            .await?
            .ok_or_else(|| SignalError::InvalidToken("unknown or revoked API key".into()))?;
        if key.tenant_disabled {
            return Err(SignalError::TenantDisabled);
        }
        let claims = token::verify(token, key.secret.as_bytes(), unix_now())?;
        Ok(TokenHolder {
            claims,
            tenant: key.tenant,
        })
    }

    /// ICE servers for `peer` in `record`'s room, minted here (see
    /// [`crate::ice`]); counted by outcome.
    pub async fn ice_servers(
        &self,
        record: &RoomRecord,
        peer: &str,
    ) -> Result<floe_proto::api::IceServers> {
        let tenant = self.tenant(&record.tenant).await?;
        let ice = self
            .ice
            .servers(&self.control, &tenant, &record.id, peer, unix_now())
            .await?;
        let outcome = ice.turn_refused.as_deref().unwrap_or("issued");
        self.metrics
            .turn_credentials
            .with_label_values(&[outcome])
            .inc();
        Ok(ice)
    }

    /// The tenant `id`, enabled.
    pub async fn tenant(&self, id: &str) -> Result<Tenant> {
        let t = self
            .control
            .tenant(id)
            .await?
            .ok_or_else(|| SignalError::UnknownTenant(id.to_owned()))?;
        if t.disabled {
            return Err(SignalError::TenantDisabled);
        }
        Ok(t)
    }

    /// Who the request's credentials say the caller is. Credentials that
    /// are present but wrong are an error, never taken as anonymous.
    pub async fn caller(&self, headers: &HeaderMap) -> Result<Caller> {
        if let Some(b) = bearer(headers) {
            if token::key_id(b).is_err() {
                return Ok(Caller::OwnerKey(b.to_owned()));
            }
            return Ok(Caller::Token(self.verify_token(b).await?));
        }
        if headers.contains_key(header::AUTHORIZATION) {
            let (kid, secret) = basic(headers).ok_or(SignalError::Unauthorized)?;
            if floe_proto::id::validate("key id", &kid).is_err() {
                return Err(SignalError::Unauthorized);
            }
            let key = self
                .control
                .key(&kid)
                .await?
                .filter(|k| floe_common::http::secret_eq(&secret, &k.secret))
                .ok_or(SignalError::Unauthorized)?;
            if key.tenant_disabled {
                return Err(SignalError::TenantDisabled);
            }
            return Ok(Caller::ApiKey { tenant: key.tenant });
        }
        Ok(Caller::Anonymous)
    }

    /// The live room `id` as `tenant` names it; without a tenant, only a
    /// server-chosen (global) id is found.
    pub async fn find_room(&self, id: &str, tenant: Option<&str>) -> Result<RoomRecord> {
        if floe_proto::id::validate("room", id).is_err() {
            return Err(SignalError::RoomNotFound);
        }
        let tenant = match tenant {
            Some(t) => t.to_owned(),
            None => self
                .bus
                .resolve(id)
                .await?
                .ok_or(SignalError::RoomNotFound)?,
        };
        match self.bus.room(&room_key(&tenant, id)).await? {
            Some(r) if r.expires_at > unix_now() => Ok(r),
            _ => Err(SignalError::RoomNotFound),
        }
    }

    /// Whether a browser `Origin` may use the API.
    pub fn origin_allowed(&self, headers: &HeaderMap) -> bool {
        if self.settings.allowed_origins.is_empty() {
            return true;
        }
        match headers.get(header::ORIGIN).and_then(|o| o.to_str().ok()) {
            // Non-browser clients send no Origin.
            None => true,
            Some(origin) => self.settings.allowed_origins.iter().any(|a| a == origin),
        }
    }

    /// The room as the REST API shows it; peer ids only to `with_peers`
    /// callers (those who [own](Caller::owns) it).
    pub async fn room_info(&self, record: &RoomRecord, with_peers: bool) -> Result<RoomInfo> {
        let mut peers: Vec<String> = self
            .bus
            .members(&record.key())
            .await?
            .into_iter()
            .map(|m| m.peer_id)
            .collect();
        peers.sort();
        Ok(RoomInfo {
            room_id: record.id.clone(),
            tenant: record.tenant.clone(),
            expires_at: record.expires_at,
            max_peers: record.max_peers,
            one_time: record.one_time,
            public: record.public,
            has_password: record.password.is_some(),
            peer_count: peers.len(),
            peers: with_peers.then_some(peers),
        })
    }
}
