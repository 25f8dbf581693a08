//! Names that never clash between tests running in parallel, in one test
//! binary or in several at once.
//!
//! A name is `<pid>-<counter>-<random>`: the pid tells a later run whose
//! leftovers these were (see [`crate::cleanup::sweep_stale`]), the counter
//! separates names inside one process, the random part guards against a
//! reused pid meeting an older run's leftovers.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A new name, `<pid>-<counter>-<random hex>`, short enough for unix socket
/// paths and cgroup names.
pub fn name() -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{}-{n}-{:06x}", std::process::id(), random() & 0xff_ffff)
}

/// The pid a name made by [`name`] was made under, if it is one.
pub fn owner_pid(name: &str) -> Option<u32> {
    let mut parts = name.splitn(3, '-');
    let pid = parts.next()?.parse().ok()?;
    parts.next()?.parse::<u64>().ok()?;
    let rest = parts.next()?;
    // The random part may be followed by a suffix such as `-<name>`.
    let hex = rest.split('-').next()?;
    if hex.len() == 6 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        Some(pid)
    } else {
        None
    }
}

/// A random number without a dependency: std seeds every `RandomState` from
/// the OS, which is all the uniqueness needed here.
fn random() -> u64 {
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.load(Ordering::Relaxed));
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_differ_and_carry_the_pid() {
        let a = name();
        let b = name();
        assert_ne!(a, b);
        assert_eq!(owner_pid(&a), Some(std::process::id()));
        assert_eq!(owner_pid(&format!("{a}-sandbox")), Some(std::process::id()));
        assert_eq!(owner_pid("runc"), None);
        assert_eq!(owner_pid("12-3-zzzzzz"), None);
    }
}
