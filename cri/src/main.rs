//! `corrald [--config FILE]`: the CRI runtime daemon kubelet talks to.
//!
//! This file owns the command line and logging setup; everything else is
//! the library's ([`corral_cri::daemon::run`]).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use corral_cri::config::LogLevel;
use corral_cri::Config;
use tracing_subscriber::EnvFilter;

/// corral's Kubernetes CRI runtime daemon.
#[derive(Debug, Parser)]
#[command(name = "corrald", version)]
struct Args {
    /// YAML configuration; every key is optional. Without it, the defaults
    /// serve a single node on /run/corral/corral.sock.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let config = match &args.config {
        Some(path) => Config::load(path),
        None => Ok(Config::default()),
    };
    // Before logging is set up (its level comes from the config), so the
    // error goes to stderr directly, where systemd and a terminal see it.
    let config = match config {
        Ok(config) => config,
        Err(e) => return fail(&e),
    };
    init_logging(&config);

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("corrald")
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => return fail(&e),
    };
    match runtime.block_on(corral_cri::daemon::run(Arc::new(config))) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

fn fail(error: &dyn std::fmt::Display) -> ExitCode {
    // Not through tracing: a fatal error must show whatever RUST_LOG says.
    eprintln!("corrald: {error}");
    ExitCode::FAILURE
}

/// `RUST_LOG` wins over the config's `log_level`: it is what an operator
/// reaches for while debugging, without editing the node's config.
fn init_logging(config: &Config) {
    let level = config.log_level;
    let configured = || EnvFilter::new(configured_directives(level));
    let filter = match std::env::var("RUST_LOG") {
        Ok(directives) if !directives.trim().is_empty() => EnvFilter::try_new(&directives)
            .unwrap_or_else(|e| {
                eprintln!(
                    "corrald: RUST_LOG={directives:?} is not a valid filter ({e}); using log_level {}",
                    level.as_str()
                );
                configured()
            }),
        _ => configured(),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes are noise in the journal and in log files.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

/// `log_level` is about corral's own logs: at `debug`, the HTTP/2 and gRPC
/// libraries would otherwise log every frame. They stay at `warn` (or
/// `error`, if that is what was asked); RUST_LOG can still open them up.
fn configured_directives(level: LogLevel) -> String {
    let libraries = match level {
        LogLevel::Error => "error",
        _ => "warn",
    };
    let level = level.as_str();
    format!("{libraries},corrald={level},corral_cri={level},corral_runtime={level},corral_proto={level}")
}
