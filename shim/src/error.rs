//! The shim's error type and its mapping onto ttrpc status codes.
//!
//! Every task RPC returns [`Error`]; [`Error::into_ttrpc`] is the one place a
//! cause becomes the code containerd's client (and corral's runtime) branches
//! on: NotFound, AlreadyExists, InvalidArgument, FailedPrecondition,
//! Unimplemented, or Internal for a failure of the OCI runtime or the host.

use std::{io, path::PathBuf};

use corral_proto::ttrpc::{self, Code};

use crate::runc::RuncError;

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    InvalidArgument(String),

    #[error("{0}")]
    NotFound(String),

    #[error("{0}")]
    AlreadyExists(String),

    #[error("{0}")]
    FailedPrecondition(String),

    #[error("{0}")]
    Unimplemented(String),

    #[error(transparent)]
    Runc(#[from] RuncError),

    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },

    #[error("{0}")]
    Internal(String),
}

impl Error {
    /// Wraps an I/O error with what the shim was doing and on which path.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    pub fn io_path(what: &str, path: &std::path::Path, source: io::Error) -> Self {
        Error::io(format!("{what} {}", path.display()), source)
    }

    pub fn code(&self) -> Code {
        match self {
            Error::InvalidArgument(_) => Code::INVALID_ARGUMENT,
            Error::NotFound(_) => Code::NOT_FOUND,
            Error::AlreadyExists(_) => Code::ALREADY_EXISTS,
            Error::FailedPrecondition(_) => Code::FAILED_PRECONDITION,
            Error::Unimplemented(_) => Code::UNIMPLEMENTED,
            Error::Runc(RuncError::BinaryNotFound { .. }) => Code::FAILED_PRECONDITION,
            Error::Io { source, .. } if source.kind() == io::ErrorKind::NotFound => Code::NOT_FOUND,
            Error::Runc(_) | Error::Io { .. } | Error::Internal(_) => Code::INTERNAL,
        }
    }

    pub fn into_ttrpc(self) -> ttrpc::Error {
        let code = self.code();
        let message = self.to_string();
        log::debug!("task rpc failed ({code:?}): {message}");
        ttrpc::Error::RpcStatus(ttrpc::get_status(code, message))
    }
}

/// A path that must be absolute, as every stdio URI and bundle path must be.
pub fn absolute(path: &str, what: &str) -> Result<PathBuf> {
    let p = PathBuf::from(path);
    if !p.is_absolute() {
        return Err(Error::InvalidArgument(format!(
            "{what} must be an absolute path, got {path:?}"
        )));
    }
    Ok(p)
}
