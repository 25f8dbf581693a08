//! A task's directories: the bundle `STATE/NAMESPACE/ID` (gone at reboot:
//! `config.json`, the `rootfs` mount point, the shim's `address`,
//! `bootstrap.json` and `shim-binary-path`, its `log` FIFO) and the work
//! directory `ROOT/NAMESPACE/ID` (kept). Both are created together and
//! removed together; nothing here starts or talks to a process.

use std::{
    fs,
    io::ErrorKind,
    os::unix::fs::{DirBuilderExt, PermissionsExt},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::{
    error::{Error, Result},
    id,
    task_client::TaskApi,
};

const CONFIG: &str = "config.json";
const ROOTFS: &str = "rootfs";
const BOOTSTRAP: &str = "bootstrap.json";
const ADDRESS: &str = "address";
const SHIM_BINARY_PATH: &str = "shim-binary-path";
const LOG: &str = "log";
const WORK_LINK: &str = "work";
const SHIM_PID: &str = "shim.pid";

/// The shim's answer to `start`, kept so a new daemon can reconnect.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bootstrap {
    pub version: u32,
    pub address: String,
    pub protocol: String,
}

impl Bootstrap {
    pub fn api(&self) -> Result<TaskApi> {
        if self.protocol != "ttrpc" {
            return Err(Error::Unimplemented(format!(
                "shim protocol {:?}: only ttrpc is supported",
                self.protocol
            )));
        }
        TaskApi::from_version(self.version)
    }

    /// Parses a shim's `start` output: the JSON form, or a plain address,
    /// which containerd takes for task API v2 over ttrpc.
    pub fn parse(output: &[u8]) -> Result<Bootstrap> {
        let text = std::str::from_utf8(output)
            .map_err(|_| Error::InvalidArgument("bootstrap reply is not UTF-8".into()))?
            .trim();
        if text.starts_with('{') {
            let b: Bootstrap = serde_json::from_str(text).map_err(|e| {
                Error::InvalidArgument(format!("malformed bootstrap {text:?}: {e}"))
            })?;
            if b.address.is_empty() {
                return Err(Error::InvalidArgument(format!(
                    "bootstrap {text:?} has no address"
                )));
            }
            b.api()?;
            return Ok(b);
        }
        let looks_like_address = text.starts_with("unix://") || text.starts_with('/');
        if !looks_like_address || text.contains(char::is_whitespace) {
            return Err(Error::InvalidArgument(format!(
                "malformed bootstrap reply {text:?}"
            )));
        }
        Ok(Bootstrap {
            version: 2,
            address: text.to_string(),
            protocol: "ttrpc".to_string(),
        })
    }
}

#[derive(Debug, Clone)]
pub struct Bundle {
    pub namespace: String,
    pub id: String,
    /// `STATE/NAMESPACE/ID`: what the shim runs in.
    pub path: PathBuf,
    /// `ROOT/NAMESPACE/ID`.
    pub work_dir: PathBuf,
}

impl Bundle {
    fn paths(root: &Path, state: &Path, namespace: &str, id: &str) -> Result<Bundle> {
        id::validate("namespace", namespace)?;
        id::validate("task id", id)?;
        Ok(Bundle {
            namespace: namespace.to_string(),
            id: id.to_string(),
            path: state.join(namespace).join(id),
            work_dir: root.join(namespace).join(id),
        })
    }

    /// Creates both directories and writes the OCI spec; refuses a task id
    /// that already has a bundle.
    pub fn create(
        root: &Path,
        state: &Path,
        namespace: &str,
        id: &str,
        spec: &[u8],
    ) -> Result<Bundle> {
        let bundle = Self::paths(root, state, namespace, id)?;
        for parent in [state.join(namespace), root.join(namespace)] {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o711)
                .create(&parent)
                .map_err(|e| Error::io("create", &parent, e))?;
        }
        match fs::DirBuilder::new().mode(0o700).create(&bundle.path) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                return Err(Error::AlreadyExists(format!(
                    "task {namespace}/{id} already has a bundle"
                )))
            }
            Err(e) => return Err(Error::io("create", &bundle.path, e)),
        }
        let made = (|| {
            fs::DirBuilder::new()
                .mode(0o711)
                .create(&bundle.work_dir)
                .or_else(|e| {
                    if e.kind() == ErrorKind::AlreadyExists {
                        Ok(())
                    } else {
                        Err(e)
                    }
                })
                .map_err(|e| Error::io("create", &bundle.work_dir, e))?;
            std::os::unix::fs::symlink(&bundle.work_dir, bundle.path.join(WORK_LINK))
                .map_err(|e| Error::io("link", bundle.path.join(WORK_LINK), e))?;
            bundle.write(CONFIG, spec)?;
            let rootfs = bundle.rootfs();
            fs::DirBuilder::new()
                .mode(0o711)
                .create(&rootfs)
                .map_err(|e| Error::io("create", &rootfs, e))
        })();
        if let Err(e) = made {
            bundle.remove();
            return Err(e);
        }
        Ok(bundle)
    }

    /// The bundle of an existing task, as found on disk.
    pub fn load(root: &Path, state: &Path, namespace: &str, id: &str) -> Result<Bundle> {
        let bundle = Self::paths(root, state, namespace, id)?;
        if !bundle.path.is_dir() {
            return Err(Error::NotFound(format!(
                "task {namespace}/{id} has no bundle"
            )));
        }
        Ok(bundle)
    }

    /// Every bundle under `state`, as (namespace, id); entries that are not
    /// valid names are skipped.
    pub fn list(state: &Path) -> Result<Vec<(String, String)>> {
        let mut found = Vec::new();
        let namespaces = match fs::read_dir(state) {
            Ok(d) => d,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(found),
            Err(e) => return Err(Error::io("read", state, e)),
        };
        for ns in namespaces.flatten() {
            let ns_name = ns.file_name().to_string_lossy().into_owned();
            if id::validate("namespace", &ns_name).is_err() || !ns.path().is_dir() {
                continue;
            }
            let Ok(tasks) = fs::read_dir(ns.path()) else {
                continue;
            };
            for task in tasks.flatten() {
                let id = task.file_name().to_string_lossy().into_owned();
                if id::validate("task id", &id).is_ok() && task.path().is_dir() {
                    found.push((ns_name.clone(), id));
                }
            }
        }
        Ok(found)
    }

    pub fn config(&self) -> PathBuf {
        self.path.join(CONFIG)
    }

    pub fn rootfs(&self) -> PathBuf {
        self.path.join(ROOTFS)
    }

    pub fn log(&self) -> PathBuf {
        self.path.join(LOG)
    }

    pub fn write_bootstrap(&self, bootstrap: &Bootstrap) -> Result<()> {
        let json = serde_json::to_vec(bootstrap).map_err(|e| Error::Internal(e.to_string()))?;
        self.write(BOOTSTRAP, &json)?;
        self.write(ADDRESS, bootstrap.address.as_bytes())
    }

    /// The saved bootstrap; older bundles that only kept `address` mean v2.
    pub fn read_bootstrap(&self) -> Result<Bootstrap> {
        match fs::read(self.path.join(BOOTSTRAP)) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                Error::InvalidArgument(format!("{}: {e}", self.path.join(BOOTSTRAP).display()))
            }),
            Err(e) if e.kind() == ErrorKind::NotFound => Bootstrap::parse(&self.read(ADDRESS)?),
            Err(e) => Err(Error::io("read", self.path.join(BOOTSTRAP), e)),
        }
    }

    pub fn write_shim_pid(&self, pid: u32) -> Result<()> {
        self.write(SHIM_PID, pid.to_string().as_bytes())
    }

    /// The shim's pid, if it was recorded and is readable.
    pub fn read_shim_pid(&self) -> Option<u32> {
        let bytes = self.read(SHIM_PID).ok()?;
        String::from_utf8_lossy(&bytes)
            .trim()
            .parse()
            .ok()
            .filter(|p| *p > 0)
    }

    pub fn write_shim_binary(&self, path: &Path) -> Result<()> {
        self.write(SHIM_BINARY_PATH, path.as_os_str().as_encoded_bytes())
    }

    pub fn read_shim_binary(&self) -> Result<PathBuf> {
        let bytes = self.read(SHIM_BINARY_PATH)?;
        Ok(PathBuf::from(String::from_utf8_lossy(&bytes).trim()))
    }

    /// Removes both directories; the rootfs must have been unmounted by the
    /// shim (a leftover mount is detached first, never deleted through).
    pub fn remove(&self) {
        let rootfs = self.rootfs();
        while nix::mount::umount2(&rootfs, nix::mount::MntFlags::MNT_DETACH).is_ok() {}
        for dir in [&self.path, &self.work_dir] {
            if let Err(e) = fs::remove_dir_all(dir) {
                if e.kind() != ErrorKind::NotFound {
                    tracing::warn!(path = %dir.display(), error = %e, "removing bundle");
                }
            }
        }
    }

    fn write(&self, name: &str, bytes: &[u8]) -> Result<()> {
        let path = self.path.join(name);
        fs::write(&path, bytes).map_err(|e| Error::io("write", &path, e))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600))
            .map_err(|e| Error::io("chmod", &path, e))
    }

    fn read(&self, name: &str) -> Result<Vec<u8>> {
        let path = self.path.join(name);
        fs::read(&path).map_err(|e| {
            if e.kind() == ErrorKind::NotFound {
                Error::NotFound(format!("{} is missing", path.display()))
            } else {
                Error::io("read", &path, e)
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bootstrap_replies_in_both_forms() {
        let json = Bootstrap::parse(
            br#"{"version":3,"address":"unix:///run/x/s/abc","protocol":"ttrpc"}"#,
        )
        .expect("json");
        assert_eq!((json.version, json.api().expect("api")), (3, TaskApi::V3));
        let plain = Bootstrap::parse(b"unix:///run/containerd/s/abc\n").expect("plain");
        assert_eq!(
            (plain.version, plain.address.as_str()),
            (2, "unix:///run/containerd/s/abc")
        );
        for bad in [
            &b"{\"version\":4,\"address\":\"unix:///x\",\"protocol\":\"ttrpc\"}"[..],
            b"{\"version\":3,\"address\":\"unix:///x\",\"protocol\":\"grpc\"}",
            b"hello world",
            b"",
            b"{not json",
            b"{\"version\":3,\"address\":\"\",\"protocol\":\"ttrpc\"}",
        ] {
            assert!(
                Bootstrap::parse(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn create_load_list_and_remove() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (root, state) = (dir.path().join("root"), dir.path().join("state"));
        let b = Bundle::create(&root, &state, "k8s.io", "t1", b"{}").expect("create");
        assert_eq!(fs::read(b.config()).expect("config"), b"{}");
        assert!(b.rootfs().is_dir() && b.work_dir.is_dir());
        assert!(matches!(
            Bundle::create(&root, &state, "k8s.io", "t1", b"{}"),
            Err(Error::AlreadyExists(_))
        ));
        b.write_bootstrap(&Bootstrap {
            version: 3,
            address: "unix:///a".into(),
            protocol: "ttrpc".into(),
        })
        .expect("bootstrap");
        assert_eq!(
            Bundle::load(&root, &state, "k8s.io", "t1")
                .expect("load")
                .read_bootstrap()
                .expect("read")
                .address,
            "unix:///a"
        );
        assert_eq!(
            Bundle::list(&state).expect("list"),
            vec![("k8s.io".to_string(), "t1".to_string())]
        );
        b.remove();
        assert!(!b.path.exists() && !b.work_dir.exists());
        assert!(matches!(
            Bundle::load(&root, &state, "k8s.io", "t1"),
            Err(Error::NotFound(_))
        ));
    }

    #[test]
    fn ids_that_could_escape_touch_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (root, state) = (dir.path().join("root"), dir.path().join("state"));
        for (ns, id) in [
            ("k8s.io", "../x"),
            ("..", "x"),
            ("k8s.io", ""),
            ("a/b", "x"),
            ("k8s.io", &"x".repeat(100)),
        ] {
            assert!(
                matches!(
                    Bundle::create(&root, &state, ns, id, b"{}"),
                    Err(Error::InvalidArgument(_))
                ),
                "{ns}/{id}"
            );
        }
        assert!(
            !root.exists() && !state.exists(),
            "an invalid id touched the disk"
        );
    }
}
