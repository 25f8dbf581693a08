//! Mounting a task's rootfs as containerd passes it (`Mount{type, source,
//! options}`, typically an overlay snapshot or a bind mount) on
//! `<bundle>/rootfs`, and undoing it.
//!
//! Done in the shim's own process: the crate's helper forks and waits on a
//! reaper of its own, which would race the shim's reaper for the child.

use std::path::Path;

use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::error::{Error, Result};

/// A mount option that is a flag: (name, flags, clears instead of sets).
const FLAGS: &[(&str, MsFlags, bool)] = &[
    ("async", MsFlags::MS_SYNCHRONOUS, true),
    ("atime", MsFlags::MS_NOATIME, true),
    ("bind", MsFlags::MS_BIND, false),
    ("defaults", MsFlags::empty(), false),
    ("dev", MsFlags::MS_NODEV, true),
    ("diratime", MsFlags::MS_NODIRATIME, true),
    ("dirsync", MsFlags::MS_DIRSYNC, false),
    ("exec", MsFlags::MS_NOEXEC, true),
    ("mand", MsFlags::MS_MANDLOCK, false),
    ("noatime", MsFlags::MS_NOATIME, false),
    ("nodev", MsFlags::MS_NODEV, false),
    ("nodiratime", MsFlags::MS_NODIRATIME, false),
    ("noexec", MsFlags::MS_NOEXEC, false),
    ("nomand", MsFlags::MS_MANDLOCK, true),
    ("norelatime", MsFlags::MS_RELATIME, true),
    ("nostrictatime", MsFlags::MS_STRICTATIME, true),
    ("nosuid", MsFlags::MS_NOSUID, false),
    ("rbind", MsFlags::MS_BIND.union(MsFlags::MS_REC), false),
    ("relatime", MsFlags::MS_RELATIME, false),
    ("remount", MsFlags::MS_REMOUNT, false),
    ("ro", MsFlags::MS_RDONLY, false),
    ("rw", MsFlags::MS_RDONLY, true),
    ("strictatime", MsFlags::MS_STRICTATIME, false),
    ("suid", MsFlags::MS_NOSUID, true),
    ("sync", MsFlags::MS_SYNCHRONOUS, false),
];

const PROPAGATION: &[(&str, MsFlags)] = &[
    ("private", MsFlags::MS_PRIVATE),
    ("rprivate", MsFlags::MS_PRIVATE.union(MsFlags::MS_REC)),
    ("shared", MsFlags::MS_SHARED),
    ("rshared", MsFlags::MS_SHARED.union(MsFlags::MS_REC)),
    ("slave", MsFlags::MS_SLAVE),
    ("rslave", MsFlags::MS_SLAVE.union(MsFlags::MS_REC)),
    ("unbindable", MsFlags::MS_UNBINDABLE),
    ("runbindable", MsFlags::MS_UNBINDABLE.union(MsFlags::MS_REC)),
];

/// Mount options split into flags, a propagation change, and the
/// filesystem-specific data string.
#[derive(Debug, PartialEq, Eq)]
struct Parsed {
    flags: MsFlags,
    propagation: MsFlags,
    data: String,
}

fn parse(options: &[String]) -> Parsed {
    let mut flags = MsFlags::empty();
    let mut propagation = MsFlags::empty();
    let mut data = Vec::new();
    for option in options {
        if let Some((_, f, clear)) = FLAGS.iter().find(|(name, _, _)| name == option) {
            if *clear {
                flags.remove(*f);
            } else {
                flags.insert(*f);
            }
        } else if let Some((_, p)) = PROPAGATION.iter().find(|(name, _)| name == option) {
            propagation.insert(*p);
        } else {
            data.push(option.as_str());
        }
    }
    Parsed {
        flags,
        propagation,
        data: data.join(","),
    }
}

/// Mounts one `Mount` of the rootfs on `target`.
pub fn mount_one(fs_type: &str, source: &str, options: &[String], target: &Path) -> Result<()> {
    let parsed = parse(options);
    let data = (!parsed.data.is_empty()).then_some(parsed.data.as_str());
    let fs_type = (!fs_type.is_empty() && fs_type != "bind").then_some(fs_type);
    let fail = |what: &str, e: nix::errno::Errno| {
        Error::InvalidArgument(format!(
            "{what} {source} ({}) on {}: {e}",
            fs_type.unwrap_or("bind"),
            target.display()
        ))
    };
    mount(Some(source), target, fs_type, parsed.flags, data).map_err(|e| fail("mount", e))?;
    if !parsed.propagation.is_empty() {
        mount(
            None::<&str>,
            target,
            None::<&str>,
            parsed.propagation,
            None::<&str>,
        )
        .map_err(|e| fail("set propagation of", e))?;
    }
    // A bind mount ignores MS_RDONLY until remounted.
    if parsed.flags.contains(MsFlags::MS_BIND) && parsed.flags.contains(MsFlags::MS_RDONLY) {
        mount(
            None::<&str>,
            target,
            None::<&str>,
            parsed.flags | MsFlags::MS_REMOUNT,
            None::<&str>,
        )
        .map_err(|e| fail("remount read-only", e))?;
    }
    Ok(())
}

/// Undoes every mount stacked on `target`; absent or unmounted is fine.
pub fn unmount_all(target: &Path) {
    loop {
        match umount2(target, MntFlags::MNT_DETACH) {
            Ok(()) => continue,
            Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => return,
            Err(e) => {
                log::warn!("unmount {}: {e}", target.display());
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn splits_flags_propagation_and_data() {
        let p = parse(&opts(&[
            "rbind",
            "ro",
            "nosuid",
            "rprivate",
            "index=off",
            "lowerdir=/a:/b",
        ]));
        assert_eq!(
            p.flags,
            MsFlags::MS_BIND | MsFlags::MS_REC | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID
        );
        assert_eq!(p.propagation, MsFlags::MS_PRIVATE | MsFlags::MS_REC);
        assert_eq!(p.data, "index=off,lowerdir=/a:/b");
    }

    #[test]
    fn later_options_clear_earlier_ones() {
        assert_eq!(parse(&opts(&["ro", "rw"])).flags, MsFlags::empty());
        assert_eq!(
            parse(&opts(&["nosuid", "suid", "noexec"])).flags,
            MsFlags::MS_NOEXEC
        );
        assert_eq!(parse(&opts(&["defaults"])).flags, MsFlags::empty());
    }

    #[test]
    fn bind_mounts_and_unmounts_for_real() {
        let src = tempfile::tempdir().expect("tempdir");
        let dst = tempfile::tempdir().expect("tempdir");
        std::fs::write(src.path().join("marker"), "x").expect("write");
        mount_one(
            "bind",
            &src.path().display().to_string(),
            &opts(&["rbind", "ro"]),
            dst.path(),
        )
        .expect("mount");
        assert!(dst.path().join("marker").exists());
        let write = std::fs::write(dst.path().join("new"), "y");
        unmount_all(dst.path());
        assert!(write.is_err(), "a read-only bind mount took a write");
        assert!(!dst.path().join("marker").exists());
    }

    #[test]
    fn a_missing_source_is_named_in_the_error() {
        let dst = tempfile::tempdir().expect("tempdir");
        let err = mount_one("bind", "/nonexistent/corral", &opts(&["rbind"]), dst.path())
            .expect_err("missing source");
        assert!(err.to_string().contains("/nonexistent/corral"), "{err}");
    }
}
