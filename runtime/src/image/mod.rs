//! Images: references, the content store, registry pulls, layer unpacking into overlayfs
//! snapshots, the metadata that ties them together, and archive imports.
//!
//! [`store::ImageStore`] is the entry point the daemon uses; the other modules are its parts.

pub mod content;
pub mod error;
pub mod import;
pub(crate) mod metadata;
pub mod oci;
pub mod pull;
pub mod reference;
pub mod registry;
pub mod snapshot;
pub mod store;
#[cfg(test)]
pub(crate) mod testing;
pub mod unpack;

pub use error::ImageError;
pub use oci::ImageConfig;
pub use pull::PullStats;
pub use registry::{Credentials, HostConfig, RegistryConfig};
pub use snapshot::{Snapshotter, Usage};
pub use store::{FsUsage, Image, ImageStore, StoreOptions};
