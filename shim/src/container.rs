//! A container as the shim tracks it: its bundle, its runtime, its init
//! process and its exec processes, each with a status and, once reaped, an
//! exit code and time kept until Delete.
//!
//! Plain state: no I/O, no locking. The service mutates it under its lock.

use std::{collections::HashMap, path::PathBuf, time::SystemTime};

use corral_proto::containerd::api::Status;

use crate::{
    cgroup::OomWatch,
    error::{Error, Result},
    reaper::Exit,
    runc::Runc,
    stdio::{ProcessIo, StdioUris},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcessStatus {
    /// Exec added, not started yet.
    Added,
    /// `runc create` done, not started.
    Created,
    Running,
    Stopped,
}

pub struct Process {
    pub exec_id: String,
    pub pid: u32,
    pub status: ProcessStatus,
    pub exit: Option<(u32, SystemTime)>,
    pub uris: StdioUris,
    pub io: Option<ProcessIo>,
    /// The OCI process of an exec, as JSON, until it starts.
    pub spec: Vec<u8>,
    /// Start is in flight: its event is not out yet.
    pub starting: bool,
    /// An exit that came while `starting`, recorded once Start's event is out.
    pub parked_exit: Option<Exit>,
}

impl Process {
    pub fn new(exec_id: &str, uris: StdioUris) -> Self {
        Process {
            exec_id: exec_id.to_string(),
            pid: 0,
            status: ProcessStatus::Added,
            exit: None,
            uris,
            io: None,
            spec: Vec::new(),
            starting: false,
            parked_exit: None,
        }
    }

    /// The status as the task API reports it; a container's paused state
    /// applies to every process in it.
    pub fn api_status(&self, paused: bool) -> Status {
        match self.status {
            ProcessStatus::Added | ProcessStatus::Created => Status::CREATED,
            ProcessStatus::Running if paused => Status::PAUSED,
            ProcessStatus::Running => Status::RUNNING,
            ProcessStatus::Stopped => Status::STOPPED,
        }
    }

    pub fn is_live(&self) -> bool {
        matches!(self.status, ProcessStatus::Created | ProcessStatus::Running)
    }
}

pub struct Container {
    pub id: String,
    pub bundle: PathBuf,
    pub runc: Runc,
    /// Rootfs mounts the shim made at `<bundle>/rootfs`, undone at Delete.
    pub mounted_rootfs: bool,
    pub init: Process,
    pub execs: HashMap<String, Process>,
    pub paused: bool,
    /// Held for its Drop, which stops watching the cgroup.
    pub _oom: Option<OomWatch>,
}

impl Container {
    pub fn process(&self, exec_id: &str) -> Option<&Process> {
        if exec_id.is_empty() {
            Some(&self.init)
        } else {
            self.execs.get(exec_id)
        }
    }

    pub fn process_mut(&mut self, exec_id: &str) -> Option<&mut Process> {
        if exec_id.is_empty() {
            Some(&mut self.init)
        } else {
            self.execs.get_mut(exec_id)
        }
    }

    /// The init (`exec_id` empty) or an exec, NotFound if there is none.
    pub fn process_or_err(&self, exec_id: &str) -> Result<&Process> {
        self.process(exec_id)
            .ok_or_else(|| exec_not_found(&self.id, exec_id))
    }

    pub fn exec_mut(&mut self, exec_id: &str) -> Result<&mut Process> {
        let id = &self.id;
        self.execs
            .get_mut(exec_id)
            .ok_or_else(|| exec_not_found(id, exec_id))
    }

    /// The process with this live pid, if any: how an exit is matched.
    pub fn process_by_pid(&mut self, pid: u32) -> Option<&mut Process> {
        if self.init.pid == pid && self.init.is_live() {
            return Some(&mut self.init);
        }
        self.execs
            .values_mut()
            .find(|p| p.pid == pid && p.is_live())
    }
}

fn exec_not_found(id: &str, exec_id: &str) -> Error {
    Error::NotFound(format!("exec {exec_id} of container {id} not found"))
}
