//! Wire types shared by corral's crates, each defined once.
//!
//! - containerd's runtime v2 protos (task API v3, events, bootstrap, cgroup
//!   metrics) re-exported from `containerd-shim-protos`;
//! - corral's own ttrpc services, generated from `protos/`.
//!
//! This crate holds no logic: a type used by two crates lives here, the code
//! that fills it lives in the crate that owns the concept.

pub use containerd_shim_protos as containerd;
pub use containerd_shim_protos::{protobuf, ttrpc};

/// The framing of the attach socket through which corrald reaches a
/// container's stdio in corral's shim.
pub mod attach;

/// The kubelet CRI log format and file, written by corral's shim and, for
/// other shims' containers, by corrald.
pub mod cri_log;

/// corral's own shim services (`corral.shim.v1`).
pub mod shim {
    /// Messages of `corral.shim.v1.Log`.
    pub mod log {
        #![allow(clippy::all, unused_mut, missing_docs, non_upper_case_globals)]
        include!(concat!(env!("OUT_DIR"), "/corral/log.rs"));
    }

    /// The ttrpc `corral.shim.v1.Log` service: server trait, client, registration.
    pub mod log_ttrpc {
        #![allow(clippy::all, unused_imports, missing_docs)]
        include!(concat!(env!("OUT_DIR"), "/corral/log_ttrpc.rs"));
    }
}

/// Runtime name under which containerd and corrald know corral's shim.
pub const SHIM_RUNTIME_NAME: &str = "io.containerd.corral.v2";

/// URI scheme of stdout/stderr that asks corral's shim to write the kubelet
/// CRI log format itself: `cri-log:///var/log/pods/<pod>/<ctr>/0.log`.
pub const CRI_LOG_SCHEME: &str = "cri-log";
