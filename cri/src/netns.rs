//! Network namespaces pinned by bind mounts.
//!
//! A pod's network namespace must outlive every process in it (the pause
//! process may die and be replaced, CNI DEL must still find the interface),
//! so it is pinned the way `ip netns` and containerd do: the namespace file
//! of a thread that has just unshared its network namespace is bind-mounted
//! onto an empty file, and that path is what runc and the CNI plugins get.
//!
//! This module owns the files it creates under the directory it is given and
//! the mounts on them. It brings `lo` up in a namespace it creates, and does
//! nothing else inside it: interfaces, addresses and routes are the CNI
//! plugins' work. It never changes the namespace of a thread it did not
//! spawn for that purpose, and those threads exit right after, so no pooled
//! thread (tokio's included) ever runs in a pod's namespace.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::thread;

use nix::errno::Errno;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};
use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
use nix::sys::statfs::{statfs, NSFS_MAGIC};

/// The calling thread's own network namespace; `/proc/self` would name the
/// main thread's, which is not the one that unshared.
const THREAD_NETNS: &str = "/proc/thread-self/ns/net";

/// `NS_GET_NSTYPE` (`_IO(0xb7, 0x3)`, linux/nsfs.h): which kind of namespace
/// an nsfs file is, so that a pinned mount or pid namespace is refused.
const NS_GET_NSTYPE: libc::c_ulong = 0xb703;

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// The name would escape the directory or is empty (invalid input).
    #[error("invalid network namespace name {0:?}: it must be a plain, non-empty file name")]
    InvalidName(String),

    /// Something already sits at the path; it is not ours to replace.
    #[error("{0} already exists")]
    AlreadyExists(PathBuf),

    #[error("network namespace {0} does not exist")]
    NotFound(PathBuf),

    /// The path exists but no network namespace is mounted on it.
    #[error("{0} is not a mounted network namespace")]
    NotANamespace(PathBuf),

    /// The kernel or the filesystem refused an operation (system failure).
    #[error("{what} {path}: {source}")]
    System {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl NetnsError {
    fn system(what: &'static str, path: &Path, source: impl Into<io::Error>) -> Self {
        NetnsError::System {
            what,
            path: path.to_path_buf(),
            source: source.into(),
        }
    }
}

/// A pinned network namespace, known by the path of its bind mount.
///
/// Dropping it leaves the namespace in place: a pod's namespace lives until
/// [`NetNs::remove`], across daemon restarts ([`NetNs::open`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetNs {
    path: PathBuf,
}

impl NetNs {
    /// Creates a new network namespace pinned at `dir/name`, with `lo` up.
    ///
    /// `dir` is created (0711) if missing. On failure nothing is left behind.
    pub fn create(dir: &Path, name: &str) -> Result<NetNs, NetnsError> {
        validate_name(name)?;
        DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(dir)
            .map_err(|e| NetnsError::system("creating", dir, e))?;
        let path = dir.join(name);
        create_mount_point(&path)?;
        if let Err(e) = pin_new_namespace(&path) {
            // The mount is the last step, so only the file can be left.
            let _ = fs::remove_file(&path);
            return Err(e);
        }
        Ok(NetNs { path })
    }

    /// The namespace pinned at `path` by an earlier [`NetNs::create`], for
    /// recovery after a daemon restart.
    pub fn open(path: impl Into<PathBuf>) -> Result<NetNs, NetnsError> {
        let path = path.into();
        match statfs(&path) {
            Ok(fs) if fs.filesystem_type() == NSFS_MAGIC => {}
            Ok(_) => return Err(NetnsError::NotANamespace(path)),
            Err(Errno::ENOENT) => return Err(NetnsError::NotFound(path)),
            Err(e) => return Err(NetnsError::system("checking", &path, e)),
        }
        let file = File::open(&path).map_err(|e| NetnsError::system("opening", &path, e))?;
        // SAFETY: NS_GET_NSTYPE takes no argument and only reads the fd.
        let kind = unsafe { libc::ioctl(file.as_raw_fd(), NS_GET_NSTYPE as _) };
        if kind != libc::CLONE_NEWNET {
            return Err(NetnsError::NotANamespace(path));
        }
        Ok(NetNs { path })
    }

    /// The bind mount's path: what runc's spec and `CNI_NETNS` get.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Unpins the namespace and deletes the file. Removing a namespace that
    /// is already gone, or was never mounted, succeeds.
    ///
    /// The namespace itself lives on while a process is still in it.
    pub fn remove(&self) -> Result<(), NetnsError> {
        match umount2(&self.path, MntFlags::MNT_DETACH) {
            // EINVAL: the path is not a mount point (already unmounted).
            Ok(()) | Err(Errno::EINVAL) | Err(Errno::ENOENT) => {}
            Err(e) => return Err(NetnsError::system("unmounting", &self.path, e)),
        }
        match fs::remove_file(&self.path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(NetnsError::system("removing", &self.path, e)),
        }
    }

    /// Runs `f` on a new thread that has entered this namespace; sockets it
    /// opens belong to the namespace and stay there after it returns. The
    /// thread exits afterwards. A panic in `f` is resumed in the caller.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, NetnsError> {
        let file = File::open(&self.path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => NetnsError::NotFound(self.path.clone()),
            _ => NetnsError::system("opening", &self.path, e),
        })?;
        let entered = move || {
            setns(file.as_fd(), CloneFlags::CLONE_NEWNET)
                .map_err(|e| NetnsError::system("entering", &self.path, e))?;
            Ok(f())
        };
        on_own_thread(&self.path, entered)
    }
}

/// Brings `lo` up in the calling thread's network namespace.
fn bring_up_loopback() -> io::Result<()> {
    let socket = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let mut request = interface_request("lo");
    // SAFETY: SIOCGIFFLAGS fills the flags of the ifreq we own.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS as _, &mut request) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: SIOCGIFFLAGS has just set the flags member of the union.
    unsafe { request.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    // SAFETY: SIOCSIFFLAGS reads the ifreq we own.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS as _, &request) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// An `ifreq` naming `name` (shorter than IFNAMSIZ), everything else zero.
fn interface_request(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain old data; all zeroes is a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, byte) in request.ifr_name.iter_mut().zip(name.bytes()) {
        *slot = byte as libc::c_char;
    }
    request
}

fn validate_name(name: &str) -> Result<(), NetnsError> {
    if name.is_empty() || name == "." || name == ".." || name.contains(['/', '\0']) {
        return Err(NetnsError::InvalidName(name.to_string()));
    }
    Ok(())
}

/// The empty file the namespace is mounted on; an existing one is refused,
/// since it may be another pod's pinned namespace.
fn create_mount_point(path: &Path) -> Result<(), NetnsError> {
    match OpenOptions::new().write(true).create_new(true).open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            Err(NetnsError::AlreadyExists(path.to_path_buf()))
        }
        Err(e) => Err(NetnsError::system("creating", path, e)),
    }
}

/// Unshares on a thread of its own, brings `lo` up, then pins the namespace.
/// Until the mount succeeds nothing outlives the thread, so no step needs
/// undoing.
fn pin_new_namespace(path: &Path) -> Result<(), NetnsError> {
    on_own_thread(path, || {
        unshare(CloneFlags::CLONE_NEWNET)
            .map_err(|e| NetnsError::system("unsharing the network namespace for", path, e))?;
        bring_up_loopback()
            .map_err(|e| NetnsError::system("bringing lo up in the namespace for", path, e))?;
        mount(
            Some(THREAD_NETNS),
            path,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| NetnsError::system("bind-mounting the namespace on", path, e))
    })
}

/// Runs `f` on a fresh OS thread that ends with it: a thread whose namespace
/// has changed must never run anything else.
fn on_own_thread<T: Send>(
    path: &Path,
    f: impl FnOnce() -> Result<T, NetnsError> + Send,
) -> Result<T, NetnsError> {
    thread::scope(|scope| {
        let handle = thread::Builder::new()
            .name("netns".into())
            .spawn_scoped(scope, f)
            .map_err(|e| NetnsError::system("starting a thread for", path, e))?;
        handle
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::net::{Ipv4Addr, TcpListener, TcpStream};

    /// Removes the namespace even when the test fails half-way.
    struct Pinned(NetNs);

    impl Drop for Pinned {
        fn drop(&mut self) {
            let _ = self.0.remove();
        }
    }

    fn interface_flags(name: &str) -> libc::c_short {
        let socket = socket(
            AddressFamily::Inet,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        let mut request = interface_request(name);
        let rc = unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS as _, &mut request) };
        assert_eq!(rc, 0, "{}", io::Error::last_os_error());
        unsafe { request.ifr_ifru.ifru_flags }
    }

    fn own_netns_inode() -> u64 {
        use std::os::unix::fs::MetadataExt;
        fs::metadata(THREAD_NETNS).unwrap().ino()
    }

    #[test]
    fn create_pins_a_new_namespace_with_lo_up_and_remove_undoes_it() {
        let dir = tempfile::tempdir().unwrap();
        let netns_dir = dir.path().join("netns");
        let ns = Pinned(NetNs::create(&netns_dir, "pod-a").unwrap());
        let path = netns_dir.join("pod-a");
        assert_eq!(ns.0.path(), path);
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(&netns_dir).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o711);
        assert_eq!(statfs(&path).unwrap().filesystem_type(), NSFS_MAGIC);

        let (inside, lo_flags) =
            ns.0.run(|| (own_netns_inode(), interface_flags("lo")))
                .unwrap();
        assert_ne!(inside, own_netns_inode(), "run did not enter the namespace");
        assert_ne!(lo_flags & libc::IFF_UP as libc::c_short, 0, "lo is down");

        // Loopback works inside: a listener there is reachable from there
        // only, since the host's 127.0.0.1 is another stack.
        let listener =
            ns.0.run(|| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
                .unwrap()
                .unwrap();
        let port = listener.local_addr().unwrap().port();
        ns.0.run(|| TcpStream::connect((Ipv4Addr::LOCALHOST, port)))
            .unwrap()
            .unwrap();
        listener.accept().unwrap();

        ns.0.remove().unwrap();
        assert!(!path.exists());
        assert!(matches!(NetNs::open(&path), Err(NetnsError::NotFound(_))));
    }

    #[test]
    fn remove_twice_succeeds() {
        let dir = tempfile::tempdir().unwrap();
        let ns = Pinned(NetNs::create(dir.path(), "twice").unwrap());
        ns.0.remove().unwrap();
        ns.0.remove().unwrap();
        assert!(matches!(ns.0.run(|| ()), Err(NetnsError::NotFound(_))));
    }

    #[test]
    fn open_finds_a_pinned_namespace_and_refuses_anything_else() {
        let dir = tempfile::tempdir().unwrap();
        let ns = Pinned(NetNs::create(dir.path(), "reopen").unwrap());
        let reopened = NetNs::open(ns.0.path()).unwrap();
        assert_eq!(reopened, ns.0);

        let plain = dir.path().join("plain-file");
        fs::write(&plain, "").unwrap();
        assert!(matches!(
            NetNs::open(&plain),
            Err(NetnsError::NotANamespace(_))
        ));
        // An nsfs file of another kind is not a network namespace.
        assert!(matches!(
            NetNs::open("/proc/self/ns/mnt"),
            Err(NetnsError::NotANamespace(_))
        ));
        assert!(matches!(
            NetNs::open(dir.path().join("absent")),
            Err(NetnsError::NotFound(_))
        ));
    }

    #[test]
    fn create_refuses_bad_names_and_existing_files_and_leaves_them_alone() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["", ".", "..", "a/b", "../escape"] {
            assert!(
                matches!(
                    NetNs::create(dir.path(), name),
                    Err(NetnsError::InvalidName(_))
                ),
                "{name:?}"
            );
        }
        let taken = dir.path().join("taken");
        fs::write(&taken, "keep me").unwrap();
        assert!(matches!(
            NetNs::create(dir.path(), "taken"),
            Err(NetnsError::AlreadyExists(_))
        ));
        assert_eq!(fs::read_to_string(&taken).unwrap(), "keep me");
    }

    #[test]
    fn create_fails_as_a_system_error_when_the_directory_cannot_be_made() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("blocker");
        fs::write(&blocker, "").unwrap();
        assert!(matches!(
            NetNs::create(&blocker.join("sub"), "x"),
            Err(NetnsError::System { .. })
        ));
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_panic_inside_run_reaches_the_caller_and_the_caller_stays_outside() {
        let dir = tempfile::tempdir().unwrap();
        let ns = Pinned(NetNs::create(dir.path(), "panics").unwrap());
        let before = own_netns_inode();
        let outcome = std::panic::catch_unwind(|| ns.0.run(|| panic!("inside")));
        assert!(outcome.is_err());
        assert_eq!(own_netns_inode(), before);
    }
}
