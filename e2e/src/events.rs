//! containerd's event endpoint: the ttrpc service
//! `containerd.services.events.ttrpc.v1.Events/Forward` a shim dials at the
//! address containerd puts in `TTRPC_ADDRESS`.
//!
//! [`EventsSink`] serves it on a unix socket and records every envelope in
//! arrival order, with the event decoded, so that tests can wait for an event
//! and assert the order of topics (create before start before exit before
//! delete). It stops serving and removes its socket on drop.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use corral_proto::containerd::shim::event::Envelope;
use corral_proto::containerd::shim::events::ForwardRequest;
use corral_proto::containerd::shim_sync::{create_events, Events};
use corral_proto::protobuf::well_known_types::empty::Empty;
use corral_proto::ttrpc;

use crate::cleanup::Cleanup;
use crate::error::{Context, Error, Result};

/// A task event, decoded as the runtime decodes it: the sink checks what
/// shims send against the same reading corrald has of it.
pub use corral_runtime::events::Event;

/// One envelope as the sink received it.
#[derive(Clone, Debug)]
pub struct ReceivedEvent {
    /// Position in arrival order, from 0.
    pub index: usize,
    pub topic: String,
    pub namespace: String,
    /// The envelope's timestamp, set by the publisher; `None` when absent.
    pub timestamp: Option<SystemTime>,
    pub event: Event,
    /// When the sink received it.
    pub received_at: Instant,
    /// The envelope exactly as it arrived.
    pub envelope: Envelope,
}

#[derive(Default)]
struct Shared {
    events: Mutex<Vec<ReceivedEvent>>,
    arrived: Condvar,
    reject: AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Vec<ReceivedEvent>> {
        self.events.lock().unwrap_or_else(|e| e.into_inner())
    }
}

struct Service(Arc<Shared>);

impl Events for Service {
    fn forward(&self, _ctx: &ttrpc::TtrpcContext, req: ForwardRequest) -> ttrpc::Result<Empty> {
        if self.0.reject.load(Ordering::SeqCst) {
            return Err(ttrpc::Error::RpcStatus(ttrpc::get_status(
                ttrpc::Code::UNAVAILABLE,
                "events sink is rejecting events",
            )));
        }
        let envelope = req.envelope.into_option().unwrap_or_default();
        let timestamp = envelope.timestamp.as_ref().and_then(|t| {
            let secs = u64::try_from(t.seconds).ok()?;
            let nanos = u32::try_from(t.nanos).ok()?;
            UNIX_EPOCH.checked_add(Duration::new(secs, nanos))
        });
        let event = match envelope.event.as_ref() {
            Some(any) => Event::decode(any),
            // The envelope carried no event: a decodable nothing.
            None => Event::Other(String::new()),
        };
        let mut events = self.0.lock();
        let received = ReceivedEvent {
            index: events.len(),
            topic: envelope.topic.clone(),
            namespace: envelope.namespace.clone(),
            timestamp,
            event,
            received_at: Instant::now(),
            envelope,
        };
        events.push(received);
        drop(events);
        self.0.arrived.notify_all();
        Ok(Empty::new())
    }
}

/// Serves containerd's events service and records what arrives.
pub struct EventsSink {
    socket: PathBuf,
    shared: Arc<Shared>,
    server: Option<ttrpc::Server>,
}

impl EventsSink {
    /// Serves on a new unix socket at `socket`.
    pub fn start(socket: impl Into<PathBuf>) -> Result<Self> {
        let socket = socket.into();
        let shared = Arc::new(Shared::default());
        let service = create_events(Arc::new(Service(shared.clone())));
        let address = format!("unix://{}", socket.display());
        let mut server = ttrpc::Server::new()
            .bind(&address)
            .context(|| format!("bind events sink at {address}"))?
            .register_service(service);
        server
            .start()
            .context(|| format!("start events sink at {address}"))?;
        Ok(EventsSink {
            socket,
            shared,
            server: Some(server),
        })
    }

    /// Serves on a new socket in the test's run directory.
    pub fn start_in(cleanup: &Cleanup) -> Result<Self> {
        let socket = cleanup
            .run_dir()
            .join(format!("{}.sock", cleanup.local_name("events")));
        Self::start(socket)
    }

    /// The socket path, as containerd passes it in `TTRPC_ADDRESS`.
    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    /// The socket as a ttrpc address, `unix:///…`.
    pub fn address(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// Makes every following Forward fail with `UNAVAILABLE` (nothing is
    /// recorded) until called with `false`: a containerd that is restarting.
    pub fn reject(&self, reject: bool) {
        self.shared.reject.store(reject, Ordering::SeqCst);
    }

    /// Everything received so far, in arrival order.
    pub fn events(&self) -> Vec<ReceivedEvent> {
        self.shared.lock().clone()
    }

    /// The topics received so far, in arrival order.
    pub fn topics(&self) -> Vec<String> {
        self.shared.lock().iter().map(|e| e.topic.clone()).collect()
    }

    /// How many envelopes have arrived.
    pub fn len(&self) -> usize {
        self.shared.lock().len()
    }

    /// Whether nothing has arrived.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The first event, received at any time, with `topic` that `matches`
    /// accepts; waits up to `timeout` for it.
    pub fn wait_for(
        &self,
        topic: &str,
        matches: impl Fn(&ReceivedEvent) -> bool,
        timeout: Duration,
    ) -> Result<ReceivedEvent> {
        self.wait_for_from(0, topic, matches, timeout)
    }

    /// Like [`EventsSink::wait_for`], looking only at events from index
    /// `from` on: what happened after a point the test marked with [`EventsSink::len`].
    pub fn wait_for_from(
        &self,
        from: usize,
        topic: &str,
        matches: impl Fn(&ReceivedEvent) -> bool,
        timeout: Duration,
    ) -> Result<ReceivedEvent> {
        let found = self.wait_until(timeout, |events| {
            events
                .iter()
                .skip(from)
                .find(|e| e.topic == topic && matches(e))
                .cloned()
        });
        found.ok_or_else(|| {
            Error::Timeout(format!(
                "no event {topic} matching after {timeout:?}; received {:?}",
                self.topics()
            ))
        })
    }

    /// Waits until at least `count` envelopes have arrived; returns them all.
    pub fn wait_for_count(&self, count: usize, timeout: Duration) -> Result<Vec<ReceivedEvent>> {
        self.wait_until(timeout, |events| {
            (events.len() >= count).then(|| events.to_vec())
        })
        .ok_or_else(|| {
            Error::Timeout(format!(
                "{} of {count} events after {timeout:?}: {:?}",
                self.len(),
                self.topics()
            ))
        })
    }

    fn wait_until<T>(
        &self,
        timeout: Duration,
        check: impl Fn(&[ReceivedEvent]) -> Option<T>,
    ) -> Option<T> {
        let deadline = Instant::now() + timeout;
        let mut events = self.shared.lock();
        loop {
            if let Some(found) = check(&events) {
                return Some(found);
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            events = self
                .shared
                .arrived
                .wait_timeout(events, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// How long dropping a sink waits for ttrpc to close its connections.
const DISCONNECT_GRACE: Duration = Duration::from_secs(2);

impl Drop for EventsSink {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.socket);
        let Some(server) = self.server.take() else {
            return;
        };
        let listener = server.as_raw_fd();
        let server = server.stop_listen();
        // ttrpc 0.10 never closes the listening socket; after stop_listen
        // nothing uses it any more.
        // SAFETY: the fd is the server's own listener, whose thread has been
        // joined, and ttrpc has no code path that closes it.
        unsafe { libc::close(listener) };
        // ttrpc 0.10's disconnect can wait forever when a client vanishes
        // while it runs (a shim killed just before the sink drops): its
        // connection handler then never learns to quit. A test must not hang
        // on that, so the wait is bounded and a stuck disconnect is left to
        // the process's exit.
        let (done, finished) = std::sync::mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name("events-sink-stop".into())
            .spawn(move || {
                server.disconnect();
                let _ = done.send(());
            });
        if spawned.is_ok() && finished.recv_timeout(DISCONNECT_GRACE).is_err() {
            eprintln!(
                "corral-e2e: events sink {}: ttrpc disconnect still waits after {DISCONNECT_GRACE:?}; left running",
                self.socket.display()
            );
        }
    }
}
