//! What happens to pods and containers without a CRI call: task events
//! (exits, OOM kills) and the recovery of every pod after a restart.
//!
//! Recovery reads the metadata store, asks the task service (which has
//! re-attached to the live shims) what became of each task while no daemon
//! ran, and rebuilds the in-memory index from that. Objects a crash caught
//! half-made (`Creating`) are torn down: kubelet will ask again.

use std::sync::Arc;

use corral_runtime::events::{Event, TaskEvent};
use corral_runtime::task_service::Status;
use k8s_cri::v1 as cri;
use tokio::sync::mpsc::UnboundedReceiver;

use crate::container;
use crate::error::Result;
use crate::node::{now_ns, to_ns, Container, Node, Sandbox, TASK_NAMESPACE};
use crate::sandbox;
use crate::store::{ContainerState, SandboxState};

/// Applies task events to the pods and containers they are about, in the
/// order the shims sent them, until the task service stops.
pub fn spawn_event_loop(node: Arc<Node>, mut events: UnboundedReceiver<TaskEvent>) {
    tokio::spawn(async move {
        while let Some(event) = events.recv().await {
            if event.namespace != TASK_NAMESPACE {
                continue;
            }
            handle(&node, event).await;
        }
    });
}

async fn handle(node: &Arc<Node>, event: TaskEvent) {
    match event.event {
        // An exec's exit is the ExecSync caller's business.
        Event::Exit(exit) if exit.id == exit.container_id || exit.id.is_empty() => {
            let at = exit
                .exited_at
                .as_ref()
                .map(|t| t.seconds * 1_000_000_000 + i64::from(t.nanos))
                .unwrap_or_else(now_ns);
            on_exit(node, &exit.container_id, exit.exit_status, at);
        }
        Event::Oom(oom) => {
            if let Some(c) = node.container_by_exact_id(&oom.container_id) {
                c.record().oom_killed = true;
                if let Err(e) = container::persist(node, &c) {
                    tracing::warn!(container = %c.id, error = %e, "recording an OOM kill");
                }
            }
        }
        _ => {}
    }
}

fn on_exit(node: &Arc<Node>, id: &str, status: u32, at: i64) {
    if let Some(c) = node.container_by_exact_id(id) {
        tracing::info!(container = %id, status, "container exited");
        // Recorded under the container's operation lock: a StartContainer
        // still publishing STARTED for a process that ended at once goes
        // first, so kubelet sees STARTED before STOPPED.
        let node = node.clone();
        tokio::spawn(async move {
            let _op = c.op.lock().await;
            // Removed meanwhile: nothing to record, and no record to revive.
            if node.container_by_exact_id(&c.id).is_none() {
                return;
            }
            if let Err(e) = container::mark_exited(&node, &c, status, at) {
                tracing::warn!(container = %c.id, error = %e, "recording an exit");
            }
            delete_task_later(&node, &c.id);
        });
    } else if let Some(s) = node.sandbox_by_exact_id(id) {
        tracing::info!(sandbox = %id, status, "pause process exited");
        mark_not_ready(node, &s);
        delete_task_later(node, id);
    }
}

/// The exited task is deleted so its shim lets go of it (and exits with
/// the pod's last task); the record keeps what CRI reports.
fn delete_task_later(node: &Arc<Node>, id: &str) {
    let node = node.clone();
    let id = id.to_string();
    tokio::spawn(async move {
        match node.tasks.delete(TASK_NAMESPACE, &id).await {
            Ok(_) | Err(corral_runtime::Error::NotFound(_)) => {}
            Err(e) => tracing::warn!(task = %id, error = %e, "deleting an exited task"),
        }
    });
}

fn mark_not_ready(node: &Node, s: &Sandbox) {
    {
        let mut r = s.record();
        if r.state == SandboxState::NotReady {
            return;
        }
        r.state = SandboxState::NotReady;
    }
    if let Err(e) = node.store.put_sandbox(&s.snapshot(), &s.config) {
        tracing::warn!(sandbox = %s.id, error = %e, "recording a stopped sandbox");
    }
    // kubelet's evented PLEG learns of a sandbox's end through a container
    // event carrying the sandbox id, as containerd sends it.
    node.publish(cri::ContainerEventResponse {
        container_id: s.id.clone(),
        container_event_type: cri::ContainerEventType::ContainerStoppedEvent as i32,
        created_at: now_ns(),
        pod_sandbox_status: sandbox::status(node, s, false).status,
        containers_statuses: Vec::new(),
    });
}

/// Rebuilds the index from the metadata store and the tasks' true state.
pub async fn recover(node: &Arc<Node>) -> Result<()> {
    let containers = node.store.containers()?;
    let sandboxes = node.store.sandboxes()?;
    let (mut ready, mut not_ready, mut dropped) = (0, 0, 0);
    for (record, config) in sandboxes {
        let dir = node.sandbox_dir(&record.id);
        let creating = record.state == SandboxState::Creating;
        let s = Arc::new(Sandbox::new(config, record, dir));
        if creating {
            dropped += 1;
            if let Err(e) = sandbox::remove_everything(node, &s).await {
                tracing::warn!(sandbox = %s.id, error = %e, "cleaning up a sandbox a crash interrupted");
            }
            continue;
        }
        let name = sandbox::sandbox_name(&s.metadata());
        node.reserve_name(&name, &s.id)?;
        match node.tasks.state(TASK_NAMESPACE, &s.id, "").await {
            Ok(state) if state.exit.is_none() && state.status == Status::RUNNING => ready += 1,
            _ => {
                mark_not_ready(node, &s);
                delete_task_later(node, &s.id);
                not_ready += 1;
            }
        }
        node.insert_sandbox(s);
    }
    for (record, config) in containers {
        let creating = record.state == ContainerState::Creating;
        let c = Arc::new(Container::new(config, record));
        let Some(s) = node
            .sandbox_by_exact_id(&c.sandbox_id)
            .filter(|_| !creating)
        else {
            dropped += 1;
            if let Err(e) = container::remove_everything(node, &c).await {
                tracing::warn!(container = %c.id, error = %e, "cleaning up a container a crash interrupted");
            }
            continue;
        };
        node.reserve_name(
            &container::container_name(&c.metadata(), &s.metadata()),
            &c.id,
        )?;
        node.insert_container(c.clone());
        reconcile_container(node, &c).await;
    }
    tracing::info!(
        ready,
        not_ready,
        dropped,
        containers = node.containers().len(),
        "recovered pods"
    );
    Ok(())
}

/// Picks up copying the output of a container whose log corrald writes.
fn resume_log_copy(node: &Node, c: &Container) {
    let record = c.snapshot();
    let handler = node
        .sandbox_by_exact_id(&c.sandbox_id)
        .map(|s| s.snapshot().runtime_handler)
        .unwrap_or_default();
    if record.log_path.is_empty() || container::shim_writes_log(node, &handler) {
        return;
    }
    let dir = container::io_dir(node, &c.id);
    let log = std::path::Path::new(&record.log_path);
    let resumed = crate::container_io::Copiers::resume(&dir, &c.config, log)
        .and_then(|pending| node.copiers.start(&c.id, pending));
    if let Err(e) = resumed {
        tracing::warn!(container = %c.id, error = %e, "resuming the copy of a container's output");
    }
}

/// Brings a container's record in line with its task after a restart.
async fn reconcile_container(node: &Arc<Node>, c: &Container) {
    let state = c.record().state;
    if state == ContainerState::Exited {
        return;
    }
    match node.tasks.state(TASK_NAMESPACE, &c.id, "").await {
        Ok(task) => match task.exit {
            Some(exit) => {
                let _ = container::mark_exited(node, c, exit.status, to_ns(exit.at));
                delete_task_later(node, &c.id);
            }
            None if task.status == Status::RUNNING || task.status == Status::PAUSED => {
                {
                    let mut r = c.record();
                    if r.state == ContainerState::Created {
                        // Started, but the daemon died before recording it.
                        r.state = ContainerState::Running;
                        r.started_at = now_ns();
                    }
                }
                resume_log_copy(node, c);
            }
            None => {}
        },
        Err(e) => {
            // No task at all: whatever ran is gone and its exit is lost.
            tracing::warn!(container = %c.id, error = %e, "no task for a container after restart");
            {
                let mut r = c.record();
                r.state = ContainerState::Exited;
                r.exit_code = 255;
                r.finished_at = now_ns();
                r.reason = "Unknown".into();
                r.message = "the container's task was gone when corrald restarted".into();
            }
            let _ = container::persist(node, c);
        }
    }
}
