//! Where corral's built binaries are.
//!
//! `$CORRAL_BIN_DIR` wins; otherwise the cargo profile directory the running
//! test or bench executable was built into (`target/<profile>/deps/<exe>`
//! → `target/<profile>/`), so a test finds the binaries of its own build
//! without being told.

use std::path::{Path, PathBuf};

/// Environment variable naming the directory that holds the binaries.
pub const BIN_DIR_ENV: &str = "CORRAL_BIN_DIR";

/// File name of corral's shim.
pub const SHIM: &str = "containerd-shim-corral-v2";

/// File name of corral's daemon.
pub const DAEMON: &str = "corrald";

/// The directory the binaries are looked up in.
///
/// # Panics
/// When neither `$CORRAL_BIN_DIR` is set nor the running executable's path
/// can be read: there is nowhere to look.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os(BIN_DIR_ENV).filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe()
        .unwrap_or_else(|e| panic!("cannot find the running executable ({e}); set {BIN_DIR_ENV}"));
    profile_dir_of(&exe).unwrap_or_else(|| {
        panic!(
            "{} is not inside target/<profile>/deps; set {BIN_DIR_ENV}",
            exe.display()
        )
    })
}

/// `target/<profile>/` for an executable in `target/<profile>/deps/`, or in
/// `target/<profile>/` itself (an example or a binary run directly).
pub fn profile_dir_of(exe: &Path) -> Option<PathBuf> {
    let parent = exe.parent()?;
    if parent.file_name()? == "deps" {
        Some(parent.parent()?.to_path_buf())
    } else {
        Some(parent.to_path_buf())
    }
}

/// The built binary `name`, if it exists.
pub fn try_binary(name: &str) -> Option<PathBuf> {
    let path = bin_dir().join(name);
    path.is_file().then_some(path)
}

/// Programs that must not panic (benches and examples run with
/// `panic = "abort"`, which would skip their cleanup) check for the shim
/// first: `Err` says how to build it.
pub fn require_shim() -> Result<PathBuf, String> {
    try_binary(SHIM).ok_or_else(|| {
        format!(
            "{SHIM} not found in {}: run `cargo build --release --workspace --bins` first, \
             or point {BIN_DIR_ENV} at the directory that holds it",
            bin_dir().display()
        )
    })
}

/// The built binary `name`.
///
/// # Panics
/// When it has not been built, with the command that builds it.
pub fn binary(name: &str) -> PathBuf {
    let dir = bin_dir();
    let path = dir.join(name);
    if !path.is_file() {
        panic!(
            "{name} not found in {}: run `cargo build --workspace --bins` with the same \
             profile and CARGO_TARGET_DIR as the tests, or point {BIN_DIR_ENV} at the \
             directory that holds it",
            dir.display()
        );
    }
    path
}

/// corral's shim, `containerd-shim-corral-v2`.
///
/// # Panics
/// When it has not been built.
pub fn shim() -> PathBuf {
    binary(SHIM)
}

/// corral's daemon, `corrald`.
///
/// # Panics
/// When it has not been built.
pub fn daemon() -> PathBuf {
    binary(DAEMON)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profile_dir_is_two_levels_above_a_deps_executable() {
        assert_eq!(
            profile_dir_of(Path::new("/t/target/debug/deps/fixtures-abc")),
            Some(PathBuf::from("/t/target/debug"))
        );
        assert_eq!(
            profile_dir_of(Path::new("/t/target/release/corrald")),
            Some(PathBuf::from("/t/target/release"))
        );
    }
}
