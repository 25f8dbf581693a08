//! Seccomp profiles: corral's RuntimeDefault, and Localhost profiles read
//! from files.
//!
//! RuntimeDefault is an allow-list as strict as containerd's and Docker's
//! default: anything not listed fails with EPERM; syscalls that only a
//! capability makes useful are allowed only with that capability; clone
//! may not make namespaces without CAP_SYS_ADMIN; `personality` is limited
//! to harmless personas; AF_VSOCK sockets are refused.
//!
//! This module only builds `LinuxSeccomp` values. Whether a container gets
//! one (Unconfined, privileged) is decided where its OCI spec is built.
//!
//! The profile assumes a kernel of 4.8 or later, where a ptraced process
//! can no longer skip seccomp, which is what makes allowing ptrace safe.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use oci_spec::runtime::{
    Arch, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArg, LinuxSeccompArgBuilder,
    LinuxSeccompFilterFlag, LinuxSeccompOperator, LinuxSyscall,
};
use serde::Deserialize;

/// Why a seccomp profile cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The file is not a profile corral can use (bad JSON, a rule without
    /// syscall names): invalid input.
    #[error("seccomp profile {path}: {message}")]
    Profile { path: String, message: String },

    /// A Localhost reference that is not an absolute path: invalid input.
    #[error("seccomp profile {path}: a localhost profile must be an absolute path")]
    RelativePath { path: String },

    /// No file at the path: not found.
    #[error("seccomp profile {path} does not exist")]
    NotFound { path: String },

    /// Larger than any real profile: invalid input.
    #[error("seccomp profile {path} is larger than {limit} bytes")]
    TooLarge { path: String, limit: u64 },

    /// The file exists but cannot be read: a failure of the host.
    #[error("seccomp profile {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: io::Error,
    },
}

const EPERM: u32 = libc::EPERM as u32;
const ENOSYS: u32 = libc::ENOSYS as u32;

/// Docker's own default profile is ~20 KB; 1 MiB leaves room for any real
/// profile while keeping a wrong path (a log, an image) from being read.
const MAX_PROFILE_SIZE: u64 = 1 << 20;

/// Allowed to every container, whatever its capabilities. The kernel still
/// checks permissions; these are the calls whose attack surface is worth it.
#[rustfmt::skip]
const ALLOWED: &[&str] = &[
    // files and directories
    "access", "chdir", "chmod", "chown", "chown32", "close", "close_range", "copy_file_range",
    "creat", "dup", "dup2", "dup3", "faccessat", "faccessat2", "fadvise64", "fadvise64_64",
    "fallocate", "fchdir", "fchmod", "fchmodat", "fchown", "fchown32", "fchownat", "fcntl",
    "fcntl64", "fdatasync", "flock", "fstat", "fstat64", "fstatat64", "fstatfs", "fstatfs64",
    "fsync", "ftruncate", "ftruncate64", "futimesat", "getcwd", "getdents", "getdents64",
    "lchown", "lchown32", "link", "linkat", "_llseek", "lseek", "lstat", "lstat64", "mkdir",
    "mkdirat", "mknod", "mknodat", "newfstatat", "open", "openat", "openat2", "pread64",
    "preadv", "preadv2", "pwrite64", "pwritev", "pwritev2", "read", "readahead", "readlink",
    "readlinkat", "readv", "rename", "renameat", "renameat2", "rmdir", "sendfile", "sendfile64",
    "splice", "stat", "stat64", "statfs", "statfs64", "statx", "symlink", "symlinkat", "sync",
    "sync_file_range", "syncfs", "tee", "truncate", "truncate64", "umask", "unlink", "unlinkat",
    "utime", "utimensat", "utimensat_time64", "utimes", "vmsplice", "write", "writev",
    // extended attributes
    "fgetxattr", "flistxattr", "fremovexattr", "fsetxattr", "getxattr", "lgetxattr",
    "listxattr", "llistxattr", "lremovexattr", "lsetxattr", "removexattr", "setxattr",
    // polling, events, asynchronous I/O
    "epoll_create", "epoll_create1", "epoll_ctl", "epoll_ctl_old", "epoll_pwait",
    "epoll_pwait2", "epoll_wait", "epoll_wait_old", "eventfd", "eventfd2", "fanotify_mark",
    "inotify_add_watch", "inotify_init", "inotify_init1", "inotify_rm_watch", "io_cancel",
    "io_destroy", "io_getevents", "io_pgetevents", "io_pgetevents_time64", "io_setup",
    "io_submit", "io_uring_enter", "io_uring_register", "io_uring_setup", "ioctl", "_newselect",
    "pipe", "pipe2", "poll", "ppoll", "ppoll_time64", "pselect6", "pselect6_time64", "select",
    // memory
    "brk", "madvise", "membarrier", "memfd_create", "memfd_secret", "mincore", "mlock",
    "mlock2", "mlockall", "mmap", "mmap2", "mprotect", "mremap", "msync", "munlock",
    "munlockall", "munmap", "pkey_alloc", "pkey_free", "pkey_mprotect", "remap_file_pages",
    // processes, threads, scheduling
    "capget", "capset", "execve", "execveat", "exit", "exit_group", "fork", "futex",
    "futex_time64", "futex_waitv", "get_robust_list", "get_thread_area", "getcpu", "getpgid",
    "getpgrp", "getpid", "getppid", "getpriority", "getrlimit", "getrusage", "getsid", "gettid",
    "ioprio_get", "ioprio_set", "pidfd_open", "pidfd_send_signal", "prctl", "prlimit64",
    "process_mrelease", "ptrace", "restart_syscall", "rseq", "sched_get_priority_max",
    "sched_get_priority_min", "sched_getaffinity", "sched_getattr", "sched_getparam",
    "sched_getscheduler", "sched_rr_get_interval", "sched_rr_get_interval_time64",
    "sched_setaffinity", "sched_setattr", "sched_setparam", "sched_setscheduler", "sched_yield",
    "seccomp", "set_robust_list", "set_thread_area", "set_tid_address", "setpgid",
    "setpriority", "setrlimit", "setsid", "ugetrlimit", "uname", "vfork", "wait4", "waitid",
    "waitpid",
    // credentials
    "getegid", "getegid32", "geteuid", "geteuid32", "getgid", "getgid32", "getgroups",
    "getgroups32", "getresgid", "getresgid32", "getresuid", "getresuid32", "getuid",
    "getuid32", "setfsgid", "setfsgid32", "setfsuid", "setfsuid32", "setgid", "setgid32",
    "setgroups", "setgroups32", "setregid", "setregid32", "setresgid", "setresgid32",
    "setresuid", "setresuid32", "setreuid", "setreuid32", "setuid", "setuid32",
    // signals
    "kill", "pause", "rt_sigaction", "rt_sigpending", "rt_sigprocmask", "rt_sigqueueinfo",
    "rt_sigreturn", "rt_sigsuspend", "rt_sigtimedwait", "rt_sigtimedwait_time64",
    "rt_tgsigqueueinfo", "sigaltstack", "signalfd", "signalfd4", "sigprocmask", "sigreturn",
    "tgkill", "tkill",
    // time and timers (setting the clock needs CAP_SYS_TIME, below)
    "adjtimex", "alarm", "clock_adjtime", "clock_adjtime64", "clock_getres",
    "clock_getres_time64", "clock_gettime", "clock_gettime64", "clock_nanosleep",
    "clock_nanosleep_time64", "getitimer", "gettimeofday", "nanosleep", "setitimer", "time",
    "timer_create", "timer_delete", "timer_getoverrun", "timer_gettime", "timer_gettime64",
    "timer_settime", "timer_settime64", "timerfd_create", "timerfd_gettime",
    "timerfd_gettime64", "timerfd_settime", "timerfd_settime64", "times",
    // sockets (`socket` itself is below, without AF_VSOCK)
    "accept", "accept4", "bind", "connect", "getpeername", "getsockname", "getsockopt",
    "listen", "recv", "recvfrom", "recvmmsg", "recvmmsg_time64", "recvmsg", "send", "sendmmsg",
    "sendmsg", "sendto", "setsockopt", "shutdown", "socketcall", "socketpair",
    // System V and POSIX IPC
    "ipc", "mq_getsetattr", "mq_notify", "mq_open", "mq_timedreceive", "mq_timedreceive_time64",
    "mq_timedsend", "mq_timedsend_time64", "mq_unlink", "msgctl", "msgget", "msgrcv", "msgsnd",
    "semctl", "semget", "semop", "semtimedop", "semtimedop_time64", "shmat", "shmctl", "shmdt",
    "shmget",
    // unprivileged sandboxing and system information
    "getrandom", "landlock_add_rule", "landlock_create_ruleset", "landlock_restrict_self",
    "sysinfo",
];

/// Syscalls allowed only to a process holding the capability that the
/// kernel checks for them: without it they can only fail, and some are
/// large attack surfaces (bpf, perf_event_open, the mount API).
#[rustfmt::skip]
const BY_CAPABILITY: &[(&str, &[&str])] = &[
    ("CAP_BPF", &["bpf"]),
    ("CAP_DAC_READ_SEARCH", &["open_by_handle_at"]),
    ("CAP_PERFMON", &["perf_event_open"]),
    ("CAP_SYSLOG", &["syslog"]),
    ("CAP_SYS_BOOT", &["reboot"]),
    ("CAP_SYS_CHROOT", &["chroot"]),
    ("CAP_SYS_MODULE", &["delete_module", "finit_module", "init_module"]),
    ("CAP_SYS_NICE", &["get_mempolicy", "mbind", "set_mempolicy", "set_mempolicy_home_node"]),
    ("CAP_SYS_PACCT", &["acct"]),
    (
        "CAP_SYS_PTRACE",
        &["kcmp", "pidfd_getfd", "process_madvise", "process_vm_readv", "process_vm_writev"],
    ),
    ("CAP_SYS_RAWIO", &["ioperm", "iopl"]),
    ("CAP_SYS_TIME", &["clock_settime", "clock_settime64", "settimeofday", "stime"]),
    ("CAP_SYS_TTY_CONFIG", &["vhangup"]),
    (
        CAP_SYS_ADMIN,
        &[
            "bpf", "clone", "clone3", "fanotify_init", "fsconfig", "fsmount", "fsopen", "fspick",
            "lookup_dcookie", "mount", "mount_setattr", "move_mount", "name_to_handle_at",
            "open_tree", "perf_event_open", "quotactl", "quotactl_fd", "setdomainname",
            "sethostname", "setns", "syslog", "umount", "umount2", "unshare",
        ],
    ),
];

const CAP_SYS_ADMIN: &str = "CAP_SYS_ADMIN";

/// `personality` values allowed: Linux, UNAME26, ADDR_NO_RANDOMIZE, both,
/// and the query (0xffffffff). Other personas change kernel behaviour in
/// ways containers have no use for.
const PERSONALITIES: &[u64] = &[0x0, 0x0008, 0x20000, 0x20008, 0xffff_ffff];

/// Without CAP_SYS_ADMIN, clone may make no namespace.
const CLONE_NAMESPACE_FLAGS: u64 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWCGROUP) as u64;

const AF_VSOCK: u64 = libc::AF_VSOCK as u64;

#[cfg(target_arch = "x86_64")]
const ARCHITECTURES: &[Arch] = &[Arch::ScmpArchX86_64, Arch::ScmpArchX86, Arch::ScmpArchX32];
#[cfg(target_arch = "x86_64")]
const ARCH_ALLOWED: &[&str] = &["arch_prctl", "modify_ldt"];
#[cfg(target_arch = "x86_64")]
const ARCH_NAMES: &[&str] = &["amd64", "x86_64"];

#[cfg(target_arch = "aarch64")]
const ARCHITECTURES: &[Arch] = &[Arch::ScmpArchAarch64, Arch::ScmpArchArm];
#[cfg(target_arch = "aarch64")]
const ARCH_ALLOWED: &[&str] = &[
    "arm_fadvise64_64",
    "arm_sync_file_range",
    "breakpoint",
    "cacheflush",
    "set_tls",
    "sync_file_range2",
];
#[cfg(target_arch = "aarch64")]
const ARCH_NAMES: &[&str] = &["arm64", "aarch64"];

/// The RuntimeDefault profile for a process with these capabilities
/// (`CAP_…` names): some syscalls are allowed only with the capability
/// that guards them, as containerd's default profile does.
pub fn runtime_default(capabilities: &[String]) -> LinuxSeccomp {
    use LinuxSeccompOperator::{ScmpCmpEq, ScmpCmpNe};

    let mut rules = vec![allow(&allowed_names(capabilities), vec![])];
    for &persona in PERSONALITIES {
        rules.push(allow(
            &["personality"],
            vec![arg(0, ScmpCmpEq, persona, None)],
        ));
    }
    rules.push(allow(&["socket"], vec![arg(0, ScmpCmpNe, AF_VSOCK, None)]));
    if !has_capability(capabilities, CAP_SYS_ADMIN) {
        rules.extend(no_new_namespaces());
    }

    let mut profile = LinuxSeccomp::default();
    profile.set_default_action(LinuxSeccompAction::ScmpActErrno);
    profile.set_default_errno_ret(Some(EPERM));
    profile.set_architectures(Some(ARCHITECTURES.to_vec()));
    profile.set_syscalls(Some(rules));
    profile
}

/// A Localhost profile: a JSON file in the OCI `LinuxSeccomp` format (as
/// containerd and CRI-O read it), by absolute path.
///
/// Docker's format is read too (`archMap`, `name`, `includes`/`excludes`).
/// Rules conditional on capabilities are resolved as for a process holding
/// none: see [`localhost_with_capabilities`] to resolve them for real.
pub fn localhost(path: &Path) -> Result<LinuxSeccomp, SeccompError> {
    localhost_with_capabilities(path, &[])
}

/// [`localhost`], resolving Docker-format rules that depend on capabilities
/// for a process holding `capabilities` (`CAP_…` names).
pub fn localhost_with_capabilities(
    path: &Path,
    capabilities: &[String],
) -> Result<LinuxSeccomp, SeccompError> {
    let shown = path.display().to_string();
    if !path.is_absolute() {
        return Err(SeccompError::RelativePath { path: shown });
    }
    let text = read_limited(path)?;
    let file: ProfileFile = serde_json::from_slice(&text).map_err(|e| SeccompError::Profile {
        path: shown.clone(),
        message: format!("not a seccomp profile: {e}"),
    })?;
    file.into_profile(capabilities)
        .map_err(|message| SeccompError::Profile {
            path: shown,
            message,
        })
}

/// The syscalls allowed unconditionally: the common list, this
/// architecture's own, and those the capabilities unlock. Sorted, each once.
fn allowed_names(capabilities: &[String]) -> Vec<&'static str> {
    let mut allowed: BTreeSet<&str> = ALLOWED.iter().chain(ARCH_ALLOWED).copied().collect();
    for (capability, names) in BY_CAPABILITY {
        if has_capability(capabilities, capability) {
            allowed.extend(names.iter());
        }
    }
    allowed.into_iter().collect()
}

/// For a process without CAP_SYS_ADMIN: clone without namespace flags only,
/// and clone3 not at all.
fn no_new_namespaces() -> [LinuxSyscall; 2] {
    // MASKED_EQ compares `arg & value` with `valueTwo`.
    let no_flags = arg(
        0,
        LinuxSeccompOperator::ScmpCmpMaskedEq,
        CLONE_NAMESPACE_FLAGS,
        Some(0),
    );
    let clone = allow(&["clone"], vec![no_flags]);
    // clone3 passes its flags in memory, out of a filter's reach; ENOSYS
    // makes libc fall back to clone, which is filtered.
    let mut clone3 = allow(&["clone3"], vec![]);
    clone3.set_action(LinuxSeccompAction::ScmpActErrno);
    clone3.set_errno_ret(Some(ENOSYS));
    [clone, clone3]
}

/// Capability names compare without case and without the `CAP_` prefix:
/// CRI, OCI and Docker profiles spell them differently.
fn has_capability(capabilities: &[String], wanted: &str) -> bool {
    let wanted = without_prefix(wanted);
    capabilities
        .iter()
        .any(|c| without_prefix(c).eq_ignore_ascii_case(wanted))
}

fn without_prefix(capability: &str) -> &str {
    let capability = capability.trim();
    match capability.get(..4) {
        Some(prefix) if prefix.eq_ignore_ascii_case("CAP_") => &capability[4..],
        _ => capability,
    }
}

/// A rule allowing `names` when `args` all match (always, when empty).
fn allow(names: &[&str], args: Vec<LinuxSeccompArg>) -> LinuxSyscall {
    let mut rule = LinuxSyscall::default();
    rule.set_names(names.iter().map(|n| n.to_string()).collect());
    rule.set_action(LinuxSeccompAction::ScmpActAllow);
    if !args.is_empty() {
        rule.set_args(Some(args));
    }
    rule
}

fn arg(
    index: usize,
    op: LinuxSeccompOperator,
    value: u64,
    value_two: Option<u64>,
) -> LinuxSeccompArg {
    let mut builder = LinuxSeccompArgBuilder::default()
        .index(index)
        .op(op)
        .value(value);
    if let Some(value_two) = value_two {
        builder = builder.value_two(value_two);
    }
    // The builder fails only on a field left unset, and every field here is.
    builder.build().expect("all LinuxSeccompArg fields set")
}

fn read_limited(path: &Path) -> Result<Vec<u8>, SeccompError> {
    let shown = || path.display().to_string();
    let file = File::open(path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => SeccompError::NotFound { path: shown() },
        _ => SeccompError::Read {
            path: shown(),
            source: e,
        },
    })?;
    let mut text = Vec::new();
    file.take(MAX_PROFILE_SIZE + 1)
        .read_to_end(&mut text)
        .map_err(|e| SeccompError::Read {
            path: shown(),
            source: e,
        })?;
    if text.len() as u64 > MAX_PROFILE_SIZE {
        return Err(SeccompError::TooLarge {
            path: shown(),
            limit: MAX_PROFILE_SIZE,
        });
    }
    Ok(text)
}

/// A profile file: the OCI `LinuxSeccomp` fields plus Docker's.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ProfileFile {
    default_action: LinuxSeccompAction,
    default_errno_ret: Option<u32>,
    #[serde(default)]
    architectures: Vec<Arch>,
    /// Docker: each native architecture with the ones it can also run.
    #[serde(default)]
    arch_map: Vec<ArchMapEntry>,
    #[serde(default)]
    flags: Vec<LinuxSeccompFilterFlag>,
    listener_path: Option<PathBuf>,
    listener_metadata: Option<String>,
    #[serde(default)]
    syscalls: Vec<RuleFile>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ArchMapEntry {
    architecture: Arch,
    #[serde(default)]
    sub_architectures: Vec<Arch>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RuleFile {
    #[serde(default)]
    names: Vec<String>,
    /// Docker's older single-name form.
    name: Option<String>,
    action: LinuxSeccompAction,
    errno_ret: Option<u32>,
    #[serde(default)]
    args: Vec<LinuxSeccompArg>,
    /// Docker: the rule applies only when all of these hold…
    #[serde(default)]
    includes: Condition,
    /// …and none of these.
    #[serde(default)]
    excludes: Condition,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Condition {
    #[serde(default)]
    caps: Vec<String>,
    #[serde(default)]
    arches: Vec<String>,
    min_kernel: Option<String>,
}

impl ProfileFile {
    fn into_profile(self, capabilities: &[String]) -> Result<LinuxSeccomp, String> {
        let mut architectures = Vec::new();
        let mapped = self
            .arch_map
            .into_iter()
            .flat_map(|e| std::iter::once(e.architecture).chain(e.sub_architectures));
        for arch in self.architectures.into_iter().chain(mapped) {
            if !architectures.contains(&arch) {
                architectures.push(arch);
            }
        }

        let kernel = kernel_version();
        let mut rules = Vec::with_capacity(self.syscalls.len());
        for (i, rule) in self.syscalls.into_iter().enumerate() {
            let applies = rule.includes.all_hold(capabilities, kernel)
                && !rule.excludes.any_holds(capabilities, kernel);
            if applies {
                rules.push(
                    rule.into_syscall()
                        .map_err(|e| format!("syscalls[{i}]: {e}"))?,
                );
            }
        }

        let mut profile = LinuxSeccomp::default();
        profile.set_default_action(self.default_action);
        profile.set_default_errno_ret(self.default_errno_ret);
        profile.set_architectures((!architectures.is_empty()).then_some(architectures));
        profile.set_flags((!self.flags.is_empty()).then_some(self.flags));
        profile.set_listener_path(self.listener_path);
        profile.set_listener_metadata(self.listener_metadata);
        profile.set_syscalls((!rules.is_empty()).then_some(rules));
        Ok(profile)
    }
}

impl RuleFile {
    fn into_syscall(self) -> Result<LinuxSyscall, &'static str> {
        let mut names = self.names;
        names.extend(self.name);
        if names.is_empty() {
            return Err("a rule without syscall names");
        }
        let mut rule = LinuxSyscall::default();
        rule.set_names(names);
        rule.set_action(self.action);
        rule.set_errno_ret(self.errno_ret);
        rule.set_args((!self.args.is_empty()).then_some(self.args));
        Ok(rule)
    }
}

impl Condition {
    /// Every condition set holds (vacuously true when none is set).
    fn all_hold(&self, capabilities: &[String], kernel: Option<(u32, u32)>) -> bool {
        self.caps.iter().all(|c| has_capability(capabilities, c))
            && (self.arches.is_empty() || self.arches.iter().any(|a| is_this_arch(a)))
            && self
                .min_kernel
                .as_deref()
                .is_none_or(|min| kernel_at_least(kernel, min))
    }

    /// Some condition set holds (false when none is set).
    fn any_holds(&self, capabilities: &[String], kernel: Option<(u32, u32)>) -> bool {
        self.caps.iter().any(|c| has_capability(capabilities, c))
            || self.arches.iter().any(|a| is_this_arch(a))
            || self
                .min_kernel
                .as_deref()
                .is_some_and(|min| kernel_at_least(kernel, min))
    }
}

fn is_this_arch(name: &str) -> bool {
    ARCH_NAMES.iter().any(|n| n.eq_ignore_ascii_case(name))
}

/// An unreadable running or minimum version counts as "not at least": the
/// rule it guards is left out.
fn kernel_at_least(kernel: Option<(u32, u32)>, min: &str) -> bool {
    match (kernel, parse_version(min)) {
        (Some(running), Some(min)) => running >= min,
        _ => false,
    }
}

fn kernel_version() -> Option<(u32, u32)> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    parse_version(release.trim())
}

/// "6.1.0-18-amd64" → (6, 1).
fn parse_version(text: &str) -> Option<(u32, u32)> {
    let mut parts = text.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next().and_then(|m| m.parse().ok()).unwrap_or(0);
    Some((major, minor))
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;
    use crate::pause::test_runc::{spec, Container};

    fn caps(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    /// What the profile does with a call of `name` whose arguments match no
    /// argument filter: the action of an unconditional rule, or the default.
    fn unconditional_action(profile: &LinuxSeccomp, name: &str) -> LinuxSeccompAction {
        profile
            .syscalls()
            .iter()
            .flatten()
            .find(|r| r.args().is_none() && r.names().iter().any(|n| n == name))
            .map_or(profile.default_action(), |r| r.action())
    }

    fn rules_for<'a>(profile: &'a LinuxSeccomp, name: &str) -> Vec<&'a LinuxSyscall> {
        let rules = profile.syscalls().as_deref().unwrap_or_default();
        rules
            .iter()
            .filter(|r| r.names().iter().any(|n| n == name))
            .collect()
    }

    const ALLOW: LinuxSeccompAction = LinuxSeccompAction::ScmpActAllow;
    const ERRNO: LinuxSeccompAction = LinuxSeccompAction::ScmpActErrno;

    #[test]
    fn default_profile_denies_with_eperm_on_this_arch() {
        let profile = runtime_default(&[]);
        assert_eq!(profile.default_action(), ERRNO);
        assert_eq!(profile.default_errno_ret(), Some(EPERM));
        #[cfg(target_arch = "x86_64")]
        assert_eq!(
            profile.architectures().as_deref(),
            Some(&[Arch::ScmpArchX86_64, Arch::ScmpArchX86, Arch::ScmpArchX32][..])
        );
        for name in [
            "read",
            "write",
            "execve",
            "openat",
            "futex",
            "exit_group",
            "ptrace",
        ] {
            assert_eq!(unconditional_action(&profile, name), ALLOW, "{name}");
        }
        #[cfg(target_arch = "x86_64")]
        assert_eq!(unconditional_action(&profile, "arch_prctl"), ALLOW);
    }

    #[test]
    fn capability_guarded_syscalls_need_their_capability() {
        let none = runtime_default(&[]);
        for name in [
            "mount",
            "umount2",
            "unshare",
            "setns",
            "reboot",
            "chroot",
            "bpf",
            "init_module",
            "settimeofday",
            "process_vm_readv",
            "syslog",
            "acct",
            "iopl",
            "vhangup",
            "kexec_load",
            "open_by_handle_at",
            "perf_event_open",
            "mbind",
        ] {
            assert!(
                rules_for(&none, name).is_empty(),
                "{name} allowed without capabilities"
            );
            assert_eq!(unconditional_action(&none, name), ERRNO, "{name}");
        }

        let admin = runtime_default(&caps(&["CAP_SYS_ADMIN"]));
        for name in [
            "mount",
            "umount2",
            "unshare",
            "setns",
            "sethostname",
            "clone",
            "clone3",
        ] {
            assert_eq!(
                unconditional_action(&admin, name),
                ALLOW,
                "{name} with CAP_SYS_ADMIN"
            );
        }
        assert_eq!(
            unconditional_action(&admin, "reboot"),
            ERRNO,
            "SYS_ADMIN is not SYS_BOOT"
        );

        let more = runtime_default(&caps(&[
            "CAP_SYS_BOOT",
            "SYS_PTRACE",
            "cap_sys_time",
            "CAP_BPF",
        ]));
        for name in [
            "reboot",
            "process_vm_readv",
            "kcmp",
            "settimeofday",
            "clock_settime",
            "bpf",
        ] {
            assert_eq!(unconditional_action(&more, name), ALLOW, "{name}");
        }
        assert_eq!(unconditional_action(&more, "mount"), ERRNO);
        // Never allowed, whatever the capabilities.
        let all = runtime_default(&caps(
            &BY_CAPABILITY.iter().map(|(c, _)| *c).collect::<Vec<_>>(),
        ));
        for name in [
            "kexec_load",
            "kexec_file_load",
            "swapon",
            "userfaultfd",
            "add_key",
            "keyctl",
        ] {
            assert_eq!(unconditional_action(&all, name), ERRNO, "{name}");
        }
    }

    #[test]
    fn clone_may_not_make_namespaces_without_sys_admin() {
        let profile = runtime_default(&[]);
        let clone = rules_for(&profile, "clone");
        assert_eq!(clone.len(), 1);
        let args = clone[0].args().as_ref().unwrap();
        assert_eq!(args[0].index(), 0);
        assert_eq!(args[0].op(), LinuxSeccompOperator::ScmpCmpMaskedEq);
        assert_eq!(args[0].value(), 0x7e02_0000);
        assert_eq!(args[0].value_two(), Some(0));
        let clone3 = rules_for(&profile, "clone3");
        assert_eq!(clone3.len(), 1);
        assert_eq!(
            (clone3[0].action(), clone3[0].errno_ret()),
            (ERRNO, Some(ENOSYS))
        );

        let admin = runtime_default(&caps(&["CAP_SYS_ADMIN"]));
        assert!(rules_for(&admin, "clone")
            .iter()
            .all(|r| r.args().is_none()));
        assert!(rules_for(&admin, "clone3")
            .iter()
            .all(|r| r.action() == ALLOW));
    }

    #[test]
    fn personality_and_socket_are_filtered_by_argument() {
        let profile = runtime_default(&[]);
        let personas: Vec<u64> = rules_for(&profile, "personality")
            .iter()
            .map(|r| r.args().as_ref().unwrap()[0].value())
            .collect();
        assert_eq!(personas, PERSONALITIES);
        let socket = rules_for(&profile, "socket");
        assert_eq!(socket.len(), 1);
        let only = socket[0].args().as_ref().unwrap()[0];
        assert_eq!(
            (only.op(), only.value()),
            (LinuxSeccompOperator::ScmpCmpNe, AF_VSOCK)
        );
    }

    #[test]
    fn profile_round_trips_through_json() {
        let profile = runtime_default(&caps(&["CAP_SYS_ADMIN"]));
        let json = serde_json::to_value(&profile).unwrap();
        assert_eq!(json["defaultAction"], "SCMP_ACT_ERRNO");
        assert_eq!(json["defaultErrnoRet"], 1);
        #[cfg(target_arch = "x86_64")]
        assert_eq!(json["architectures"][0], "SCMP_ARCH_X86_64");
        let back: LinuxSeccomp = serde_json::from_value(json).unwrap();
        assert_eq!(back, profile);
    }

    fn profile_file(text: &str) -> tempfile::NamedTempFile {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(text.as_bytes()).unwrap();
        file
    }

    #[test]
    fn localhost_reads_a_critest_profile() {
        let file = profile_file(
            r#"{
                 "defaultAction": "SCMP_ACT_ALLOW",
                 "syscalls": [
                     { "names": ["chmod", "fchmodat"], "action": "SCMP_ACT_ERRNO" }
                 ]
             }"#,
        );
        let profile = localhost(file.path()).unwrap();
        assert_eq!(profile.default_action(), ALLOW);
        assert_eq!(profile.architectures(), &None);
        let rules = profile.syscalls().as_ref().unwrap();
        assert_eq!(rules.len(), 1);
        assert_eq!(rules[0].names(), &["chmod", "fchmodat"]);
        assert_eq!(rules[0].action(), ERRNO);
        assert_eq!(unconditional_action(&profile, "chmod"), ERRNO);
    }

    #[test]
    fn localhost_reads_its_own_output() {
        let profile = runtime_default(&[]);
        let file = profile_file(&serde_json::to_string(&profile).unwrap());
        assert_eq!(localhost(file.path()).unwrap(), profile);
    }

    #[test]
    fn localhost_reads_docker_format() {
        let file = profile_file(
            r#"{
                 "defaultAction": "SCMP_ACT_ERRNO",
                 "defaultErrnoRet": 1,
                 "archMap": [
                     { "architecture": "SCMP_ARCH_X86_64", "subArchitectures": ["SCMP_ARCH_X86", "SCMP_ARCH_X32"] },
                     { "architecture": "SCMP_ARCH_AARCH64", "subArchitectures": ["SCMP_ARCH_ARM"] }
                 ],
                 "syscalls": [
                     { "name": "read", "action": "SCMP_ACT_ALLOW", "args": [] },
                     { "names": ["mount"], "action": "SCMP_ACT_ALLOW", "includes": { "caps": ["CAP_SYS_ADMIN"] } },
                     { "names": ["clone"], "action": "SCMP_ACT_ALLOW",
                       "args": [ { "index": 0, "value": 2114060288, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ" } ],
                       "excludes": { "caps": ["CAP_SYS_ADMIN"] } },
                     { "names": ["arch_prctl"], "action": "SCMP_ACT_ALLOW", "includes": { "arches": ["amd64"] } },
                     { "names": ["set_tls"], "action": "SCMP_ACT_ALLOW", "includes": { "arches": ["arm64"] } },
                     { "names": ["ptrace"], "action": "SCMP_ACT_ALLOW", "includes": { "minKernel": "4.8" } },
                     { "names": ["future"], "action": "SCMP_ACT_ALLOW", "includes": { "minKernel": "999.0" } }
                 ]
             }"#,
        );
        let plain = localhost(file.path()).unwrap();
        assert_eq!(plain.architectures().as_ref().unwrap().len(), 5);
        let names: Vec<&str> = plain
            .syscalls()
            .iter()
            .flatten()
            .flat_map(|r| r.names().iter().map(String::as_str))
            .collect();
        #[cfg(target_arch = "x86_64")]
        assert_eq!(names, ["read", "clone", "arch_prctl", "ptrace"]);
        #[cfg(target_arch = "aarch64")]
        assert_eq!(names, ["read", "clone", "set_tls", "ptrace"]);

        let admin = localhost_with_capabilities(file.path(), &caps(&["CAP_SYS_ADMIN"])).unwrap();
        assert_eq!(unconditional_action(&admin, "mount"), ALLOW);
        assert!(rules_for(&admin, "clone").is_empty());
    }

    #[test]
    fn localhost_errors_name_the_file_and_the_cause() {
        let relative = localhost(Path::new("profiles/block.json")).unwrap_err();
        assert!(
            matches!(relative, SeccompError::RelativePath { .. }),
            "{relative}"
        );
        assert!(relative.to_string().contains("profiles/block.json"));

        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.json");
        let err = localhost(&missing).unwrap_err();
        assert!(matches!(err, SeccompError::NotFound { .. }), "{err}");
        assert!(err.to_string().contains(&missing.display().to_string()));

        for (text, cause) in [
            ("{ not json", "not a seccomp profile"),
            (r#"{"syscalls": []}"#, "defaultAction"),
            (r#"{"defaultAction": "SCMP_ACT_MAYBE"}"#, "SCMP_ACT_MAYBE"),
            (
                r#"{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"action": "SCMP_ACT_ERRNO"}]}"#,
                "syscalls[0]",
            ),
        ] {
            let file = profile_file(text);
            let err = localhost(file.path()).unwrap_err();
            assert!(matches!(err, SeccompError::Profile { .. }), "{text}: {err}");
            let message = err.to_string();
            assert!(
                message.contains(&file.path().display().to_string()),
                "{message}"
            );
            assert!(message.contains(cause), "{text}: {message}");
        }

        let big = profile_file(&" ".repeat(MAX_PROFILE_SIZE as usize + 1));
        assert!(matches!(
            localhost(big.path()).unwrap_err(),
            SeccompError::TooLarge { .. }
        ));
        let err = localhost(dir.path()).unwrap_err();
        assert!(
            matches!(err, SeccompError::Read { .. }),
            "a directory: {err}"
        );
    }

    #[test]
    fn parses_kernel_versions() {
        assert_eq!(parse_version("6.1.0-18-amd64"), Some((6, 1)));
        assert_eq!(parse_version("4.8"), Some((4, 8)));
        assert_eq!(parse_version("5"), Some((5, 0)));
        assert_eq!(parse_version("x"), None);
        assert!(kernel_version().is_some());
    }

    /// Runs `script` under busybox sh in a container holding CAP_SYS_ADMIN,
    /// confined by `profile`; returns its stdout.
    fn run_confined(profile: &LinuxSeccomp, script: &str) -> String {
        let dir = tempfile::tempdir().unwrap();
        let rootfs = dir.path().join("rootfs");
        for sub in ["bin", "mnt", "proc", "dev"] {
            std::fs::create_dir_all(rootfs.join(sub)).unwrap();
        }
        std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).unwrap();
        let args = ["/bin/busybox", "sh", "-c", script];
        let mut spec = spec(&rootfs, &args, &["CAP_SYS_ADMIN"], false);
        spec["linux"]["seccomp"] = serde_json::to_value(profile).unwrap();
        let output = Container::run(&spec);
        assert!(output.status.success(), "{output:?}");
        String::from_utf8(output.stdout).unwrap()
    }

    const SCRIPT: &str = "/bin/busybox grep '^Seccomp:' /proc/self/status; echo hi; \
         /bin/busybox mount -t tmpfs none /mnt 2>/dev/null && echo mounted || echo mount-denied";

    #[test]
    fn runc_enforces_runtime_default() {
        let output = run_confined(&runtime_default(&[]), SCRIPT);
        assert_eq!(output, "Seccomp:\t2\nhi\nmount-denied\n");
    }

    #[test]
    fn runc_enforces_runtime_default_with_sys_admin() {
        // The same container, its profile made for CAP_SYS_ADMIN: the denial
        // above came from seccomp, not from a missing capability.
        let output = run_confined(&runtime_default(&caps(&["CAP_SYS_ADMIN"])), SCRIPT);
        assert_eq!(output, "Seccomp:\t2\nhi\nmounted\n");
    }
}
