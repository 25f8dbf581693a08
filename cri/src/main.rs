//! `corrald [--config FILE]`: the CRI runtime daemon kubelet talks to, and
//! `corrald image import FILE` / `corrald image list`: the image store of a
//! stopped daemon, for nodes with no registry.
//!
//! This file owns the command line, logging setup and the `image`
//! subcommands' use of the store; the daemon is the library's
//! ([`corral_cri::daemon::run`]), and the store is the runtime layer's. The
//! subcommands never touch a store a running corrald holds: its metadata
//! database is locked by that daemon, and they say so instead.

use std::fs::{DirBuilder, File};
use std::io::IsTerminal;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use corral_cri::config::LogLevel;
use corral_cri::Config;
use corral_runtime::image::{Image, ImageError, ImageStore, StoreOptions};
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use tracing_subscriber::EnvFilter;

/// corral's Kubernetes CRI runtime daemon.
#[derive(Debug, Parser)]
#[command(name = "corrald", version)]
struct Args {
    /// YAML configuration; every key is optional. Without it, the defaults
    /// serve a single node on /run/corral/corral.sock.
    #[arg(long, value_name = "FILE", global = true)]
    config: Option<PathBuf>,

    /// Without a command, corrald serves CRI.
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The image store under the configured root, while corrald is stopped.
    #[command(subcommand)]
    Image(ImageCommand),
}

#[derive(Debug, Subcommand)]
enum ImageCommand {
    /// Imports the images of an OCI image layout or `docker save` tarball
    /// (plain, gzip or zstd) and prints their names and ids.
    Import {
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// Lists the images in the store.
    List,
}

/// Why an `image` subcommand failed.
#[derive(Debug, thiserror::Error)]
enum ImageCommandError {
    /// A running daemon holds the store's database lock.
    #[error("the image store at {} is in use by a running corrald; {hint}", root.display())]
    StoreInUse { root: PathBuf, hint: &'static str },

    #[error("creating {}: {source}", path.display())]
    CreateRoot {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The store's own failure; its message names the archive or image.
    #[error(transparent)]
    Image(#[from] ImageError),
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
    match args.command {
        None => serve(config),
        Some(Command::Image(command)) => image(&config, command),
    }
}

fn serve(config: Config) -> ExitCode {
    init_logging(config.log_level);
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

fn image(config: &Config, command: ImageCommand) -> ExitCode {
    // A one-shot command: its output is what it prints, so the store's
    // progress logs stay quiet unless asked for.
    init_logging(match config.log_level {
        LogLevel::Error => LogLevel::Error,
        _ => LogLevel::Warn,
    });
    // One thread: the store does its work on blocking threads anyway.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => return fail(&e),
    };
    let result = runtime.block_on(async {
        match command {
            ImageCommand::Import { file } => import(config, &file).await,
            ImageCommand::List => list(config).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

async fn import(config: &Config, file: &Path) -> Result<(), ImageCommandError> {
    let store = open_store(config, "stop it first, or import before starting it").await?;
    let images = store.import(file).await?;
    for image in &images {
        println!("imported {}", describe(image));
    }
    Ok(())
}

async fn list(config: &Config) -> Result<(), ImageCommandError> {
    let store = open_store(config, "stop it first, or list with `crictl images`").await?;
    let images = store.list(None).await?;
    // One row per name, as crictl lists them; a nameless image once.
    let rows: Vec<(&str, &Image)> = images
        .iter()
        .flat_map(|image| {
            let mut names = names(image);
            if names.is_empty() {
                names.push("<none>");
            }
            names.into_iter().map(move |name| (name, image))
        })
        .collect();
    let width = rows
        .iter()
        .map(|(name, _)| name.len())
        .chain([5])
        .max()
        .unwrap_or(5);
    println!("{:<width$}  {:<71}  SIZE", "IMAGE", "ID");
    for (name, image) in rows {
        println!(
            "{name:<width$}  {:<71}  {}",
            image.id,
            human_size(image.size)
        );
    }
    Ok(())
}

/// Opens the store at the configured root, the daemon's own directories
/// created as the daemon would create them. `hint` says what to do when a
/// running daemon holds it.
async fn open_store(config: &Config, hint: &'static str) -> Result<ImageStore, ImageCommandError> {
    DirBuilder::new()
        .recursive(true)
        .mode(corral_cri::daemon::DIR_MODE)
        .create(&config.root)
        .map_err(|source| ImageCommandError::CreateRoot {
            path: config.root.clone(),
            source,
        })?;
    let root = config.images_dir();
    let mut options = StoreOptions::new(&root);
    options.registry = config.registry_config();
    match ImageStore::open(options).await {
        Ok(store) => Ok(store),
        // The store reports a held lock as an internal database error; the
        // lock itself is the reliable sign of a daemon that owns the store.
        Err(e) if database_locked(&root.join("meta.db")) => {
            tracing::debug!(error = %e, "image store is locked");
            Err(ImageCommandError::StoreInUse { root, hint })
        }
        Err(e) => Err(e.into()),
    }
}

/// Whether another process holds the lock the store's database (redb) takes
/// with `flock` for as long as it is open.
fn database_locked(path: &Path) -> bool {
    let Ok(file) = File::open(path) else {
        return false;
    };
    // Dropping the lock at once: the probe must not keep the store from
    // its owner.
    matches!(
        Flock::lock(file, FlockArg::LockExclusiveNonblock),
        Err((_, Errno::EWOULDBLOCK))
    )
}

/// `NAME, NAME (ID)`, or the id alone for an image without names (an OCI
/// layout entry without a reference annotation).
fn describe(image: &Image) -> String {
    let names = names(image);
    if names.is_empty() {
        return format!("{} (no name; use its id)", image.id);
    }
    format!("{} ({})", names.join(", "), image.id)
}

/// Tags, then digests.
fn names(image: &Image) -> Vec<&str> {
    image
        .repo_tags
        .iter()
        .chain(&image.repo_digests)
        .map(String::as_str)
        .collect()
}

/// Bytes in the decimal units crictl prints.
fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit + 1 < UNITS.len() {
        value /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes}B")
    } else {
        format!("{value:.3}{}", UNITS[unit])
    }
}

fn fail(error: &dyn std::fmt::Display) -> ExitCode {
    // Not through tracing: a fatal error must show whatever RUST_LOG says.
    eprintln!("corrald: {error}");
    ExitCode::FAILURE
}

/// `RUST_LOG` wins over the config's `log_level`: it is what an operator
/// reaches for while debugging, without editing the node's config.
fn init_logging(level: LogLevel) {
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
