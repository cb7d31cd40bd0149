//! Operator commands that talk to a running control plane's API:
//! `floe tenant …`, `floe token`, `floe ice-servers`, `floe usage`.

use std::path::PathBuf;

use floe_proto::ErrorBody;
use floe_proto::api::{
    CreateTenant, CreatedApiKey, IceServers, MintToken, MintedToken, Plan, Tenant,
    TurnCredentialsRequest, UpdateTenant,
};
use floe_proto::token::Grants;
use serde::de::DeserializeOwned;

use crate::store::UsageReport;

/// Where the control plane is and how to authenticate to it.
#[derive(Debug, Clone, clap::Args)]
pub struct Endpoint {
    /// Base URL of the control plane API.
    #[arg(
        long = "control-url",
        env = "FLOE_CONTROL_URL",
        default_value = "http://127.0.0.1:8090"
    )]
    pub url: String,
    /// Admin bearer token.
    #[arg(long, env = "FLOE_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// File holding the admin token.
    #[arg(long, env = "FLOE_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long, env = "FLOE_JSON")]
    pub json: bool,
}

/// Plan fields settable from the command line.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct PlanArgs {
    /// Allow TURN relay.
    #[arg(long, env = "FLOE_PLAN_TURN")]
    pub turn: Option<bool>,
    /// Relayed bytes per calendar month (0: no quota).
    #[arg(long, env = "FLOE_PLAN_QUOTA_BYTES")]
    pub quota_bytes: Option<u64>,
    /// Bit rate cap per allocation, bits/s (0: none).
    #[arg(long, env = "FLOE_PLAN_MAX_BITRATE_BPS")]
    pub max_bitrate_bps: Option<u64>,
    /// Concurrent TURN allocations (0: no limit).
    #[arg(long, env = "FLOE_PLAN_MAX_ALLOCATIONS")]
    pub max_allocations: Option<u32>,
    /// Concurrent rooms created with join tokens (0: no limit).
    #[arg(long, env = "FLOE_PLAN_MAX_ROOMS")]
    pub max_rooms: Option<u32>,
    /// Concurrent public rooms, created with no token (0: no limit).
    #[arg(long, env = "FLOE_PLAN_MAX_PUBLIC_ROOMS")]
    pub max_public_rooms: Option<u32>,
    /// Peers per room (0: no limit).
    #[arg(long, env = "FLOE_PLAN_MAX_PEERS_PER_ROOM")]
    pub max_peers_per_room: Option<u32>,
    /// Allow rooms without join tokens.
    #[arg(long, env = "FLOE_PLAN_PUBLIC_ROOMS")]
    pub public_rooms: Option<bool>,
    /// Longest TURN credential lifetime the tenant may ask for, seconds
    /// (0: the control plane's default).
    #[arg(long, env = "FLOE_PLAN_MAX_CREDENTIAL_TTL_SECS")]
    pub max_credential_ttl_secs: Option<u64>,
}

impl PlanArgs {
    fn apply(&self, plan: &mut Plan) {
        let nonzero64 = |v: u64| (v > 0).then_some(v);
        let nonzero32 = |v: u32| (v > 0).then_some(v);
        if let Some(v) = self.turn {
            plan.turn = v;
        }
        if let Some(v) = self.quota_bytes {
            plan.monthly_relay_bytes = nonzero64(v);
        }
        if let Some(v) = self.max_bitrate_bps {
            plan.max_bitrate_bps = nonzero64(v);
        }
        if let Some(v) = self.max_allocations {
            plan.max_allocations = nonzero32(v);
        }
        if let Some(v) = self.max_rooms {
            plan.max_rooms = nonzero32(v);
        }
        if let Some(v) = self.max_public_rooms {
            plan.max_public_rooms = nonzero32(v);
        }
        if let Some(v) = self.max_peers_per_room {
            plan.max_peers_per_room = nonzero32(v);
        }
        if let Some(v) = self.public_rooms {
            plan.public_rooms = v;
        }
        if let Some(v) = self.max_credential_ttl_secs {
            plan.max_credential_ttl_secs = nonzero64(v);
        }
    }

    fn is_empty(&self) -> bool {
        let mut probe = Plan::default();
        let before = probe.clone();
        self.apply(&mut probe);
        probe == before && self.turn.is_none() && self.public_rooms.is_none()
    }
}

/// `floe tenant …`
#[derive(Debug, Clone, clap::Subcommand)]
pub enum TenantCommand {
    /// Create a tenant (and print it).
    Create {
        /// Tenant name.
        #[arg(long)]
        name: String,
        /// Tenant id (generated when absent).
        #[arg(long)]
        id: Option<String>,
        /// Webhook URL for usage alerts.
        #[arg(long)]
        webhook_url: Option<String>,
        #[command(flatten)]
        plan: PlanArgs,
    },
    /// List tenants.
    List,
    /// Show one tenant.
    Show { id: String },
    /// Change a tenant's name, plan or webhook.
    Update {
        id: String,
        #[arg(long)]
        name: Option<String>,
        /// Webhook URL for usage alerts ("" removes it).
        #[arg(long)]
        webhook_url: Option<String>,
        #[command(flatten)]
        plan: PlanArgs,
    },
    /// Disable a tenant: no new rooms, no TURN, live allocations closed.
    Disable { id: String },
    /// Enable a disabled tenant.
    Enable { id: String },
    /// Create an API key for a tenant (the secret is shown once).
    CreateKey { id: String },
}

/// Where the control plane is and which tenant API key to use.
#[derive(Debug, Clone, clap::Args)]
pub struct KeyEndpoint {
    /// Base URL of the control plane API.
    #[arg(
        long = "control-url",
        env = "FLOE_CONTROL_URL",
        default_value = "http://127.0.0.1:8090"
    )]
    pub url: String,
    /// API key id.
    #[arg(long, env = "FLOE_KEY_ID")]
    pub key_id: String,
    /// API key secret.
    #[arg(long, env = "FLOE_KEY_SECRET", hide_env_values = true)]
    pub key_secret: String,
}

impl KeyEndpoint {
    fn post(&self, path: &str, body: &impl serde::Serialize) -> reqwest::RequestBuilder {
        reqwest::Client::new()
            .post(format!("{}{path}", self.url.trim_end_matches('/')))
            .basic_auth(&self.key_id, Some(&self.key_secret))
            .json(body)
    }
}

/// `floe token`: mint a join token with a tenant API key.
#[derive(Debug, Clone, clap::Args)]
pub struct TokenCommand {
    #[command(flatten)]
    pub endpoint: KeyEndpoint,
    /// Peer identity (`sub`).
    #[arg(long, env = "FLOE_PEER")]
    pub peer: String,
    /// Room the token is limited to (any room when absent).
    #[arg(long, env = "FLOE_ROOM")]
    pub room: Option<String>,
    /// Grant room creation.
    #[arg(long, env = "FLOE_CREATE")]
    pub create: bool,
    /// Grant joining (default when no grant is given).
    #[arg(long, env = "FLOE_JOIN")]
    pub join: bool,
    /// Lifetime, seconds.
    #[arg(long, env = "FLOE_TTL_SECS", default_value_t = 3_600)]
    pub ttl_secs: u64,
}

/// `floe ice-servers`: ICE servers with TURN credentials, as a tenant's
/// own back end gets them (`POST /v1/ice-servers`).
#[derive(Debug, Clone, clap::Args)]
pub struct IceServersCommand {
    #[command(flatten)]
    pub endpoint: KeyEndpoint,
    /// Room label the relayed bytes are metered under (default `default`).
    #[arg(long, env = "FLOE_ROOM")]
    pub room: Option<String>,
    /// Peer label, for revocations (default: a random one).
    #[arg(long, env = "FLOE_PEER")]
    pub peer: Option<String>,
    /// Credential lifetime, seconds (capped by the tenant's plan).
    #[arg(long, env = "FLOE_TTL_SECS")]
    pub ttl_secs: Option<u64>,
}

/// `floe usage`: a tenant's relayed traffic over a period.
#[derive(Debug, Clone, clap::Args)]
pub struct UsageCommand {
    #[command(flatten)]
    pub endpoint: Endpoint,
    /// Tenant id.
    #[arg(long, env = "FLOE_TENANT")]
    pub tenant: String,
    /// First day, YYYY-MM-DD (default: first of this month).
    #[arg(long, env = "FLOE_FROM")]
    pub from: Option<String>,
    /// Last day, YYYY-MM-DD (default: today).
    #[arg(long, env = "FLOE_TO")]
    pub to: Option<String>,
}

/// Why a CLI command failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("cannot reach the control plane")]
    Http(#[from] reqwest::Error),
    #[error("control plane answered {status}: {body}")]
    Api { status: u16, body: ErrorBody },
    #[error(transparent)]
    Secret(#[from] floe_common::secret::SecretError),
    #[error("an admin token is needed (--admin-token, FLOE_ADMIN_TOKEN or --admin-token-file)")]
    NoAdminToken,
    #[error("nothing to change")]
    NothingToChange,
    #[error("cannot encode output")]
    Json(#[from] serde_json::Error),
}

async fn answer<T: DeserializeOwned>(resp: reqwest::Response) -> Result<T, CliError> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp.json().await?);
    }
    let text = resp.text().await.unwrap_or_default();
    let body = serde_json::from_str(&text).unwrap_or_else(|_| {
        ErrorBody::new("http_error", text.chars().take(200).collect::<String>())
    });
    Err(CliError::Api {
        status: status.as_u16(),
        body,
    })
}

impl Endpoint {
    fn token(&self) -> Result<String, CliError> {
        floe_common::secret::load(
            "admin token",
            self.admin_token.as_deref(),
            self.admin_token_file.as_deref(),
        )?
        .ok_or(CliError::NoAdminToken)
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.url.trim_end_matches('/'))
    }
}

fn tenant_table(tenants: &[Tenant]) -> String {
    let opt = |v: Option<u64>| v.map_or_else(|| "-".to_owned(), |v| v.to_string());
    let mut out = format!(
        "{:<20} {:<24} {:<5} {:<6} {:<15} {:<8}\n",
        "ID", "NAME", "TURN", "PUBLIC", "QUOTA_BYTES", "STATUS"
    );
    for t in tenants {
        out.push_str(&format!(
            "{:<20} {:<24} {:<5} {:<6} {:<15} {:<8}\n",
            t.id,
            t.name,
            t.plan.turn,
            t.plan.public_rooms,
            opt(t.plan.monthly_relay_bytes),
            if t.disabled { "disabled" } else { "active" }
        ));
    }
    out
}

/// Runs `floe tenant …` and returns what to print.
pub async fn tenant(endpoint: &Endpoint, cmd: &TenantCommand) -> Result<String, CliError> {
    let http = reqwest::Client::new();
    let token = endpoint.token()?;
    let update = |id: &str, body: UpdateTenant| {
        http.patch(endpoint.url(&format!("/v1/tenants/{id}")))
            .bearer_auth(&token)
            .json(&body)
            .send()
    };
    let tenant: Tenant = match cmd {
        TenantCommand::Create {
            name,
            id,
            webhook_url,
            plan,
        } => {
            let mut p = Plan::default();
            plan.apply(&mut p);
            let body = CreateTenant {
                id: id.clone(),
                name: name.clone(),
                plan: p,
                webhook_url: webhook_url.clone(),
            };
            answer(
                http.post(endpoint.url("/v1/tenants"))
                    .bearer_auth(&token)
                    .json(&body)
                    .send()
                    .await?,
            )
            .await?
        }
        TenantCommand::List => {
            let tenants: Vec<Tenant> = answer(
                http.get(endpoint.url("/v1/tenants"))
                    .bearer_auth(&token)
                    .send()
                    .await?,
            )
            .await?;
            return Ok(if endpoint.json {
                pretty(&tenants)?
            } else {
                tenant_table(&tenants)
            });
        }
        TenantCommand::Show { id } => {
            answer(
                http.get(endpoint.url(&format!("/v1/tenants/{id}")))
                    .bearer_auth(&token)
                    .send()
                    .await?,
            )
            .await?
        }
        TenantCommand::Update {
            id,
            name,
            webhook_url,
            plan,
        } => {
            let new_plan = if plan.is_empty() {
                None
            } else {
                let current: Tenant = answer(
                    http.get(endpoint.url(&format!("/v1/tenants/{id}")))
                        .bearer_auth(&token)
                        .send()
                        .await?,
                )
                .await?;
                let mut p = current.plan;
                plan.apply(&mut p);
                Some(p)
            };
            if name.is_none() && webhook_url.is_none() && new_plan.is_none() {
                return Err(CliError::NothingToChange);
            }
            let body = UpdateTenant {
                name: name.clone(),
                plan: new_plan,
                disabled: None,
                webhook_url: webhook_url.clone(),
            };
            answer(update(id, body).await?).await?
        }
        TenantCommand::Disable { id } | TenantCommand::Enable { id } => {
            let body = UpdateTenant {
                disabled: Some(matches!(cmd, TenantCommand::Disable { .. })),
                ..UpdateTenant::default()
            };
            answer(update(id, body).await?).await?
        }
        TenantCommand::CreateKey { id } => {
            let key: CreatedApiKey = answer(
                http.post(endpoint.url(&format!("/v1/tenants/{id}/keys")))
                    .bearer_auth(&token)
                    .send()
                    .await?,
            )
            .await?;
            return Ok(if endpoint.json {
                pretty(&key)?
            } else {
                format!(
                    "key id:     {}\nkey secret: {}\n(the secret is shown only now)\n",
                    key.id, key.secret
                )
            });
        }
    };
    Ok(if endpoint.json {
        pretty(&tenant)?
    } else {
        tenant_table(std::slice::from_ref(&tenant))
    })
}

/// Runs `floe token` and returns the token.
pub async fn token(cmd: &TokenCommand) -> Result<String, CliError> {
    let body = MintToken {
        peer: cmd.peer.clone(),
        room: cmd.room.clone(),
        grants: Grants {
            create: cmd.create,
            join: cmd.join || !cmd.create,
        },
        ttl_secs: Some(cmd.ttl_secs),
    };
    let minted: MintedToken = answer(cmd.endpoint.post("/v1/tokens", &body).send().await?).await?;
    Ok(format!("{}\n", minted.token))
}

/// Runs `floe ice-servers` and returns the answer, as JSON that
/// `new RTCPeerConnection(…)` accepts.
pub async fn ice_servers(cmd: &IceServersCommand) -> Result<String, CliError> {
    let body = TurnCredentialsRequest {
        room: cmd.room.clone(),
        peer: cmd.peer.clone(),
        ttl_secs: cmd.ttl_secs,
    };
    let ice: IceServers = answer(cmd.endpoint.post("/v1/ice-servers", &body).send().await?).await?;
    pretty(&ice)
}

/// Runs `floe usage` and returns what to print.
pub async fn usage(cmd: &UsageCommand) -> Result<String, CliError> {
    let token = cmd.endpoint.token()?;
    let mut query = Vec::new();
    if let Some(from) = &cmd.from {
        query.push(("from", from.as_str()));
    }
    if let Some(to) = &cmd.to {
        query.push(("to", to.as_str()));
    }
    let report: UsageReport = answer(
        reqwest::Client::new()
            .get(
                cmd.endpoint
                    .url(&format!("/v1/tenants/{}/usage", cmd.tenant)),
            )
            .bearer_auth(&token)
            .query(&query)
            .send()
            .await?,
    )
    .await?;
    if cmd.endpoint.json {
        return pretty(&report);
    }
    let mut out = format!(
        "{:<12} {:>16} {:>16} {:>16}\n",
        "DAY", "BYTES_OUT", "BYTES_IN", "TOTAL_BYTES"
    );
    for (day, t) in &report.days {
        out.push_str(&format!(
            "{day:<12} {:>16} {:>16} {:>16}\n",
            t.bytes_out,
            t.bytes_in,
            t.bytes()
        ));
    }
    out.push_str(&format!(
        "{:<12} {:>16} {:>16} {:>16}\n",
        "total",
        report.total.bytes_out,
        report.total.bytes_in,
        report.total.bytes()
    ));
    if !report.rooms.is_empty() {
        out.push_str(&format!("\n{:<30} {:>16}\n", "ROOM", "TOTAL_BYTES"));
        for (room, t) in &report.rooms {
            out.push_str(&format!("{room:<30} {:>16}\n", t.bytes()));
        }
    }
    Ok(out)
}

fn pretty<T: serde::Serialize>(value: &T) -> Result<String, CliError> {
    Ok(serde_json::to_string_pretty(value)? + "\n")
}
