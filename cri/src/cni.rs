//! CNI network configuration: finding the network pods join.
//!
//! This module owns reading `cni.conf_dir` the way libcni does: files
//! ending in `.conflist`, `.conf` or `.json`, in lexical order, the first
//! loadable one winning. For now it only answers whether one exists (the
//! `NetworkReady` condition); running plugins comes with RunPodSandbox.
//!
//! The directory is read on every call rather than watched: an operator (or
//! a CNI daemonset) drops a file there at any moment, `Status` is called
//! every few seconds, and reading a handful of small files is cheaper than
//! keeping a watch right across the directory being created and removed.

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use serde_json::Value;

/// The extensions libcni loads; which file wins is decided by name alone.
const EXTENSIONS: [&str; 3] = ["conflist", "conf", "json"];

/// Whether pods can get a network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetworkStatus {
    /// `file` holds the network `name` that pods will join.
    Ready { file: PathBuf, name: String },
    /// No loadable configuration; `message` says what is missing or wrong.
    NotReady { message: String },
}

/// The network status as the configuration directory says it is now.
pub fn network_status(conf_dir: &Path) -> NetworkStatus {
    let not_ready = |message: String| NetworkStatus::NotReady { message };
    let entries = match fs::read_dir(conf_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == ErrorKind::NotFound => {
            return not_ready(format!(
                "no network config found in {}: the directory does not exist",
                conf_dir.display()
            ))
        }
        Err(e) => return not_ready(format!("cannot read {}: {e}", conf_dir.display())),
    };
    let mut files: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| EXTENSIONS.contains(&e))
        })
        // Follows symlinks: configuration is often a link into a package's
        // or a daemonset's own directory.
        .filter(|p| p.is_file())
        .collect();
    files.sort();

    let mut problems = Vec::new();
    for file in files {
        match load(&file) {
            Ok(name) => return NetworkStatus::Ready { file, name },
            Err(why) => problems.push(format!("{}: {why}", file.display())),
        }
    }
    if problems.is_empty() {
        not_ready(format!("no network config found in {}", conf_dir.display()))
    } else {
        not_ready(format!(
            "no valid network config in {}: {}",
            conf_dir.display(),
            problems.join("; ")
        ))
    }
}

/// The network's name, if the file is a configuration libcni would load.
fn load(file: &Path) -> Result<String, String> {
    let text = fs::read_to_string(file).map_err(|e| e.to_string())?;
    let value: Value = serde_json::from_str(&text).map_err(|e| format!("not JSON: {e}"))?;
    let object = value.as_object().ok_or("not a JSON object")?;
    let name = object
        .get("name")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .ok_or("no \"name\"")?;
    let is_list = file.extension().and_then(|e| e.to_str()) == Some("conflist");
    if is_list {
        let plugins = object
            .get("plugins")
            .and_then(Value::as_array)
            .filter(|p| !p.is_empty())
            .ok_or("no \"plugins\" in the list")?;
        for (i, plugin) in plugins.iter().enumerate() {
            plugin
                .get("type")
                .and_then(Value::as_str)
                .filter(|t| !t.is_empty())
                .ok_or_else(|| format!("plugin {i} has no \"type\""))?;
        }
    } else {
        object
            .get("type")
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
            .ok_or("no \"type\"")?;
    }
    Ok(name.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const BRIDGE_LIST: &str = r#"{
        "cniVersion": "1.0.0",
        "name": "corral",
        "plugins": [
            {"type": "bridge", "bridge": "corral0", "ipam": {"type": "host-local"}},
            {"type": "portmap", "capabilities": {"portMappings": true}}
        ]
    }"#;

    fn is_ready(dir: &Path) -> bool {
        matches!(network_status(dir), NetworkStatus::Ready { .. })
    }

    #[test]
    fn a_missing_directory_is_not_ready_and_named() {
        let dir = Path::new("/nonexistent/net.d");
        match network_status(dir) {
            NetworkStatus::NotReady { message } => {
                assert!(message.contains("/nonexistent/net.d"), "{message}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_empty_directory_is_not_ready_until_a_conflist_appears() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(!is_ready(dir.path()));
        fs::write(dir.path().join("README"), "not a config").expect("write");
        assert!(!is_ready(dir.path()));
        fs::write(dir.path().join("10-corral.conflist"), BRIDGE_LIST).expect("write");
        assert_eq!(
            network_status(dir.path()),
            NetworkStatus::Ready {
                file: dir.path().join("10-corral.conflist"),
                name: "corral".into()
            }
        );
    }

    #[test]
    fn a_single_plugin_conf_counts() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(
            dir.path().join("99-loop.conf"),
            r#"{"cniVersion":"1.0.0","name":"lo","type":"loopback"}"#,
        )
        .expect("write");
        assert!(is_ready(dir.path()));
    }

    #[test]
    fn broken_files_are_skipped_and_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(dir.path().join("00-broken.conflist"), "{not json").expect("write");
        fs::write(
            dir.path().join("05-empty.conflist"),
            r#"{"name":"x","plugins":[]}"#,
        )
        .expect("write");
        fs::write(dir.path().join("07-notype.conf"), r#"{"name":"y"}"#).expect("write");
        match network_status(dir.path()) {
            NetworkStatus::NotReady { message } => {
                assert!(message.contains("00-broken.conflist"), "{message}");
                assert!(message.contains("no \"plugins\""), "{message}");
                assert!(message.contains("no \"type\""), "{message}");
            }
            other => panic!("{other:?}"),
        }
        // A later valid file wins over earlier broken ones.
        fs::write(dir.path().join("10-corral.conflist"), BRIDGE_LIST).expect("write");
        assert!(is_ready(dir.path()));
    }
}
