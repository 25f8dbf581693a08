//! The event exchange: the ttrpc service containerd shims publish to
//! (`containerd.services.events.ttrpc.v1.Events/Forward`, served at the
//! address the shims get as `TTRPC_ADDRESS`), fanned out to subscribers.
//!
//! A shim sends its next event only after the previous one was answered,
//! and an event is handed to every subscriber before it is answered, so
//! subscribers see each shim's events in order, each once. The exchange
//! also carries the synthetic exits the shim manager makes for shims that
//! died while no daemon ran.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use containerd_shim_protos::{
    events::task::{
        TaskCheckpointed, TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit,
        TaskOOM, TaskPaused, TaskResumed, TaskStart,
    },
    shim::events::ForwardRequest,
    shim_async::{create_events, Events},
};
use corral_proto::protobuf::{
    well_known_types::{any::Any, empty::Empty},
    MessageFull,
};
use tokio::sync::mpsc;

use crate::error::{Error, Result};

/// A task event as a shim published it.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskEvent {
    pub namespace: String,
    pub topic: String,
    pub timestamp: SystemTime,
    pub event: Event,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Create(TaskCreate),
    Start(TaskStart),
    Exit(TaskExit),
    Delete(TaskDelete),
    Oom(TaskOOM),
    ExecAdded(TaskExecAdded),
    ExecStarted(TaskExecStarted),
    Paused(TaskPaused),
    Resumed(TaskResumed),
    Checkpointed(TaskCheckpointed),
    /// An event of a type the runtime does not act on.
    Other(String),
}

impl Event {
    /// Decodes an event by its type URL, as containerd's typeurl writes it
    /// (`containerd.events.TaskExit`, with or without a host prefix).
    pub fn decode(any: &Any) -> Event {
        fn parse<M: MessageFull>(any: &Any) -> Option<M> {
            M::parse_from_bytes(&any.value).ok()
        }
        let name = any.type_url.rsplit('/').next().unwrap_or_default();
        let decoded = match name.strip_prefix("containerd.events.") {
            Some("TaskCreate") => parse(any).map(Event::Create),
            Some("TaskStart") => parse(any).map(Event::Start),
            Some("TaskExit") => parse(any).map(Event::Exit),
            Some("TaskDelete") => parse(any).map(Event::Delete),
            Some("TaskOOM") => parse(any).map(Event::Oom),
            Some("TaskExecAdded") => parse(any).map(Event::ExecAdded),
            Some("TaskExecStarted") => parse(any).map(Event::ExecStarted),
            Some("TaskPaused") => parse(any).map(Event::Paused),
            Some("TaskResumed") => parse(any).map(Event::Resumed),
            Some("TaskCheckpointed") => parse(any).map(Event::Checkpointed),
            _ => None,
        };
        decoded.unwrap_or_else(|| Event::Other(any.type_url.clone()))
    }

    /// The container (task) the event is about.
    pub fn container_id(&self) -> Option<&str> {
        Some(match self {
            Event::Create(e) => &e.container_id,
            Event::Start(e) => &e.container_id,
            Event::Exit(e) => &e.container_id,
            Event::Delete(e) => &e.container_id,
            Event::Oom(e) => &e.container_id,
            Event::ExecAdded(e) => &e.container_id,
            Event::ExecStarted(e) => &e.container_id,
            Event::Paused(e) => &e.container_id,
            Event::Resumed(e) => &e.container_id,
            Event::Checkpointed(e) => &e.container_id,
            Event::Other(_) => return None,
        })
    }
}

type Subscribers = Arc<Mutex<Vec<mpsc::UnboundedSender<TaskEvent>>>>;

pub struct EventExchange {
    socket: PathBuf,
    subscribers: Subscribers,
    server: tokio::sync::Mutex<Option<ttrpc::asynchronous::Server>>,
}

impl EventExchange {
    /// Serves the events service on `socket` (a stale socket file is
    /// replaced).
    pub async fn serve(socket: &Path) -> Result<Arc<EventExchange>> {
        if let Some(dir) = socket.parent() {
            tokio::fs::create_dir_all(dir)
                .await
                .map_err(|e| Error::io("create", dir, e))?;
        }
        match tokio::fs::remove_file(socket).await {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io("remove stale socket", socket, e)),
        }
        let subscribers: Subscribers = Arc::default();
        let service = create_events(Arc::new(Forwarder {
            subscribers: Arc::clone(&subscribers),
        }));
        let mut server = ttrpc::asynchronous::Server::new()
            .bind(&format!("unix://{}", socket.display()))
            .map_err(|e| Error::Internal(format!("bind events socket {}: {e}", socket.display())))?
            .register_service(service);
        server
            .start()
            .await
            .map_err(|e| Error::Internal(format!("serve events on {}: {e}", socket.display())))?;
        Ok(Arc::new(EventExchange {
            socket: socket.to_path_buf(),
            subscribers,
            server: tokio::sync::Mutex::new(Some(server)),
        }))
    }

    /// The path shims get as `TTRPC_ADDRESS`.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Every event from now on, in order. Dropping the receiver unsubscribes.
    pub fn subscribe(&self) -> mpsc::UnboundedReceiver<TaskEvent> {
        let (tx, rx) = mpsc::unbounded_channel();
        lock(&self.subscribers).push(tx);
        rx
    }

    /// Hands an event to every subscriber, as if a shim had sent it.
    pub fn publish(&self, event: TaskEvent) {
        fan_out(&self.subscribers, event);
    }

    pub async fn shutdown(&self) {
        if let Some(mut server) = self.server.lock().await.take() {
            // ttrpc's shutdown waits for every connection to close; shims
            // keep theirs open, so bound it.
            let _ = tokio::time::timeout(Duration::from_secs(1), server.shutdown()).await;
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn fan_out(subscribers: &Subscribers, event: TaskEvent) {
    // A closed receiver is an unsubscribe.
    lock(subscribers).retain(|tx| tx.send(event.clone()).is_ok());
}

struct Forwarder {
    subscribers: Subscribers,
}

#[async_trait::async_trait]
impl Events for Forwarder {
    async fn forward(
        &self,
        _ctx: &ttrpc::r#async::TtrpcContext,
        req: ForwardRequest,
    ) -> ttrpc::Result<Empty> {
        let envelope = req.envelope.into_option().unwrap_or_default();
        let timestamp = envelope
            .timestamp
            .as_ref()
            .map(|t| UNIX_EPOCH + Duration::new(t.seconds.max(0) as u64, t.nanos.max(0) as u32))
            .unwrap_or_else(SystemTime::now);
        let event = envelope
            .event
            .as_ref()
            .map(Event::decode)
            .unwrap_or_else(|| Event::Other(String::new()));
        tracing::debug!(topic = %envelope.topic, namespace = %envelope.namespace, "event from shim");
        fan_out(
            &self.subscribers,
            TaskEvent {
                namespace: envelope.namespace,
                topic: envelope.topic,
                timestamp,
                event,
            },
        );
        Ok(Empty::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode<M: MessageFull>(event: &M) -> Any {
        Any {
            type_url: M::descriptor().full_name().to_string(),
            value: event.write_to_bytes().expect("encode"),
            ..Default::default()
        }
    }

    #[test]
    fn decodes_task_events_by_type_url() {
        let exit = TaskExit {
            container_id: "c".into(),
            exit_status: 7,
            ..Default::default()
        };
        let mut any = encode(&exit);
        assert_eq!(any.type_url, "containerd.events.TaskExit");
        assert_eq!(Event::decode(&any), Event::Exit(exit.clone()));
        any.type_url = format!("type.googleapis.com/{}", any.type_url);
        assert_eq!(Event::decode(&any).container_id(), Some("c"));
        let unknown = Any {
            type_url: "containerd.events.ImageCreate".into(),
            ..Default::default()
        };
        assert_eq!(
            Event::decode(&unknown),
            Event::Other("containerd.events.ImageCreate".into())
        );
    }
}
