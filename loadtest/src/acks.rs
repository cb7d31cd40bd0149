//! Usage acks: posts usage batches to the control plane the way a TURN
//! server does, one after another, and times each acknowledgement. With
//! `--tenants N` it first creates N tenants (admin token), so the cost of
//! an ack can be measured against the size of the tenant table.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use floe_proto::usage::{UsageAck, UsageBatch, UsageRecord};
use serde::Serialize;

use crate::stats::{Samples, Summary};

/// Flags of `floe loadtest usage-acks`.
#[derive(Debug, Clone, clap::Args)]
pub struct AckArgs {
    /// Control plane base URL.
    #[arg(
        long,
        env = "FLOE_CONTROL_URL",
        default_value = "http://127.0.0.1:8081"
    )]
    pub control_url: String,
    /// Internal token (the one TURN servers present).
    #[arg(long, env = "FLOE_INTERNAL_TOKEN")]
    pub internal_token: String,
    /// Admin token, to create the tenants.
    #[arg(long, env = "FLOE_ADMIN_TOKEN")]
    pub admin_token: String,
    /// Tenants to create before timing (ids `ack-<run>-<n>`); 0 creates none.
    #[arg(long, default_value_t = 10_000)]
    pub tenants: usize,
    /// Usage batches to post, one after another.
    #[arg(long, default_value_t = 500)]
    pub batches: u64,
    /// Records per batch (each for a different tenant).
    #[arg(long, default_value_t = 20)]
    pub records: usize,
    /// Tenant-creation requests in flight at once.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
}

/// What a usage-ack run measured.
#[derive(Debug, Clone, Serialize)]
pub struct AckReport {
    pub tenants: usize,
    pub tenants_created_seconds: f64,
    pub batches: u64,
    pub failed: u64,
    /// Post to ack, milliseconds.
    pub ack_ms: Option<Summary>,
    pub acks_per_sec: f64,
    /// Tenants the last ack listed as cut off.
    pub cut_off: usize,
}

/// Why a run could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot create tenants: {0}")]
pub struct SetupError(String);

async fn create_tenants(
    http: &reqwest::Client,
    args: &AckArgs,
    run: &str,
) -> Result<Vec<String>, SetupError> {
    let ids: Vec<String> = (0..args.tenants)
        .map(|n| format!("ack-{run}-{n}"))
        .collect();
    let pb = crate::progress_bar(ids.len() as u64, "tenants", "{per_sec}");
    let next = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for _ in 0..args.concurrency.max(1) {
        let (http, next, ids, pb) = (http.clone(), next.clone(), ids.clone(), pb.clone());
        let url = format!("{}/v1/tenants", args.control_url.trim_end_matches('/'));
        let admin = args.admin_token.clone();
        workers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                let Some(id) = ids.get(i) else {
                    return Ok(());
                };
                // Every tenth tenant has a small quota, so acks carry cut-offs.
                let quota = i.is_multiple_of(10).then_some(1_000_u64);
                let body = serde_json::json!({"id": id, "name": id,
                    "plan": {"turn": true, "monthly_relay_bytes": quota}});
                let resp = http
                    .post(&url)
                    .bearer_auth(&admin)
                    .json(&body)
                    .send()
                    .await
                    .map_err(|e| SetupError(e.to_string()))?;
                if !resp.status().is_success() {
                    return Err(SetupError(format!("{id}: answered {}", resp.status())));
                }
                pb.inc(1);
            }
        }));
    }
    for w in workers {
        w.await.map_err(|e| SetupError(e.to_string()))??;
    }
    pb.finish_and_clear();
    Ok(ids)
}

/// Runs the scenario.
pub async fn run(args: AckArgs) -> Result<AckReport, SetupError> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(|e| SetupError(e.to_string()))?;
    let run = floe_common::secret::random_token(4).to_lowercase();
    let started = Instant::now();
    let tenants = create_tenants(&http, &args, &run).await?;
    let tenants_created_seconds = started.elapsed().as_secs_f64();
    let url = format!(
        "{}/internal/v1/usage",
        args.control_url.trim_end_matches('/')
    );
    let server_id = format!("ack-bench-{run}");
    let mut samples = Samples::default();
    let (mut failed, mut cut_off) = (0, 0);
    let pb = crate::progress_bar(args.batches, "acks", "{per_sec}");
    let timed = Instant::now();
    for seq in 1..=args.batches {
        let records = (0..args.records)
            .map(|r| UsageRecord {
                tenant: tenants
                    .get((seq as usize * args.records + r) % tenants.len().max(1))
                    .cloned()
                    .unwrap_or_else(|| "ack-none".into()),
                room: "bench".into(),
                bytes_out: 600,
                bytes_in: 600,
                packets_out: 1,
                packets_in: 1,
            })
            .collect();
        let batch = UsageBatch {
            server_id: server_id.clone(),
            seq,
            at: floe_proto::time::unix_now(),
            records,
        };
        let t = Instant::now();
        let acked = match http
            .post(&url)
            .bearer_auth(&args.internal_token)
            .json(&batch)
            .send()
            .await
        {
            Ok(r) if r.status().is_success() => r.json::<UsageAck>().await.ok(),
            _ => None,
        };
        match acked {
            Some(ack) => {
                samples.record_ms(t.elapsed());
                cut_off = ack.enforcement.cut_off.len();
            }
            None => failed += 1,
        }
        pb.inc(1);
    }
    pb.finish_and_clear();
    Ok(AckReport {
        tenants: tenants.len(),
        tenants_created_seconds,
        batches: args.batches,
        failed,
        ack_ms: samples.summary(),
        acks_per_sec: samples.len() as f64 / timed.elapsed().as_secs_f64().max(1e-9),
        cut_off,
    })
}

/// The human summary of a report.
pub fn render(r: &AckReport) -> String {
    format!(
        "usage acks with {} tenants (created in {:.1} s)\n  {} batches, {} failed, {:.0} acks/s\n  ack latency {}\n  last ack listed {} cut-off tenants\n",
        r.tenants,
        r.tenants_created_seconds,
        r.batches,
        r.failed,
        r.acks_per_sec,
        Summary::line_of(r.ack_ms, 2),
        r.cut_off,
    )
}
