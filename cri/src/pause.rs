//! The built-in pause process, so that a pod starts without pulling a pause
//! image.
//!
//! The binary (`cri/pause/pause.rs`, built by `cri/build.rs`) is embedded in
//! corrald. [`install_rootfs`] lays it out once, at daemon start, as a
//! rootfs holding nothing else; every sandbox container runs
//! [`PAUSE_ARGS`] in that rootfs, mounted read-only.
//!
//! This module owns `<dir>/rootfs` and nothing else: it does not build the
//! sandbox's OCI spec, and it never removes a rootfs a sandbox may be using.

use std::fs::{self, File, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The pause executable: static, libc-free, a couple of KB.
const PAUSE_BINARY: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/corral-pause"));

/// The process args of a sandbox container running the built-in pause.
pub const PAUSE_ARGS: &[&str] = &["/pause"];

/// The file name of the executable inside the rootfs.
const PAUSE_NAME: &str = "pause";

/// Mount points a sandbox spec may mount onto. They exist beforehand so that
/// runc has nothing to create in a rootfs that every sandbox shares.
const MOUNT_POINTS: &[&str] = &["dev", "etc", "proc", "sys"];
const FILE_MOUNT_POINTS: &[&str] = &["etc/hostname", "etc/hosts", "etc/resolv.conf"];

/// Why the pause rootfs cannot be installed. Always a failure of the host
/// (permissions, disk), never of a request.
#[derive(Debug, thiserror::Error)]
pub enum PauseError {
    #[error("installing the pause rootfs: {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Makes `dir/rootfs` hold the pause executable and the mount points runc
/// needs, and returns the rootfs path. Idempotent: an executable already
/// there with the same content is left alone, so a restart does not replace
/// a file running sandboxes execute.
pub fn install_rootfs(dir: &Path) -> Result<PathBuf, PauseError> {
    let rootfs = dir.join("rootfs");
    create_dir(&rootfs)?;
    for name in MOUNT_POINTS {
        create_dir(&rootfs.join(name))?;
    }
    for name in FILE_MOUNT_POINTS {
        create_empty_file(&rootfs.join(name))?;
    }
    let binary = rootfs.join(PAUSE_NAME);
    if !is_current(&binary)? {
        write_executable(&binary)?;
    }
    Ok(rootfs)
}

fn create_dir(path: &Path) -> Result<(), PauseError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(path)
        .map_err(|source| io_error("create directory", path, source))
}

/// Creates `path` empty unless it exists; never truncates.
fn create_empty_file(path: &Path) -> Result<(), PauseError> {
    fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .open(path)
        .map(drop)
        .map_err(|source| io_error("create", path, source))
}

/// Whether `path` already is this build's pause, executable.
fn is_current(path: &Path) -> Result<bool, PauseError> {
    let metadata = match fs::symlink_metadata(path) {
        Ok(metadata) => metadata,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(io_error("inspect", path, e)),
    };
    if !metadata.is_file()
        || metadata.len() != PAUSE_BINARY.len() as u64
        || metadata.permissions().mode() & 0o7777 != 0o755
    {
        return Ok(false);
    }
    let content = fs::read(path).map_err(|e| io_error("read", path, e))?;
    Ok(content == PAUSE_BINARY)
}

/// Writes the executable beside `path` and renames it into place, so that a
/// sandbox starting meanwhile finds either the old file or the whole new one.
fn write_executable(path: &Path) -> Result<(), PauseError> {
    let temp = path.with_file_name(format!(".{PAUSE_NAME}.{}", std::process::id()));
    let written = File::create(&temp)
        .and_then(|mut file| {
            file.write_all(PAUSE_BINARY)?;
            file.set_permissions(Permissions::from_mode(0o755))
        })
        .and_then(|()| fs::rename(&temp, path));
    written.map_err(|e| {
        let _ = fs::remove_file(&temp);
        io_error("write", path, e)
    })
}

fn io_error(what: &'static str, path: &Path, source: io::Error) -> PauseError {
    PauseError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

#[cfg(test)]
pub(crate) mod test_runc {
    //! A container run by real runc for tests: a bundle in a tempdir, a
    //! private `--root`, and a guard that deletes the container even when
    //! the test fails.

    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, Output, Stdio};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::{Duration, Instant};

    use serde_json::{json, Value};

    /// A unique container id for this test process.
    pub fn unique_id(prefix: &str) -> String {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        format!("corral-test-{prefix}-{}-{n}", std::process::id())
    }

    /// A minimal spec: new pid/ipc/uts/mount namespaces, /proc and /dev,
    /// `capabilities` as all of the process's sets.
    pub fn spec(rootfs: &Path, args: &[&str], capabilities: &[&str], readonly: bool) -> Value {
        json!({
            "ociVersion": "1.0.2",
            "process": {
                "terminal": false,
                "user": { "uid": 0, "gid": 0 },
                "args": args,
                "env": ["PATH=/bin"],
                "cwd": "/",
                "capabilities": {
                    "bounding": capabilities,
                    "effective": capabilities,
                    "permitted": capabilities,
                },
                "noNewPrivileges": true,
            },
            "root": { "path": rootfs, "readonly": readonly },
            "hostname": "corral-test",
            "mounts": [
                { "destination": "/proc", "type": "proc", "source": "proc" },
                {
                    "destination": "/dev", "type": "tmpfs", "source": "tmpfs",
                    "options": ["nosuid", "mode=755", "size=1024k"],
                },
            ],
            "linux": {
                "namespaces": [
                    { "type": "pid" }, { "type": "ipc" }, { "type": "uts" }, { "type": "mount" },
                ],
            },
        })
    }

    /// A container started by `runc run` in the foreground: runc's exit
    /// status is the container's.
    pub struct Container {
        pub id: String,
        state_root: PathBuf,
        runc: Option<Child>,
        _dir: tempfile::TempDir,
    }

    impl Container {
        /// Starts `spec` in the background, stdio on /dev/null.
        pub fn start(spec: &Value) -> Container {
            let (dir, mut command, id) = prepare(spec);
            command.stdout(Stdio::null()).stderr(Stdio::null());
            let runc = command.spawn().unwrap();
            Container {
                id,
                state_root: dir.path().join("state"),
                runc: Some(runc),
                _dir: dir,
            }
        }

        /// Runs `spec` to its end and returns its output.
        pub fn run(spec: &Value) -> Output {
            let (dir, mut command, id) = prepare(spec);
            let guard = Container {
                id,
                state_root: dir.path().join("state"),
                runc: None,
                _dir: dir,
            };
            let output = command.output().unwrap();
            drop(guard);
            output
        }

        /// `runc <command…> <id> <args…>` on this container.
        pub fn runc(&self, command: &[&str], args: &[&str]) -> Output {
            Command::new("runc")
                .arg("--root")
                .arg(&self.state_root)
                .args(command)
                .arg(&self.id)
                .args(args)
                .stdin(Stdio::null())
                .output()
                .unwrap()
        }

        /// The container's `runc state`, once it reports `status`.
        pub fn wait_for_status(&self, status: &str) -> Value {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let output = self.runc(&["state"], &[]);
                if output.status.success() {
                    let state: Value = serde_json::from_slice(&output.stdout).unwrap();
                    if state["status"] == status {
                        return state;
                    }
                }
                assert!(
                    Instant::now() < deadline,
                    "{} never became {status}",
                    self.id
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }

        /// Waits for the foreground runc, hence the container, to exit.
        pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
            let runc = self.runc.as_mut().expect("started with Container::start");
            let deadline = Instant::now() + timeout;
            loop {
                if let Some(status) = runc.try_wait().unwrap() {
                    return status;
                }
                assert!(Instant::now() < deadline, "{} did not exit", self.id);
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    impl Drop for Container {
        fn drop(&mut self) {
            let _ = self.runc(&["delete", "-f"], &[]);
            if let Some(mut runc) = self.runc.take() {
                let _ = runc.kill();
                let _ = runc.wait();
            }
        }
    }

    /// Writes the bundle and returns `runc --root … run --bundle … <id>`.
    fn prepare(spec: &Value) -> (tempfile::TempDir, Command, String) {
        let dir = tempfile::tempdir().unwrap();
        let id = unique_id("runc");
        std::fs::write(dir.path().join("config.json"), spec.to_string()).unwrap();
        let mut command = Command::new("runc");
        command
            .arg("--root")
            .arg(dir.path().join("state"))
            .arg("--log")
            .arg(dir.path().join("runc.log"))
            .args(["run", "--bundle"])
            .arg(dir.path())
            .arg(&id)
            .stdin(Stdio::null());
        (dir, command, id)
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;
    use std::time::Duration;

    use super::test_runc::{spec, Container};
    use super::*;

    #[test]
    fn pause_binary_is_static() {
        assert_eq!(&PAUSE_BINARY[..4], b"\x7fELF", "not an ELF file");
        assert!(
            program_header_types(PAUSE_BINARY)
                .iter()
                .all(|&t| t != PT_INTERP),
            "pause asks for a program interpreter"
        );
        assert!(
            PAUSE_BINARY.len() < 64 * 1024,
            "pause grew to {} bytes",
            PAUSE_BINARY.len()
        );
    }

    #[test]
    fn install_rootfs_lays_out_and_keeps_the_binary() {
        let dir = tempfile::tempdir().unwrap();
        let rootfs = install_rootfs(dir.path()).unwrap();
        assert_eq!(rootfs, dir.path().join("rootfs"));
        let binary = rootfs.join("pause");
        assert_eq!(fs::read(&binary).unwrap(), PAUSE_BINARY);
        assert_eq!(
            fs::metadata(&binary).unwrap().permissions().mode() & 0o7777,
            0o755
        );
        for name in MOUNT_POINTS {
            assert!(rootfs.join(name).is_dir(), "{name} missing");
        }
        for name in FILE_MOUNT_POINTS {
            assert_eq!(fs::read(rootfs.join(name)).unwrap(), b"", "{name}");
        }
        let mut names: Vec<_> = fs::read_dir(&rootfs)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(
            names,
            ["dev", "etc", "pause", "proc", "sys"],
            "stray files left"
        );

        // Same content: the file (its inode) is not replaced.
        let inode = fs::metadata(&binary).unwrap().ino();
        install_rootfs(dir.path()).unwrap();
        assert_eq!(fs::metadata(&binary).unwrap().ino(), inode);

        // Different content: replaced whole.
        fs::write(&binary, b"old pause").unwrap();
        install_rootfs(dir.path()).unwrap();
        assert_eq!(fs::read(&binary).unwrap(), PAUSE_BINARY);
        assert_ne!(fs::metadata(&binary).unwrap().ino(), inode);
    }

    #[test]
    fn install_rootfs_reports_the_failing_path() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("file");
        fs::write(&blocker, b"").unwrap();
        let err = install_rootfs(&blocker).unwrap_err();
        assert!(
            err.to_string().contains(&blocker.display().to_string()),
            "{err}"
        );
    }

    #[test]
    fn pause_runs_in_runc_and_exits_zero_on_term() {
        let dir = tempfile::tempdir().unwrap();
        let rootfs = install_rootfs(dir.path()).unwrap();
        let mut container = Container::start(&spec(&rootfs, PAUSE_ARGS, &[], true));
        wait_until_pausing(&container);
        // Still there a moment later: it blocks rather than exits.
        std::thread::sleep(Duration::from_millis(200));
        container.wait_for_status("running");

        let kill = container.runc(&["kill"], &["TERM"]);
        assert!(kill.status.success(), "{kill:?}");
        let status = container.wait_exit(Duration::from_secs(5));
        assert_eq!(status.code(), Some(0), "{status}");
    }

    #[test]
    fn pause_exits_zero_on_int() {
        let dir = tempfile::tempdir().unwrap();
        let rootfs = install_rootfs(dir.path()).unwrap();
        let mut container = Container::start(&spec(&rootfs, PAUSE_ARGS, &[], true));
        wait_until_pausing(&container);
        let kill = container.runc(&["kill"], &["INT"]);
        assert!(kill.status.success(), "{kill:?}");
        assert_eq!(container.wait_exit(Duration::from_secs(5)).code(), Some(0));
    }

    #[test]
    fn pause_reaps_orphans_of_its_pid_namespace() {
        // A test rootfs: pause plus busybox to make an orphan with.
        let dir = tempfile::tempdir().unwrap();
        let rootfs = install_rootfs(dir.path()).unwrap();
        fs::create_dir(rootfs.join("bin")).unwrap();
        fs::copy("/bin/busybox", rootfs.join("bin/busybox")).unwrap();
        let container = Container::start(&spec(&rootfs, PAUSE_ARGS, &[], true));
        let pause_pid = wait_until_pausing(&container);

        // sh exits at once and leaves its `sleep` to the namespace's init.
        let exec = container.runc(
            &["exec"],
            &[
                "/bin/busybox",
                "sh",
                "-c",
                "/bin/busybox sleep 1 </dev/null >/dev/null 2>&1 & exit 0",
            ],
        );
        assert!(exec.status.success(), "{exec:?}");
        let orphans = children_of(pause_pid);
        assert_eq!(
            orphans.len(),
            1,
            "sleep was not reparented to pause: {orphans:?}"
        );

        // Once sleep has exited, no zombie of it may stay under pause.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !children_of(pause_pid).is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "pause left {:?} unreaped",
                children_of(pause_pid)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the container's init is pause, asleep with its signals
    /// blocked (runc reports "running" a moment before its init has exec'd,
    /// and a signal sent before the block is dropped), and returns its pid.
    fn wait_until_pausing(container: &Container) -> u64 {
        let pid = container.wait_for_status("running")["pid"]
            .as_u64()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // The state follows the command name in parentheses.
            let sleeping = stat
                .rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('S'));
            if cmdline == b"/pause\0" && sleeping {
                return pid;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "pid {pid} never paused"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    const PT_INTERP: u32 = 3;

    /// The `p_type` of every program header of a 64-bit little-endian ELF.
    fn program_header_types(elf: &[u8]) -> Vec<u32> {
        let u16_at = |at: usize| u16::from_le_bytes(elf[at..at + 2].try_into().unwrap());
        let u32_at = |at: usize| u32::from_le_bytes(elf[at..at + 4].try_into().unwrap());
        let u64_at = |at: usize| u64::from_le_bytes(elf[at..at + 8].try_into().unwrap());
        assert_eq!(elf[4], 2, "not ELFCLASS64");
        assert_eq!(elf[5], 1, "not little-endian");
        let phoff = u64_at(0x20) as usize;
        let phentsize = u16_at(0x36) as usize;
        let phnum = u16_at(0x38) as usize;
        assert!(phnum > 0, "no program headers");
        (0..phnum).map(|i| u32_at(phoff + i * phentsize)).collect()
    }

    /// Host pids whose parent is `parent` (zombies included).
    fn children_of(parent: u64) -> Vec<(u64, String)> {
        let mut children = Vec::new();
        for entry in fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u64>() else {
                continue;
            };
            let Ok(status) = fs::read_to_string(entry.path().join("status")) else {
                continue;
            };
            let field = |name: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(name))
                    .map(|v| v.trim().to_string())
                    .unwrap_or_default()
            };
            if field("PPid:") == parent.to_string() {
                children.push((pid, field("State:")));
            }
        }
        children
    }
}
