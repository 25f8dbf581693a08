//! The layer between the CRI front end and the shims.
//!
//! It knows tasks, shims, bundles (and, later, images and snapshots); it
//! does not know pods. `cri/` calls it with plain Rust calls.
//!
//! - [`task_service::TaskService`]: the task API the daemon uses.
//! - [`shim_manager::ShimManager`]: starts shims as containerd 2.x does,
//!   connects to them, re-attaches after a restart.
//! - [`bundle::Bundle`]: a task's directories on disk.
//! - [`events::EventExchange`]: the ttrpc events service shims publish to.
//! - [`task_client::TaskClient`]: the task API over ttrpc, v2 or v3.
//! - [`handlers::RuntimeHandler`]: how a RuntimeClass handler runs its pods.

pub mod attach;
pub mod bundle;
pub mod error;
pub mod events;
pub mod handlers;
pub mod id;
pub mod image;
pub mod shim_manager;
pub mod task_client;
pub mod task_service;

pub use error::{Error, Result};
