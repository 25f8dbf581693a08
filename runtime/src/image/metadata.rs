//! The image store's metadata: one embedded transactional database (redb) at
//! `<root>/meta.db`, and the schema of every record in it.
//!
//! Tables (keys are text, values are JSON records so that fields can be added later):
//!
//! ```text
//! names      image name -> NameRecord      `repo:tag`, `repo@digest`, or the id `sha256:…`
//! targets    top digest -> TargetRecord    what a pulled index or manifest resolved to
//! snapshots  chain id   -> SnapshotRecord  committed layer snapshots (numeric dir id, parent)
//! active     key        -> ActiveRecord    containers' writable snapshots and read-only views
//! leases     lease id   -> LeaseRecord     blobs and chains a pull or import in progress uses
//! counters   name       -> u64             the next numeric snapshot id
//! ```
//!
//! Owns the file and the schema; it does not decide what a record means for the disk (the
//! snapshotter and the store do) and never touches the content or snapshot directories.
//! Every commit is durable (fsync) before it returns: the rule the rest of the store builds
//! on is "write the files first, then the record in one transaction", so a crash leaves at
//! worst files that no record names, which [`super::store::ImageStore::open`] deletes.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use redb::{Database, ReadableTable, TableDefinition};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::error::{ImageError, Result};
use super::oci::{Descriptor, ImageConfig};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Table {
    Names,
    Targets,
    Snapshots,
    Active,
    Leases,
    Counters,
}

impl Table {
    const ALL: [Table; 6] = [
        Table::Names,
        Table::Targets,
        Table::Snapshots,
        Table::Active,
        Table::Leases,
        Table::Counters,
    ];

    fn def(self) -> TableDefinition<'static, &'static str, &'static [u8]> {
        TableDefinition::new(match self {
            Table::Names => "names",
            Table::Targets => "targets",
            Table::Snapshots => "snapshots",
            Table::Active => "active",
            Table::Leases => "leases",
            Table::Counters => "counters",
        })
    }
}

/// One name of an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct NameRecord {
    /// The digest of the index or manifest the name resolved to: a key of `targets`.
    pub target: String,
    /// Seconds since the epoch when the name was (re)pointed.
    pub created: u64,
}

/// What one top-level digest (an index or a manifest) resolved to on this node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct TargetRecord {
    pub media_type: String,
    /// The platform manifest (the target itself unless the target is an index).
    pub manifest: String,
    /// The config digest: the image id.
    pub config: String,
    pub layers: Vec<Descriptor>,
    /// Every blob of the image in the content store: index, manifest, config, layers.
    pub blobs: Vec<String>,
    /// One per layer, bottom first; the last is the image's top snapshot.
    pub chain_ids: Vec<String>,
    /// Compressed layers plus config, as containerd reports it.
    pub size: u64,
    pub image_config: ImageConfig,
    pub created: u64,
}

/// A committed layer snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SnapshotRecord {
    /// The directory `<root>/snapshots/<id>`.
    pub id: u64,
    /// The parent chain id.
    pub parent: Option<String>,
    pub bytes: u64,
    pub inodes: u64,
    pub created: u64,
}

/// A container's writable snapshot, or a read-only view.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ActiveRecord {
    pub id: u64,
    pub parent: Option<String>,
    pub readonly: bool,
    pub created: u64,
}

/// What a pull or an import in progress has written or is about to: kept by garbage
/// collection until the image record names it or the lease expires.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub(crate) struct LeaseRecord {
    pub image: String,
    pub blobs: Vec<String>,
    pub chains: Vec<String>,
    /// Seconds since the epoch.
    pub expires: u64,
}

pub(crate) fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The database. Opened by one process at a time (redb locks the file).
pub(crate) struct Metadata {
    db: Database,
    path: PathBuf,
}

impl std::fmt::Debug for Metadata {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metadata")
            .field("path", &self.path)
            .finish()
    }
}

fn db_err(path: &Path) -> impl Fn(redb::Error) -> ImageError + '_ {
    move |e| ImageError::Internal(format!("image metadata {}: {e}", path.display()))
}

impl Metadata {
    pub(crate) fn open(path: &Path) -> Result<Metadata> {
        let err = db_err(path);
        let db = Database::create(path).map_err(|e| err(e.into()))?;
        let meta = Metadata {
            db,
            path: path.to_owned(),
        };
        // Tables exist from the start so that read transactions never meet a missing one.
        let w = meta.write()?;
        for t in Table::ALL {
            w.txn.open_table(t.def()).map_err(|e| err(e.into()))?;
        }
        w.commit()?;
        Ok(meta)
    }

    pub(crate) fn read(&self) -> Result<ReadTx<'_>> {
        let txn = self
            .db
            .begin_read()
            .map_err(|e| db_err(&self.path)(e.into()))?;
        Ok(ReadTx {
            txn,
            path: &self.path,
        })
    }

    pub(crate) fn write(&self) -> Result<WriteTx<'_>> {
        let txn = self
            .db
            .begin_write()
            .map_err(|e| db_err(&self.path)(e.into()))?;
        Ok(WriteTx {
            txn,
            path: &self.path,
        })
    }
}

fn decode<T: DeserializeOwned>(path: &Path, table: Table, key: &str, raw: &[u8]) -> Result<T> {
    serde_json::from_slice(raw).map_err(|e| {
        ImageError::Internal(format!(
            "image metadata {}: record {key:?} of {table:?} is corrupt: {e}",
            path.display()
        ))
    })
}

/// Reads, in a read or a write transaction.
pub(crate) trait Tx {
    fn get<T: DeserializeOwned>(&self, table: Table, key: &str) -> Result<Option<T>>;
    fn list<T: DeserializeOwned>(&self, table: Table) -> Result<Vec<(String, T)>>;
}

/// Reads one record from an open table, of a read or a write transaction.
fn get_from<T: DeserializeOwned>(
    t: &impl ReadableTable<&'static str, &'static [u8]>,
    path: &Path,
    table: Table,
    key: &str,
) -> Result<Option<T>> {
    let raw = t.get(key).map_err(|e| db_err(path)(e.into()))?;
    raw.map(|v| decode(path, table, key, v.value())).transpose()
}

/// Reads every record of an open table, in key order.
fn list_from<T: DeserializeOwned>(
    t: &impl ReadableTable<&'static str, &'static [u8]>,
    path: &Path,
    table: Table,
) -> Result<Vec<(String, T)>> {
    let err = db_err(path);
    let mut out = Vec::new();
    for entry in t.iter().map_err(|e| err(e.into()))? {
        let (k, v) = entry.map_err(|e| err(e.into()))?;
        let key = k.value().to_owned();
        let value = decode(path, table, &key, v.value())?;
        out.push((key, value));
    }
    Ok(out)
}

/// A consistent view of the database.
pub(crate) struct ReadTx<'a> {
    txn: redb::ReadTransaction,
    path: &'a Path,
}

impl Tx for ReadTx<'_> {
    fn get<T: DeserializeOwned>(&self, table: Table, key: &str) -> Result<Option<T>> {
        let t = self
            .txn
            .open_table(table.def())
            .map_err(|e| db_err(self.path)(e.into()))?;
        get_from(&t, self.path, table, key)
    }

    fn list<T: DeserializeOwned>(&self, table: Table) -> Result<Vec<(String, T)>> {
        let t = self
            .txn
            .open_table(table.def())
            .map_err(|e| db_err(self.path)(e.into()))?;
        list_from(&t, self.path, table)
    }
}

/// The one write transaction (redb serializes them); nothing is visible until
/// [`WriteTx::commit`], and dropping it aborts.
pub(crate) struct WriteTx<'a> {
    txn: redb::WriteTransaction,
    path: &'a Path,
}

impl Tx for WriteTx<'_> {
    fn get<T: DeserializeOwned>(&self, table: Table, key: &str) -> Result<Option<T>> {
        let t = self
            .txn
            .open_table(table.def())
            .map_err(|e| db_err(self.path)(e.into()))?;
        get_from(&t, self.path, table, key)
    }

    fn list<T: DeserializeOwned>(&self, table: Table) -> Result<Vec<(String, T)>> {
        let t = self
            .txn
            .open_table(table.def())
            .map_err(|e| db_err(self.path)(e.into()))?;
        list_from(&t, self.path, table)
    }
}

impl WriteTx<'_> {
    pub(crate) fn put<T: Serialize>(&self, table: Table, key: &str, value: &T) -> Result<()> {
        let err = db_err(self.path);
        let raw = serde_json::to_vec(value)
            .map_err(|e| ImageError::internal("encoding a metadata record", e))?;
        let mut t = self
            .txn
            .open_table(table.def())
            .map_err(|e| err(e.into()))?;
        t.insert(key, raw.as_slice()).map_err(|e| err(e.into()))?;
        Ok(())
    }

    /// Whether there was a record.
    pub(crate) fn remove(&self, table: Table, key: &str) -> Result<bool> {
        let err = db_err(self.path);
        let mut t = self
            .txn
            .open_table(table.def())
            .map_err(|e| err(e.into()))?;
        let old = t.remove(key).map_err(|e| err(e.into()))?;
        Ok(old.is_some())
    }

    /// Takes the next value of a counter (starting at 1).
    pub(crate) fn next_id(&self, counter: &str) -> Result<u64> {
        let n: u64 = self.get(Table::Counters, counter)?.unwrap_or(1);
        self.put(Table::Counters, counter, &(n + 1))?;
        Ok(n)
    }

    pub(crate) fn commit(self) -> Result<()> {
        self.txn.commit().map_err(|e| db_err(self.path)(e.into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_reopen_and_aborts_leave_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("meta.db");
        {
            let m = Metadata::open(&path).expect("open");
            let w = m.write().expect("write");
            w.put(
                Table::Names,
                "docker.io/library/a:latest",
                &NameRecord {
                    target: "sha256:x".into(),
                    created: 1,
                },
            )
            .expect("put");
            assert_eq!(w.next_id("snapshot").expect("id"), 1);
            assert_eq!(w.next_id("snapshot").expect("id"), 2);
            w.commit().expect("commit");
            // Dropped without commit: aborted.
            let w = m.write().expect("write");
            w.put(
                Table::Names,
                "docker.io/library/b:latest",
                &NameRecord {
                    target: "sha256:y".into(),
                    created: 1,
                },
            )
            .expect("put");
            drop(w);
        }
        let m = Metadata::open(&path).expect("reopen");
        let r = m.read().expect("read");
        let names: Vec<(String, NameRecord)> = r.list(Table::Names).expect("list");
        assert_eq!(names.len(), 1);
        assert_eq!(names[0].0, "docker.io/library/a:latest");
        drop(r);
        let w = m.write().expect("write");
        assert_eq!(w.next_id("snapshot").expect("id"), 3);
        assert!(w
            .remove(Table::Names, "docker.io/library/a:latest")
            .expect("rm"));
        assert!(!w.remove(Table::Names, "nope").expect("rm"));
        w.commit().expect("commit");
    }
}
