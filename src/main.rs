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
    /// Learn this host's NAT mapping and filtering behaviour from a STUN
    /// server with NAT behaviour discovery (RFC 5780; floe's with --alt-ip).
    StunProbe(floe_turn::probe::ProbeConfig),
    /// Ready TURN's data folder on a volume owned by root (a hostPath),
    /// from an init container: create it, mode 0700, owned by --owner.
    TurnDataDir(floe_turn::data_dir::DataDirConfig),
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
    /// Get ICE servers with fresh TURN credentials with a tenant API key,
    /// as a back end with its own signaling does.
    IceServers(floe_control::cli::IceServersCommand),
    /// Show a tenant's relayed traffic over a period.
    Usage(floe_control::cli::UsageCommand),
}

/// The command line, with an environment variable for every flag: flags
/// that name none read one after their command path, such as
/// `floe loadtest signal --peers` ↔ `FLOE_LOADTEST_SIGNAL_PEERS`.
fn command() -> clap::Command {
    use clap::CommandFactory;
    env_for_every_flag(Cli::command(), "FLOE")
}

fn env_for_every_flag(mut cmd: clap::Command, prefix: &str) -> clap::Command {
    let upper = |s: &str| s.to_uppercase().replace('-', "_");
    let missing: Vec<(String, String)> = cmd
        .get_arguments()
        .filter(|a| a.get_env().is_none() && !matches!(a.get_id().as_str(), "help" | "version"))
        .filter_map(|a| {
            Some((
                a.get_id().to_string(),
                format!("{prefix}_{}", upper(a.get_long()?)),
            ))
        })
        .collect();
    for (id, env) in missing {
        cmd = cmd.mut_arg(id, |a| a.env(env));
    }
    let subcommands: Vec<String> = cmd
        .get_subcommands()
        .map(|s| s.get_name().to_owned())
        .collect();
    for name in subcommands {
        let sub_prefix = format!("{prefix}_{}", upper(&name));
        cmd = cmd.mut_subcommand(name, |s| env_for_every_flag(s, &sub_prefix));
    }
    cmd
}

fn main() -> ExitCode {
    use clap::FromArgMatches;
    let cli = match Cli::from_arg_matches(&command().get_matches()) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
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
        Command::StunProbe(config) => {
            if check {
                return ok();
            }
            let found = floe_turn::probe::probe(&config).await?;
            if config.json {
                println!("{}", serde_json::to_string_pretty(&found)?);
            } else {
                print!("{found}");
            }
            Ok(())
        }
        Command::TurnDataDir(config) => {
            if check {
                return ok();
            }
            print!("{}", floe_turn::data_dir::prepare(&config)?);
            Ok(())
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
        Command::IceServers(command) => {
            print!("{}", floe_control::cli::ice_servers(&command).await?);
            Ok(())
        }
        Command::Usage(command) => {
            print!("{}", floe_control::cli::usage(&command).await?);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Flags (named arguments) of `cmd` and its subcommands that read no
    /// environment variable, as `path --flag`.
    fn flags_without_env(cmd: &clap::Command, path: &str, out: &mut Vec<String>) {
        for arg in cmd.get_arguments() {
            let builtin = matches!(arg.get_id().as_str(), "help" | "version");
            if arg.get_long().is_some() && arg.get_env().is_none() && !builtin {
                out.push(format!("{path} --{}", arg.get_long().unwrap_or_default()));
            }
        }
        for sub in cmd.get_subcommands() {
            flags_without_env(sub, &format!("{path} {}", sub.get_name()), out);
        }
    }

    #[test]
    fn every_flag_reads_an_environment_variable() {
        // The README promises it; this keeps new flags honest.
        let mut missing = Vec::new();
        flags_without_env(&command(), "floe", &mut missing);
        assert!(missing.is_empty(), "flags without env: {missing:#?}");
    }

    #[test]
    fn unnamed_flags_read_their_command_path() {
        let m = command()
            .try_get_matches_from(["floe", "loadtest", "signal"])
            .expect("parses");
        let (_, lt) = m.subcommand().expect("loadtest");
        let (_, signal) = lt.subcommand().expect("signal");
        assert_eq!(signal.get_one::<usize>("peers"), Some(&1_000));
        let cmd = command();
        let lt = cmd.find_subcommand("loadtest").expect("loadtest");
        let peers = lt
            .find_subcommand("signal")
            .and_then(|s| s.get_arguments().find(|a| a.get_id() == "peers"))
            .expect("--peers");
        assert_eq!(
            peers.get_env().and_then(|e| e.to_str()),
            Some("FLOE_LOADTEST_SIGNAL_PEERS")
        );
        // Flags that name their own variable keep it.
        let token = cmd.find_subcommand("token").expect("token");
        let peer = token
            .get_arguments()
            .find(|a| a.get_id() == "peer")
            .expect("--peer");
        assert_eq!(peer.get_env().and_then(|e| e.to_str()), Some("FLOE_PEER"));
    }
}
