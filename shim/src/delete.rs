//! The `delete` action: containerd runs it when a shim died without
//! cleaning up. Removes the container from the runtime, unmounts its
//! rootfs, and reports it killed (137) now.

use std::{fs, io::Write, time::SystemTime};

use containerd_shim::Flags;
use corral_proto::containerd::{api::DeleteResponse, protobuf::Message};

use crate::{
    error::{Error, Result},
    reaper::{self, Reaper},
    service::{unmount_rootfs, RuntimeOptions},
    timestamp,
};

pub fn run(flags: &Flags) -> Result<()> {
    if flags.id.is_empty() || flags.namespace.is_empty() {
        return Err(Error::InvalidArgument(
            "delete needs -namespace and -id".into(),
        ));
    }
    let bundle = if flags.bundle.is_empty() {
        std::env::current_dir().map_err(|e| Error::io("current directory", e))?
    } else {
        crate::error::absolute(&flags.bundle, "bundle")?
    };
    reaper::block_signals().map_err(|e| Error::io("block signals", e.into()))?;
    let reaper = Reaper::start().map_err(|e| Error::io("start the reaper", e))?;

    let options = RuntimeOptions::load(&bundle)?;
    match options.runtime(&flags.namespace) {
        Ok(runc) => {
            if let Err(e) = runc.delete(&reaper, &flags.id, true) {
                log::warn!("delete {}: {e}", flags.id);
            }
        }
        Err(e) => log::warn!("delete {}: {e}", flags.id),
    }
    unmount_rootfs(&bundle);
    let pid = fs::read_to_string(bundle.join("init.pid"))
        .ok()
        .and_then(|t| t.trim().parse::<u32>().ok())
        .unwrap_or(0);

    let response = DeleteResponse {
        pid,
        exit_status: 128 + libc::SIGKILL as u32,
        exited_at: Some(timestamp(SystemTime::now())).into(),
        ..Default::default()
    };
    let bytes = response
        .write_to_bytes()
        .map_err(|e| Error::Internal(e.to_string()))?;
    std::io::stdout()
        .write_all(&bytes)
        .map_err(|e| Error::io("write the delete response", e))
}
