//! corral's CRI front end and the `corrald` daemon (issue 5).
//!
//! kubelet and crictl speak CRI v1 to corrald over a unix socket; this crate
//! translates that into plain calls on `corral-runtime`. A CRI field is
//! translated here, once: the layers below never see a CRI type.
//!
//! - [`config`]: the YAML configuration, its defaults and validation.
//! - [`daemon`]: directories, the socket, serving, graceful stop.
//! - [`runtime_service`]: CRI `RuntimeService`.
//! - [`image_service`]: CRI `ImageService`.
//! - [`cni`]: the CNI network configuration pods join.
//! - [`error`]: the daemon's errors and the only mapping to gRPC statuses.

pub mod cni;
pub mod config;
pub mod container;
pub mod container_io;
pub mod daemon;
pub mod deadline;
pub mod error;
pub mod image_service;
pub mod lifecycle;
pub mod metrics;
pub mod netns;
pub mod node;
pub mod pause;
pub mod runtime_service;
pub mod sandbox;
pub mod sandbox_files;
pub mod seccomp;
pub mod spec;
pub mod stats;
pub mod store;
pub mod streaming;

pub use config::Config;
pub use error::{Error, Result};

/// `runtime_name` in `Version`: what `crictl version` and the node's
/// `containerRuntimeVersion` (`corral://0.1.0`) show.
pub const RUNTIME_NAME: &str = "corral";

/// corral's own version, semver as CRI requires.
pub const RUNTIME_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The CRI API version served.
pub const RUNTIME_API_VERSION: &str = "v1";

/// `version` in `Version`: the kubelet runtime API version, a constant
/// "0.1.0" in every CRI runtime since the field's introduction.
pub const KUBE_RUNTIME_API_VERSION: &str = "0.1.0";
