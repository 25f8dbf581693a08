//! `containerd-shim-corral-v2`: one process per pod sandbox, serving
//! containerd's runtime v2 task API (v3) over ttrpc and driving an OCI
//! runtime (runc by default) for every container of that pod.
//!
//! Actions, as containerd 2.x invokes a shim:
//! - `start`: find or spawn the pod's shim server, print its bootstrap;
//! - `delete`: clean up after a shim that died (exit status 137);
//! - no action, with `-socket`: serve.

use corral_proto::cri_log;
mod attach;
mod bootstrap;
mod cgroup;
mod container;
mod delete;
mod error;
mod mount;
mod publisher;
mod reaper;
mod runc;
mod serve;
mod service;
mod stdio;

use std::{
    io::Write,
    time::{SystemTime, UNIX_EPOCH},
};

use corral_proto::containerd::protobuf::{well_known_types::timestamp::Timestamp, Message};

fn main() {
    let args: Vec<_> = std::env::args_os().collect();
    let flags = match containerd_shim::parse(&args[1..]) {
        Ok(flags) => flags,
        Err(e) => fail(&e),
    };
    if flags.version {
        println!(
            "{}:\n  Version: {}\n  Runtime: {}",
            binary_name(),
            env!("CARGO_PKG_VERSION"),
            corral_proto::SHIM_RUNTIME_NAME
        );
        return;
    }
    let result = if flags.info {
        print_info()
    } else {
        match flags.action.as_str() {
            "start" => bootstrap::start(&flags),
            "delete" => delete::run(&flags),
            "" => serve::run(&flags),
            other => Err(error::Error::InvalidArgument(format!(
                "unknown action {other:?}"
            ))),
        }
    };
    if let Err(e) = result {
        fail(&e);
    }
}

fn fail(e: &dyn std::fmt::Display) -> ! {
    eprintln!("{}: {e}", binary_name());
    std::process::exit(1);
}

fn binary_name() -> &'static str {
    "containerd-shim-corral-v2"
}

/// The `-info` action: containerd asks what the runtime is before any
/// shim instance exists.
fn print_info() -> error::Result<()> {
    let info = corral_proto::containerd::types::introspection::RuntimeInfo {
        name: corral_proto::SHIM_RUNTIME_NAME.to_string(),
        version: Some(
            corral_proto::containerd::types::introspection::RuntimeVersion {
                version: env!("CARGO_PKG_VERSION").to_string(),
                ..Default::default()
            },
        )
        .into(),
        ..Default::default()
    };
    let bytes = info
        .write_to_bytes()
        .map_err(|e| error::Error::Internal(e.to_string()))?;
    std::io::stdout()
        .write_all(&bytes)
        .map_err(|e| error::Error::io("write runtime info", e))
}

/// A protobuf timestamp of a wall-clock time.
pub fn timestamp(at: SystemTime) -> Timestamp {
    let since = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    Timestamp {
        seconds: since.as_secs() as i64,
        nanos: since.subsec_nanos() as i32,
        ..Default::default()
    }
}
