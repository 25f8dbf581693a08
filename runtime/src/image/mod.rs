//! Images: references, the content store, registry pulls, layer unpacking
//! into overlayfs snapshots (issue 4; wired in module by module).

pub mod content;
pub mod reference;
pub mod registry;
pub mod unpack;
