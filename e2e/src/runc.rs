//! The raw runc command line: the baseline a shim is measured against, and
//! the tool the cleanup uses to remove containers.
//!
//! Every call passes `--root`, so each test works in a state root of its own
//! (see [`crate::Cleanup::runc`]) and never sees another test's containers.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::cleanup::run_command;
use crate::error::{Context, Error, Result};

/// runc bound to one state root.
#[derive(Clone, Debug)]
pub struct Runc {
    binary: PathBuf,
    root: PathBuf,
}

/// What `runc state` reports about a container.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerState {
    pub id: String,
    /// Pid of the container's init, as seen from the host; 0 once stopped.
    pub pid: u32,
    /// `created`, `running`, `paused` or `stopped`.
    pub status: String,
    pub bundle: PathBuf,
}

/// The stdio a container created with `runc create` keeps. A pipe would
/// make a reader wait for the container's exit, so files are the usual
/// choice.
pub struct ContainerIo {
    pub stdin: Stdio,
    pub stdout: Stdio,
    pub stderr: Stdio,
}

impl ContainerIo {
    /// All three to /dev/null.
    pub fn null() -> Self {
        ContainerIo {
            stdin: Stdio::null(),
            stdout: Stdio::null(),
            stderr: Stdio::null(),
        }
    }

    /// stdin from /dev/null, stdout and stderr into new files at the given paths.
    pub fn files(stdout: &Path, stderr: &Path) -> Result<Self> {
        let out = File::create(stdout).context(|| format!("create {}", stdout.display()))?;
        let err = File::create(stderr).context(|| format!("create {}", stderr.display()))?;
        Ok(ContainerIo {
            stdin: Stdio::null(),
            stdout: out.into(),
            stderr: err.into(),
        })
    }
}

impl Runc {
    /// `runc` from `$PATH`, with state under `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self::with_binary("runc", root)
    }

    /// A given runc binary, with state under `root`.
    pub fn with_binary(binary: impl Into<PathBuf>, root: impl Into<PathBuf>) -> Self {
        Runc {
            binary: binary.into(),
            root: root.into(),
        }
    }

    /// The state root (`--root`).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The runc binary.
    pub fn binary(&self) -> &Path {
        &self.binary
    }

    /// `runc --root <root>`, for subcommands this type does not wrap.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--root").arg(&self.root);
        cmd
    }

    /// `runc run --bundle <bundle> <id>` in the foreground, capturing the
    /// container's stdout and stderr. The container's exit code is the
    /// status of the returned output; runc removes the container when it exits.
    pub fn run(&self, bundle: &Path, id: &str) -> Result<Output> {
        self.command()
            .arg("run")
            .arg("--bundle")
            .arg(bundle)
            .arg(id)
            .stdin(Stdio::null())
            .output()
            .context(|| format!("runc run {id}"))
    }

    /// `runc create --bundle <bundle> --pid-file … <id>`; returns the pid of
    /// the container's init, which waits for [`Runc::start`]. runc's own log
    /// goes to `<bundle>/runc.log`, quoted in the error when create fails.
    pub fn create(&self, bundle: &Path, id: &str, io: ContainerIo) -> Result<u32> {
        let pid_file = bundle.join(format!("{id}.pid"));
        let log = bundle.join("runc.log");
        let status = self
            .command_logging_to(&log)
            .arg("create")
            .arg("--bundle")
            .arg(bundle)
            .arg("--pid-file")
            .arg(&pid_file)
            .arg(id)
            .stdin(io.stdin)
            .stdout(io.stdout)
            .stderr(io.stderr)
            .status()
            .context(|| format!("runc create {id}"))?;
        if !status.success() {
            return Err(Error::Command {
                command: format!("runc create {id}"),
                status,
                stdout: String::new(),
                stderr: std::fs::read_to_string(&log).unwrap_or_default(),
            });
        }
        let pid = std::fs::read_to_string(&pid_file)
            .context(|| format!("read {}", pid_file.display()))?;
        pid.trim()
            .parse()
            .map_err(|_| Error::Protocol(format!("runc wrote pid {pid:?}")))
    }

    fn command_logging_to(&self, log: &Path) -> Command {
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--root").arg(&self.root).arg("--log").arg(log);
        cmd
    }

    /// `runc start <id>`.
    pub fn start(&self, id: &str) -> Result<()> {
        run_command(self.command().args(["start", id])).map(drop)
    }

    /// `runc kill <id> <signal>`; `signal` as runc takes it (`KILL`, `9`, `SIGTERM`).
    pub fn kill(&self, id: &str, signal: &str) -> Result<()> {
        run_command(self.command().args(["kill", id, signal])).map(drop)
    }

    /// `runc delete <id>`: only a stopped (or created) container.
    pub fn delete(&self, id: &str) -> Result<()> {
        run_command(self.command().args(["delete", id])).map(drop)
    }

    /// `runc delete --force <id>`: kills the container first if it runs.
    pub fn delete_force(&self, id: &str) -> Result<()> {
        run_command(self.command().args(["delete", "--force", id])).map(drop)
    }

    /// `runc state <id>`.
    pub fn state(&self, id: &str) -> Result<ContainerState> {
        let out = run_command(self.command().args(["state", id]))?;
        let value: serde_json::Value =
            serde_json::from_str(&out).context(|| format!("parse runc state {id}"))?;
        Ok(ContainerState {
            id: value["id"].as_str().unwrap_or_default().to_string(),
            pid: value["pid"]
                .as_u64()
                .and_then(|p| u32::try_from(p).ok())
                .unwrap_or(0),
            status: value["status"].as_str().unwrap_or_default().to_string(),
            bundle: PathBuf::from(value["bundle"].as_str().unwrap_or_default()),
        })
    }

    /// Ids of every container in the root; empty when the root does not exist.
    pub fn list_ids(&self) -> Result<Vec<String>> {
        if !self.root.exists() {
            return Ok(Vec::new());
        }
        let out = run_command(self.command().args(["list", "--quiet"]))?;
        Ok(out
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect())
    }

    /// Polls `runc state` until the container reaches `status`.
    pub fn wait_status(&self, id: &str, status: &str, timeout: Duration) -> Result<ContainerState> {
        let deadline = Instant::now() + timeout;
        loop {
            let state = self.state(id)?;
            if state.status == status {
                return Ok(state);
            }
            if Instant::now() > deadline {
                return Err(Error::Timeout(format!(
                    "container {id} is {} after {timeout:?}, expected {status}",
                    state.status
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
