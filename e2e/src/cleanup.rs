//! The per-test guard that removes everything a test made, even when the test
//! panics.
//!
//! A [`Cleanup`] owns two fresh directories: a short one under
//! [`RUN_BASE`] for unix sockets and runc state (socket paths must stay under
//! 108 bytes), and one under the temp dir for bundles and root filesystems.
//! Everything else a test makes outside them (processes, runc containers,
//! cgroups, mounts, files) is registered with a `track_*` call. On drop, in
//! this order: deferred closures, processes killed, runc containers
//! force-deleted, cgroups removed, mounts detached, paths removed. What could
//! not be removed is reported, and fails the test unless it is already
//! failing.
//!
//! [`sweep_stale`] removes what test processes that died without unwinding
//! (SIGKILL, abort) left behind; [`Cleanup::new`] runs it once per process.

use std::fs;
use std::io::ErrorKind;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, Once};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::bundle::Bundle;
use crate::error::{Context, Result};
use crate::rootfs::BusyboxRootfs;
use crate::runc::Runc;
use crate::unique;

/// Parent of every test's short runtime directory.
pub const RUN_BASE: &str = "/run/corral-e2e";

/// Parent cgroup of every cgroup the fixtures name.
pub const CGROUP_PARENT: &str = "/corral-e2e";

/// Where the cgroup hierarchies are mounted.
pub const CGROUP_MOUNT: &str = "/sys/fs/cgroup";

/// How long a killed process or a busy cgroup gets before it counts as leaked.
const SETTLE: Duration = Duration::from_secs(10);

/// Cleanups alive in this process. Shared parents (the base directories, the
/// cgroup parent) are removed only by the last one, so that a test never
/// removes a parent another test is about to create a child in. cargo runs
/// test binaries one at a time, so a per-process count is enough.
static LIVE: AtomicUsize = AtomicUsize::new(0);

static SWEEP: Once = Once::new();

/// The base directory of every test's work directory.
pub fn work_base() -> PathBuf {
    std::env::temp_dir().join("corral-e2e")
}

/// A process to kill, identified by pid and start time so that a pid reused
/// by an unrelated process after ours died is left alone.
struct TrackedPid {
    pid: i32,
    start_time: Option<u64>,
}

#[derive(Default)]
struct State {
    deferred: Vec<Box<dyn FnOnce() + Send>>,
    pids: Vec<TrackedPid>,
    process_dirs: Vec<PathBuf>,
    runc_roots: Vec<Runc>,
    runc_containers: Vec<(Runc, String)>,
    cgroups: Vec<String>,
    mounts: Vec<PathBuf>,
    paths: Vec<PathBuf>,
}

/// Removes, on drop, everything a test registered or made in its directories.
pub struct Cleanup {
    unique: String,
    run_dir: PathBuf,
    work_dir: PathBuf,
    names: AtomicU64,
    state: Mutex<State>,
}

impl Cleanup {
    /// Makes the test's two directories, after sweeping leftovers of dead
    /// test processes (once per process).
    pub fn new() -> Result<Self> {
        SWEEP.call_once(|| {
            for problem in sweep_stale() {
                eprintln!("corral-e2e: stale leftovers: {problem}");
            }
        });
        let unique = unique::name();
        let run_dir = Path::new(RUN_BASE).join(&unique);
        let work_dir = work_base().join(&unique);
        LIVE.fetch_add(1, Ordering::SeqCst);
        // From here on Drop removes whatever part of this was made.
        let cleanup = Cleanup {
            unique,
            run_dir,
            work_dir,
            names: AtomicU64::new(0),
            state: Mutex::new(State::default()),
        };
        for dir in [&cleanup.run_dir, &cleanup.work_dir] {
            create_dir_racing(dir)?;
            fs::set_permissions(dir, fs::Permissions::from_mode(0o755))
                .context(|| format!("chmod {}", dir.display()))?;
        }
        Ok(cleanup)
    }

    /// The unique name of this test, `<pid>-<counter>-<random>`.
    pub fn unique(&self) -> &str {
        &self.unique
    }

    /// A short directory for unix sockets and runtime state:
    /// `/run/corral-e2e/<unique>`.
    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// A directory for bundles, root filesystems and logs.
    pub fn work_dir(&self) -> &Path {
        &self.work_dir
    }

    /// A new name unique across tests, `<unique>-<prefix><n>`: container ids,
    /// namespaces, sandbox ids.
    pub fn name(&self, prefix: &str) -> String {
        format!("{}-{}", self.unique, self.local_name(prefix))
    }

    /// A name unique within this test only, `<prefix><n>`: files in its own
    /// directories, where the directory already carries the unique part.
    pub fn local_name(&self, prefix: &str) -> String {
        let n = self.names.fetch_add(1, Ordering::Relaxed);
        format!("{prefix}{n}")
    }

    /// A cgroup path for `name` inside this test's cgroup subtree
    /// (`/corral-e2e/<unique>/<name>`), which is removed on drop in every
    /// hierarchy.
    pub fn cgroup_path(&self, name: &str) -> String {
        format!("{}/{name}", self.cgroup_subtree())
    }

    fn cgroup_subtree(&self) -> String {
        format!("{CGROUP_PARENT}/{}", self.unique)
    }

    /// A busybox rootfs in `<work_dir>/<name>`.
    pub fn busybox_rootfs(&self, name: &str) -> Result<BusyboxRootfs> {
        BusyboxRootfs::build(self.work_dir.join(name))
    }

    /// A bundle builder for `<work_dir>/<name>` whose cgroup lies in this
    /// test's cgroup subtree.
    pub fn bundle(&self, name: &str, rootfs: impl AsRef<Path>) -> Bundle {
        Bundle::new(self.work_dir.join(name), rootfs).cgroups_path(self.cgroup_path(name))
    }

    /// A bundle `<work_dir>/<name>` with a fresh static busybox rootfs in
    /// its `rootfs/` (containerd's layout), its cgroup in this test's subtree.
    pub fn busybox_bundle(&self, name: &str) -> Result<Bundle> {
        let dir = self.work_dir.join(name);
        let rootfs = BusyboxRootfs::build(dir.join("rootfs"))?;
        Ok(Bundle::new(dir, rootfs).cgroups_path(self.cgroup_path(name)))
    }

    /// runc with its own state root in this test's run directory; every
    /// container in that root is force-deleted on drop.
    pub fn runc(&self) -> Runc {
        let runc = Runc::new(self.run_dir.join("runc"));
        self.track_runc_root(&runc);
        runc
    }

    /// Kills `pid` on drop, if it is still the process it is now.
    pub fn track_pid(&self, pid: u32) {
        let Ok(pid) = i32::try_from(pid) else { return };
        let start_time = proc_start_time(pid);
        self.with_state(|s| {
            if !s.pids.iter().any(|p| p.pid == pid) {
                s.pids.push(TrackedPid { pid, start_time });
            }
        });
    }

    /// Kills, on drop, every process whose working directory lies under
    /// `dir`: a shim runs in its bundle. Processes under the test's own
    /// directories are always killed.
    pub fn track_processes_in(&self, dir: impl Into<PathBuf>) {
        let dir = dir.into();
        self.with_state(|s| s.process_dirs.push(dir));
    }

    /// Force-deletes every container of `runc`'s root on drop, then removes
    /// the root if it is empty.
    pub fn track_runc_root(&self, runc: &Runc) {
        let runc = runc.clone();
        self.with_state(|s| {
            if !s.runc_roots.iter().any(|r| r.root() == runc.root()) {
                s.runc_roots.push(runc);
            }
        });
    }

    /// Force-deletes container `id` of `runc`'s root on drop; for roots shared
    /// with other tests, where deleting everything would be wrong.
    pub fn track_runc_container(&self, runc: &Runc, id: &str) {
        let entry = (runc.clone(), id.to_string());
        self.with_state(|s| s.runc_containers.push(entry));
    }

    /// Removes cgroup `path` (as in `linux.cgroupsPath`) and its children in
    /// every hierarchy on drop, killing what still runs in it.
    pub fn track_cgroup(&self, path: &str) {
        let path = path.to_string();
        self.with_state(|s| s.cgroups.push(path));
    }

    /// Detaches the mount at `path` on drop. Mounts under the test's own
    /// directories are found without being registered.
    pub fn track_mount(&self, path: impl Into<PathBuf>) {
        let path = path.into();
        self.with_state(|s| s.mounts.push(path));
    }

    /// Removes `path` (file, socket or directory tree) on drop.
    pub fn track_path(&self, path: impl Into<PathBuf>) {
        let path = path.into();
        self.with_state(|s| s.paths.push(path));
    }

    /// Runs `f` first thing on drop (last registered, first run).
    pub fn defer(&self, f: impl FnOnce() + Send + 'static) {
        self.with_state(|s| s.deferred.push(Box::new(f)));
    }

    fn with_state<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        // A panic while the lock was held must not stop the cleanup itself.
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut state)
    }

    /// Runs every step and returns what was left behind.
    fn run(&mut self) -> Vec<String> {
        let state = std::mem::take(self.state.get_mut().unwrap_or_else(|e| e.into_inner()));
        let mut leaks = Vec::new();

        for f in state.deferred.into_iter().rev() {
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).is_err() {
                leaks.push("a deferred cleanup closure panicked".to_string());
            }
        }

        kill_all(&state.pids, &mut leaks);
        let mut dirs = state.process_dirs.clone();
        dirs.push(self.work_dir.clone());
        dirs.push(self.run_dir.clone());
        let (strays, sockets) = kill_processes_in(&dirs);
        wait_gone(&strays, &mut leaks);
        remove_sockets(&sockets, &mut leaks);

        for (runc, id) in &state.runc_containers {
            force_delete(runc, id, &mut leaks);
        }
        for runc in &state.runc_roots {
            for id in runc.list_ids().unwrap_or_default() {
                force_delete(runc, &id, &mut leaks);
            }
            // Not remove_dir_all: a shared root may hold other tests' containers.
            if let Err(e) = fs::remove_dir(runc.root()) {
                if !matches!(e.kind(), ErrorKind::NotFound | ErrorKind::DirectoryNotEmpty) {
                    leaks.push(format!("runc root {}: {e}", runc.root().display()));
                }
            }
        }

        let mut cgroups = state.cgroups.clone();
        cgroups.push(self.cgroup_subtree());
        for cgroup in &cgroups {
            remove_cgroup_everywhere(cgroup, &mut leaks);
        }

        let mut mounts = state.mounts.clone();
        mounts.extend(mounts_under(&[&self.run_dir, &self.work_dir]));
        unmount_all(mounts, &mut leaks);

        for path in state.paths.iter().rev() {
            remove_path(path, &mut leaks);
        }
        remove_path(&self.work_dir, &mut leaks);
        remove_path(&self.run_dir, &mut leaks);
        leaks
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let leaks = self.run();
        if LIVE.fetch_sub(1, Ordering::SeqCst) == 1 {
            remove_shared_parents();
        }
        if leaks.is_empty() {
            return;
        }
        for leak in &leaks {
            eprintln!("corral-e2e cleanup {}: {leak}", self.unique);
        }
        // A second panic during unwinding would abort and hide the first.
        if !std::thread::panicking() {
            panic!(
                "cleanup of {} left {} thing(s) behind: {leaks:?}",
                self.unique,
                leaks.len()
            );
        }
    }
}

/// Creates `dir`, retrying if the last test of the process removes the
/// shared parent at the same moment.
fn create_dir_racing(dir: &Path) -> Result<()> {
    let mut attempt = 0;
    loop {
        match fs::create_dir_all(dir) {
            Err(e) if e.kind() == ErrorKind::NotFound && attempt < 5 => attempt += 1,
            other => return other.context(|| format!("create {}", dir.display())),
        }
    }
}

fn remove_shared_parents() {
    // Only empty ones: other test processes may be using them.
    let _ = fs::remove_dir(RUN_BASE);
    let _ = fs::remove_dir(work_base());
    for hierarchy in cgroup_hierarchies() {
        let _ = fs::remove_dir(hierarchy.join(CGROUP_PARENT.trim_start_matches('/')));
    }
}

fn force_delete(runc: &Runc, id: &str, leaks: &mut Vec<String>) {
    if let Err(e) = runc.delete_force(id) {
        // Already gone is the normal case for a test that cleaned up itself.
        if runc
            .list_ids()
            .map(|ids| ids.iter().any(|i| i == id))
            .unwrap_or(true)
        {
            leaks.push(format!(
                "runc container {id} in {}: {e}",
                runc.root().display()
            ));
        }
    }
}

/// Start time of `pid` in clock ticks since boot (field 22 of
/// `/proc/<pid>/stat`), the identity that survives pid reuse.
pub(crate) fn proc_start_time(pid: i32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: split after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Whether `pid` still runs: zombies count as dead, their parent (often
/// init) reaps them when it will.
pub(crate) fn pid_alive(pid: i32) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat
        .rfind(')')
        .and_then(|i| stat[i + 1..].split_whitespace().next());
    !matches!(state, Some("Z") | Some("X") | None)
}

fn kill_all(pids: &[TrackedPid], leaks: &mut Vec<String>) {
    let mut waiting = Vec::new();
    let mut sockets = Vec::new();
    for p in pids {
        let same = match p.start_time {
            Some(t) => proc_start_time(p.pid) == Some(t),
            None => false,
        };
        if same && pid_alive(p.pid) {
            sockets.extend(listening_sockets(p.pid));
            let _ = kill(Pid::from_raw(p.pid), Signal::SIGKILL);
            waiting.push(p.pid);
        }
    }
    wait_gone(&waiting, leaks);
    remove_sockets(&sockets, leaks);
}

/// Paths of the unix sockets `pid` listens on: a killed server cannot remove
/// them itself, and they may lie outside the test's directories (a shim's
/// task socket under /run/containerd/s).
fn listening_sockets(pid: i32) -> Vec<PathBuf> {
    // __SO_ACCEPTCON in the Flags column of /proc/net/unix.
    const LISTENING: u32 = 0x0001_0000;
    let inodes: Vec<String> = fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flat_map(|entries| entries.flatten())
        .filter_map(|e| fs::read_link(e.path()).ok())
        .filter_map(|target| {
            let target = target.to_string_lossy().into_owned();
            let inode = target.strip_prefix("socket:[")?.strip_suffix(']')?;
            Some(inode.to_string())
        })
        .collect();
    let Ok(table) = fs::read_to_string(format!("/proc/{pid}/net/unix")) else {
        return Vec::new();
    };
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let flags = u32::from_str_radix(fields.get(3)?, 16).ok()?;
            let inode = fields.get(6)?;
            let path = fields.get(7)?;
            (flags & LISTENING != 0 && path.starts_with('/') && inodes.iter().any(|i| i == inode))
                .then(|| PathBuf::from(path))
        })
        .collect()
}

fn remove_sockets(sockets: &[PathBuf], leaks: &mut Vec<String>) {
    use std::os::unix::fs::FileTypeExt;
    for socket in sockets {
        let is_socket = fs::symlink_metadata(socket)
            .map(|m| m.file_type().is_socket())
            .unwrap_or(false);
        if is_socket {
            if let Err(e) = fs::remove_file(socket) {
                if e.kind() != ErrorKind::NotFound {
                    leaks.push(format!("remove socket {}: {e}", socket.display()));
                }
            }
        }
    }
}

fn wait_gone(pids: &[i32], leaks: &mut Vec<String>) {
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    let deadline = Instant::now() + SETTLE;
    for &pid in pids {
        loop {
            // Our own children must be reaped or they stay zombies. A
            // multithreaded child reads as a zombie before it can be reaped,
            // so for children only a successful reap counts.
            let gone = match waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => false,
                Ok(_) => true,
                // Not our child: its parent (often init) reaps it.
                Err(_) => !pid_alive(pid),
            };
            if gone {
                break;
            }
            if Instant::now() > deadline {
                leaks.push(format!("process {pid} survived SIGKILL"));
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Every mounted cgroup hierarchy (v1 controllers, named v1 hierarchies and
/// the v2 one), or the single v2 root on a pure v2 host.
pub fn cgroup_hierarchies() -> Vec<PathBuf> {
    let root = Path::new(CGROUP_MOUNT);
    if root.join("cgroup.procs").exists() {
        return vec![root.to_path_buf()];
    }
    let Ok(entries) = fs::read_dir(root) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        // Symlinks such as cpu,cpuacct -> cpu name a hierarchy twice.
        .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
        .map(|e| e.path())
        .filter(|p| p.join("cgroup.procs").exists())
        .collect();
    out.sort();
    out
}

fn remove_cgroup_everywhere(cgroup: &str, leaks: &mut Vec<String>) {
    let relative = cgroup.trim_start_matches('/');
    if relative.is_empty() {
        return;
    }
    for hierarchy in cgroup_hierarchies() {
        let dir = hierarchy.join(relative);
        if dir.exists() {
            if let Err(e) = remove_cgroup_tree(&dir) {
                leaks.push(format!("cgroup {}: {e}", dir.display()));
            }
        }
    }
}

/// Removes a cgroup directory and its children, killing what still runs in
/// them: a container that outlived its runc state would otherwise pin it.
pub(crate) fn remove_cgroup_tree(dir: &Path) -> std::io::Result<()> {
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_cgroup_tree(&entry.path())?;
            }
        }
    }
    let deadline = Instant::now() + SETTLE;
    loop {
        if let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs")) {
            for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
        // A frozen cgroup (a paused container) never lets its tasks die.
        let _ = fs::write(dir.join("freezer.state"), "THAWED");
        let _ = fs::write(dir.join("cgroup.freeze"), "0");
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Mount points under any of `dirs`, from this mount namespace's mountinfo.
pub fn mounts_under(dirs: &[&Path]) -> Vec<PathBuf> {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    info.lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape_mountinfo(p)))
        .filter(|p| dirs.iter().any(|d| p.starts_with(d)))
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            if let Some(b) = std::str::from_utf8(&bytes[i + 1..i + 4])
                .ok()
                .and_then(|oct| u8::from_str_radix(oct, 8).ok())
            {
                out.push(b);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn unmount_all(mut mounts: Vec<PathBuf>, leaks: &mut Vec<String>) {
    // Children before parents; a path mounted twice is unmounted twice.
    mounts.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for mount in mounts {
        match nix::mount::umount2(&mount, nix::mount::MntFlags::MNT_DETACH) {
            Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
            Err(e) => leaks.push(format!("unmount {}: {e}", mount.display())),
        }
    }
}

fn remove_path(path: &Path, leaks: &mut Vec<String>) {
    let result = match fs::symlink_metadata(path) {
        Err(_) => return,
        Ok(md) if md.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
    };
    if let Err(e) = result {
        if e.kind() != ErrorKind::NotFound {
            leaks.push(format!("remove {}: {e}", path.display()));
        }
    }
}

/// Removes what test processes that are no longer alive left behind: their
/// directories, the runc containers in them, the processes whose working
/// directory is in them (shims), and their cgroups. Returns what could not be
/// removed. Safe while other test processes run: only names whose owner pid
/// is dead are touched.
pub fn sweep_stale() -> Vec<String> {
    let mut leaks = Vec::new();
    let stale_dirs: Vec<PathBuf> = [PathBuf::from(RUN_BASE), work_base()]
        .iter()
        .filter_map(|base| fs::read_dir(base).ok())
        .flat_map(|entries| entries.flatten())
        .filter(|e| is_stale(&e.file_name().to_string_lossy()))
        .map(|e| e.path())
        .collect();
    if !stale_dirs.is_empty() {
        let (killed, sockets) = kill_processes_in(&stale_dirs);
        wait_gone(&killed, &mut leaks);
        remove_sockets(&sockets, &mut leaks);
        for dir in &stale_dirs {
            let runc = Runc::new(dir.join("runc"));
            if runc.root().is_dir() {
                for id in runc.list_ids().unwrap_or_default() {
                    force_delete(&runc, &id, &mut leaks);
                }
            }
        }
        let refs: Vec<&Path> = stale_dirs.iter().map(PathBuf::as_path).collect();
        unmount_all(mounts_under(&refs), &mut leaks);
        for dir in &stale_dirs {
            remove_path(dir, &mut leaks);
        }
    }
    for hierarchy in cgroup_hierarchies() {
        let parent = hierarchy.join(CGROUP_PARENT.trim_start_matches('/'));
        let Ok(entries) = fs::read_dir(&parent) else {
            continue;
        };
        for entry in entries.flatten() {
            let is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(false);
            if is_dir && is_stale(&entry.file_name().to_string_lossy()) {
                if let Err(e) = remove_cgroup_tree(&entry.path()) {
                    leaks.push(format!("cgroup {}: {e}", entry.path().display()));
                }
            }
        }
    }
    leaks
}

fn is_stale(name: &str) -> bool {
    match unique::owner_pid(name).and_then(|p| i32::try_from(p).ok()) {
        Some(pid) => pid != std::process::id() as i32 && !pid_alive(pid),
        None => false,
    }
}

/// SIGKILLs every process but this one whose working directory lies under
/// one of `dirs`: shims run with the bundle as their working directory.
/// Returns the pids signalled and the sockets they listened on.
fn kill_processes_in(dirs: &[PathBuf]) -> (Vec<i32>, Vec<PathBuf>) {
    let mut killed = Vec::new();
    let mut sockets = Vec::new();
    let me = std::process::id() as i32;
    let Ok(entries) = fs::read_dir("/proc") else {
        return (killed, sockets);
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if let Ok(cwd) = fs::read_link(entry.path().join("cwd")) {
            if pid != me && dirs.iter().any(|d| cwd.starts_with(d)) && pid_alive(pid) {
                sockets.extend(listening_sockets(pid));
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                killed.push(pid);
            }
        }
    }
    (killed, sockets)
}

/// Runs `command` and returns its stdout, or an error carrying its stderr.
pub(crate) fn run_command(command: &mut Command) -> Result<String> {
    let what = format!("{command:?}");
    let output = command
        .stdin(Stdio::null())
        .output()
        .context(|| format!("run {what}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.status.success() {
        return Err(crate::Error::Command {
            command: what,
            status: output.status,
            stdout,
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        });
    }
    Ok(stdout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape_mountinfo(r"/tmp/a\040b"), "/tmp/a b");
        assert_eq!(unescape_mountinfo(r"/x\134y"), r"/x\y");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
    }

    #[test]
    fn own_process_start_time_is_readable() {
        let me = std::process::id() as i32;
        assert!(proc_start_time(me).is_some());
        assert!(pid_alive(me));
    }
}
