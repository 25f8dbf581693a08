//! The files a pod's containers bind-mount, kept in the sandbox's state
//! directory: `hostname`, `hosts`, `resolv.conf`, and `shm`, a tmpfs that
//! becomes the pod's shared `/dev/shm`.
//!
//! This module writes, mounts and removes those, inside the one directory
//! it is given, and nothing outside it (the host's `/etc/hosts` and
//! `/etc/resolv.conf` are only read). It does not decide where containers
//! mount them; the OCI spec does.
//!
//! Files are replaced whole (temp file, then rename), so a reader never
//! sees half a file. A bind mount holds the inode it was made from: a
//! file rewritten after a container started does not reach that container.

use std::fs::{self, OpenOptions, Permissions};
use std::io::{self, Write};
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use k8s_cri::v1 as cri;
use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags};

const HOSTNAME: &str = "hostname";
const HOSTS: &str = "hosts";
const RESOLV_CONF: &str = "resolv.conf";
const SHM: &str = "shm";

const HOST_HOSTS: &str = "/etc/hosts";
const HOST_RESOLV_CONF: &str = "/etc/resolv.conf";

/// containerd's default `/dev/shm` for a pod: 64 MiB, shared by its
/// containers, world-writable with the sticky bit like the host's.
const SHM_OPTIONS: &str = "mode=1777,size=65536k";

/// Mounts stacked on `shm` that [`unmount_shm`] takes off at most; a bound
/// against a loop, far above the one mount this module makes.
const MAX_STACKED_MOUNTS: usize = 16;

/// The local part of a pod's `/etc/hosts`, as kubelet writes it for pods.
const LOCAL_HOSTS: &str = "\
127.0.0.1\tlocalhost
::1\tlocalhost ip6-localhost ip6-loopback
fe00::0\tip6-localnet
fe00::0\tip6-mcastprefix
fe00::1\tip6-allnodes
fe00::2\tip6-allrouters
";

/// Why a sandbox file cannot be made or removed.
#[derive(Debug, thiserror::Error)]
pub enum SandboxFilesError {
    /// A value from the pod's config that cannot go into the file as it is
    /// (a hostname or DNS entry with spaces or line breaks, say).
    #[error("invalid {what} {value:?}: {reason}")]
    InvalidInput {
        what: &'static str,
        value: String,
        reason: &'static str,
    },

    /// The host refused: permissions, disk, mount.
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

pub type Result<T, E = SandboxFilesError> = std::result::Result<T, E>;

/// Writes `dir/hostname`: the pod's hostname and a newline.
pub fn write_hostname(dir: &Path, hostname: &str) -> Result<PathBuf> {
    check_hostname(hostname)?;
    write_file(dir, HOSTNAME, format!("{hostname}\n").as_bytes())
}

/// Writes `dir/hosts`. A pod on the host's network gets a copy of the
/// host's `/etc/hosts`; any other pod gets the local names plus each of its
/// `ips` under `hostname`.
pub fn write_hosts(
    dir: &Path,
    hostname: &str,
    ips: &[IpAddr],
    host_network: bool,
) -> Result<PathBuf> {
    let content = if host_network {
        read_host_file(HOST_HOSTS)?
    } else {
        check_hostname(hostname)?;
        pod_hosts(hostname, ips).into_bytes()
    };
    write_file(dir, HOSTS, &content)
}

/// Writes `dir/resolv.conf` from the pod's DNS config (`search`,
/// `nameserver` and `options` lines, in that order), or copies the host's
/// when the pod has none or an empty one.
pub fn write_resolv_conf(dir: &Path, dns: Option<&cri::DnsConfig>) -> Result<PathBuf> {
    let content = match dns {
        Some(dns) if !is_empty(dns) => resolv_conf(dns)?.into_bytes(),
        _ => read_host_file(HOST_RESOLV_CONF)?,
    };
    write_file(dir, RESOLV_CONF, &content)
}

/// Mounts the pod's `/dev/shm` tmpfs at `dir/shm` and returns that path.
/// Already mounted (a retried RunPodSandbox): left as it is.
pub fn mount_shm(dir: &Path) -> Result<PathBuf> {
    let shm = dir.join(SHM);
    match fs::DirBuilder::new().mode(0o700).create(&shm) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io_error("create directory", &shm, e)),
    }
    if is_mounted(dir, &shm)? {
        return Ok(shm);
    }
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    nix::mount::mount(Some("shm"), &shm, Some("tmpfs"), flags, Some(SHM_OPTIONS))
        .map_err(|e| io_error("mount tmpfs on", &shm, e.into()))?;
    Ok(shm)
}

/// Unmounts `dir/shm`. Nothing mounted there, or no such directory: done.
/// Lazily (MNT_DETACH), so a container still holding it open does not make
/// the pod's teardown fail; the memory is freed when the last user goes.
pub fn unmount_shm(dir: &Path) -> Result<()> {
    let shm = dir.join(SHM);
    // A symlink planted at `shm` is not followed to unmount something else.
    let flags = MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW;
    for _ in 0..MAX_STACKED_MOUNTS {
        match nix::mount::umount2(&shm, flags) {
            Ok(()) => continue,
            Err(Errno::EINVAL | Errno::ENOENT | Errno::ENOTDIR) => return Ok(()),
            Err(e) => return Err(io_error("unmount", &shm, e.into())),
        }
    }
    Err(io_error(
        "unmount",
        &shm,
        io::Error::other("still mounted after unmounting it repeatedly"),
    ))
}

/// Unmounts `dir/shm` and removes `dir` with everything in it. Symlinks in
/// it are removed, never followed. A missing `dir`: done.
pub fn remove_all(dir: &Path) -> Result<()> {
    unmount_shm(dir)?;
    match fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_error("remove", dir, e)),
    }
}

fn pod_hosts(hostname: &str, ips: &[IpAddr]) -> String {
    let mut content = String::from(LOCAL_HOSTS);
    for ip in ips {
        content.push_str(&format!("{ip}\t{hostname}\n"));
    }
    content
}

fn is_empty(dns: &cri::DnsConfig) -> bool {
    dns.servers.is_empty() && dns.searches.is_empty() && dns.options.is_empty()
}

fn resolv_conf(dns: &cri::DnsConfig) -> Result<String> {
    let mut content = String::new();
    if !dns.searches.is_empty() {
        check_tokens("DNS search domain", &dns.searches)?;
        content.push_str(&format!("search {}\n", dns.searches.join(" ")));
    }
    check_tokens("DNS server", &dns.servers)?;
    for server in &dns.servers {
        content.push_str(&format!("nameserver {server}\n"));
    }
    if !dns.options.is_empty() {
        check_tokens("DNS option", &dns.options)?;
        content.push_str(&format!("options {}\n", dns.options.join(" ")));
    }
    Ok(content)
}

/// A hostname goes into files that are parsed by lines and by whitespace;
/// beyond that, the kernel's limit for a UTS name.
fn check_hostname(hostname: &str) -> Result<()> {
    let invalid = |reason| SandboxFilesError::InvalidInput {
        what: "hostname",
        value: hostname.to_string(),
        reason,
    };
    if hostname.is_empty() {
        return Err(invalid("it is empty"));
    }
    if hostname.len() > 64 {
        return Err(invalid("it is longer than 64 bytes"));
    }
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_');
    if !hostname.chars().all(allowed) {
        return Err(invalid(
            "only letters, digits, '-', '.' and '_' are allowed",
        ));
    }
    Ok(())
}

/// Each value must be one word of resolv.conf: no whitespace, no control
/// characters, not empty.
fn check_tokens(what: &'static str, values: &[String]) -> Result<()> {
    for value in values {
        let reason = if value.is_empty() {
            "it is empty"
        } else if value.chars().any(|c| c.is_whitespace() || c.is_control()) {
            "it contains whitespace or control characters"
        } else {
            continue;
        };
        return Err(SandboxFilesError::InvalidInput {
            what,
            value: value.clone(),
            reason,
        });
    }
    Ok(())
}

fn read_host_file(path: &str) -> Result<Vec<u8>> {
    fs::read(path).map_err(|e| io_error("read", Path::new(path), e))
}

/// Replaces `dir/name` with `content`, mode 0644, through a temp file and a
/// rename. Not fsynced: the files are remade whenever a sandbox is.
fn write_file(dir: &Path, name: &str, content: &[u8]) -> Result<PathBuf> {
    let path = dir.join(name);
    let temp = dir.join(format!(".{name}.tmp"));
    let written = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        // A symlink left at the temp name is not written through.
        .custom_flags(libc::O_NOFOLLOW)
        .open(&temp)
        .and_then(|mut file| {
            file.write_all(content)?;
            // The process umask does not decide what containers may read.
            file.set_permissions(Permissions::from_mode(0o644))
        })
        .and_then(|()| fs::rename(&temp, &path));
    match written {
        Ok(()) => Ok(path),
        Err(e) => {
            let _ = fs::remove_file(&temp);
            Err(io_error("write", &path, e))
        }
    }
}

/// Whether `shm`, a directory in `dir`, has a filesystem mounted on it.
/// Anything else there (a symlink, which mount(2) would follow) is refused.
fn is_mounted(dir: &Path, shm: &Path) -> Result<bool> {
    let parent = fs::metadata(dir).map_err(|e| io_error("inspect", dir, e))?;
    let target = fs::symlink_metadata(shm).map_err(|e| io_error("inspect", shm, e))?;
    if !target.is_dir() {
        let not_a_dir = io::Error::new(
            io::ErrorKind::AlreadyExists,
            "exists and is not a directory",
        );
        return Err(io_error("mount tmpfs on", shm, not_a_dir));
    }
    Ok(parent.dev() != target.dev())
}

fn io_error(what: &'static str, path: &Path, source: io::Error) -> SandboxFilesError {
    SandboxFilesError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dns(servers: &[&str], searches: &[&str], options: &[&str]) -> cri::DnsConfig {
        let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect();
        cri::DnsConfig {
            servers: strings(servers),
            searches: strings(searches),
            options: strings(options),
        }
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    /// Unmounts `dir/shm` even when a test fails. Declared after the
    /// tempdir holding `dir`, so dropped before it.
    struct ShmGuard(PathBuf);

    impl Drop for ShmGuard {
        fn drop(&mut self) {
            let _ = unmount_shm(&self.0);
        }
    }

    #[test]
    fn hostname_file_is_the_name_and_a_newline() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_hostname(dir.path(), "pod-a.example").unwrap();
        assert_eq!(path, dir.path().join("hostname"));
        assert_eq!(fs::read_to_string(&path).unwrap(), "pod-a.example\n");
        assert_eq!(mode(&path), 0o644);
    }

    #[test]
    fn hostname_that_would_break_a_file_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        for bad in ["", "a b", "a\n10.0.0.1 evil", &"x".repeat(65)] {
            let err = write_hostname(dir.path(), bad).unwrap_err();
            assert!(
                matches!(err, SandboxFilesError::InvalidInput { .. }),
                "{bad:?}: {err}"
            );
        }
        assert!(!dir.path().join("hostname").exists());
    }

    #[test]
    fn pod_hosts_file_has_local_names_and_each_pod_ip() {
        let dir = tempfile::tempdir().unwrap();
        let ips: [IpAddr; 2] = ["10.88.0.7".parse().unwrap(), "fd00::7".parse().unwrap()];
        let path = write_hosts(dir.path(), "web-0", &ips, false).unwrap();
        let expected = "127.0.0.1\tlocalhost\n\
                        ::1\tlocalhost ip6-localhost ip6-loopback\n\
                        fe00::0\tip6-localnet\n\
                        fe00::0\tip6-mcastprefix\n\
                        fe00::1\tip6-allnodes\n\
                        fe00::2\tip6-allrouters\n\
                        10.88.0.7\tweb-0\n\
                        fd00::7\tweb-0\n";
        assert_eq!(fs::read_to_string(&path).unwrap(), expected);
        assert_eq!(mode(&path), 0o644);
    }

    #[test]
    fn host_network_hosts_file_is_the_hosts() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_hosts(dir.path(), "node", &[], true).unwrap();
        assert_eq!(fs::read(&path).unwrap(), fs::read("/etc/hosts").unwrap());
    }

    #[test]
    fn resolv_conf_from_dns_config() {
        let dir = tempfile::tempdir().unwrap();
        let config = dns(
            &["10.10.10.10", "fd00::53"],
            &["google.com", "svc.local"],
            &["ndots:8", "edns0"],
        );
        let path = write_resolv_conf(dir.path(), Some(&config)).unwrap();
        assert_eq!(
            fs::read_to_string(&path).unwrap(),
            "search google.com svc.local\n\
             nameserver 10.10.10.10\n\
             nameserver fd00::53\n\
             options ndots:8 edns0\n"
        );
        assert_eq!(mode(&path), 0o644);
    }

    #[test]
    fn resolv_conf_without_dns_config_is_the_hosts() {
        let host = fs::read("/etc/resolv.conf").unwrap();
        for config in [None, Some(dns(&[], &[], &[]))] {
            let dir = tempfile::tempdir().unwrap();
            let path = write_resolv_conf(dir.path(), config.as_ref()).unwrap();
            assert_eq!(fs::read(&path).unwrap(), host);
        }
    }

    #[test]
    fn dns_entries_that_would_inject_lines_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        for config in [
            dns(&["10.0.0.1\nnameserver 6.6.6.6"], &[], &[]),
            dns(&["10.0.0.1"], &["a b"], &[]),
            dns(&["10.0.0.1"], &[], &[""]),
        ] {
            let err = write_resolv_conf(dir.path(), Some(&config)).unwrap_err();
            assert!(
                matches!(err, SandboxFilesError::InvalidInput { .. }),
                "{err}"
            );
        }
    }

    #[test]
    fn rewriting_replaces_the_file_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        write_hostname(dir.path(), "first").unwrap();
        write_hostname(dir.path(), "second").unwrap();
        assert_eq!(
            fs::read_to_string(dir.path().join("hostname")).unwrap(),
            "second\n"
        );
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["hostname"]);
    }

    #[test]
    fn write_does_not_follow_a_symlink_at_the_temp_name() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::NamedTempFile::new().unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join(".hostname.tmp")).unwrap();
        assert!(write_hostname(dir.path(), "pod").is_err());
        assert_eq!(fs::read(outside.path()).unwrap(), b"");
    }

    #[test]
    fn shm_is_a_64m_tmpfs_until_unmounted() {
        let dir = tempfile::tempdir().unwrap();
        let _guard = ShmGuard(dir.path().to_path_buf());
        let shm = mount_shm(dir.path()).unwrap();
        assert_eq!(shm, dir.path().join("shm"));
        let fs_stat = nix::sys::statfs::statfs(&shm).unwrap();
        assert_eq!(fs_stat.filesystem_type(), nix::sys::statfs::TMPFS_MAGIC);
        let size = fs_stat.blocks() * fs_stat.block_size() as u64;
        assert_eq!(size, 64 * 1024 * 1024);
        assert_eq!(mode(&shm), 0o1777);
        let options = mount_options(&shm);
        for option in ["nosuid", "nodev", "noexec"] {
            assert!(
                options.split(',').any(|o| o == option),
                "{option} missing: {options}"
            );
        }

        // A retry does not stack a second tmpfs.
        mount_shm(dir.path()).unwrap();
        unmount_shm(dir.path()).unwrap();
        assert_ne!(
            nix::sys::statfs::statfs(&shm).unwrap().filesystem_type(),
            nix::sys::statfs::TMPFS_MAGIC,
            "a tmpfs is still mounted (stacked by the retry?)"
        );
        assert!(mount_options_opt(&shm).is_none());
        unmount_shm(dir.path()).unwrap();
    }

    #[test]
    fn shm_is_not_mounted_through_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let _guard = ShmGuard(dir.path().to_path_buf());
        std::os::unix::fs::symlink(outside.path(), dir.path().join("shm")).unwrap();
        assert!(mount_shm(dir.path()).is_err());
        assert!(
            mount_options_opt(outside.path()).is_none(),
            "mounted outside the dir"
        );
    }

    #[test]
    fn unmount_shm_of_nothing_is_fine() {
        let dir = tempfile::tempdir().unwrap();
        unmount_shm(dir.path()).unwrap();
        fs::create_dir(dir.path().join("shm")).unwrap();
        unmount_shm(dir.path()).unwrap();
        unmount_shm(&dir.path().join("missing")).unwrap();
    }

    #[test]
    fn remove_all_unmounts_removes_and_is_idempotent() {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("sandbox");
        fs::create_dir(&dir).unwrap();
        let _guard = ShmGuard(dir.clone());
        write_hostname(&dir, "pod").unwrap();
        let shm = mount_shm(&dir).unwrap();
        fs::write(shm.join("segment"), b"data").unwrap();

        remove_all(&dir).unwrap();
        assert!(!dir.exists());
        assert!(mount_options_opt(&shm).is_none(), "shm still mounted");
        remove_all(&dir).unwrap();
    }

    #[test]
    fn remove_all_does_not_follow_symlinks_out_of_the_dir() {
        let parent = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("keep"), b"keep").unwrap();
        let dir = parent.path().join("sandbox");
        fs::create_dir(&dir).unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.join("link")).unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.join("shm")).unwrap();

        remove_all(&dir).unwrap();
        assert!(!dir.exists());
        assert_eq!(fs::read(outside.path().join("keep")).unwrap(), b"keep");
    }

    /// The options of the mount at `path` in /proc/self/mountinfo.
    fn mount_options(path: &Path) -> String {
        mount_options_opt(path).unwrap_or_else(|| panic!("{} is not a mount point", path.display()))
    }

    fn mount_options_opt(path: &Path) -> Option<String> {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap();
        let path = path.to_str().unwrap();
        mountinfo.lines().rev().find_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            (fields.get(4) == Some(&path)).then(|| fields[5].to_string())
        })
    }
}
