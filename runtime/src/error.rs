//! The runtime layer's error. `cri/` maps it to gRPC codes in one place,
//! so each variant says which kind of failure it is, not just what failed.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The caller asked for something malformed (an id with `/`, an
    /// unknown runtime name).
    #[error("{0}")]
    InvalidArgument(String),

    #[error("{0}")]
    NotFound(String),

    #[error("{0}")]
    AlreadyExists(String),

    /// The object exists but is in the wrong state for the request.
    #[error("{0}")]
    FailedPrecondition(String),

    #[error("{0}")]
    Unimplemented(String),

    /// A shim could not be started or reached; names the shim and the cause.
    #[error("shim {shim}: {cause}")]
    Shim { shim: String, cause: String },

    /// A shim answered a task RPC with an error status.
    #[error("{method} on shim {shim}: {status}")]
    ShimRpc {
        shim: String,
        method: &'static str,
        code: ttrpc::Code,
        status: String,
    },

    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("timed out: {0}")]
    Timeout(String),

    #[error("{0}")]
    Internal(String),
}

impl Error {
    pub fn io(what: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            what,
            path: path.into(),
            source,
        }
    }

    pub fn shim(shim: impl Into<String>, cause: impl std::fmt::Display) -> Self {
        Error::Shim {
            shim: shim.into(),
            cause: cause.to_string(),
        }
    }

    /// An error status from a shim keeps its meaning: NotFound stays
    /// NotFound, so that the daemon can answer kubelet with the right code.
    pub fn from_shim_status(shim: &str, method: &'static str, err: ttrpc::Error) -> Self {
        match err {
            ttrpc::Error::RpcStatus(status) => {
                let code = status.code();
                let message = status.message().to_string();
                match code {
                    ttrpc::Code::NOT_FOUND => Error::NotFound(message),
                    ttrpc::Code::ALREADY_EXISTS => Error::AlreadyExists(message),
                    ttrpc::Code::INVALID_ARGUMENT => Error::InvalidArgument(message),
                    ttrpc::Code::FAILED_PRECONDITION => Error::FailedPrecondition(message),
                    ttrpc::Code::UNIMPLEMENTED => Error::Unimplemented(message),
                    _ => Error::ShimRpc {
                        shim: shim.to_string(),
                        method,
                        code,
                        status: message,
                    },
                }
            }
            other => Error::Shim {
                shim: shim.to_string(),
                cause: format!("{method}: {other}"),
            },
        }
    }
}
