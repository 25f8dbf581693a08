//! The streaming server behind Exec, Attach and PortForward (issue 6), as
//! kubelet's own streaming server serves them.
//!
//! An RPC validates its request and stores it under a single-use token
//! ([`token`]); the URL it returns points at [`StreamingServer`], whose
//! HTTP/1.1 listener ([`server`]) takes the token, upgrades the connection
//! to SPDY/3.1 ([`spdy`]) or WebSocket ([`websocket`]) and runs the
//! request: an exec process in the pod's shim ([`remotecommand`]) or TCP
//! connections inside the pod's network namespace ([`portforward`]).
//!
//! This module owns the listener, the tokens and the exec processes it
//! starts (killed and deleted when their client goes away); it reads the
//! [`Node`](crate::node::Node) but never changes a pod or container record.

pub mod attach;
pub mod portforward;
pub mod remotecommand;
pub mod server;
pub mod spdy;
pub mod token;
pub mod websocket;

use std::io;

pub use server::StreamingServer;

/// Outgoing messages queued per connection before a writer blocks its
/// producers: this, times the 32 KiB a message carries at most, bounds
/// what corrald buffers for a slow client.
pub(crate) const OUT_QUEUE: usize = 16;

/// Incoming messages queued per stream before the connection's reader
/// waits for the consumer (the process's stdin, a pod's TCP socket).
pub(crate) const INPUT_QUEUE: usize = 8;

/// The largest piece read from a process or a socket at once.
pub(crate) const READ_CHUNK: usize = 32 * 1024;

/// What the protocol-neutral layers ask a connection's writer to send. The
/// `u32` is the SPDY stream id or the WebSocket channel.
#[derive(Debug)]
pub enum Out {
    Data(u32, Vec<u8>),
    /// The end of what this side sends on a stream (SPDY only).
    Fin(u32),
    /// Abandons a stream (SPDY only).
    Reset(u32, u32),
    /// Accepts a stream the client opened (SPDY only).
    Reply(u32),
    /// Answers a client's ping (SPDY).
    Ping(u32),
    /// Answers a client's ping (WebSocket).
    Pong(Vec<u8>),
    /// Ends the connection after everything queued before it.
    Shutdown,
}

#[derive(Debug, thiserror::Error)]
pub enum StreamingError {
    /// The request itself is wrong (no stream asked, tty with stderr...).
    #[error("{0}")]
    InvalidArgument(String),

    /// The container or pod sandbox named does not exist.
    #[error("{0}")]
    NotFound(String),

    /// It exists but is not in a state to stream from (not running, not
    /// ready).
    #[error("{0}")]
    FailedPrecondition(String),

    /// corrald cannot serve this kind of request.
    #[error("{0}")]
    Unimplemented(String),

    /// Too many URLs handed out and not used yet.
    #[error("{0}")]
    ResourceExhausted(String),

    /// The listener or the system refused something (system failure).
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: io::Error,
    },

    /// The task service, the shim or the node failed (system failure).
    #[error("{0}")]
    Runtime(String),

    /// The daemon is shutting down: the node is gone.
    #[error("corrald is shutting down")]
    ShuttingDown,
}

impl From<crate::error::Error> for StreamingError {
    fn from(e: crate::error::Error) -> StreamingError {
        use crate::error::Error;
        match e {
            Error::NotFound(m) => StreamingError::NotFound(m),
            Error::InvalidArgument(m) => StreamingError::InvalidArgument(m),
            Error::FailedPrecondition(m) => StreamingError::FailedPrecondition(m),
            other => StreamingError::Runtime(other.to_string()),
        }
    }
}

impl From<corral_runtime::Error> for StreamingError {
    fn from(e: corral_runtime::Error) -> StreamingError {
        StreamingError::from(crate::error::Error::from(e))
    }
}
