//! Reading a container process's cgroup, v1 or v2, for the task `Stats` RPC
//! and for OOM notification.
//!
//! This module only reads: it never creates, modifies or deletes a cgroup.
//! runc owns the container cgroups, and anything written here would race it.
//! (Registering an eventfd through v1's `cgroup.event_control` is the one
//! write, and it changes no cgroup setting.)
//!
//! The metrics are encoded as containerd's runc shim encodes them, so that
//! containerd's CRI plugin (and anything else decoding `StatsResponse.stats`)
//! can read them: a protobuf `Any` whose type URL is the bare message name
//! ([`V1_METRICS_TYPE_URL`] or [`V2_METRICS_TYPE_URL`]), with no
//! `type.googleapis.com/` prefix.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use containerd_shim_protos::cgroups::metrics as v1;
use containerd_shim_protos::cgroups_v2::metrics as v2;
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use protobuf::well_known_types::any::Any;
use protobuf::{Message, MessageField};

/// Type URL of the cgroup v1 metrics in `StatsResponse.stats`.
///
/// containerd's runc shim marshals with `typeurl.MarshalAny`, which falls back
/// to `proto.MessageName` for protobuf messages: the bare full name of
/// `io.containerd.cgroups.v1.Metrics`. Consumers such as the CRI plugin resolve
/// it through the protobuf registry, which accepts the bare name.
pub const V1_METRICS_TYPE_URL: &str = "io.containerd.cgroups.v1.Metrics";
/// Type URL of the cgroup v2 metrics in `StatsResponse.stats`; see
/// [`V1_METRICS_TYPE_URL`].
pub const V2_METRICS_TYPE_URL: &str = "io.containerd.cgroups.v2.Metrics";

/// The v1 controllers whose files [`Cgroup::stats`] reads. A hybrid host
/// counts as v1 only if one of these is on a v1 hierarchy: a lone v1
/// `net_cls` or `name=systemd` mount on a v2 host must not hide the v2 stats.
const STATS_CONTROLLERS: [&str; 5] = ["memory", "cpu", "cpuacct", "pids", "blkio"];

/// How often a watch thread checks that its cgroup still exists, in case the
/// kernel's removal notification never reaches it (a v2 cgroup whose parent
/// directory could not be watched).
const EXISTENCE_CHECK_INTERVAL: Duration = Duration::from_secs(10);

/// How long a v1 watch waits, after finding its cgroup gone, for the removal
/// signal when the signal it already read may have been an OOM.
const V1_REMOVAL_GRACE: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("process {pid} does not exist")]
    NoProcess { pid: i32 },
    #[error("cannot find the cgroup of process {pid}: {reason}")]
    NotFound { pid: i32, reason: String },
    #[error("cgroup {} no longer exists", path.display())]
    Gone { path: PathBuf },
    #[error("cgroup {} has no memory controller", path.display())]
    NoMemoryController { path: PathBuf },
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("{}: {reason}", path.display())]
    Parse { path: PathBuf, reason: String },
    #[error("{op} for {}: {source}", path.display())]
    Sys {
        op: &'static str,
        path: PathBuf,
        source: Errno,
    },
    #[error("encoding the metrics of cgroup {}: {source}", path.display())]
    Encode {
        path: PathBuf,
        source: protobuf::Error,
    },
}

type Result<T> = std::result::Result<T, CgroupError>;

/// Where a process's cgroup lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cgroup {
    /// One directory per mounted v1 hierarchy, keyed by each controller of
    /// that hierarchy (`cpu` and `cpuacct` both map to the directory of a
    /// co-mounted `cpu,cpuacct`), and by `name=...` for named hierarchies.
    V1 { paths: HashMap<String, PathBuf> },
    /// The directory in the unified hierarchy.
    V2 { path: PathBuf },
}

impl Cgroup {
    /// Finds the cgroup of `pid` from /proc/<pid>/cgroup and
    /// /proc/self/mountinfo. On a hybrid host the v1 controllers win, since
    /// that is where runc puts the limits; a pure v2 host gives `V2`.
    pub fn of_pid(pid: i32) -> Result<Self> {
        let proc_path = PathBuf::from(format!("/proc/{pid}/cgroup"));
        let proc_text = match fs::read_to_string(&proc_path) {
            Ok(text) => text,
            Err(e)
                if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ESRCH) =>
            {
                return Err(CgroupError::NoProcess { pid })
            }
            Err(e) => return Err(io_err("reading", &proc_path, e)),
        };
        let mountinfo_path = Path::new("/proc/self/mountinfo");
        let mountinfo =
            fs::read_to_string(mountinfo_path).map_err(|e| io_err("reading", mountinfo_path, e))?;
        resolve(pid, &proc_text, &mountinfo)
    }

    /// The metrics as containerd's runc shim returns them in
    /// `StatsResponse.stats`. Files this kernel lacks leave their fields at
    /// zero; a cgroup that no longer exists is [`CgroupError::Gone`].
    pub fn stats(&self) -> Result<Any> {
        self.ensure_exists()?;
        let any = match self {
            Cgroup::V1 { paths } => {
                let metrics = v1_metrics(paths)?;
                pack(V1_METRICS_TYPE_URL, &metrics, self.main_dir())?
            }
            Cgroup::V2 { path } => {
                let metrics = v2_metrics(path)?;
                pack(V2_METRICS_TYPE_URL, &metrics, path)?
            }
        };
        // Files of a cgroup removed while we read vanish and read as zero:
        // check again so such a half-read is reported as gone, not as zeros.
        self.ensure_exists()?;
        Ok(any)
    }

    fn ensure_exists(&self) -> Result<()> {
        match self {
            Cgroup::V1 { paths } => {
                for (controller, dir) in paths {
                    if STATS_CONTROLLERS.contains(&controller.as_str()) && !dir.is_dir() {
                        return Err(CgroupError::Gone { path: dir.clone() });
                    }
                }
                Ok(())
            }
            Cgroup::V2 { path } if !path.is_dir() => Err(CgroupError::Gone { path: path.clone() }),
            Cgroup::V2 { .. } => Ok(()),
        }
    }

    /// A directory to name in messages about the whole cgroup.
    fn main_dir(&self) -> &Path {
        match self {
            Cgroup::V1 { paths } => ["memory", "cpu", "pids"]
                .iter()
                .find_map(|c| paths.get(*c))
                .or_else(|| paths.values().next())
                .map_or(Path::new(""), PathBuf::as_path),
            Cgroup::V2 { path } => path,
        }
    }
}

fn io_err(op: &'static str, path: &Path, source: io::Error) -> CgroupError {
    CgroupError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

fn pack(type_url: &str, message: &impl Message, dir: &Path) -> Result<Any> {
    let value = message
        .write_to_bytes()
        .map_err(|source| CgroupError::Encode {
            path: dir.to_path_buf(),
            source,
        })?;
    let mut any = Any::new();
    any.type_url = type_url.to_string();
    any.value = value;
    Ok(any)
}

// ---------------------------------------------------------------------------
// Finding the cgroup

/// One line of /proc/<pid>/cgroup: `hierarchy-id:controllers:path`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ProcCgroupLine {
    hierarchy: u32,
    /// Empty for the v2 line (`0::/path`).
    controllers: Vec<String>,
    path: String,
}

fn parse_proc_cgroup(text: &str) -> std::result::Result<Vec<ProcCgroupLine>, String> {
    let mut lines = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        // The path may itself contain ':', so split at the first two only.
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(format!("malformed line {line:?}"));
        };
        let hierarchy = id
            .parse()
            .map_err(|_| format!("malformed hierarchy id in {line:?}"))?;
        lines.push(ProcCgroupLine {
            hierarchy,
            controllers: controllers
                .split(',')
                .filter(|c| !c.is_empty())
                .map(str::to_string)
                .collect(),
            path: path.to_string(),
        });
    }
    Ok(lines)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CgroupFs {
    V1,
    V2,
}

/// A cgroup filesystem mount from mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
struct CgroupMount {
    fs: CgroupFs,
    /// The cgroup the mount shows at its mount point (not "/" for a bind
    /// mount of a sub-cgroup, as inside some containers).
    root: String,
    mount_point: PathBuf,
    /// Super options: for v1 these name the hierarchy's controllers.
    options: Vec<String>,
}

/// Parses the cgroup mounts of a mountinfo file, skipping other and malformed
/// lines (a line we cannot read is not one we can use either).
fn parse_mountinfo(text: &str) -> Vec<CgroupMount> {
    let mut mounts = Vec::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // Optional fields (shared:N, master:N...) vary in number and end at "-".
        let Some(sep) = fields.iter().skip(6).position(|f| *f == "-").map(|p| p + 6) else {
            continue;
        };
        let (Some(fstype), Some(super_options)) = (fields.get(sep + 1), fields.get(sep + 3)) else {
            continue;
        };
        let fs = match *fstype {
            "cgroup" => CgroupFs::V1,
            "cgroup2" => CgroupFs::V2,
            _ => continue,
        };
        let (Some(root), Some(mount_point)) = (fields.get(3), fields.get(4)) else {
            continue;
        };
        mounts.push(CgroupMount {
            fs,
            root: unescape_mountinfo(root),
            mount_point: PathBuf::from(unescape_mountinfo(mount_point)),
            options: super_options.split(',').map(str::to_string).collect(),
        });
    }
    mounts
}

/// Undoes mountinfo's octal escapes (`\040` for a space and so on).
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' {
            if let Some(digits) = bytes.get(i + 1..i + 4) {
                if digits.iter().all(|d| (b'0'..=b'7').contains(d)) {
                    let value = digits
                        .iter()
                        .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
                    if let Ok(b) = u8::try_from(value) {
                        out.push(b);
                        i += 4;
                        continue;
                    }
                }
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The directory of cgroup `path` (as /proc/<pid>/cgroup shows it) under
/// `mount`.
fn cgroup_dir(mount: &CgroupMount, path: &str) -> PathBuf {
    let relative = if mount.root != "/" {
        match path.strip_prefix(mount.root.as_str()) {
            Some(rest) if rest.is_empty() || rest.starts_with('/') => rest,
            // A path outside the mount's root: the reader is in a cgroup
            // namespace whose root is the mount's root, so the path is
            // already relative to it.
            _ => path,
        }
    } else {
        path
    };
    // Joining an absolute path would replace the mount point.
    mount.mount_point.join(relative.trim_start_matches('/'))
}

/// Picks, among the mounts of one hierarchy, the one that shows `path`: the
/// one whose root is the longest prefix of it, else the first.
fn best_mount<'a>(candidates: &[&'a CgroupMount], path: &str) -> Option<&'a CgroupMount> {
    let covers = |m: &&&CgroupMount| {
        m.root == "/"
            || path == m.root
            || path
                .strip_prefix(m.root.as_str())
                .is_some_and(|rest| rest.starts_with('/'))
    };
    candidates
        .iter()
        .filter(covers)
        .max_by_key(|m| m.root.len())
        .or_else(|| candidates.first())
        .copied()
}

fn resolve(pid: i32, proc_cgroup: &str, mountinfo: &str) -> Result<Cgroup> {
    let lines = parse_proc_cgroup(proc_cgroup).map_err(|reason| CgroupError::NotFound {
        pid,
        reason: format!("/proc/{pid}/cgroup: {reason}"),
    })?;
    let mounts = parse_mountinfo(mountinfo);

    let mut paths = HashMap::new();
    for line in lines.iter().filter(|l| !l.controllers.is_empty()) {
        let candidates: Vec<&CgroupMount> = mounts
            .iter()
            .filter(|m| {
                m.fs == CgroupFs::V1 && line.controllers.iter().all(|c| m.options.contains(c))
            })
            .collect();
        if let Some(mount) = best_mount(&candidates, &line.path) {
            let dir = cgroup_dir(mount, &line.path);
            for controller in &line.controllers {
                paths.insert(controller.clone(), dir.clone());
            }
        }
    }
    if paths
        .keys()
        .any(|c| STATS_CONTROLLERS.contains(&c.as_str()))
    {
        return Ok(Cgroup::V1 { paths });
    }

    let Some(unified) = lines
        .iter()
        .find(|l| l.hierarchy == 0 && l.controllers.is_empty())
    else {
        return Err(CgroupError::NotFound {
            pid,
            reason: "no mounted v1 memory, cpu, cpuacct, pids or blkio hierarchy and no v2 entry"
                .to_string(),
        });
    };
    let candidates: Vec<&CgroupMount> = mounts.iter().filter(|m| m.fs == CgroupFs::V2).collect();
    match best_mount(&candidates, &unified.path) {
        Some(mount) => Ok(Cgroup::V2 {
            path: cgroup_dir(mount, &unified.path),
        }),
        None => Err(CgroupError::NotFound {
            pid,
            reason: "no cgroup2 filesystem is mounted".to_string(),
        }),
    }
}

// ---------------------------------------------------------------------------
// Reading cgroup files

/// Whether a read error means "this file is not here" rather than a failure:
/// ENOENT for a file this kernel or configuration lacks, ENODEV for one whose
/// cgroup was removed under us, EOPNOTSUPP for an accounting switched off.
fn is_absent(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound
        || matches!(e.raw_os_error(), Some(libc::ENODEV | libc::EOPNOTSUPP))
}

fn read_opt(path: &Path) -> Result<Option<String>> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if is_absent(&e) => Ok(None),
        Err(e) => Err(io_err("reading", path, e)),
    }
}

/// A number as cgroup files print it. v1 prints some unset values as -1; like
/// containerd, negatives count as 0.
fn parse_num(s: &str) -> Option<u64> {
    s.parse::<u64>()
        .ok()
        .or_else(|| s.parse::<i64>().ok().filter(|v| *v < 0).map(|_| 0))
}

/// A single-value file: a number, or "max" for no limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Single {
    Value(u64),
    Max,
}

fn parse_single(text: &str) -> Option<Single> {
    let text = text.trim();
    if text == "max" {
        Some(Single::Max)
    } else {
        parse_num(text).map(Single::Value)
    }
}

/// Reads a single-value file; "max" reads as `max_as`, an absent file as 0.
fn read_u64(path: &Path, max_as: u64) -> Result<u64> {
    let Some(text) = read_opt(path)? else {
        return Ok(0);
    };
    match parse_single(&text) {
        Some(Single::Value(v)) => Ok(v),
        Some(Single::Max) => Ok(max_as),
        None => Err(CgroupError::Parse {
            path: path.to_path_buf(),
            reason: format!("expected a number or \"max\", found {:?}", text.trim()),
        }),
    }
}

/// Parses a flat keyed file (`key value` lines: memory.stat, cpu.stat,
/// memory.events...). Lines that are not a key and a number are skipped, so
/// that a field a future kernel adds in another shape cannot break stats.
fn parse_flat_keyed(text: &str) -> HashMap<String, u64> {
    text.lines()
        .filter_map(|line| {
            let mut parts = line.split_whitespace();
            let key = parts.next()?;
            let value = parse_num(parts.next()?)?;
            Some((key.to_string(), value))
        })
        .collect()
}

fn read_flat_keyed(path: &Path) -> Result<HashMap<String, u64>> {
    Ok(read_opt(path)?
        .map(|text| parse_flat_keyed(&text))
        .unwrap_or_default())
}

/// Field lookup in a parsed flat keyed file, 0 when absent.
struct Keyed(HashMap<String, u64>);

impl Keyed {
    fn read(path: &Path) -> Result<Self> {
        read_flat_keyed(path).map(Keyed)
    }
    fn get(&self, key: &str) -> u64 {
        self.0.get(key).copied().unwrap_or(0)
    }
    fn has(&self, key: &str) -> bool {
        self.0.contains_key(key)
    }
}

/// Resolves block devices to their /dev names, as containerd fills
/// `BlkIOEntry.device`, reading sysfs once per device per stats call.
#[derive(Default)]
struct DeviceNames(HashMap<(u64, u64), String>);

impl DeviceNames {
    fn name(&mut self, major: u64, minor: u64) -> String {
        self.0
            .entry((major, minor))
            .or_insert_with(|| {
                fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/uevent"))
                    .ok()
                    .and_then(|uevent| {
                        uevent
                            .lines()
                            .find_map(|l| l.strip_prefix("DEVNAME="))
                            .map(|name| format!("/dev/{name}"))
                    })
                    .unwrap_or_default()
            })
            .clone()
    }
}

fn parse_major_minor(s: &str) -> Option<(u64, u64)> {
    let (major, minor) = s.split_once(':')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

// ---------------------------------------------------------------------------
// v1 metrics

fn v1_metrics(paths: &HashMap<String, PathBuf>) -> Result<v1::Metrics> {
    let mut metrics = v1::Metrics::new();
    if let Some(dir) = paths.get("pids") {
        metrics.pids = MessageField::some(v1_pids(dir)?);
    }
    let cpuacct = paths.get("cpuacct").map(PathBuf::as_path);
    let cpu = paths.get("cpu").map(PathBuf::as_path);
    if cpuacct.is_some() || cpu.is_some() {
        metrics.cpu = MessageField::some(v1_cpu(cpuacct, cpu)?);
    }
    if let Some(dir) = paths.get("memory") {
        metrics.memory = MessageField::some(v1_memory(dir)?);
        let oom = Keyed::read(&dir.join("memory.oom_control"))?;
        let mut control = v1::MemoryOomControl::new();
        control.oom_kill_disable = oom.get("oom_kill_disable");
        control.under_oom = oom.get("under_oom");
        control.oom_kill = oom.get("oom_kill");
        metrics.memory_oom_control = MessageField::some(control);
    }
    if let Some(dir) = paths.get("blkio") {
        metrics.blkio = MessageField::some(v1_blkio(dir)?);
    }
    Ok(metrics)
}

fn v1_pids(dir: &Path) -> Result<v1::PidsStat> {
    let mut pids = v1::PidsStat::new();
    pids.current = read_u64(&dir.join("pids.current"), 0)?;
    // containerd's v1 reader reports an unlimited pids.max as 0.
    pids.limit = read_u64(&dir.join("pids.max"), 0)?;
    Ok(pids)
}

fn v1_cpu(cpuacct: Option<&Path>, cpu: Option<&Path>) -> Result<v1::CPUStat> {
    let mut stat = v1::CPUStat::new();
    if let Some(dir) = cpuacct {
        let mut usage = v1::CPUUsage::new();
        usage.total = read_u64(&dir.join("cpuacct.usage"), 0)?;
        if let Some(text) = read_opt(&dir.join("cpuacct.usage_percpu"))? {
            usage.per_cpu = text.split_whitespace().filter_map(parse_num).collect();
        }
        // usage_user/usage_sys are in nanoseconds; cpuacct.stat, the only
        // source on old kernels, counts USER_HZ ticks.
        let user = dir.join("cpuacct.usage_user");
        let sys = dir.join("cpuacct.usage_sys");
        if user.exists() && sys.exists() {
            usage.user = read_u64(&user, 0)?;
            usage.kernel = read_u64(&sys, 0)?;
        } else {
            let ticks = Keyed::read(&dir.join("cpuacct.stat"))?;
            let ns_per_tick = 1_000_000_000 / clock_ticks_per_second();
            usage.user = ticks.get("user").saturating_mul(ns_per_tick);
            usage.kernel = ticks.get("system").saturating_mul(ns_per_tick);
        }
        stat.usage = MessageField::some(usage);
    }
    if let Some(dir) = cpu {
        let cpu_stat = Keyed::read(&dir.join("cpu.stat"))?;
        let mut throttle = v1::Throttle::new();
        throttle.periods = cpu_stat.get("nr_periods");
        throttle.throttled_periods = cpu_stat.get("nr_throttled");
        throttle.throttled_time = cpu_stat.get("throttled_time");
        stat.throttling = MessageField::some(throttle);
    }
    Ok(stat)
}

fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf reads a configuration value and touches no memory of ours.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    // USER_HZ is 100 on every Linux architecture we run on; the fallback only
    // guards against a nonsensical answer.
    u64::try_from(ticks).ok().filter(|t| *t > 0).unwrap_or(100)
}

fn v1_memory(dir: &Path) -> Result<v1::MemoryStat> {
    let stat = Keyed::read(&dir.join("memory.stat"))?;
    let mut m = v1::MemoryStat::new();
    m.cache = stat.get("cache");
    m.rss = stat.get("rss");
    m.rss_huge = stat.get("rss_huge");
    m.mapped_file = stat.get("mapped_file");
    m.dirty = stat.get("dirty");
    m.writeback = stat.get("writeback");
    m.pg_pg_in = stat.get("pgpgin");
    m.pg_pg_out = stat.get("pgpgout");
    m.pg_fault = stat.get("pgfault");
    m.pg_maj_fault = stat.get("pgmajfault");
    m.inactive_anon = stat.get("inactive_anon");
    m.active_anon = stat.get("active_anon");
    m.inactive_file = stat.get("inactive_file");
    m.active_file = stat.get("active_file");
    m.unevictable = stat.get("unevictable");
    m.hierarchical_memory_limit = stat.get("hierarchical_memory_limit");
    m.hierarchical_swap_limit = stat.get("hierarchical_memsw_limit");
    m.total_cache = stat.get("total_cache");
    m.total_rss = stat.get("total_rss");
    m.total_rss_huge = stat.get("total_rss_huge");
    m.total_mapped_file = stat.get("total_mapped_file");
    m.total_dirty = stat.get("total_dirty");
    m.total_writeback = stat.get("total_writeback");
    m.total_pg_pg_in = stat.get("total_pgpgin");
    m.total_pg_pg_out = stat.get("total_pgpgout");
    m.total_pg_fault = stat.get("total_pgfault");
    m.total_pg_maj_fault = stat.get("total_pgmajfault");
    m.total_inactive_anon = stat.get("total_inactive_anon");
    m.total_active_anon = stat.get("total_active_anon");
    m.total_inactive_file = stat.get("total_inactive_file");
    m.total_active_file = stat.get("total_active_file");
    m.total_unevictable = stat.get("total_unevictable");
    m.usage = MessageField::some(v1_memory_entry(dir, "memory")?);
    // Like containerd, `swap` carries the memsw (memory+swap) counters; they
    // read as zero without swap accounting.
    m.swap = MessageField::some(v1_memory_entry(dir, "memory.memsw")?);
    m.kernel = MessageField::some(v1_memory_entry(dir, "memory.kmem")?);
    m.kernel_tcp = MessageField::some(v1_memory_entry(dir, "memory.kmem.tcp")?);
    Ok(m)
}

fn v1_memory_entry(dir: &Path, prefix: &str) -> Result<v1::MemoryEntry> {
    let file = |name: &str| dir.join(format!("{prefix}.{name}"));
    let mut entry = v1::MemoryEntry::new();
    entry.usage = read_u64(&file("usage_in_bytes"), 0)?;
    entry.max = read_u64(&file("max_usage_in_bytes"), 0)?;
    entry.failcnt = read_u64(&file("failcnt"), 0)?;
    entry.limit = read_u64(&file("limit_in_bytes"), 0)?;
    Ok(entry)
}

fn v1_blkio(dir: &Path) -> Result<v1::BlkIOStat> {
    // The CFQ files exist only with the legacy CFQ scheduler; elsewhere the
    // throttle layer is what counts every device's I/O (containerd reads them
    // in the same order).
    let (bytes_file, ios_file) = if dir.join("blkio.io_serviced_recursive").exists() {
        (
            "blkio.io_service_bytes_recursive",
            "blkio.io_serviced_recursive",
        )
    } else {
        (
            "blkio.throttle.io_service_bytes_recursive",
            "blkio.throttle.io_serviced_recursive",
        )
    };
    let mut names = DeviceNames::default();
    let mut stat = v1::BlkIOStat::new();
    for (file, field) in [
        (bytes_file, &mut stat.io_service_bytes_recursive),
        (ios_file, &mut stat.io_serviced_recursive),
    ] {
        if let Some(text) = read_opt(&dir.join(file))? {
            *field = parse_blkio(&text, &mut names);
        }
    }
    Ok(stat)
}

/// Parses `major:minor Op value` lines; the closing `Total N` line has no
/// device and is skipped.
fn parse_blkio(text: &str, names: &mut DeviceNames) -> Vec<v1::BlkIOEntry> {
    text.lines()
        .filter_map(|line| {
            let mut parts = line.split_whitespace();
            let (major, minor) = parse_major_minor(parts.next()?)?;
            let op = parts.next()?;
            let value = parse_num(parts.next()?)?;
            let mut entry = v1::BlkIOEntry::new();
            entry.major = major;
            entry.minor = minor;
            entry.op = op.to_string();
            entry.value = value;
            entry.device = names.name(major, minor);
            Some(entry)
        })
        .collect()
}

// ---------------------------------------------------------------------------
// v2 metrics

fn v2_metrics(dir: &Path) -> Result<v2::Metrics> {
    let mut metrics = v2::Metrics::new();

    let mut pids = v2::PidsStat::new();
    pids.current = read_u64(&dir.join("pids.current"), 0)?;
    // containerd's v2 reader reports "max" as u64::MAX (unlike its v1 reader).
    pids.limit = read_u64(&dir.join("pids.max"), u64::MAX)?;
    metrics.pids = MessageField::some(pids);

    let cpu_stat = Keyed::read(&dir.join("cpu.stat"))?;
    let mut cpu = v2::CPUStat::new();
    cpu.usage_usec = cpu_stat.get("usage_usec");
    cpu.user_usec = cpu_stat.get("user_usec");
    cpu.system_usec = cpu_stat.get("system_usec");
    cpu.nr_periods = cpu_stat.get("nr_periods");
    cpu.nr_throttled = cpu_stat.get("nr_throttled");
    cpu.throttled_usec = cpu_stat.get("throttled_usec");
    cpu.nr_bursts = cpu_stat.get("nr_bursts");
    cpu.burst_usec = cpu_stat.get("burst_usec");
    cpu.psi = read_psi(&dir.join("cpu.pressure"))?;
    metrics.cpu = MessageField::some(cpu);

    metrics.memory = MessageField::some(v2_memory(dir)?);

    let events = Keyed::read(&dir.join("memory.events"))?;
    let mut memory_events = v2::MemoryEvents::new();
    memory_events.low = events.get("low");
    memory_events.high = events.get("high");
    memory_events.max = events.get("max");
    memory_events.oom = events.get("oom");
    memory_events.oom_kill = events.get("oom_kill");
    memory_events.oom_group_kill = events.get("oom_group_kill");
    metrics.memory_events = MessageField::some(memory_events);

    let mut io_stat = v2::IOStat::new();
    if let Some(text) = read_opt(&dir.join("io.stat"))? {
        io_stat.usage = parse_io_stat(&text);
    }
    io_stat.psi = read_psi(&dir.join("io.pressure"))?;
    metrics.io = MessageField::some(io_stat);

    Ok(metrics)
}

fn v2_memory(dir: &Path) -> Result<v2::MemoryStat> {
    let stat = Keyed::read(&dir.join("memory.stat"))?;
    // Since Linux 5.9 some counters are split into _anon and _file halves.
    let split = |key: &str| {
        if stat.has(key) {
            stat.get(key)
        } else {
            stat.get(&format!("{key}_anon"))
                .saturating_add(stat.get(&format!("{key}_file")))
        }
    };
    let mut m = v2::MemoryStat::new();
    m.anon = stat.get("anon");
    m.file = stat.get("file");
    m.kernel_stack = stat.get("kernel_stack");
    m.slab = stat.get("slab");
    m.sock = stat.get("sock");
    m.shmem = stat.get("shmem");
    m.file_mapped = stat.get("file_mapped");
    m.file_dirty = stat.get("file_dirty");
    m.file_writeback = stat.get("file_writeback");
    m.anon_thp = stat.get("anon_thp");
    m.inactive_anon = stat.get("inactive_anon");
    m.active_anon = stat.get("active_anon");
    m.inactive_file = stat.get("inactive_file");
    m.active_file = stat.get("active_file");
    m.unevictable = stat.get("unevictable");
    m.slab_reclaimable = stat.get("slab_reclaimable");
    m.slab_unreclaimable = stat.get("slab_unreclaimable");
    m.pgfault = stat.get("pgfault");
    m.pgmajfault = stat.get("pgmajfault");
    m.workingset_refault = split("workingset_refault");
    m.workingset_activate = split("workingset_activate");
    m.workingset_nodereclaim = stat.get("workingset_nodereclaim");
    m.pgrefill = stat.get("pgrefill");
    m.pgscan = stat.get("pgscan");
    m.pgsteal = stat.get("pgsteal");
    m.pgactivate = stat.get("pgactivate");
    m.pgdeactivate = stat.get("pgdeactivate");
    m.pglazyfree = stat.get("pglazyfree");
    m.pglazyfreed = stat.get("pglazyfreed");
    m.thp_fault_alloc = stat.get("thp_fault_alloc");
    m.thp_collapse_alloc = stat.get("thp_collapse_alloc");
    m.usage = read_u64(&dir.join("memory.current"), 0)?;
    m.usage_limit = read_u64(&dir.join("memory.max"), u64::MAX)?;
    m.swap_usage = read_u64(&dir.join("memory.swap.current"), 0)?;
    m.swap_limit = read_u64(&dir.join("memory.swap.max"), u64::MAX)?;
    m.max_usage = read_u64(&dir.join("memory.peak"), 0)?;
    m.swap_max_usage = read_u64(&dir.join("memory.swap.peak"), 0)?;
    m.psi = read_psi(&dir.join("memory.pressure"))?;
    Ok(m)
}

/// Parses io.stat: `major:minor rbytes=N wbytes=N rios=N wios=N ...`.
fn parse_io_stat(text: &str) -> Vec<v2::IOEntry> {
    text.lines()
        .filter_map(|line| {
            let mut parts = line.split_whitespace();
            let (major, minor) = parse_major_minor(parts.next()?)?;
            let mut entry = v2::IOEntry::new();
            entry.major = major;
            entry.minor = minor;
            for pair in parts {
                let Some((key, value)) = pair.split_once('=') else {
                    continue;
                };
                let Some(value) = parse_num(value) else {
                    continue;
                };
                match key {
                    "rbytes" => entry.rbytes = value,
                    "wbytes" => entry.wbytes = value,
                    "rios" => entry.rios = value,
                    "wios" => entry.wios = value,
                    _ => {}
                }
            }
            Some(entry)
        })
        .collect()
}

/// Reads a pressure file; none when the kernel has no PSI for it.
fn read_psi(path: &Path) -> Result<MessageField<v2::PSIStats>> {
    Ok(match read_opt(path)? {
        Some(text) => MessageField::some(parse_psi(&text)),
        None => MessageField::none(),
    })
}

/// Parses `some avg10=0.00 avg60=0.00 avg300=0.00 total=0` and its `full`
/// sibling.
fn parse_psi(text: &str) -> v2::PSIStats {
    let mut stats = v2::PSIStats::new();
    for line in text.lines() {
        let mut parts = line.split_whitespace();
        let slot = match parts.next() {
            Some("some") => &mut stats.some,
            Some("full") => &mut stats.full,
            _ => continue,
        };
        let mut data = v2::PSIData::new();
        for pair in parts {
            let Some((key, value)) = pair.split_once('=') else {
                continue;
            };
            match key {
                "avg10" => data.avg10 = value.parse().unwrap_or(0.0),
                "avg60" => data.avg60 = value.parse().unwrap_or(0.0),
                "avg300" => data.avg300 = value.parse().unwrap_or(0.0),
                "total" => data.total = parse_num(value).unwrap_or(0),
                _ => {}
            }
        }
        *slot = MessageField::some(data);
    }
    stats
}

// ---------------------------------------------------------------------------
// OOM notification

/// Watches `cgroup` for OOM kills and calls `on_oom` once per OOM event, from
/// a thread of its own, until the cgroup is removed (then the thread ends by
/// itself) or the returned guard is dropped.
///
/// v1: an eventfd registered on memory.oom_control through
/// cgroup.event_control. The kernel signals it on each OOM of the cgroup (or
/// of an ancestor whose limit was hit) and once more when the cgroup is
/// removed; the two are told apart by whether the cgroup still exists.
///
/// v2: inotify on memory.events, calling `on_oom` when its `oom_kill` count
/// has grown; kills counted before the watch started are not reported.
///
/// `on_oom` runs on the watch thread: it should hand the event off (publish
/// it, send it on a channel) rather than block for long.
pub fn watch_oom(cgroup: &Cgroup, on_oom: impl Fn() + Send + 'static) -> Result<OomWatch> {
    cgroup.ensure_exists()?;
    match cgroup {
        Cgroup::V1 { paths } => match paths.get("memory") {
            Some(dir) => watch_v1(dir, on_oom),
            None => Err(CgroupError::NoMemoryController {
                path: cgroup.main_dir().to_path_buf(),
            }),
        },
        Cgroup::V2 { path } => watch_v2(path, "memory.events", on_oom),
    }
}

/// Guard of a watch started by [`watch_oom`]. Dropping it tells the watch
/// thread to stop and returns at once; the thread closes its descriptors as
/// it ends, which it does within one poll wake-up (it never waits for the
/// thread, so that dropping it while holding a lock `on_oom` takes cannot
/// deadlock).
#[derive(Debug)]
pub struct OomWatch {
    /// Shared with the thread, so whichever side ends last closes it.
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
}

impl OomWatch {
    /// Whether the watch thread has ended (its cgroup was removed, or it was
    /// stopped).
    // Part of the API whether or not the shim calls it yet.
    #[allow(dead_code)]
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Stops the watch and waits for its thread to end. Must not be called
    /// while holding anything `on_oom` waits for.
    #[allow(dead_code)]
    pub fn stop(mut self) {
        self.signal_stop();
        if let Some(thread) = self.thread.take() {
            // Joining itself (stop called from on_oom) would never return.
            if thread.thread().id() != std::thread::current().id() && thread.join().is_err() {
                log::warn!("OOM watch thread panicked");
            }
        }
    }

    fn signal_stop(&self) {
        if let Err(e) = self.stop.write(1) {
            log::warn!("cannot signal the OOM watch thread to stop: {e}");
        }
    }
}

impl Drop for OomWatch {
    fn drop(&mut self) {
        self.signal_stop();
    }
}

fn new_eventfd(path: &Path) -> Result<EventFd> {
    EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK).map_err(|source| {
        CgroupError::Sys {
            op: "creating an eventfd",
            path: path.to_path_buf(),
            source,
        }
    })
}

fn spawn_watch(
    dir: &Path,
    stop: Arc<EventFd>,
    body: impl FnOnce() + Send + 'static,
) -> Result<OomWatch> {
    let thread = std::thread::Builder::new()
        .name("oom-watch".to_string())
        .spawn(body)
        .map_err(|e| io_err("starting the OOM watch thread for", dir, e))?;
    Ok(OomWatch {
        stop,
        thread: Some(thread),
    })
}

enum Wake {
    Stop,
    Ready,
    Timeout,
}

/// Waits for `fd` to be readable, the stop eventfd to be signalled, or the
/// timeout.
fn wait_for(
    stop: &EventFd,
    fd: BorrowedFd<'_>,
    timeout: Duration,
) -> std::result::Result<Wake, Errno> {
    let timeout = PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX);
    loop {
        let mut fds = [
            PollFd::new(stop.as_fd(), PollFlags::POLLIN),
            PollFd::new(fd, PollFlags::POLLIN),
        ];
        match poll(&mut fds, timeout) {
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e),
            Ok(0) => return Ok(Wake::Timeout),
            // Flags nix does not know (None) still mean something happened.
            Ok(_) if fds[0].any().unwrap_or(true) => return Ok(Wake::Stop),
            Ok(_) => return Ok(Wake::Ready),
        }
    }
}

fn watch_v1(dir: &Path, on_oom: impl Fn() + Send + 'static) -> Result<OomWatch> {
    let control_path = dir.join("memory.oom_control");
    let control = fs::File::open(&control_path).map_err(|e| {
        if is_absent(&e) {
            CgroupError::Gone {
                path: dir.to_path_buf(),
            }
        } else {
            io_err("opening", &control_path, e)
        }
    })?;
    let event = new_eventfd(dir)?;
    let event_control = dir.join("cgroup.event_control");
    fs::OpenOptions::new()
        .write(true)
        .open(&event_control)
        .and_then(|mut f| {
            f.write_all(format!("{} {}", event.as_raw_fd(), control.as_raw_fd()).as_bytes())
        })
        .map_err(|e| {
            io_err(
                "registering for OOM notification through",
                &event_control,
                e,
            )
        })?;
    // The kernel keeps no reference to memory.oom_control once registered.
    // Closing `event` later (when the thread ends) unregisters the
    // notification: the kernel sees the eventfd hang up.
    drop(control);

    let stop = Arc::new(new_eventfd(dir)?);
    let thread_stop = Arc::clone(&stop);
    let dir = dir.to_path_buf();
    let thread_dir = dir.clone();
    spawn_watch(&dir, stop, move || {
        run_v1(&thread_dir, &event, &thread_stop, on_oom);
    })
}

fn run_v1(dir: &Path, event: &EventFd, stop: &EventFd, on_oom: impl Fn()) {
    let control = dir.join("memory.oom_control");
    loop {
        match wait_for(stop, event.as_fd(), EXISTENCE_CHECK_INTERVAL) {
            Ok(Wake::Stop) => return,
            Ok(Wake::Timeout) => {
                if !dir.is_dir() {
                    return;
                }
            }
            Ok(Wake::Ready) => {
                let count = match event.read() {
                    Ok(count) => count,
                    Err(Errno::EAGAIN) => continue,
                    Err(e) => {
                        log::warn!("OOM watch of {}: reading its eventfd: {e}", dir.display());
                        return;
                    }
                };
                if fs::metadata(&control).is_ok() {
                    on_oom();
                    continue;
                }
                // The cgroup is gone, so one count is the removal signal (the
                // kernel sends it after the directory is unlinked). More than
                // one, or a second signal right after, means an OOM raced the
                // removal: typical of a container killed by the OOM killer
                // and deleted at once.
                let late = match wait_for(stop, event.as_fd(), V1_REMOVAL_GRACE) {
                    Ok(Wake::Ready) => event.read().unwrap_or(0),
                    _ => 0,
                };
                if count.saturating_add(late) > 1 {
                    on_oom();
                }
                return;
            }
            Err(e) => {
                log::warn!("OOM watch of {}: poll: {e}", dir.display());
                return;
            }
        }
    }
}

/// The outcome of reading memory.events in a v2 watch.
enum EventsRead {
    OomKills(u64),
    /// Readable but without the count: a torn read of a file being
    /// rewritten (only in tests) or a kernel without `oom_kill`.
    NoCount,
    Gone,
}

fn read_oom_kills(path: &Path) -> EventsRead {
    match fs::read_to_string(path) {
        Ok(text) => match parse_flat_keyed(&text).get("oom_kill") {
            Some(count) => EventsRead::OomKills(*count),
            None => EventsRead::NoCount,
        },
        Err(e) if is_absent(&e) => EventsRead::Gone,
        Err(e) => {
            log::warn!("OOM watch: reading {}: {e}", path.display());
            EventsRead::NoCount
        }
    }
}

/// Watches `dir/file` (memory.events; another flat keyed file in tests on
/// hosts whose v2 hierarchy has no memory controller).
fn watch_v2(dir: &Path, file: &str, on_oom: impl Fn() + Send + 'static) -> Result<OomWatch> {
    let events_path = dir.join(file);
    let sys_err = |op: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| CgroupError::Sys { op, path, source }
    };
    let inotify = Inotify::init(InitFlags::IN_CLOEXEC | InitFlags::IN_NONBLOCK)
        .map_err(sys_err("creating an inotify instance", dir))?;
    let events_wd = match inotify.add_watch(&events_path, AddWatchFlags::IN_MODIFY) {
        Ok(wd) => wd,
        Err(Errno::ENOENT) if dir.is_dir() => {
            return Err(CgroupError::NoMemoryController {
                path: dir.to_path_buf(),
            })
        }
        Err(Errno::ENOENT) => {
            return Err(CgroupError::Gone {
                path: dir.to_path_buf(),
            })
        }
        Err(source) => {
            return Err(CgroupError::Sys {
                op: "watching",
                path: events_path,
                source,
            })
        }
    };
    // Removing a cgroup2 directory sends nothing to watches on its files
    // (kernfs keeps their inodes alive); only the parent directory sees an
    // IN_DELETE for it, from the rmdir.
    let parent_wd = dir.parent().and_then(|parent| {
        inotify
            .add_watch(
                parent,
                AddWatchFlags::IN_DELETE | AddWatchFlags::IN_MOVED_FROM,
            )
            .map_err(|e| {
                log::warn!(
                    "OOM watch of {}: cannot watch {} for its removal ({e}); checking every {:?}",
                    dir.display(),
                    parent.display(),
                    EXISTENCE_CHECK_INTERVAL
                )
            })
            .ok()
    });
    let last = match read_oom_kills(&events_path) {
        EventsRead::OomKills(count) => count,
        EventsRead::NoCount => 0,
        EventsRead::Gone => {
            return Err(CgroupError::Gone {
                path: dir.to_path_buf(),
            })
        }
    };

    let stop = Arc::new(new_eventfd(dir)?);
    let thread_stop = Arc::clone(&stop);
    let watch = V2Watch {
        dir: dir.to_path_buf(),
        events_path,
        inotify,
        events_wd,
        parent_wd,
        last,
    };
    spawn_watch(dir, stop, move || watch.run(&thread_stop, on_oom))
}

struct V2Watch {
    dir: PathBuf,
    events_path: PathBuf,
    inotify: Inotify,
    events_wd: WatchDescriptor,
    parent_wd: Option<WatchDescriptor>,
    /// The oom_kill count already reported.
    last: u64,
}

impl V2Watch {
    fn run(mut self, stop: &EventFd, on_oom: impl Fn()) {
        let name = self.dir.file_name().map(|n| n.to_os_string());
        loop {
            match wait_for(stop, self.inotify.as_fd(), EXISTENCE_CHECK_INTERVAL) {
                Ok(Wake::Stop) => return,
                Ok(Wake::Timeout) => {
                    if !self.dir.is_dir() {
                        return;
                    }
                }
                Ok(Wake::Ready) => {
                    let events = match self.inotify.read_events() {
                        Ok(events) => events,
                        Err(Errno::EAGAIN | Errno::EINTR) => continue,
                        Err(e) => {
                            log::warn!("OOM watch of {}: reading inotify: {e}", self.dir.display());
                            return;
                        }
                    };
                    let mut gone = events.iter().any(|e| {
                        let removed_here = Some(e.wd) == self.parent_wd
                            && e.name.is_some()
                            && e.name == name
                            && e.mask.intersects(
                                AddWatchFlags::IN_DELETE | AddWatchFlags::IN_MOVED_FROM,
                            );
                        let watch_dropped =
                            e.wd == self.events_wd && e.mask.contains(AddWatchFlags::IN_IGNORED);
                        removed_here || watch_dropped
                    });
                    // Read the count even when the cgroup is going: the kill
                    // usually comes just before the removal.
                    match read_oom_kills(&self.events_path) {
                        EventsRead::OomKills(count) => {
                            if count > self.last {
                                on_oom();
                            }
                            self.last = count;
                        }
                        EventsRead::NoCount => {}
                        EventsRead::Gone => gone = true,
                    }
                    if gone {
                        return;
                    }
                }
                Err(e) => {
                    log::warn!("OOM watch of {}: poll: {e}", self.dir.display());
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protobuf::MessageFull;
    use std::io::{BufRead, BufReader};
    use std::process::{Child, ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    use std::time::Instant;

    static NEXT: AtomicUsize = AtomicUsize::new(0);

    /// A cgroup name no other test, or concurrent run, uses.
    fn unique(tag: &str) -> String {
        format!(
            "corral-cgtest-{}-{}-{tag}",
            std::process::id(),
            NEXT.fetch_add(1, SeqCst)
        )
    }

    fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if done() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        done()
    }

    fn write(dir: &Path, file: &str, text: &str) {
        fs::write(dir.join(file), text).unwrap();
    }

    // -- finding the cgroup ------------------------------------------------

    const HYBRID_PROC: &str = "\
9:name=systemd:/kubepods/pod1/ctr
8:pids:/kubepods/pod1/ctr
4:memory:/kubepods/pod1/ctr
2:cpu,cpuacct:/kubepods/pod1/ctr
1:net_cls:/
0::/kubepods/pod1/ctr
";

    const HYBRID_MOUNTINFO: &str = "\
25 30 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
31 25 0:28 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
32 31 0:29 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
33 31 0:30 / /sys/fs/cgroup/systemd rw,nosuid,nodev,noexec,relatime shared:11 - cgroup cgroup rw,xattr,name=systemd
36 31 0:33 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid,nodev,noexec,relatime shared:14 - cgroup cgroup rw,cpu,cpuacct
37 31 0:34 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:15 - cgroup cgroup rw,memory
38 31 0:35 / /sys/fs/cgroup/pids rw,nosuid,nodev,noexec,relatime shared:16 - cgroup cgroup rw,pids
39 31 0:36 / /sys/fs/cgroup/net_cls rw,nosuid,nodev,noexec,relatime shared:17 - cgroup cgroup rw,net_cls
";

    #[test]
    fn parses_proc_cgroup_lines() {
        let lines = parse_proc_cgroup("2:cpu,cpuacct:/a:b\n0::/x/y\n\n1:name=systemd:/\n").unwrap();
        assert_eq!(
            lines,
            vec![
                ProcCgroupLine {
                    hierarchy: 2,
                    controllers: vec!["cpu".into(), "cpuacct".into()],
                    path: "/a:b".into(),
                },
                ProcCgroupLine {
                    hierarchy: 0,
                    controllers: vec![],
                    path: "/x/y".into(),
                },
                ProcCgroupLine {
                    hierarchy: 1,
                    controllers: vec!["name=systemd".into()],
                    path: "/".into(),
                },
            ]
        );
        assert!(parse_proc_cgroup("garbage\n").is_err());
        assert!(parse_proc_cgroup("x:memory:/\n").is_err());
    }

    #[test]
    fn parses_mountinfo_cgroup_mounts_only() {
        let text = "\
36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue
40 31 0:37 / /sys/fs/cgroup/my\\040dir rw,relatime shared:1 master:2 - cgroup cgroup rw,memory
41 31 0:38 /kubepods /sys/fs/cgroup rw,relatime - cgroup2 cgroup2 rw
42 31 0:39 / /broken rw - cgroup2
";
        let mounts = parse_mountinfo(text);
        assert_eq!(
            mounts,
            vec![
                CgroupMount {
                    fs: CgroupFs::V1,
                    root: "/".into(),
                    mount_point: "/sys/fs/cgroup/my dir".into(),
                    options: vec!["rw".into(), "memory".into()],
                },
                CgroupMount {
                    fs: CgroupFs::V2,
                    root: "/kubepods".into(),
                    mount_point: "/sys/fs/cgroup".into(),
                    options: vec!["rw".into()],
                },
            ]
        );
        assert_eq!(unescape_mountinfo(r"a\134b\011c\0"), "a\\b\tc\\0");
        assert_eq!(unescape_mountinfo("é\\04"), "é\\04");
    }

    #[test]
    fn hybrid_host_resolves_to_v1_directories() {
        let cgroup = resolve(42, HYBRID_PROC, HYBRID_MOUNTINFO).unwrap();
        let Cgroup::V1 { paths } = cgroup else {
            panic!("expected v1, got {cgroup:?}");
        };
        let dir = |d: &str| PathBuf::from(d);
        assert_eq!(
            paths["memory"],
            dir("/sys/fs/cgroup/memory/kubepods/pod1/ctr")
        );
        assert_eq!(
            paths["cpu"],
            dir("/sys/fs/cgroup/cpu,cpuacct/kubepods/pod1/ctr")
        );
        assert_eq!(paths["cpuacct"], paths["cpu"]);
        assert_eq!(paths["pids"], dir("/sys/fs/cgroup/pids/kubepods/pod1/ctr"));
        assert_eq!(
            paths["name=systemd"],
            dir("/sys/fs/cgroup/systemd/kubepods/pod1/ctr")
        );
        assert_eq!(paths["net_cls"], dir("/sys/fs/cgroup/net_cls"));
        assert_eq!(paths.len(), 6);
    }

    #[test]
    fn pure_v2_host_resolves_to_v2_even_with_a_stray_v1_mount() {
        let proc_text = "1:net_cls:/\n0::/kubepods.slice/cri-containerd-abc.scope\n";
        let mountinfo = "\
35 24 0:30 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
50 35 0:50 / /run/net_cls rw,relatime - cgroup net_cls rw,net_cls
";
        assert_eq!(
            resolve(7, proc_text, mountinfo).unwrap(),
            Cgroup::V2 {
                path: "/sys/fs/cgroup/kubepods.slice/cri-containerd-abc.scope".into()
            }
        );
    }

    #[test]
    fn mount_roots_are_stripped_and_the_covering_mount_wins() {
        let mountinfo = "\
60 1 0:30 /kubepods/pod1 /run/my\\040cgroup rw - cgroup2 cgroup2 rw
61 1 0:30 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw
";
        // The bind mount of /kubepods/pod1 shows the path under its root.
        assert_eq!(
            resolve(1, "0::/kubepods/pod1/ctr\n", mountinfo).unwrap(),
            Cgroup::V2 {
                path: "/run/my cgroup/ctr".into()
            }
        );
        // A path outside that root is only visible through the full mount.
        assert_eq!(
            resolve(1, "0::/system.slice/x\n", mountinfo).unwrap(),
            Cgroup::V2 {
                path: "/sys/fs/cgroup/system.slice/x".into()
            }
        );
        // Inside a cgroup namespace the path is already relative to a
        // mount whose root it does not start with.
        let ns_mountinfo = "70 1 0:30 /kubepods/pod1 /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            resolve(1, "0::/\n", ns_mountinfo).unwrap(),
            Cgroup::V2 {
                path: "/sys/fs/cgroup".into()
            }
        );
    }

    #[test]
    fn resolve_errors_name_the_pid() {
        let err = resolve(4242, HYBRID_PROC, "").unwrap_err();
        assert!(
            matches!(err, CgroupError::NotFound { pid: 4242, .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("4242"), "{err}");
        let err = resolve(4243, "nonsense", HYBRID_MOUNTINFO).unwrap_err();
        assert!(err.to_string().contains("/proc/4243/cgroup"), "{err}");
        let err = resolve(
            4244,
            "4:memory:/x\n",
            HYBRID_MOUNTINFO.replace("rw,memory", "rw,hugetlb").as_str(),
        )
        .unwrap_err();
        assert!(
            matches!(err, CgroupError::NotFound { pid: 4244, .. }),
            "{err:?}"
        );
    }

    #[test]
    fn of_pid_reports_a_missing_process() {
        // Above any pid_max, so never a live process.
        let err = Cgroup::of_pid(i32::MAX).unwrap_err();
        assert!(
            matches!(err, CgroupError::NoProcess { pid: i32::MAX }),
            "{err:?}"
        );
    }

    // -- parsing stat files -------------------------------------------------

    #[test]
    fn type_urls_are_the_message_full_names() {
        assert_eq!(v1::Metrics::descriptor().full_name(), V1_METRICS_TYPE_URL);
        assert_eq!(v2::Metrics::descriptor().full_name(), V2_METRICS_TYPE_URL);
    }

    #[test]
    fn parses_numbers_single_values_and_flat_keyed_files() {
        assert_eq!(parse_num("12"), Some(12));
        assert_eq!(parse_num("-1"), Some(0));
        assert_eq!(parse_num("x"), None);
        assert_eq!(parse_single(" max\n"), Some(Single::Max));
        assert_eq!(
            parse_single("9223372036854771712\n"),
            Some(Single::Value(9223372036854771712))
        );
        assert_eq!(parse_single(""), None);
        let keyed = parse_flat_keyed("a 1\nb -5\nc x\nd 2 extra\n\ne\n");
        assert_eq!(keyed.len(), 3);
        assert_eq!((keyed["a"], keyed["b"], keyed["d"]), (1, 0, 2));
    }

    #[test]
    fn parses_blkio_io_stat_and_psi() {
        let mut names = DeviceNames::default();
        let entries = parse_blkio(
            "253:99 Read 10\n253:99 Write 20\n253:99 Total 30\nTotal 30\n",
            &mut names,
        );
        let got: Vec<_> = entries
            .iter()
            .map(|e| (e.major, e.minor, e.op.as_str(), e.value))
            .collect();
        assert_eq!(
            got,
            vec![
                (253, 99, "Read", 10),
                (253, 99, "Write", 20),
                (253, 99, "Total", 30)
            ]
        );

        let io = parse_io_stat(
            "8:0 rbytes=100 wbytes=200 rios=3 wios=4 dbytes=0 dios=0\n259:1 rbytes=1 junk wios=6\n",
        );
        let got: Vec<_> = io
            .iter()
            .map(|e| (e.major, e.minor, e.rbytes, e.wbytes, e.rios, e.wios))
            .collect();
        assert_eq!(got, vec![(8, 0, 100, 200, 3, 4), (259, 1, 1, 0, 0, 6)]);

        let psi = parse_psi(
            "some avg10=1.50 avg60=0.25 avg300=0.00 total=12345\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=7\n",
        );
        assert_eq!(psi.some.avg10, 1.5);
        assert_eq!(psi.some.avg60, 0.25);
        assert_eq!(psi.some.total, 12345);
        assert_eq!(psi.full.total, 7);
        assert!(parse_psi("some avg10=0.00 total=3\n").full.is_none());
    }

    #[test]
    fn v2_stats_from_a_laid_out_cgroup() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        write(dir, "pids.current", "3\n");
        write(dir, "pids.max", "max\n");
        write(
            dir,
            "cpu.stat",
            "usage_usec 1000\nuser_usec 600\nsystem_usec 400\nnr_periods 10\nnr_throttled 2\nthrottled_usec 300\nnr_bursts 1\nburst_usec 50\n",
        );
        write(dir, "cpu.pressure", "some avg10=0.10 avg60=0.00 avg300=0.00 total=99\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=9\n");
        write(dir, "memory.current", "4096\n");
        write(dir, "memory.max", "max\n");
        write(dir, "memory.swap.current", "0\n");
        write(dir, "memory.swap.max", "1048576\n");
        write(dir, "memory.peak", "8192\n");
        write(
            dir,
            "memory.stat",
            "anon 1\nfile 2\nkernel_stack 3\nslab 4\nsock 5\nshmem 6\nfile_mapped 7\nfile_dirty 8\nfile_writeback 9\n\
             anon_thp 10\ninactive_anon 11\nactive_anon 12\ninactive_file 13\nactive_file 14\nunevictable 15\n\
             slab_reclaimable 16\nslab_unreclaimable 17\npgfault 18\npgmajfault 19\n\
             workingset_refault_anon 5\nworkingset_refault_file 15\nworkingset_activate 21\n\
             a_future_field one two\n",
        );
        write(
            dir,
            "memory.events",
            "low 1\nhigh 2\nmax 3\noom 4\noom_kill 5\noom_group_kill 6\n",
        );
        write(
            dir,
            "io.stat",
            "8:0 rbytes=100 wbytes=200 rios=3 wios=4 dbytes=0 dios=0\n",
        );

        let any = Cgroup::V2 {
            path: dir.to_path_buf(),
        }
        .stats()
        .unwrap();
        assert_eq!(any.type_url, "io.containerd.cgroups.v2.Metrics");
        let m = v2::Metrics::parse_from_bytes(&any.value).unwrap();

        assert_eq!((m.pids.current, m.pids.limit), (3, u64::MAX));
        let cpu = &m.cpu;
        assert_eq!(
            (
                cpu.usage_usec,
                cpu.user_usec,
                cpu.system_usec,
                cpu.nr_periods,
                cpu.nr_throttled,
                cpu.throttled_usec
            ),
            (1000, 600, 400, 10, 2, 300)
        );
        assert_eq!((cpu.nr_bursts, cpu.burst_usec), (1, 50));
        assert_eq!((cpu.psi.some.total, cpu.psi.full.total), (99, 9));
        let mem = &m.memory;
        assert_eq!(
            (mem.usage, mem.usage_limit, mem.max_usage),
            (4096, u64::MAX, 8192)
        );
        assert_eq!(
            (mem.swap_usage, mem.swap_limit, mem.swap_max_usage),
            (0, 1048576, 0)
        );
        assert_eq!(
            [
                mem.anon,
                mem.file,
                mem.kernel_stack,
                mem.slab,
                mem.sock,
                mem.shmem,
                mem.file_mapped,
                mem.file_dirty,
                mem.file_writeback,
                mem.anon_thp,
                mem.inactive_anon,
                mem.active_anon,
                mem.inactive_file,
                mem.active_file,
                mem.unevictable,
                mem.slab_reclaimable,
                mem.slab_unreclaimable,
                mem.pgfault,
                mem.pgmajfault,
                mem.workingset_refault,
                mem.workingset_activate,
            ],
            [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]
        );
        assert!(mem.psi.is_none(), "no memory.pressure file laid out");
        let ev = &m.memory_events;
        assert_eq!(
            [
                ev.low,
                ev.high,
                ev.max,
                ev.oom,
                ev.oom_kill,
                ev.oom_group_kill
            ],
            [1, 2, 3, 4, 5, 6]
        );
        assert_eq!(m.io.usage.len(), 1);
        assert_eq!(
            (
                m.io.usage[0].major,
                m.io.usage[0].rbytes,
                m.io.usage[0].wios
            ),
            (8, 100, 4)
        );
    }

    #[test]
    fn v2_missing_files_read_as_zero_but_a_missing_cgroup_is_gone() {
        let tmp = tempfile::tempdir().unwrap();
        let cgroup = Cgroup::V2 {
            path: tmp.path().to_path_buf(),
        };
        let m = v2::Metrics::parse_from_bytes(&cgroup.stats().unwrap().value).unwrap();
        assert_eq!(
            (
                m.pids.current,
                m.pids.limit,
                m.memory.usage,
                m.cpu.usage_usec
            ),
            (0, 0, 0, 0)
        );
        assert!(m.io.usage.is_empty());

        write(tmp.path(), "memory.current", "lots\n");
        let err = cgroup.stats().unwrap_err();
        assert!(matches!(err, CgroupError::Parse { .. }), "{err:?}");
        assert!(err.to_string().contains("memory.current"), "{err}");

        let gone_path = tmp.path().join("gone");
        let err = Cgroup::V2 {
            path: gone_path.clone(),
        }
        .stats()
        .unwrap_err();
        assert!(
            matches!(&err, CgroupError::Gone { path } if *path == gone_path),
            "{err:?}"
        );
        assert!(err.to_string().contains("gone"), "{err}");
    }

    #[test]
    fn v1_stats_from_a_laid_out_cgroup() {
        let tmp = tempfile::tempdir().unwrap();
        let sub = |c: &str| {
            let d = tmp.path().join(c);
            fs::create_dir(&d).unwrap();
            d
        };
        let (memory, cpu, cpuacct, pids, blkio) = (
            sub("memory"),
            sub("cpu"),
            sub("cpuacct"),
            sub("pids"),
            sub("blkio"),
        );
        write(&pids, "pids.current", "4\n");
        write(&pids, "pids.max", "max\n");
        write(&cpuacct, "cpuacct.usage", "123456789\n");
        write(&cpuacct, "cpuacct.usage_percpu", "100 200 \n");
        // No usage_user/usage_sys: an old kernel, counting ticks.
        write(&cpuacct, "cpuacct.stat", "user 5\nsystem 3\n");
        write(
            &cpu,
            "cpu.stat",
            "nr_periods 7\nnr_throttled 2\nthrottled_time 9000\n",
        );
        write(&memory, "memory.usage_in_bytes", "1000\n");
        write(&memory, "memory.max_usage_in_bytes", "2000\n");
        write(&memory, "memory.limit_in_bytes", "8388608\n");
        write(&memory, "memory.failcnt", "3\n");
        write(&memory, "memory.memsw.usage_in_bytes", "1100\n");
        write(
            &memory,
            "memory.memsw.limit_in_bytes",
            "9223372036854771712\n",
        );
        write(&memory, "memory.kmem.usage_in_bytes", "50\n");
        write(&memory, "memory.kmem.tcp.usage_in_bytes", "5\n");
        write(
            &memory,
            "memory.stat",
            "cache 1\nrss 2\nrss_huge 3\nmapped_file 4\ndirty 5\nwriteback 6\npgpgin 7\npgpgout 8\npgfault 9\n\
             pgmajfault 10\ninactive_anon 11\nactive_anon 12\ninactive_file 13\nactive_file 14\nunevictable 15\n\
             hierarchical_memory_limit 8388608\nhierarchical_memsw_limit 16777216\ntotal_cache 18\ntotal_rss 19\n\
             total_rss_huge 20\ntotal_mapped_file 21\ntotal_dirty 22\ntotal_writeback 23\ntotal_pgpgin 24\n\
             total_pgpgout 25\ntotal_pgfault 26\ntotal_pgmajfault 27\ntotal_inactive_anon 28\n\
             total_active_anon 29\ntotal_inactive_file 30\ntotal_active_file 31\ntotal_unevictable 32\n",
        );
        write(
            &memory,
            "memory.oom_control",
            "oom_kill_disable 0\nunder_oom 1\noom_kill 2\n",
        );
        write(
            &blkio,
            "blkio.throttle.io_service_bytes_recursive",
            "253:99 Read 4096\n253:99 Write 0\nTotal 4096\n",
        );
        write(
            &blkio,
            "blkio.throttle.io_serviced_recursive",
            "253:99 Read 1\nTotal 1\n",
        );

        let paths = HashMap::from([
            ("memory".to_string(), memory),
            ("cpu".to_string(), cpu),
            ("cpuacct".to_string(), cpuacct),
            ("pids".to_string(), pids),
            ("blkio".to_string(), blkio),
        ]);
        let any = Cgroup::V1 { paths }.stats().unwrap();
        assert_eq!(any.type_url, "io.containerd.cgroups.v1.Metrics");
        let m = v1::Metrics::parse_from_bytes(&any.value).unwrap();

        assert_eq!((m.pids.current, m.pids.limit), (4, 0));
        let tick = 1_000_000_000 / clock_ticks_per_second();
        let usage = &m.cpu.usage;
        assert_eq!(
            (usage.total, usage.user, usage.kernel),
            (123456789, 5 * tick, 3 * tick)
        );
        assert_eq!(usage.per_cpu, vec![100, 200]);
        let throttle = &m.cpu.throttling;
        assert_eq!(
            (
                throttle.periods,
                throttle.throttled_periods,
                throttle.throttled_time
            ),
            (7, 2, 9000)
        );
        let mem = &m.memory;
        assert_eq!(
            (
                mem.usage.usage,
                mem.usage.max,
                mem.usage.limit,
                mem.usage.failcnt
            ),
            (1000, 2000, 8388608, 3)
        );
        assert_eq!(
            (mem.swap.usage, mem.swap.limit),
            (1100, 9223372036854771712)
        );
        assert_eq!((mem.kernel.usage, mem.kernel_tcp.usage), (50, 5));
        assert_eq!(
            [
                mem.cache,
                mem.rss,
                mem.rss_huge,
                mem.mapped_file,
                mem.dirty,
                mem.writeback,
                mem.pg_pg_in,
                mem.pg_pg_out,
                mem.pg_fault,
                mem.pg_maj_fault,
                mem.inactive_anon,
                mem.active_anon,
                mem.inactive_file,
                mem.active_file,
                mem.unevictable,
            ],
            [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]
        );
        assert_eq!(
            (mem.hierarchical_memory_limit, mem.hierarchical_swap_limit),
            (8388608, 16777216)
        );
        assert_eq!(
            [
                mem.total_cache,
                mem.total_rss,
                mem.total_rss_huge,
                mem.total_mapped_file,
                mem.total_dirty,
                mem.total_writeback,
                mem.total_pg_pg_in,
                mem.total_pg_pg_out,
                mem.total_pg_fault,
                mem.total_pg_maj_fault,
                mem.total_inactive_anon,
                mem.total_active_anon,
                mem.total_inactive_file,
                mem.total_active_file,
                mem.total_unevictable,
            ],
            [18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32]
        );
        let oom = &m.memory_oom_control;
        assert_eq!(
            (oom.oom_kill_disable, oom.under_oom, oom.oom_kill),
            (0, 1, 2)
        );
        let bytes: Vec<_> = m
            .blkio
            .io_service_bytes_recursive
            .iter()
            .map(|e| (e.major, e.minor, e.op.as_str(), e.value))
            .collect();
        assert_eq!(bytes, vec![(253, 99, "Read", 4096), (253, 99, "Write", 0)]);
        assert_eq!(m.blkio.io_serviced_recursive.len(), 1);
    }

    // -- OOM watch over files laid out in a tempdir (the v2 logic) ----------

    fn counter() -> (Arc<AtomicUsize>, impl Fn() + Send + 'static) {
        let count = Arc::new(AtomicUsize::new(0));
        let inner = Arc::clone(&count);
        (count, move || {
            inner.fetch_add(1, SeqCst);
        })
    }

    #[test]
    fn v2_watch_fires_when_oom_kill_grows_and_ends_when_the_cgroup_goes() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join(unique("v2"));
        fs::create_dir(&dir).unwrap();
        // Kills from before the watch are not reported.
        write(
            &dir,
            "memory.events",
            "low 0\nhigh 0\nmax 0\noom 1\noom_kill 2\n",
        );
        let (count, on_oom) = counter();
        let watch = watch_oom(&Cgroup::V2 { path: dir.clone() }, on_oom).unwrap();

        write(
            &dir,
            "memory.events",
            "low 0\nhigh 5\nmax 1\noom 1\noom_kill 2\n",
        );
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(count.load(SeqCst), 0, "high/max events are no OOM kill");

        write(
            &dir,
            "memory.events",
            "low 0\nhigh 5\nmax 1\noom 2\noom_kill 3\n",
        );
        assert!(wait_until(Duration::from_secs(5), || count.load(SeqCst) == 1));
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(count.load(SeqCst), 1, "one kill, one call");
        assert!(!watch.is_finished());

        fs::remove_dir_all(&dir).unwrap();
        assert!(
            wait_until(Duration::from_secs(3), || watch.is_finished()),
            "watch thread still running after its cgroup was removed"
        );
        assert_eq!(count.load(SeqCst), 1);
    }

    #[test]
    fn v2_watch_stop_joins_the_thread() {
        let tmp = tempfile::tempdir().unwrap();
        write(tmp.path(), "memory.events", "oom_kill 0\n");
        let token = Arc::new(());
        let held = Arc::clone(&token);
        let watch = watch_oom(
            &Cgroup::V2 {
                path: tmp.path().to_path_buf(),
            },
            move || {
                let _ = &held;
            },
        )
        .unwrap();
        assert_eq!(Arc::strong_count(&token), 2);
        watch.stop();
        // Joined: the closure, and what it holds, is gone already.
        assert_eq!(Arc::strong_count(&token), 1);
    }

    #[test]
    fn watch_errors_without_memory_controller_or_cgroup() {
        let tmp = tempfile::tempdir().unwrap();
        let err = watch_oom(
            &Cgroup::V2 {
                path: tmp.path().to_path_buf(),
            },
            || {},
        )
        .unwrap_err();
        assert!(
            matches!(err, CgroupError::NoMemoryController { .. }),
            "{err:?}"
        );
        let err = watch_oom(
            &Cgroup::V2 {
                path: tmp.path().join("nope"),
            },
            || {},
        )
        .unwrap_err();
        assert!(matches!(err, CgroupError::Gone { .. }), "{err:?}");
        let paths = HashMap::from([("pids".to_string(), tmp.path().to_path_buf())]);
        let err = watch_oom(&Cgroup::V1 { paths }, || {}).unwrap_err();
        assert!(
            matches!(err, CgroupError::NoMemoryController { .. }),
            "{err:?}"
        );
    }

    // -- real cgroups on this host -------------------------------------------

    /// A child shell, killed and reaped on drop.
    struct Proc {
        child: Child,
        stdin: ChildStdin,
        stdout: BufReader<ChildStdout>,
    }

    impl Proc {
        /// Runs `script` after it reads a "go" line, so the test can move it
        /// into a cgroup first.
        fn sh(script: &str) -> Self {
            let mut child = Command::new("sh")
                .arg("-c")
                .arg(format!("read go; {script}"))
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let stdin = child.stdin.take().unwrap();
            let stdout = BufReader::new(child.stdout.take().unwrap());
            Proc {
                child,
                stdin,
                stdout,
            }
        }
        fn pid(&self) -> u32 {
            self.child.id()
        }
        fn go(&mut self) {
            self.stdin.write_all(b"go\n").unwrap();
        }
        fn line(&mut self) -> String {
            let mut line = String::new();
            self.stdout.read_line(&mut line).unwrap();
            line.trim().to_string()
        }
        fn wait(&mut self) -> ExitStatus {
            self.child.wait().unwrap()
        }
    }

    impl Drop for Proc {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    /// v1 cgroups made by a test below this process's own cgroup in each
    /// hierarchy; on drop their processes are killed and they are removed.
    struct TestCgroup {
        dirs: HashMap<String, PathBuf>,
    }

    impl TestCgroup {
        /// None (the test skips) where this host has no v1 hierarchy for one
        /// of `controllers`.
        fn new(controllers: &[&str]) -> Option<Self> {
            let own = Cgroup::of_pid(std::process::id() as i32).unwrap();
            let Cgroup::V1 { paths } = own else {
                eprintln!("skipping: this host has no cgroup v1 hierarchies");
                return None;
            };
            let name = unique("v1");
            let mut cg = TestCgroup {
                dirs: HashMap::new(),
            };
            for controller in controllers {
                let Some(base) = paths.get(*controller) else {
                    eprintln!("skipping: no v1 {controller} hierarchy");
                    return None;
                };
                let dir = base.join(&name);
                fs::create_dir(&dir).unwrap();
                cg.dirs.insert(controller.to_string(), dir);
            }
            Some(cg)
        }
        fn dir(&self, controller: &str) -> &Path {
            &self.dirs[controller]
        }
        fn set(&self, controller: &str, file: &str, value: &str) {
            write(self.dir(controller), file, value);
        }
        fn add(&self, pid: u32) {
            for dir in self.dirs.values() {
                write(dir, "cgroup.procs", &pid.to_string());
            }
        }
        fn cgroup(&self) -> Cgroup {
            Cgroup::V1 {
                paths: self.dirs.clone(),
            }
        }
        fn remove(&mut self) {
            for (_, dir) in self.dirs.drain() {
                let removed = wait_until(Duration::from_secs(5), || {
                    let procs = fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
                    for pid in procs
                        .split_whitespace()
                        .filter_map(|p| p.parse::<i32>().ok())
                    {
                        // SAFETY: kill takes no pointers; these pids are the
                        // test's own processes, in the test's own cgroup.
                        unsafe { libc::kill(pid, libc::SIGKILL) };
                    }
                    fs::remove_dir(&dir).is_ok() || !dir.exists()
                });
                if !removed {
                    eprintln!("could not remove test cgroup {}", dir.display());
                }
            }
        }
    }

    impl Drop for TestCgroup {
        fn drop(&mut self) {
            self.remove();
        }
    }

    fn v1_metrics_of(cgroup: &Cgroup) -> v1::Metrics {
        let any = cgroup.stats().unwrap();
        assert_eq!(any.type_url, V1_METRICS_TYPE_URL);
        v1::Metrics::parse_from_bytes(&any.value).unwrap()
    }

    #[test]
    fn v1_of_pid_and_stats_for_real() {
        let Some(mut cg) = TestCgroup::new(&["memory", "cpu", "cpuacct", "pids"]) else {
            return;
        };
        const LIMIT: u64 = 256 << 20;
        cg.set("memory", "memory.limit_in_bytes", &LIMIT.to_string());
        cg.set("pids", "pids.max", "100");
        // The shell keeps 2 MiB of anonymous memory charged to the cgroup
        // (charges made before moving in stay behind), and tr burns some CPU.
        let mut proc = Proc::sh("x=$(head -c 2M /dev/zero | tr '\\0' a); echo ready; read wait");
        cg.add(proc.pid());
        proc.go();
        assert_eq!(proc.line(), "ready");

        let found = Cgroup::of_pid(proc.pid() as i32).unwrap();
        let Cgroup::V1 { paths } = &found else {
            panic!("expected v1, got {found:?}");
        };
        for controller in ["memory", "cpu", "cpuacct", "pids"] {
            assert_eq!(paths[controller], cg.dir(controller), "{controller}");
        }

        let m = v1_metrics_of(&found);
        let mem = &m.memory;
        assert_eq!(mem.usage.limit, LIMIT);
        assert_eq!(mem.hierarchical_memory_limit, LIMIT);
        assert!(mem.usage.usage >= 1 << 20, "usage {}", mem.usage.usage);
        assert!(mem.total_rss + mem.total_cache > 0);
        assert!(m.pids.current >= 1);
        assert_eq!(m.pids.limit, 100);
        assert!(m.cpu.usage.total > 0);
        assert!(!m.cpu.usage.per_cpu.is_empty());
        assert!(m.cpu.usage.user + m.cpu.usage.kernel > 0);
        assert!(m.cpu.throttling.is_some());
        assert_eq!(m.memory_oom_control.oom_kill, 0);

        drop(proc);
        cg.remove();
        let err = found.stats().unwrap_err();
        assert!(matches!(err, CgroupError::Gone { .. }), "{err:?}");
    }

    fn limit_memory(cg: &TestCgroup, bytes: u64) {
        cg.set("memory", "memory.limit_in_bytes", &bytes.to_string());
        // Without a memsw limit the cgroup could swap instead of OOMing.
        if cg
            .dir("memory")
            .join("memory.memsw.limit_in_bytes")
            .exists()
        {
            cg.set("memory", "memory.memsw.limit_in_bytes", &bytes.to_string());
        }
    }

    #[test]
    fn v1_watch_fires_on_an_oom_kill() {
        let Some(cg) = TestCgroup::new(&["memory"]) else {
            return;
        };
        limit_memory(&cg, 8 << 20);
        let (count, on_oom) = counter();
        let watch = watch_oom(&cg.cgroup(), on_oom).unwrap();
        let mut proc = Proc::sh("x=$(head -c 64M /dev/zero | tr '\\0' a); echo survived");
        cg.add(proc.pid());
        proc.go();
        assert!(
            wait_until(Duration::from_secs(20), || count.load(SeqCst) >= 1),
            "no OOM notification"
        );
        proc.wait();
        assert!(v1_metrics_of(&cg.cgroup()).memory_oom_control.oom_kill >= 1);
        assert!(!watch.is_finished());
    }

    #[test]
    fn v1_watch_stays_silent_under_the_limit_and_ends_with_the_cgroup() {
        let Some(mut cg) = TestCgroup::new(&["memory"]) else {
            return;
        };
        limit_memory(&cg, 64 << 20);
        let (count, on_oom) = counter();
        let watch = watch_oom(&cg.cgroup(), on_oom).unwrap();
        let mut proc = Proc::sh("x=$(head -c 1M /dev/zero | tr '\\0' a); echo done");
        cg.add(proc.pid());
        proc.go();
        assert_eq!(proc.line(), "done");
        assert!(proc.wait().success());
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(count.load(SeqCst), 0);
        assert!(!watch.is_finished());

        cg.remove();
        assert!(
            wait_until(Duration::from_secs(5), || watch.is_finished()),
            "watch thread still running after its cgroup was removed"
        );
        assert_eq!(count.load(SeqCst), 0, "removal reported as an OOM");
    }

    #[test]
    fn v1_dropping_the_watch_ends_its_thread() {
        let Some(cg) = TestCgroup::new(&["memory"]) else {
            return;
        };
        let token = Arc::new(());
        let held = Arc::clone(&token);
        let watch = watch_oom(&cg.cgroup(), move || {
            let _ = &held;
        })
        .unwrap();
        assert_eq!(Arc::strong_count(&token), 2);
        drop(watch);
        assert!(
            wait_until(Duration::from_secs(2), || Arc::strong_count(&token) == 1),
            "watch thread still holds its callback after the guard was dropped"
        );
    }

    /// Removes a directory on drop, so a failing test leaves no cgroup.
    struct RmdirOnDrop(PathBuf);

    impl Drop for RmdirOnDrop {
        fn drop(&mut self) {
            let _ = fs::remove_dir(&self.0);
        }
    }

    #[test]
    fn v2_watch_notices_a_real_cgroup2_removal() {
        // The removal path runs on kernfs for real, on whatever cgroup2
        // mount this host has (the hybrid one has no memory controller, so
        // the watch follows cgroup.events, which every cgroup2 dir has).
        let proc_text = fs::read_to_string("/proc/self/cgroup").unwrap();
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap();
        let lines = parse_proc_cgroup(&proc_text).unwrap();
        let mounts = parse_mountinfo(&mountinfo);
        let unified = lines
            .iter()
            .find(|l| l.hierarchy == 0 && l.controllers.is_empty());
        let mount = mounts.iter().find(|m| m.fs == CgroupFs::V2);
        let (Some(unified), Some(mount)) = (unified, mount) else {
            eprintln!("skipping: no cgroup2 mount");
            return;
        };
        let dir = cgroup_dir(mount, &unified.path).join(unique("v2"));
        fs::create_dir(&dir).unwrap();
        let guard = RmdirOnDrop(dir.clone());
        let (count, on_oom) = counter();
        let watch = watch_v2(&dir, "cgroup.events", on_oom).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        assert!(!watch.is_finished());
        fs::remove_dir(&dir).unwrap();
        // Well within EXISTENCE_CHECK_INTERVAL: the inotify path saw it.
        assert!(
            wait_until(Duration::from_secs(3), || watch.is_finished()),
            "watch thread still running after its cgroup2 dir was removed"
        );
        assert_eq!(count.load(SeqCst), 0);
        drop(guard);
    }
}
