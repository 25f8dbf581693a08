//! The daemon's pod and container records, on disk.
//!
//! One redb database at `<root>/cri/meta.redb` holds a record per sandbox and
//! per container: what the CRI config asked for (kept as the protobuf bytes
//! kubelet sent, so a status after a restart echoes it exactly) and what
//! corrald learnt since (state, pid, IPs, exit code, times). A record is
//! written before the thing it describes is created and deleted after the
//! thing is gone, so after `kill -9` every object that may exist on the node
//! has a record to find it by.
//!
//! This module owns the encoding and the transactions. It does not know
//! which states may follow which (the sandbox and container modules do) and
//! it holds nothing in memory.

use std::path::{Path, PathBuf};

use k8s_cri::v1 as cri;
use prost::Message;
use redb::{Database, ReadableTable, TableDefinition};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

const SANDBOXES: TableDefinition<&str, &[u8]> = TableDefinition::new("sandboxes");
const CONTAINERS: TableDefinition<&str, &[u8]> = TableDefinition::new("containers");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("metadata store {path}: {message}")]
    Database { path: PathBuf, message: String },
    #[error("metadata store {path}: record {id} is corrupt: {message}")]
    Corrupt {
        path: PathBuf,
        id: String,
        message: String,
    },
}

/// Where a sandbox is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SandboxState {
    /// Recorded, not yet running: a RunPodSandbox in progress, or one a crash
    /// interrupted.
    Creating,
    Ready,
    NotReady,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SandboxRecord {
    pub id: String,
    pub runtime_handler: String,
    /// Nanoseconds since the epoch.
    pub created_at: i64,
    pub state: SandboxState,
    /// The pause process; 0 until started.
    pub pid: u32,
    /// The pinned network namespace; `None` for host network.
    pub netns: Option<PathBuf>,
    /// Pod IPs, the primary first.
    pub ips: Vec<String>,
    /// The cgroups path given to the runtime for the sandbox.
    pub cgroups_path: String,
    /// Whether CNI ADD succeeded and DEL has not run since.
    pub network_up: bool,
    /// The image the sandbox runs, if not the built-in pause.
    pub image: Option<String>,
}

/// Where a container is in its life (CRI's states, plus `Creating` for the
/// window between the record and the task).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ContainerState {
    Creating,
    Created,
    Running,
    Exited,
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContainerRecord {
    pub id: String,
    pub sandbox_id: String,
    /// The image id (config digest) the container was created from.
    pub image_id: String,
    /// A name of that image to report: the reference asked for, normalized.
    pub image_name: String,
    /// `repo@digest` when the image has one, else the image id.
    pub image_ref: String,
    pub state: ContainerState,
    pub pid: u32,
    pub created_at: i64,
    pub started_at: i64,
    pub finished_at: i64,
    pub exit_code: i32,
    /// Set when the task was reported killed by the OOM killer.
    pub oom_killed: bool,
    /// Why it exited, as kubelet shows it (`Completed`, `Error`,
    /// `OOMKilled`, `StartError`).
    pub reason: String,
    pub message: String,
    /// Absolute; empty when the container asked for no log.
    pub log_path: String,
    /// The writable snapshot's key.
    pub snapshot: String,
    /// The signal StopContainer sends first (the image's `StopSignal`).
    pub stop_signal: String,
    /// The effective resources, as last applied.
    pub resources: Option<Vec<u8>>,
}

/// The database.
pub struct Store {
    db: Database,
    path: PathBuf,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

impl Store {
    /// Opens (or creates) `dir/meta.redb`.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let path = dir.join("meta.redb");
        let err = |e: &dyn std::fmt::Display| StoreError::Database {
            path: path.clone(),
            message: e.to_string(),
        };
        std::fs::create_dir_all(dir).map_err(|e| err(&e))?;
        let db = Database::create(&path).map_err(|e| err(&e))?;
        // Both tables exist from the start, so readers never meet a missing one.
        let txn = db.begin_write().map_err(|e| err(&e))?;
        txn.open_table(SANDBOXES).map_err(|e| err(&e))?;
        txn.open_table(CONTAINERS).map_err(|e| err(&e))?;
        txn.commit().map_err(|e| err(&e))?;
        Ok(Store { db, path })
    }

    pub fn put_sandbox(
        &self,
        record: &SandboxRecord,
        config: &cri::PodSandboxConfig,
    ) -> Result<(), StoreError> {
        self.put(SANDBOXES, &record.id, &encode(record, config))
    }

    pub fn put_container(
        &self,
        record: &ContainerRecord,
        config: &cri::ContainerConfig,
    ) -> Result<(), StoreError> {
        self.put(CONTAINERS, &record.id, &encode(record, config))
    }

    pub fn delete_sandbox(&self, id: &str) -> Result<(), StoreError> {
        self.delete(SANDBOXES, id)
    }

    pub fn delete_container(&self, id: &str) -> Result<(), StoreError> {
        self.delete(CONTAINERS, id)
    }

    pub fn sandboxes(&self) -> Result<Vec<(SandboxRecord, cri::PodSandboxConfig)>, StoreError> {
        self.all(SANDBOXES)
    }

    pub fn containers(&self) -> Result<Vec<(ContainerRecord, cri::ContainerConfig)>, StoreError> {
        self.all(CONTAINERS)
    }

    fn put(
        &self,
        table: TableDefinition<&str, &[u8]>,
        id: &str,
        value: &[u8],
    ) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        {
            let mut t = txn.open_table(table).map_err(|e| self.err(e))?;
            t.insert(id, value).map_err(|e| self.err(e))?;
        }
        txn.commit().map_err(|e| self.err(e))
    }

    fn delete(&self, table: TableDefinition<&str, &[u8]>, id: &str) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        {
            let mut t = txn.open_table(table).map_err(|e| self.err(e))?;
            t.remove(id).map_err(|e| self.err(e))?;
        }
        txn.commit().map_err(|e| self.err(e))
    }

    fn all<R: DeserializeOwned, C: Message + Default>(
        &self,
        table: TableDefinition<&str, &[u8]>,
    ) -> Result<Vec<(R, C)>, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = txn.open_table(table).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for entry in t.iter().map_err(|e| self.err(e))? {
            let (id, value) = entry.map_err(|e| self.err(e))?;
            let decoded = decode(value.value()).map_err(|message| StoreError::Corrupt {
                path: self.path.clone(),
                id: id.value().to_string(),
                message,
            })?;
            out.push(decoded);
        }
        Ok(out)
    }

    fn err(&self, e: impl Into<redb::Error>) -> StoreError {
        StoreError::Database {
            path: self.path.clone(),
            message: e.into().to_string(),
        }
    }
}

/// `len(json) as u32 LE ++ json(record) ++ protobuf(config)`: the record
/// stays readable, and the config keeps kubelet's exact bytes.
fn encode(record: &impl Serialize, config: &impl Message) -> Vec<u8> {
    // Serializing a struct of plain fields to JSON cannot fail.
    let json = serde_json::to_vec(record).unwrap_or_default();
    let mut out = Vec::with_capacity(4 + json.len() + config.encoded_len());
    out.extend_from_slice(&(json.len() as u32).to_le_bytes());
    out.extend_from_slice(&json);
    config.encode(&mut out).unwrap_or_default();
    out
}

fn decode<R: DeserializeOwned, C: Message + Default>(value: &[u8]) -> Result<(R, C), String> {
    let (len, rest) = value
        .split_first_chunk::<4>()
        .ok_or("shorter than its header")?;
    let len = u32::from_le_bytes(*len) as usize;
    if rest.len() < len {
        return Err("record shorter than its length".into());
    }
    let (json, config) = rest.split_at(len);
    let record = serde_json::from_slice(json).map_err(|e| e.to_string())?;
    let config = C::decode(config).map_err(|e| e.to_string())?;
    Ok((record, config))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sandbox(id: &str) -> SandboxRecord {
        SandboxRecord {
            id: id.into(),
            runtime_handler: String::new(),
            created_at: 1,
            state: SandboxState::Ready,
            pid: 42,
            netns: Some("/run/corral/netns/x".into()),
            ips: vec!["10.88.0.2".into()],
            cgroups_path: "/kubepods/x".into(),
            network_up: true,
            image: None,
        }
    }

    #[test]
    fn records_survive_reopening_with_the_config_bytes_intact() {
        let dir = tempfile::tempdir().unwrap();
        let config = cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: "web".into(),
                uid: "u".into(),
                namespace: "default".into(),
                attempt: 2,
            }),
            hostname: "web-0".into(),
            ..Default::default()
        };
        {
            let store = Store::open(dir.path()).unwrap();
            store.put_sandbox(&sandbox("a"), &config).unwrap();
            store.put_sandbox(&sandbox("b"), &config).unwrap();
            store.delete_sandbox("b").unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        let all = store.sandboxes().unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].0, sandbox("a"));
        assert_eq!(all[0].1, config);
        assert!(store.containers().unwrap().is_empty());
    }

    #[test]
    fn a_truncated_record_is_reported_corrupt_by_id() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.put(SANDBOXES, "bad", &[9, 0, 0, 0, b'{']).unwrap();
        match store.sandboxes() {
            Err(StoreError::Corrupt { id, .. }) => assert_eq!(id, "bad"),
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }

    #[test]
    fn deleting_an_absent_record_is_fine() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.delete_container("nope").unwrap();
    }
}
