//! The one error type of the fixtures: every variant names what was being
//! done, so a failing test says which step broke without a backtrace.

use std::path::PathBuf;
use std::process::ExitStatus;

/// What went wrong while setting up or driving a fixture.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file-system or process operation failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// A ttrpc call or server operation failed.
    #[error("{context}: {source}")]
    Ttrpc {
        context: String,
        #[source]
        source: corral_proto::ttrpc::Error,
    },
    /// A command ran but exited unsuccessfully.
    #[error("{command} exited with {status}: {stderr}")]
    Command {
        command: String,
        status: ExitStatus,
        stdout: String,
        stderr: String,
    },
    /// A peer answered something the protocol does not allow.
    #[error("protocol: {0}")]
    Protocol(String),
    /// Waiting for something took longer than the caller allowed.
    #[error("timed out: {0}")]
    Timeout(String),
    /// Something the fixture needs is missing on this machine.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// A file the fixture expected is not there.
    #[error("not found: {0}")]
    NotFound(PathBuf),
}

impl Error {
    /// The status code of a failed RPC, for tests that assert on it.
    pub fn rpc_code(&self) -> Option<corral_proto::ttrpc::Code> {
        match self {
            Error::Ttrpc {
                source: corral_proto::ttrpc::Error::RpcStatus(status),
                ..
            } => Some(status.code()),
            _ => None,
        }
    }
}

/// Result of a fixture operation.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Adds a description of the step to low-level errors.
pub(crate) trait Context<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> Context<T> for std::result::Result<T, std::io::Error> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Io {
            context: what(),
            source,
        })
    }
}

impl<T> Context<T> for std::result::Result<T, nix::Error> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|errno| Error::Io {
            context: what(),
            source: std::io::Error::from(errno),
        })
    }
}

impl<T> Context<T> for std::result::Result<T, corral_proto::ttrpc::Error> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Ttrpc {
            context: what(),
            source,
        })
    }
}

impl<T> Context<T> for std::result::Result<T, corral_proto::protobuf::Error> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::Protocol(format!("{}: {e}", what())))
    }
}

impl<T> Context<T> for std::result::Result<T, serde_json::Error> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::Protocol(format!("{}: {e}", what())))
    }
}
