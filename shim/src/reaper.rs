//! Reaping: the shim is the child subreaper of its containers.
//!
//! One thread waits for SIGCHLD and reaps every exited child with
//! `waitpid(-1)`. A child the shim spawned itself (a runc command) has its
//! status handed to the caller of [`Reaper::run`]; every other exit (a
//! container's init, an exec process) goes to the exit handler the service
//! installed. Nothing else in the shim may call `wait`: it would steal exits.
//!
//! SIGCHLD must be blocked in every thread before the first thread starts
//! ([`block_signals`]), so that only this thread's `sigwait` sees it.

use std::{
    collections::HashMap,
    io::{self, Read, Write},
    process::{Command, Stdio},
    sync::{Arc, Condvar, Mutex, OnceLock},
    thread,
    time::SystemTime,
};

use nix::{
    errno::Errno,
    sys::{
        signal::{SigSet, Signal},
        wait::{waitpid, WaitPidFlag, WaitStatus},
    },
    unistd::Pid,
};

/// A reaped process: its pid, its exit code (or 128 + the signal that
/// killed it, as a shell reports it) and when the shim saw it exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    pub pid: i32,
    pub status: i32,
    pub at: SystemTime,
}

/// What a command run through [`Reaper::run`] left behind.
#[derive(Debug)]
pub struct CommandOutput {
    pub status: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

type ExitHandler = Box<dyn Fn(Exit) + Send + Sync>;

pub struct Reaper {
    /// Pids of commands whose callers wait in [`Reaper::run`], with their
    /// exit once reaped.
    commands: Mutex<HashMap<i32, Option<Exit>>>,
    reaped: Condvar,
    on_exit: OnceLock<ExitHandler>,
}

/// Blocks the signals the shim handles synchronously. Call before spawning
/// any thread: threads inherit the mask.
pub fn block_signals() -> nix::Result<()> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGCHLD);
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set.thread_block()
}

/// Makes this process the subreaper of its descendants, so that a
/// container's init, re-parented when `runc create` exits, is ours to reap.
pub fn set_subreaper() -> io::Result<()> {
    // SAFETY: prctl with PR_SET_CHILD_SUBREAPER takes one integer argument.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Reaper {
    /// Starts the reaping thread. [`block_signals`] must have run first.
    pub fn start() -> io::Result<Arc<Reaper>> {
        let reaper = Arc::new(Reaper {
            commands: Mutex::new(HashMap::new()),
            reaped: Condvar::new(),
            on_exit: OnceLock::new(),
        });
        let worker = Arc::clone(&reaper);
        thread::Builder::new()
            .name("reaper".into())
            .stack_size(64 * 1024)
            .spawn(move || worker.wait_signals())?;
        Ok(reaper)
    }

    /// Installs the handler of exits that are not the shim's own commands.
    /// Exits reaped before it is installed are logged and dropped, which
    /// cannot happen in practice: the service installs it before it runs
    /// anything.
    pub fn set_exit_handler(&self, handler: impl Fn(Exit) + Send + Sync + 'static) {
        if self.on_exit.set(Box::new(handler)).is_err() {
            log::warn!("exit handler installed twice; keeping the first");
        }
    }

    /// Runs `cmd` to completion, feeding it `stdin`, and returns its output
    /// and exit status. Its stdout and stderr are captured unless the caller
    /// set them.
    pub fn run(&self, cmd: &mut Command, stdin: Option<&[u8]>) -> io::Result<CommandOutput> {
        if stdin.is_some() {
            cmd.stdin(Stdio::piped());
        }
        let mut child = {
            // Registered under the lock so the reaper thread, which takes the
            // same lock, cannot reap this pid before it is known to be ours.
            let mut commands = self.lock_commands();
            let child = cmd.spawn()?;
            commands.insert(child.id() as i32, None);
            child
        };
        let pid = child.id() as i32;
        if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
            // A runtime that exits without reading its input is reported by
            // its status below, not by this write.
            let _ = pipe.write_all(input);
        }
        let mut stdout = Vec::new();
        let mut stderr = Vec::new();
        let err_reader = child.stderr.take();
        if let Some(mut out) = child.stdout.take() {
            let _ = out.read_to_end(&mut stdout);
        }
        if let Some(mut err) = err_reader {
            let _ = err.read_to_end(&mut stderr);
        }
        // `child` is never waited on: its exit belongs to the reaper thread.
        drop(child);
        let exit = self.wait_command(pid);
        Ok(CommandOutput {
            status: exit.status,
            stdout,
            stderr,
        })
    }

    fn wait_command(&self, pid: i32) -> Exit {
        let mut commands = self.lock_commands();
        loop {
            if let Some(Some(exit)) = commands.get(&pid) {
                let exit = *exit;
                commands.remove(&pid);
                return exit;
            }
            commands = self
                .reaped
                .wait(commands)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
    }

    fn lock_commands(&self) -> std::sync::MutexGuard<'_, HashMap<i32, Option<Exit>>> {
        self.commands
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn wait_signals(&self) {
        let mut set = SigSet::empty();
        set.add(Signal::SIGCHLD);
        set.add(Signal::SIGTERM);
        set.add(Signal::SIGINT);
        loop {
            match set.wait() {
                Ok(Signal::SIGCHLD) => self.reap_all(),
                // The shim outlives a signal sent to its process group (a
                // terminal's ^C, a daemon's stop): it ends only on Shutdown,
                // so that pods keep running while the daemon restarts.
                Ok(sig) => log::info!("ignoring {sig}: the shim stops on Shutdown"),
                Err(e) => log::warn!("sigwait: {e}"),
            }
        }
    }

    fn reap_all(&self) {
        loop {
            let (pid, status) = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => (pid.as_raw(), code),
                Ok(WaitStatus::Signaled(pid, sig, _)) => (pid.as_raw(), 128 + sig as i32),
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
                Ok(_) => continue,
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    log::warn!("waitpid: {e}");
                    return;
                }
            };
            let exit = Exit {
                pid,
                status,
                at: SystemTime::now(),
            };
            let mut commands = self.lock_commands();
            if let Some(slot) = commands.get_mut(&pid) {
                *slot = Some(exit);
                self.reaped.notify_all();
                continue;
            }
            drop(commands);
            match self.on_exit.get() {
                Some(handler) => handler(exit),
                None => log::warn!("pid {pid} exited with {status} before any handler"),
            }
        }
    }
}
