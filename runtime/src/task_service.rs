//! The task service: the task API the daemon uses, over the shims the
//! [`ShimManager`] runs, with the event stream of every task.
//!
//! A task is addressed by namespace and id. Create reads as its steps:
//! resolve the handler, start (or join) the shim with a new bundle, create
//! the task in it; a failed Create leaves no bundle and no shim.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use containerd_shim_protos::api;
use corral_proto::protobuf::{well_known_types::any::Any, well_known_types::timestamp::Timestamp};
use tokio::sync::mpsc;

use crate::{
    error::{Error, Result},
    events::{EventExchange, TaskEvent},
    handlers::Handlers,
    shim_manager::{DeadTask, Reattached, ShimManager, ShimManagerConfig, ShimTask},
};

pub use containerd_shim_protos::api::{Mount, Status};

#[derive(Debug, Clone)]
pub struct TaskServiceConfig {
    pub shims: ShimManagerConfig,
    /// Where the events service listens: the shims' `TTRPC_ADDRESS`.
    pub events_socket: PathBuf,
    pub handlers: Handlers,
}

/// Everything Create needs; the OCI spec is the bundle's `config.json`.
#[derive(Debug, Clone, Default)]
pub struct CreateTask {
    pub namespace: String,
    pub id: String,
    pub spec: Vec<u8>,
    pub rootfs: Vec<Mount>,
    pub stdio: Stdio,
    /// A RuntimeClass handler name; `""` is the default.
    pub runtime_handler: String,
}

/// Stdio URIs as the shim takes them (FIFO paths, `file://`, `cri-log://`).
#[derive(Debug, Clone, Default)]
pub struct Stdio {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

#[derive(Debug, Clone, Default)]
pub struct ExecProcess {
    pub exec_id: String,
    /// The OCI `Process`, as JSON.
    pub spec: Vec<u8>,
    pub stdio: Stdio,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    pub status: u32,
    pub at: SystemTime,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TaskState {
    pub pid: u32,
    pub status: Status,
    pub exit: Option<Exit>,
    pub bundle: PathBuf,
}

pub struct TaskService {
    shims: Arc<ShimManager>,
    events: Arc<EventExchange>,
    handlers: Handlers,
    /// Tasks whose shim died while no daemon ran: reported stopped with
    /// the exit `delete` gave, until deleted.
    dead: Mutex<HashMap<String, DeadTask>>,
}

fn key(namespace: &str, id: &str) -> String {
    format!("{namespace}/{id}")
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl TaskService {
    /// Serves the events service. Call [`TaskService::reattach`] next,
    /// once subscribed, to pick up the shims an earlier daemon left.
    pub async fn start(config: TaskServiceConfig) -> Result<Arc<TaskService>> {
        let events = EventExchange::serve(&config.events_socket).await?;
        let shims = Arc::new(ShimManager::new(config.shims, Arc::clone(&events)));
        Ok(Arc::new(TaskService {
            shims,
            events,
            handlers: config.handlers,
            dead: Mutex::new(HashMap::new()),
        }))
    }

    /// Reconnects to every live shim in the bundles on disk and cleans up
    /// after dead ones, whose tasks are then reported stopped (with the
    /// synthetic TaskExit and TaskDelete events) until deleted.
    pub async fn reattach(&self) -> Result<Reattached> {
        let reattached = self.shims.reattach().await?;
        tracing::info!(
            live = reattached.live.len(),
            dead = reattached.dead.len(),
            "re-attached to shims"
        );
        let mut dead = lock(&self.dead);
        for d in &reattached.dead {
            dead.insert(key(&d.namespace, &d.id), d.clone());
        }
        Ok(reattached)
    }

    /// Every task event from now on, in order.
    pub fn subscribe(&self) -> mpsc::UnboundedReceiver<TaskEvent> {
        self.events.subscribe()
    }

    /// The tasks this service knows, as (namespace, id).
    pub fn list(&self) -> Vec<(String, String)> {
        let mut tasks: Vec<_> = self
            .shims
            .list()
            .iter()
            .map(|t| (t.bundle.namespace.clone(), t.bundle.id.clone()))
            .collect();
        tasks.extend(
            lock(&self.dead)
                .values()
                .map(|d| (d.namespace.clone(), d.id.clone())),
        );
        tasks
    }

    pub async fn create(&self, req: CreateTask) -> Result<u32> {
        let handler = self.handlers.get(&req.runtime_handler)?;
        let shim = self
            .shims
            .start(&req.namespace, &req.id, &req.spec, handler)
            .await?;
        let create = api::CreateTaskRequest {
            id: req.id.clone(),
            bundle: shim.bundle.path.display().to_string(),
            rootfs: req.rootfs,
            terminal: req.stdio.terminal,
            stdin: req.stdio.stdin,
            stdout: req.stdio.stdout,
            stderr: req.stdio.stderr,
            options: Some(handler.options()).into(),
            ..Default::default()
        };
        match shim.client.create(&create).await {
            Ok(resp) => Ok(resp.pid),
            Err(e) => {
                if let Err(cleanup) = self.shims.remove(&req.namespace, &req.id).await {
                    tracing::warn!(task = %key(&req.namespace, &req.id), error = %cleanup, "cleanup after a failed create");
                }
                Err(e)
            }
        }
    }

    fn shim(&self, namespace: &str, id: &str) -> Result<Arc<ShimTask>> {
        self.shims.get(namespace, id)
    }

    pub async fn start_process(&self, namespace: &str, id: &str, exec_id: &str) -> Result<u32> {
        let req = api::StartRequest {
            id: id.to_string(),
            exec_id: exec_id.to_string(),
            ..Default::default()
        };
        Ok(self.shim(namespace, id)?.client.start(&req).await?.pid)
    }

    pub async fn kill(
        &self,
        namespace: &str,
        id: &str,
        exec_id: &str,
        signal: u32,
        all: bool,
    ) -> Result<()> {
        let req = api::KillRequest {
            id: id.to_string(),
            exec_id: exec_id.to_string(),
            signal,
            all,
            ..Default::default()
        };
        self.shim(namespace, id)?.client.kill(&req).await
    }

    /// Blocks until the process exits.
    pub async fn wait(&self, namespace: &str, id: &str, exec_id: &str) -> Result<Exit> {
        if exec_id.is_empty() {
            if let Some(dead) = lock(&self.dead).get(&key(namespace, id)) {
                return Ok(Exit {
                    status: dead.exit_status,
                    at: dead.exited_at,
                });
            }
        }
        let req = api::WaitRequest {
            id: id.to_string(),
            exec_id: exec_id.to_string(),
            ..Default::default()
        };
        let resp = self.shim(namespace, id)?.client.wait(&req).await?;
        Ok(Exit {
            status: resp.exit_status,
            at: time_of(resp.exited_at.as_ref()),
        })
    }

    pub async fn state(&self, namespace: &str, id: &str, exec_id: &str) -> Result<TaskState> {
        if exec_id.is_empty() {
            if let Some(dead) = lock(&self.dead).get(&key(namespace, id)) {
                return Ok(TaskState {
                    pid: dead.pid,
                    status: Status::STOPPED,
                    exit: Some(Exit {
                        status: dead.exit_status,
                        at: dead.exited_at,
                    }),
                    bundle: PathBuf::new(),
                });
            }
        }
        let shim = self.shim(namespace, id)?;
        let req = api::StateRequest {
            id: id.to_string(),
            exec_id: exec_id.to_string(),
            ..Default::default()
        };
        let resp = shim.client.state(&req).await?;
        let status = resp.status.enum_value().unwrap_or(Status::UNKNOWN);
        Ok(TaskState {
            pid: resp.pid,
            status,
            exit: (status == Status::STOPPED).then(|| Exit {
                status: resp.exit_status,
                at: time_of(resp.exited_at.as_ref()),
            }),
            bundle: shim.bundle.path.clone(),
        })
    }

    /// Deletes a stopped task and everything of it: its shim's record, the
    /// bundle, the shim itself once its last task is gone.
    pub async fn delete(&self, namespace: &str, id: &str) -> Result<Exit> {
        if let Some(dead) = lock(&self.dead).remove(&key(namespace, id)) {
            return Ok(Exit {
                status: dead.exit_status,
                at: dead.exited_at,
            });
        }
        let shim = self.shim(namespace, id)?;
        let req = api::DeleteRequest {
            id: id.to_string(),
            ..Default::default()
        };
        let resp = shim.client.delete(&req).await?;
        self.shims.remove(namespace, id).await?;
        Ok(Exit {
            status: resp.exit_status,
            at: time_of(resp.exited_at.as_ref()),
        })
    }

    pub async fn exec(&self, namespace: &str, id: &str, process: ExecProcess) -> Result<()> {
        let req = api::ExecProcessRequest {
            id: id.to_string(),
            exec_id: process.exec_id,
            terminal: process.stdio.terminal,
            stdin: process.stdio.stdin,
            stdout: process.stdio.stdout,
            stderr: process.stdio.stderr,
            spec: Some(Any {
                type_url: "types.containerd.io/opencontainers/runtime-spec/1/Process".to_string(),
                value: process.spec,
                ..Default::default()
            })
            .into(),
            ..Default::default()
        };
        self.shim(namespace, id)?.client.exec(&req).await
    }

    pub async fn delete_exec(&self, namespace: &str, id: &str, exec_id: &str) -> Result<Exit> {
        let req = api::DeleteRequest {
            id: id.to_string(),
            exec_id: exec_id.to_string(),
            ..Default::default()
        };
        let resp = self.shim(namespace, id)?.client.delete(&req).await?;
        Ok(Exit {
            status: resp.exit_status,
            at: time_of(resp.exited_at.as_ref()),
        })
    }

    pub async fn pids(&self, namespace: &str, id: &str) -> Result<Vec<u32>> {
        let req = api::PidsRequest {
            id: id.to_string(),
            ..Default::default()
        };
        let resp = self.shim(namespace, id)?.client.pids(&req).await?;
        Ok(resp.processes.iter().map(|p| p.pid).collect())
    }

    pub async fn pause(&self, namespace: &str, id: &str) -> Result<()> {
        let req = api::PauseRequest {
            id: id.to_string(),
            ..Default::default()
        };
        self.shim(namespace, id)?.client.pause(&req).await
    }

    pub async fn resume(&self, namespace: &str, id: &str) -> Result<()> {
        let req = api::ResumeRequest {
            id: id.to_string(),
            ..Default::default()
        };
        self.shim(namespace, id)?.client.resume(&req).await
    }

    /// Applies OCI `LinuxResources`, given as JSON.
    pub async fn update(&self, namespace: &str, id: &str, resources: Vec<u8>) -> Result<()> {
        let req = api::UpdateTaskRequest {
            id: id.to_string(),
            resources: Some(Any {
                type_url: "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources"
                    .to_string(),
                value: resources,
                ..Default::default()
            })
            .into(),
            ..Default::default()
        };
        self.shim(namespace, id)?.client.update(&req).await
    }

    /// The task's cgroup metrics as the shim encodes them (v1 or v2).
    pub async fn stats(&self, namespace: &str, id: &str) -> Result<Any> {
        let req = api::StatsRequest {
            id: id.to_string(),
            ..Default::default()
        };
        let resp = self.shim(namespace, id)?.client.stats(&req).await?;
        resp.stats
            .into_option()
            .ok_or_else(|| Error::Internal(format!("shim of {namespace}/{id} sent no stats")))
    }

    pub async fn close_io(&self, namespace: &str, id: &str, exec_id: &str) -> Result<()> {
        let req = api::CloseIORequest {
            id: id.to_string(),
            exec_id: exec_id.to_string(),
            stdin: true,
            ..Default::default()
        };
        self.shim(namespace, id)?.client.close_io(&req).await
    }

    pub async fn resize_pty(
        &self,
        namespace: &str,
        id: &str,
        exec_id: &str,
        width: u32,
        height: u32,
    ) -> Result<()> {
        let req = api::ResizePtyRequest {
            id: id.to_string(),
            exec_id: exec_id.to_string(),
            width,
            height,
            ..Default::default()
        };
        self.shim(namespace, id)?.client.resize_pty(&req).await
    }

    /// Connects to the task's attach socket (corral's shim only): its
    /// output from now on, and its stdin and terminal.
    pub async fn attach(
        &self,
        namespace: &str,
        id: &str,
    ) -> Result<(crate::attach::AttachOutput, crate::attach::AttachInput)> {
        let shim = self.shim(namespace, id)?;
        crate::attach::connect(&shim.bundle.path).await
    }

    /// Has the shim reopen the task's CRI log file (after kubelet renamed it).
    pub async fn reopen_log(&self, namespace: &str, id: &str) -> Result<()> {
        self.shim(namespace, id)?.client.reopen_log(id).await
    }

    /// The shim's address of a task, for the project's own services on the
    /// same socket (CRI log reopening).
    pub fn shim_address(&self, namespace: &str, id: &str) -> Result<String> {
        Ok(self.shim(namespace, id)?.bootstrap.address.clone())
    }

    /// Stops serving events; shims and their tasks keep running.
    pub async fn shutdown(&self) {
        self.events.shutdown().await;
    }
}

fn time_of(ts: Option<&Timestamp>) -> SystemTime {
    ts.map(|t| UNIX_EPOCH + Duration::new(t.seconds.max(0) as u64, t.nanos.max(0) as u32))
        .unwrap_or(UNIX_EPOCH)
}
