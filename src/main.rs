//! The `floe` binary: parses the command line and hands off to the
//! component crates. Nothing else lives here but `floe dev`'s wiring.

mod dev;

use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use floe_common::telemetry::{self, LogFormat};

/// ICE infrastructure for WebRTC products: signaling, STUN, metered TURN,
/// control plane and load tester in one binary.
#[derive(Debug, Parser)]
#[command(name = "floe", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,

    /// Log format.
    #[arg(long, env = "FLOE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,

    /// Validate the configuration (flags, env, secret files) and exit
    /// without starting anything.
    #[arg(long, env = "FLOE_CHECK_CONFIG", global = true)]
    check_config: bool,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run every component in one process on embedded defaults (no Redis,
    /// no external service) and print what to open.
    Dev(dev::DevConfig),
    /// Run a signaling node (HTTP + WebSocket API).
    Signal(floe_signal::Config),
    /// Run the STUN/TURN server.
    Turn(floe_turn::Config),
    /// Run the control plane (tenants, keys, credentials, usage ledger).
    ControlPlane(floe_control::Config),
    /// Drive a deployment with simulated load and report what it measured.
    Loadtest(floe_loadtest::Config),
    /// Manage tenants through the control plane's admin API.
    Tenant {
        #[command(flatten)]
        endpoint: floe_control::cli::Endpoint,
        #[command(subcommand)]
        command: floe_control::cli::TenantCommand,
    },
    /// Mint a join token with a tenant API key.
    Token(floe_control::cli::TokenCommand),
    /// Show a tenant's relayed traffic over a period.
    Usage(floe_control::cli::UsageCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init(cli.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let check = cli.check_config;
    let ok = || {
        println!("configuration OK");
        Ok(())
    };
    match cli.command {
        Command::Dev(config) => {
            if check {
                config.validate()?;
                return ok();
            }
            dev::run(config, floe_common::shutdown::on_signals()).await
        }
        Command::Signal(config) => {
            if check {
                config.resolve().context("signal configuration")?;
                return ok();
            }
            floe_signal::run(config, floe_common::shutdown::on_signals())
                .await
                .context("signal")
        }
        Command::Turn(config) => {
            if check {
                config.resolve().context("TURN configuration")?;
                return ok();
            }
            floe_turn::run(config, floe_common::shutdown::on_signals())
                .await
                .context("TURN")
        }
        Command::ControlPlane(config) => {
            if check {
                config.resolve().context("control-plane configuration")?;
                return ok();
            }
            floe_control::run(config, floe_common::shutdown::on_signals())
                .await
                .context("control plane")
        }
        Command::Loadtest(config) => {
            if check {
                return ok();
            }
            print!("{}", floe_loadtest::run(config).await?);
            Ok(())
        }
        Command::Tenant { endpoint, command } => {
            print!("{}", floe_control::cli::tenant(&endpoint, &command).await?);
            Ok(())
        }
        Command::Token(command) => {
            print!("{}", floe_control::cli::token(&command).await?);
            Ok(())
        }
        Command::Usage(command) => {
            print!("{}", floe_control::cli::usage(&command).await?);
            Ok(())
        }
    }
}
