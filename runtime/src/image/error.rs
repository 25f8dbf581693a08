//! The image store's one error type.
//!
//! Owns the classification of every failure of a pull, an import, a lookup, a removal or a
//! snapshot operation into the kinds the CRI front end maps to gRPC codes; each message names
//! the image (or snapshot) and the cause. It does not know gRPC: `cri/` does the mapping.

use super::content::ContentError;
use super::registry::RegistryError;
use super::unpack::UnpackError;

/// Why an image or snapshot operation failed. Every message names the object and the cause.
///
/// Cloneable because two pulls that share one download both report its failure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImageError {
    /// No such image, snapshot, manifest or platform (gRPC NotFound).
    #[error("{0}")]
    NotFound(String),
    /// A malformed reference or argument (gRPC InvalidArgument).
    #[error("{0}")]
    InvalidArgument(String),
    /// A snapshot key that is taken (gRPC AlreadyExists).
    #[error("{0}")]
    AlreadyExists(String),
    /// The registry refused the credentials, or asked for some (gRPC Unauthenticated or
    /// PermissionDenied).
    #[error("{0}")]
    Unauthorized(String),
    /// The registry is down, cut the connection or failed; worth retrying, and a retry
    /// resumes what was fetched (gRPC Unavailable).
    #[error("{0}")]
    Unavailable(String),
    /// The image is used by a container (gRPC FailedPrecondition).
    #[error("{0}")]
    FailedPrecondition(String),
    /// The content is wrong: hostile or corrupt layers, digests or diff_ids that do not
    /// match, unknown media types, malformed manifests. A retry will not help (gRPC
    /// InvalidArgument or FailedPrecondition, the daemon's choice).
    #[error("{0}")]
    BadImage(String),
    /// The node's own failure: disk, metadata store (gRPC Internal).
    #[error("{0}")]
    Internal(String),
}

pub type Result<T, E = ImageError> = std::result::Result<T, E>;

impl ImageError {
    /// The same error with `context` (usually "pulling IMAGE") in front of the message.
    pub fn context(self, context: impl std::fmt::Display) -> ImageError {
        use ImageError::*;
        let wrap = |m: String| format!("{context}: {m}");
        match self {
            NotFound(m) => NotFound(wrap(m)),
            InvalidArgument(m) => InvalidArgument(wrap(m)),
            AlreadyExists(m) => AlreadyExists(wrap(m)),
            Unauthorized(m) => Unauthorized(wrap(m)),
            Unavailable(m) => Unavailable(wrap(m)),
            FailedPrecondition(m) => FailedPrecondition(wrap(m)),
            BadImage(m) => BadImage(wrap(m)),
            Internal(m) => Internal(wrap(m)),
        }
    }

    pub fn message(&self) -> &str {
        use ImageError::*;
        match self {
            NotFound(m)
            | InvalidArgument(m)
            | AlreadyExists(m)
            | Unauthorized(m)
            | Unavailable(m)
            | FailedPrecondition(m)
            | BadImage(m)
            | Internal(m) => m,
        }
    }

    pub(crate) fn internal(what: impl std::fmt::Display, e: impl std::fmt::Display) -> ImageError {
        ImageError::Internal(format!("{what}: {e}"))
    }
}

impl From<RegistryError> for ImageError {
    fn from(e: RegistryError) -> Self {
        use RegistryError as R;
        let m = e.to_string();
        match e {
            R::Unauthorized { .. } => ImageError::Unauthorized(m),
            R::NotFound { .. } => ImageError::NotFound(m),
            R::Server { .. }
            | R::UnexpectedStatus { .. }
            | R::Connect { .. }
            | R::Tls { .. }
            | R::Http { .. }
            | R::Interrupted { .. }
            | R::Truncated { .. }
            | R::Timeout { .. }
            | R::TooManyRedirects { .. }
            | R::BadRedirect { .. }
            | R::RangeNotSatisfiable { .. } => ImageError::Unavailable(m),
            R::ManifestTooLarge { .. }
            | R::SizeExceeded { .. }
            | R::DigestMismatch { .. }
            | R::UnsupportedMediaType { .. }
            | R::BadResponse { .. } => ImageError::BadImage(m),
            R::InvalidArgument { .. } => ImageError::InvalidArgument(m),
            R::Config(_) => ImageError::Internal(m),
        }
    }
}

impl From<ContentError> for ImageError {
    fn from(e: ContentError) -> Self {
        use ContentError as C;
        let m = e.to_string();
        match e {
            C::NotFound(_) => ImageError::NotFound(m),
            C::DigestMismatch { .. } | C::SizeExceeded { .. } | C::UnsupportedAlgorithm(_) => {
                ImageError::BadImage(m)
            }
            // Another process is fetching the blob, or it is short: both clear up on a retry.
            C::Locked { .. } | C::Incomplete { .. } => ImageError::Unavailable(m),
            C::Io { .. } | C::AlreadyExists(_) | C::Poisoned { .. } => ImageError::Internal(m),
        }
    }
}

impl From<UnpackError> for ImageError {
    fn from(e: UnpackError) -> Self {
        if e.is_bad_layer() {
            ImageError::BadImage(e.to_string())
        } else {
            ImageError::Internal(e.to_string())
        }
    }
}
