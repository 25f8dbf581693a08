//! The OCI runtime binary (runc by default), driven through its CLI.
//!
//! Owns the command lines and the parsing of what the runtime prints. Every
//! command runs through the [`Reaper`], never `Child::wait`, because the
//! shim reaps all of its children itself.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use crate::reaper::{CommandOutput, Reaper};

#[derive(Debug, thiserror::Error)]
pub enum RuncError {
    #[error("OCI runtime binary {name:?} not found in PATH")]
    BinaryNotFound { name: String },

    #[error("start {binary}: {source}")]
    Spawn {
        binary: String,
        #[source]
        source: std::io::Error,
    },

    #[error("{binary} {command} {id}: {message}")]
    Failed {
        binary: String,
        command: &'static str,
        id: String,
        message: String,
    },

    #[error("{binary} {command} {id}: unexpected output: {detail}")]
    Output {
        binary: String,
        command: &'static str,
        id: String,
        detail: String,
    },
}

/// The stdio handed to the runtime for a process without a terminal: runc
/// passes its own fds 0-2 to the container process.
pub struct ProcessStdio {
    pub stdin: Stdio,
    pub stdout: Stdio,
    pub stderr: Stdio,
}

impl ProcessStdio {
    pub fn null() -> Self {
        ProcessStdio {
            stdin: Stdio::null(),
            stdout: Stdio::null(),
            stderr: Stdio::null(),
        }
    }
}

/// How to start a container's init or an exec process.
pub struct Launch<'a> {
    pub pid_file: &'a Path,
    /// runc's `--log`: with the process's stdio handed over, this file is
    /// where runc (and runc init) explain a failure.
    pub log_file: &'a Path,
    pub console_socket: Option<&'a Path>,
    pub stdio: ProcessStdio,
}

#[derive(Debug, Clone)]
pub struct Runc {
    binary: PathBuf,
    root: PathBuf,
    systemd_cgroup: bool,
}

impl Runc {
    /// `binary` is a name looked up in `PATH` or a path; `root` is runc's
    /// state directory (`--root`).
    pub fn new(binary: &str, root: &Path, systemd_cgroup: bool) -> Result<Self, RuncError> {
        let binary = resolve_binary(binary).ok_or_else(|| RuncError::BinaryNotFound {
            name: binary.to_string(),
        })?;
        Ok(Runc {
            binary,
            root: root.to_path_buf(),
            systemd_cgroup,
        })
    }

    pub fn create(
        &self,
        reaper: &Reaper,
        id: &str,
        bundle: &Path,
        launch: Launch<'_>,
    ) -> Result<(), RuncError> {
        let mut cmd = self.command(Some(launch.log_file));
        cmd.arg("create")
            .arg("--bundle")
            .arg(bundle)
            .arg("--pid-file")
            .arg(launch.pid_file);
        if let Some(socket) = launch.console_socket {
            cmd.arg("--console-socket").arg(socket);
        }
        cmd.arg(id);
        self.run_launch(reaper, cmd, "create", id, launch)
    }

    pub fn exec(
        &self,
        reaper: &Reaper,
        id: &str,
        process_json: &Path,
        launch: Launch<'_>,
    ) -> Result<(), RuncError> {
        let mut cmd = self.command(Some(launch.log_file));
        cmd.arg("exec")
            .arg("--detach")
            .arg("--process")
            .arg(process_json)
            .arg("--pid-file")
            .arg(launch.pid_file);
        if let Some(socket) = launch.console_socket {
            cmd.arg("--console-socket").arg(socket);
        }
        cmd.arg(id);
        self.run_launch(reaper, cmd, "exec", id, launch)
    }

    pub fn start(&self, reaper: &Reaper, id: &str) -> Result<(), RuncError> {
        self.simple(reaper, "start", id, &[], None).map(drop)
    }

    pub fn kill(&self, reaper: &Reaper, id: &str, signal: u32, all: bool) -> Result<(), RuncError> {
        let flags: &[&str] = if all { &["--all"] } else { &[] };
        // runc takes the signal after the id: `runc kill [--all] <id> <signal>`.
        self.run(reaper, "kill", flags, id, &[&signal.to_string()], None)
            .map(drop)
    }

    pub fn delete(&self, reaper: &Reaper, id: &str, force: bool) -> Result<(), RuncError> {
        let args: &[&str] = if force { &["--force"] } else { &[] };
        match self.simple(reaper, "delete", id, args, None) {
            Ok(_) => Ok(()),
            // Deleting what is already gone is what a retry after a crash does.
            Err(RuncError::Failed { message, .. }) if message.contains("does not exist") => Ok(()),
            Err(e) => Err(e),
        }
    }

    pub fn pause(&self, reaper: &Reaper, id: &str) -> Result<(), RuncError> {
        self.simple(reaper, "pause", id, &[], None).map(drop)
    }

    pub fn resume(&self, reaper: &Reaper, id: &str) -> Result<(), RuncError> {
        self.simple(reaper, "resume", id, &[], None).map(drop)
    }

    /// Applies OCI `LinuxResources`, given as JSON.
    pub fn update(
        &self,
        reaper: &Reaper,
        id: &str,
        resources_json: &[u8],
    ) -> Result<(), RuncError> {
        self.simple(
            reaper,
            "update",
            id,
            &["--resources", "-"],
            Some(resources_json),
        )
        .map(drop)
    }

    /// The pids of every process in the container's cgroup.
    pub fn ps(&self, reaper: &Reaper, id: &str) -> Result<Vec<u32>, RuncError> {
        let out = self.simple(reaper, "ps", id, &["--format", "json"], None)?;
        serde_json::from_slice::<Option<Vec<u32>>>(&out.stdout)
            .map(Option::unwrap_or_default)
            .map_err(|e| RuncError::Output {
                binary: self.binary.display().to_string(),
                command: "ps",
                id: id.to_string(),
                detail: e.to_string(),
            })
    }

    fn command(&self, log_file: Option<&Path>) -> Command {
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--root").arg(&self.root);
        if let Some(log) = log_file {
            cmd.arg("--log").arg(log).arg("--log-format").arg("json");
        }
        if self.systemd_cgroup {
            cmd.arg("--systemd-cgroup");
        }
        cmd
    }

    fn simple(
        &self,
        reaper: &Reaper,
        command: &'static str,
        id: &str,
        flags: &[&str],
        stdin: Option<&[u8]>,
    ) -> Result<CommandOutput, RuncError> {
        self.run(reaper, command, flags, id, &[], stdin)
    }

    /// `runc <command> <flags> <id> <trailing>`, its output captured.
    fn run(
        &self,
        reaper: &Reaper,
        command: &'static str,
        flags: &[&str],
        id: &str,
        trailing: &[&str],
        stdin: Option<&[u8]>,
    ) -> Result<CommandOutput, RuncError> {
        let mut cmd = self.command(None);
        cmd.arg(command)
            .args(flags)
            .arg(id)
            .args(trailing)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let out = reaper
            .run(&mut cmd, stdin)
            .map_err(|source| RuncError::Spawn {
                binary: self.binary.display().to_string(),
                source,
            })?;
        if out.status != 0 {
            return Err(self.failed(command, id, &out.stderr, out.status));
        }
        Ok(out)
    }

    fn run_launch(
        &self,
        reaper: &Reaper,
        mut cmd: Command,
        command: &'static str,
        id: &str,
        launch: Launch<'_>,
    ) -> Result<(), RuncError> {
        cmd.stdin(launch.stdio.stdin)
            .stdout(launch.stdio.stdout)
            .stderr(launch.stdio.stderr);
        let out = reaper
            .run(&mut cmd, None)
            .map_err(|source| RuncError::Spawn {
                binary: self.binary.display().to_string(),
                source,
            })?;
        // Dropping `cmd` closes the shim's copies of the process's pipe ends,
        // so the output copiers see EOF when the process exits.
        drop(cmd);
        if out.status != 0 {
            let logged = last_error(launch.log_file);
            return Err(self.failed(command, id, logged.as_bytes(), out.status));
        }
        Ok(())
    }

    fn failed(&self, command: &'static str, id: &str, stderr: &[u8], status: i32) -> RuncError {
        let text = String::from_utf8_lossy(stderr);
        let message = text.trim();
        RuncError::Failed {
            binary: self.binary.display().to_string(),
            command,
            id: id.to_string(),
            message: if message.is_empty() {
                format!("exited with status {status}")
            } else {
                message.to_string()
            },
        }
    }
}

/// The last error runc wrote to its JSON log: the reason a create or exec
/// failed, as runc init reported it.
fn last_error(log_file: &Path) -> String {
    let Ok(text) = fs::read_to_string(log_file) else {
        return String::new();
    };
    text.lines()
        .rev()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .find(|entry| entry["level"] == "error" || entry["level"] == "fatal")
        .and_then(|entry| entry["msg"].as_str().map(str::to_string))
        .unwrap_or_default()
}

/// Resolves a runtime binary as `exec` would: a name with a slash is a
/// path, anything else is looked up in `PATH`.
fn resolve_binary(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &Path| {
        fs::metadata(p)
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    };
    if name.is_empty() {
        return None;
    }
    if name.contains('/') {
        let path = PathBuf::from(name);
        return executable(&path).then_some(path);
    }
    let path = std::env::var_os("PATH")
        .unwrap_or_else(|| "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| executable(candidate))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_names_in_path_and_refuses_missing_ones() {
        assert!(resolve_binary("sh").is_some());
        assert!(resolve_binary("/bin/sh").is_some());
        assert!(resolve_binary("corral-no-such-runtime").is_none());
        assert!(resolve_binary("/nonexistent/runc").is_none());
        assert!(resolve_binary("").is_none());
    }

    #[test]
    fn last_error_reads_the_final_error_entry() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("log.json");
        fs::write(
            &log,
            concat!(
                "{\"level\":\"info\",\"msg\":\"starting\"}\n",
                "{\"level\":\"error\",\"msg\":\"first\"}\n",
                "not json\n",
                "{\"level\":\"error\",\"msg\":\"exec: \\\"nope\\\": executable file not found\"}\n",
            ),
        )
        .expect("write log");
        assert_eq!(
            last_error(&log),
            "exec: \"nope\": executable file not found"
        );
        assert_eq!(last_error(&dir.path().join("missing")), "");
    }
}
