//! Fixtures shared by the end-to-end tests and benchmarks.
//!
//! They drive corral's built binaries from outside, exactly as containerd and
//! kubelet would, against real runc, a real busybox rootfs, real namespaces
//! and cgroups. Nothing here is a mock.
//!
//! - [`bench`]: timing summaries the benchmarks print.
//! - [`bin`]: where the built binaries are.
//! - [`unique`]: names that never clash between tests running in parallel.
//! - [`cleanup`]: the per-test guard that removes everything a test made.
//! - [`rootfs`]: busybox root filesystems.
//! - [`bundle`]: OCI bundles (`config.json`) the way runc 1.1 reads them.
//! - [`runc`]: the raw runc CLI, the baseline a shim is compared against.
//! - [`events`]: containerd's ttrpc events service, recording what a shim publishes.
//! - [`shim`]: starting, connecting to and deleting a runtime v2 shim.
//! - [`task`]: a pod's shim driven through the task API, as a daemon drives it.
//! - [`cri`]: corrald started with a test's config, and a CRI client on its socket.
//! - [`registry`]: Debian's docker-registry on loopback, and pushing a busybox image to it.
//! - [`runtime`]: corral's runtime layer (TaskService) over real shims.
//! - [`image_builder`]: images built in memory (hostile layers included), pushed or saved.
//! - [`pod`]: a node for pod tests: corrald, a CNI bridge of its own, a registry, an image.
//! - [`streaming_client`]: SPDY/3.1 and WebSocket clients of the streaming server.

pub mod bench;
pub mod bin;
pub mod bundle;
pub mod cleanup;
pub mod cri;
pub mod error;
pub mod events;
pub mod image_builder;
pub mod kube_api;
pub mod pod;
pub mod registry;
pub mod rootfs;
pub mod runc;
pub mod runtime;
pub mod shim;
pub mod streaming_client;
pub mod task;
pub mod unique;

pub use bundle::Bundle;
pub use cleanup::Cleanup;
pub use error::{Error, Result};
pub use events::{Event, EventsSink, ReceivedEvent};
pub use rootfs::BusyboxRootfs;
pub use runc::Runc;
pub use shim::{Bootstrap, ShimCommand, ShimProcess, ShimStdin};
