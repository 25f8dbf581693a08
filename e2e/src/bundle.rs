//! OCI bundles: a directory with the `config.json` runc 1.1 reads.
//!
//! The spec is the one `runc spec` generates, with what containerd's default
//! spec and the CRI plugin change for a Kubernetes container: containerd's
//! default capabilities (not runc's three), no terminal, a cgroup path of
//! its own, the cgroup filesystem mounted read-only. It is written with
//! `serde_json` rather than the `oci-spec` crate: tests need to write specs
//! that are odd or invalid on purpose and to see the exact JSON runc gets,
//! which a typed builder with its own defaults and validation gets in the
//! way of; [`Bundle::edit`] reaches any field the builder does not.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::error::{Context, Result};

/// The OCI runtime spec version runc 1.1 generates.
pub const OCI_VERSION: &str = "1.0.2-dev";

/// `PATH` inside the container unless [`Bundle::env`] sets another.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// containerd's default capability set, which kubelet containers get.
pub const DEFAULT_CAPABILITIES: [&str; 14] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// Paths runc masks (bind-mounts /dev/null or an empty tmpfs over).
pub const MASKED_PATHS: [&str; 10] = [
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/sys/firmware",
    "/proc/scsi",
];

/// Paths runc remounts read-only.
pub const READONLY_PATHS: [&str; 5] = [
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// Namespace kinds a container gets new ones of by default.
pub const DEFAULT_NAMESPACES: [&str; 5] = ["pid", "ipc", "uts", "mount", "network"];

type Edit = Box<dyn Fn(&mut Value) + Send + Sync>;

/// Builds an OCI bundle; [`Bundle::write`] puts `config.json` on disk.
pub struct Bundle {
    dir: PathBuf,
    rootfs: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    cwd: String,
    terminal: bool,
    uid: u32,
    gid: u32,
    additional_gids: Vec<u32>,
    hostname: Option<String>,
    annotations: BTreeMap<String, String>,
    cgroups_path: String,
    memory_limit: Option<i64>,
    pids_limit: Option<i64>,
    readonly_rootfs: bool,
    capabilities: Vec<String>,
    no_new_privileges: bool,
    namespaces: Vec<(String, Option<PathBuf>)>,
    mounts: Vec<Value>,
    nofile: u64,
    edits: Vec<Edit>,
}

impl Bundle {
    /// A bundle in `dir` whose root is `rootfs`: written as `rootfs` relative
    /// to the bundle when it lies inside it (containerd's layout), absolute
    /// otherwise. Runs `sh` as root until told otherwise. Its cgroup path is
    /// unique (`/corral-e2e/<unique>`): register it with
    /// [`crate::Cleanup::track_cgroup`], or build the bundle with
    /// [`crate::Cleanup::bundle`], which does.
    pub fn new(dir: impl Into<PathBuf>, rootfs: impl AsRef<Path>) -> Self {
        Bundle {
            dir: dir.into(),
            rootfs: rootfs.as_ref().to_path_buf(),
            args: vec!["sh".into()],
            env: vec![("PATH".into(), DEFAULT_PATH.into())],
            cwd: "/".into(),
            terminal: false,
            uid: 0,
            gid: 0,
            additional_gids: Vec::new(),
            hostname: Some("corral-e2e".into()),
            annotations: BTreeMap::new(),
            cgroups_path: format!(
                "{}/{}",
                crate::cleanup::CGROUP_PARENT,
                crate::unique::name()
            ),
            memory_limit: None,
            pids_limit: None,
            readonly_rootfs: false,
            capabilities: DEFAULT_CAPABILITIES.iter().map(|c| c.to_string()).collect(),
            no_new_privileges: true,
            namespaces: DEFAULT_NAMESPACES
                .iter()
                .map(|n| (n.to_string(), None))
                .collect(),
            mounts: Vec::new(),
            nofile: 1024,
            edits: Vec::new(),
        }
    }

    /// The process's argv.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args = args.into_iter().map(Into::into).collect();
        self
    }

    /// Sets one environment variable, replacing an earlier value of `key`.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        let key = key.into();
        let value = value.into();
        match self.env.iter_mut().find(|(k, _)| *k == key) {
            Some(entry) => entry.1 = value,
            None => self.env.push((key, value)),
        }
        self
    }

    /// The process's working directory inside the container.
    pub fn cwd(mut self, cwd: impl Into<String>) -> Self {
        self.cwd = cwd.into();
        self
    }

    /// Whether the process gets a pty (runc then wants a console socket).
    pub fn terminal(mut self, terminal: bool) -> Self {
        self.terminal = terminal;
        self
    }

    /// The process's uid and gid.
    pub fn user(mut self, uid: u32, gid: u32) -> Self {
        self.uid = uid;
        self.gid = gid;
        self
    }

    /// Supplementary groups of the process.
    pub fn additional_gids(mut self, gids: impl IntoIterator<Item = u32>) -> Self {
        self.additional_gids = gids.into_iter().collect();
        self
    }

    /// The container's hostname; `None` leaves it unset (the UTS namespace
    /// then keeps the host's name).
    pub fn hostname(mut self, hostname: Option<&str>) -> Self {
        self.hostname = hostname.map(String::from);
        self
    }

    /// Adds an annotation, such as `io.kubernetes.cri.sandbox-id`.
    pub fn annotation(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.annotations.insert(key.into(), value.into());
        self
    }

    /// `linux.cgroupsPath`, e.g. `/corral-e2e/<unique>/<name>`.
    pub fn cgroups_path(mut self, path: impl Into<String>) -> Self {
        self.cgroups_path = path.into();
        self
    }

    /// `linux.resources.memory.limit` in bytes.
    pub fn memory_limit(mut self, bytes: i64) -> Self {
        self.memory_limit = Some(bytes);
        self
    }

    /// `linux.resources.pids.limit`.
    pub fn pids_limit(mut self, limit: i64) -> Self {
        self.pids_limit = Some(limit);
        self
    }

    /// Whether the root filesystem is mounted read-only.
    pub fn readonly_rootfs(mut self, readonly: bool) -> Self {
        self.readonly_rootfs = readonly;
        self
    }

    /// The bounding, effective and permitted capability sets.
    pub fn capabilities<I, S>(mut self, caps: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.capabilities = caps.into_iter().map(Into::into).collect();
        self
    }

    /// `process.noNewPrivileges` (on by default, as in `runc spec`).
    pub fn no_new_privileges(mut self, on: bool) -> Self {
        self.no_new_privileges = on;
        self
    }

    /// Joins the existing namespace at `path` (e.g. `/proc/<pid>/ns/net`, or
    /// a pinned netns) instead of creating one of `kind`.
    pub fn namespace_path(mut self, kind: &str, path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        match self.namespaces.iter_mut().find(|(k, _)| k == kind) {
            Some(entry) => entry.1 = Some(path),
            None => self.namespaces.push((kind.to_string(), Some(path))),
        }
        self
    }

    /// Stays in the host's namespace of `kind` (e.g. host network).
    pub fn host_namespace(mut self, kind: &str) -> Self {
        self.namespaces.retain(|(k, _)| k != kind);
        self
    }

    /// Adds a bind mount of host `source` at `destination`.
    pub fn bind_mount(
        mut self,
        source: impl AsRef<Path>,
        destination: &str,
        readonly: bool,
    ) -> Self {
        let mut options = vec!["rbind", "rprivate"];
        if readonly {
            options.push("ro");
        }
        self.mounts.push(json!({
            "destination": destination,
            "type": "bind",
            "source": source.as_ref(),
            "options": options,
        }));
        self
    }

    /// The soft and hard `RLIMIT_NOFILE`.
    pub fn nofile(mut self, limit: u64) -> Self {
        self.nofile = limit;
        self
    }

    /// Changes the generated spec before it is written: for fields the
    /// builder does not cover and for specs that are wrong on purpose.
    pub fn edit(mut self, f: impl Fn(&mut Value) + Send + Sync + 'static) -> Self {
        self.edits.push(Box::new(f));
        self
    }

    /// The bundle directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where `config.json` goes.
    pub fn config_path(&self) -> PathBuf {
        self.dir.join("config.json")
    }

    /// The rootfs directory, absolute.
    pub fn rootfs(&self) -> PathBuf {
        if self.rootfs.is_absolute() {
            self.rootfs.clone()
        } else {
            self.dir.join(&self.rootfs)
        }
    }

    /// `linux.cgroupsPath`.
    pub fn cgroup(&self) -> &str {
        &self.cgroups_path
    }

    /// The spec as it will be written.
    pub fn spec(&self) -> Value {
        let root_path = match self.rootfs.strip_prefix(&self.dir) {
            Ok(inside) if self.rootfs.is_absolute() => inside.to_path_buf(),
            _ => self.rootfs.clone(),
        };
        let env: Vec<String> = self.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let namespaces: Vec<Value> = self
            .namespaces
            .iter()
            .map(|(kind, path)| match path {
                Some(path) => json!({ "type": kind, "path": path }),
                None => json!({ "type": kind }),
            })
            .collect();
        let mut mounts = default_mounts();
        mounts.extend(self.mounts.iter().cloned());

        let mut resources = json!({
            "devices": [ { "allow": false, "access": "rwm" } ],
        });
        if let Some(limit) = self.memory_limit {
            resources["memory"] = json!({ "limit": limit });
        }
        if let Some(limit) = self.pids_limit {
            resources["pids"] = json!({ "limit": limit });
        }

        let mut user = json!({ "uid": self.uid, "gid": self.gid });
        if !self.additional_gids.is_empty() {
            user["additionalGids"] = json!(self.additional_gids);
        }

        let mut spec = json!({
            "ociVersion": OCI_VERSION,
            "process": {
                "terminal": self.terminal,
                "user": user,
                "args": self.args,
                "env": env,
                "cwd": self.cwd,
                "capabilities": {
                    "bounding": self.capabilities,
                    "effective": self.capabilities,
                    "permitted": self.capabilities,
                },
                "rlimits": [
                    { "type": "RLIMIT_NOFILE", "hard": self.nofile, "soft": self.nofile }
                ],
                "noNewPrivileges": self.no_new_privileges,
            },
            "root": { "path": root_path, "readonly": self.readonly_rootfs },
            "mounts": mounts,
            "annotations": self.annotations,
            "linux": {
                "cgroupsPath": self.cgroups_path,
                "resources": resources,
                "namespaces": namespaces,
                "maskedPaths": MASKED_PATHS,
                "readonlyPaths": READONLY_PATHS,
            },
        });
        if let Some(hostname) = &self.hostname {
            spec["hostname"] = json!(hostname);
        }
        for edit in &self.edits {
            edit(&mut spec);
        }
        spec
    }

    /// Creates the bundle directory and writes `config.json`.
    pub fn write(&self) -> Result<&Self> {
        fs::create_dir_all(&self.dir).context(|| format!("create {}", self.dir.display()))?;
        let path = self.config_path();
        let text =
            serde_json::to_vec_pretty(&self.spec()).context(|| "encode config.json".into())?;
        fs::write(&path, text).context(|| format!("write {}", path.display()))?;
        Ok(self)
    }
}

/// The mounts of `runc spec`, which containerd's default spec shares.
fn default_mounts() -> Vec<Value> {
    vec![
        json!({ "destination": "/proc", "type": "proc", "source": "proc" }),
        json!({
            "destination": "/dev", "type": "tmpfs", "source": "tmpfs",
            "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
        }),
        json!({
            "destination": "/dev/pts", "type": "devpts", "source": "devpts",
            "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"],
        }),
        json!({
            "destination": "/dev/shm", "type": "tmpfs", "source": "shm",
            "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        }),
        json!({
            "destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
            "options": ["nosuid", "noexec", "nodev"],
        }),
        json!({
            "destination": "/sys", "type": "sysfs", "source": "sysfs",
            "options": ["nosuid", "noexec", "nodev", "ro"],
        }),
        json!({
            "destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
            "options": ["nosuid", "noexec", "nodev", "relatime", "ro"],
        }),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rootfs_inside_the_bundle_is_relative() {
        let spec = Bundle::new("/b", "/b/rootfs").spec();
        assert_eq!(spec["root"]["path"], "rootfs");
        let spec = Bundle::new("/b", "/elsewhere/rootfs").spec();
        assert_eq!(spec["root"]["path"], "/elsewhere/rootfs");
    }

    #[test]
    fn builder_fields_land_in_the_spec() {
        let spec = Bundle::new("/b", "/b/rootfs")
            .args(["sh", "-c", "true"])
            .env("PATH", "/bin")
            .env("A", "1")
            .cwd("/tmp")
            .user(1000, 1000)
            .annotation("io.kubernetes.cri.sandbox-id", "s")
            .cgroups_path("/corral-e2e/x")
            .memory_limit(64 << 20)
            .readonly_rootfs(true)
            .host_namespace("network")
            .namespace_path("ipc", "/proc/1/ns/ipc")
            .edit(|s| s["process"]["oomScoreAdj"] = json!(100))
            .spec();
        assert_eq!(spec["process"]["args"], json!(["sh", "-c", "true"]));
        assert_eq!(spec["process"]["env"], json!(["PATH=/bin", "A=1"]));
        assert_eq!(spec["process"]["cwd"], "/tmp");
        assert_eq!(spec["process"]["user"]["uid"], 1000);
        assert_eq!(spec["annotations"]["io.kubernetes.cri.sandbox-id"], "s");
        assert_eq!(spec["linux"]["cgroupsPath"], "/corral-e2e/x");
        assert_eq!(spec["linux"]["resources"]["memory"]["limit"], 64 << 20);
        assert_eq!(spec["root"]["readonly"], true);
        assert_eq!(spec["process"]["oomScoreAdj"], 100);
        let ns = spec["linux"]["namespaces"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert!(!ns.iter().any(|n| n["type"] == "network"));
        assert!(ns.contains(&json!({ "type": "ipc", "path": "/proc/1/ns/ipc" })));
    }
}
