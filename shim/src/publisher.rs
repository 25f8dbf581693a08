//! Publishes task events to the daemon, as containerd shims do: the ttrpc
//! `containerd.services.events.ttrpc.v1.Events/Forward` at `TTRPC_ADDRESS`.
//!
//! Events are queued in order and sent by one thread, so they reach the
//! daemon in the order the service emitted them (Create before Start before
//! Exit before Delete). While the daemon is away (restarting), the queue
//! holds up to [`QUEUE_LIMIT`] events and the thread reconnects; the shim's
//! containers are never slowed down by a missing daemon.

use std::{
    collections::VecDeque,
    sync::{Arc, Condvar, Mutex},
    thread,
    time::{Duration, SystemTime},
};

use corral_proto::{
    containerd::{
        events::task::{
            TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskOOM, TaskPaused,
            TaskResumed, TaskStart,
        },
        protobuf::{well_known_types::any::Any, Message},
        shim::{event::Envelope, events::ForwardRequest},
        shim_sync::{Client, EventsClient},
        topics,
    },
    ttrpc::context,
};

/// As containerd's shim publisher: beyond this, the oldest events are dropped.
const QUEUE_LIMIT: usize = 2048;
const SEND_TIMEOUT: Duration = Duration::from_secs(5);
const RETRY_MAX: Duration = Duration::from_secs(2);

pub struct Publisher {
    queue: Arc<Queue>,
    namespace: String,
}

struct Queue {
    events: Mutex<VecDeque<Envelope>>,
    ready: Condvar,
    /// Notified each time an event was delivered.
    drained: Condvar,
}

impl Publisher {
    /// Starts the sending thread. Connecting is lazy: a daemon that is not
    /// listening yet is retried, not an error.
    pub fn start(address: &str, namespace: &str) -> std::io::Result<Publisher> {
        let queue = Arc::new(Queue {
            events: Mutex::new(VecDeque::new()),
            ready: Condvar::new(),
            drained: Condvar::new(),
        });
        let worker = Arc::clone(&queue);
        let address = address.to_string();
        thread::Builder::new()
            .name("publisher".into())
            .stack_size(128 * 1024)
            .spawn(move || send_loop(&address, &worker))?;
        Ok(Publisher {
            queue,
            namespace: namespace.to_string(),
        })
    }

    /// Waits until every queued event is delivered, at most `timeout`: the
    /// last events of a shim that is shutting down (a task's exit and
    /// delete) must reach the daemon, but a daemon that is away must not
    /// keep the shim alive.
    pub fn flush(&self, timeout: Duration) {
        let deadline = std::time::Instant::now() + timeout;
        let mut events = lock(&self.queue.events);
        while !events.is_empty() {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                log::warn!("shutting down with {} undelivered events", events.len());
                return;
            }
            events = match self.queue.drained.wait_timeout(events, left) {
                Ok((guard, _)) => guard,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
    }

    pub fn publish<E: TaskEvent>(&self, event: &E) {
        let topic = E::TOPIC;
        let any = match event.write_to_bytes() {
            Ok(value) => Any {
                type_url: E::TYPE_URL.to_string(),
                value,
                ..Default::default()
            },
            Err(e) => {
                log::error!("encode {topic} event: {e}");
                return;
            }
        };
        let envelope = Envelope {
            timestamp: Some(crate::timestamp(SystemTime::now())).into(),
            namespace: self.namespace.clone(),
            topic: topic.to_string(),
            event: Some(any).into(),
            ..Default::default()
        };
        let mut events = lock(&self.queue.events);
        if events.len() >= QUEUE_LIMIT {
            events.pop_front();
            log::warn!("event queue full: dropped the oldest event");
        }
        events.push_back(envelope);
        self.queue.ready.notify_one();
    }
}

/// A task event, its topic, and the name containerd's typeurl gives it (the
/// message's full name, without the `type.googleapis.com/` host). Named here
/// rather than read from the protobuf descriptor: building the reflection
/// tables would cost every shim a few hundred KiB for a constant string.
pub trait TaskEvent: Message {
    const TOPIC: &'static str;
    const TYPE_URL: &'static str;
}

macro_rules! task_events {
    ($($event:ident => $topic:path),* $(,)?) => {
        $(impl TaskEvent for $event {
            const TOPIC: &'static str = $topic;
            const TYPE_URL: &'static str = concat!("containerd.events.", stringify!($event));
        })*

        #[cfg(test)]
        mod type_urls {
            use corral_proto::containerd::protobuf::MessageFull;
            use super::*;

            #[test]
            fn type_urls_are_the_messages_full_names() {
                $(assert_eq!($event::descriptor().full_name(), <$event as TaskEvent>::TYPE_URL);)*
            }
        }
    };
}

task_events! {
    TaskCreate => topics::TASK_CREATE_EVENT_TOPIC,
    TaskStart => topics::TASK_START_EVENT_TOPIC,
    TaskExit => topics::TASK_EXIT_EVENT_TOPIC,
    TaskDelete => topics::TASK_DELETE_EVENT_TOPIC,
    TaskOOM => topics::TASK_OOM_EVENT_TOPIC,
    TaskExecAdded => topics::TASK_EXEC_ADDED_EVENT_TOPIC,
    TaskExecStarted => topics::TASK_EXEC_STARTED_EVENT_TOPIC,
    TaskPaused => topics::TASK_PAUSED_EVENT_TOPIC,
    TaskResumed => topics::TASK_RESUMED_EVENT_TOPIC,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn send_loop(address: &str, queue: &Queue) {
    let mut client: Option<EventsClient> = None;
    let mut backoff = Duration::from_millis(50);
    let mut failed_last = false;
    loop {
        let envelope = {
            let mut events = lock(&queue.events);
            while events.is_empty() {
                events = queue
                    .ready
                    .wait(events)
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
            }
            events.front().cloned()
        };
        let Some(envelope) = envelope else { continue };

        if client.is_none() {
            match connect(address) {
                Ok(c) => {
                    client = Some(c);
                    backoff = Duration::from_millis(50);
                }
                Err(e) => {
                    log::debug!("events: connect {address}: {e}");
                    thread::sleep(backoff);
                    backoff = (backoff * 2).min(RETRY_MAX);
                    continue;
                }
            }
        }
        let Some(events_client) = client.as_ref() else {
            continue;
        };
        let req = ForwardRequest {
            envelope: Some(envelope).into(),
            ..Default::default()
        };
        match events_client.forward(context::with_timeout(SEND_TIMEOUT.as_nanos() as i64), &req) {
            Ok(_) => {
                lock(&queue.events).pop_front();
            }
            Err(e) => {
                // Keep the event at the head: it is resent on the next
                // connection, so order holds across a daemon restart. A
                // connection that broke since the last event (the daemon
                // restarted) is redialled at once; only a second failure
                // in a row backs off.
                log::debug!("events: forward to {address}: {e}");
                client = None;
                if failed_last {
                    thread::sleep(backoff);
                    backoff = (backoff * 2).min(RETRY_MAX);
                }
                failed_last = true;
                continue;
            }
        }
        failed_last = false;
        queue.drained.notify_all();
    }
}

fn connect(address: &str) -> Result<EventsClient, String> {
    let path = address.strip_prefix("unix://").unwrap_or(address);
    let stream = std::os::unix::net::UnixStream::connect(path).map_err(|e| e.to_string())?;
    use std::os::fd::IntoRawFd;
    let client = Client::new(stream.into_raw_fd()).map_err(|e| e.to_string())?;
    Ok(EventsClient::new(client))
}
