//! The one place where errors become gRPC statuses.
//!
//! kubelet and crictl act on the code (they retry Unavailable, treat
//! NotFound on Stop/Remove as done, surface InvalidArgument to the user), so
//! every failure keeps its kind from the runtime layer up to the wire. RPC
//! handlers return [`Error`]; `?` turns it into a [`tonic::Status`] through
//! the `From` impl below, and nothing else in the crate builds a status.

use std::path::PathBuf;

use corral_proto::protobuf::Enum;
use tonic::{Code, Status};

use crate::config::ConfigError;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What a CRI RPC returns.
pub type RpcResult<T> = std::result::Result<tonic::Response<T>, Status>;

/// The answer of an RPC a later slice implements: `Unimplemented`, naming
/// the RPC, so that a client learns which call is missing.
pub fn not_yet<T>(rpc: &'static str) -> RpcResult<T> {
    Err(Error::Unimplemented(rpc).into())
}

/// What can go wrong in the daemon: while starting (configuration, socket)
/// or while serving an RPC.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),

    #[error(transparent)]
    Runtime(#[from] corral_runtime::Error),

    #[error(transparent)]
    Image(#[from] corral_runtime::image::ImageError),

    /// The RPC exists in CRI v1 but corrald does not serve it yet.
    #[error("{0} is not implemented yet")]
    Unimplemented(&'static str),

    /// A request field the daemon itself rejects; the message names it.
    #[error("{0}")]
    InvalidArgument(String),

    /// The id or name asked for names nothing.
    #[error("{0}")]
    NotFound(String),

    /// A name already taken; the message names its holder.
    #[error("{0}")]
    AlreadyExists(String),

    /// The object is not in a state the call can act on.
    #[error("{0}")]
    FailedPrecondition(String),

    /// The caller's deadline (or the call's own timeout) passed.
    #[error("{0}")]
    DeadlineExceeded(String),

    /// A failure of the daemon itself, not of the request.
    #[error("{0}")]
    Internal(String),

    #[error(transparent)]
    Store(#[from] crate::store::StoreError),

    #[error(transparent)]
    Netns(#[from] crate::netns::NetnsError),

    #[error(transparent)]
    Cni(#[from] crate::cni::CniError),

    #[error(transparent)]
    Spec(#[from] crate::spec::SpecError),

    #[error(transparent)]
    SandboxFiles(#[from] crate::sandbox_files::SandboxFilesError),

    #[error(transparent)]
    Pause(#[from] crate::pause::PauseError),

    #[error(transparent)]
    Streaming(#[from] crate::streaming::StreamingError),

    /// Another process answers on the socket: two daemons must not share
    /// one root and one socket.
    #[error("another corrald is already serving on {0}; refusing to start")]
    SocketInUse(PathBuf),

    /// Something other than a socket sits where the socket goes; it is not
    /// ours to delete.
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),

    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("serving CRI on {path}: {source}")]
    Serve {
        path: PathBuf,
        #[source]
        source: tonic::transport::Error,
    },
}

impl Error {
    pub fn io(what: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            what,
            path: path.into(),
            source,
        }
    }
}

impl From<Error> for Status {
    fn from(err: Error) -> Status {
        match err {
            Error::Runtime(e) => runtime_status(&e),
            Error::Image(e) => image_status(&e),
            Error::Unimplemented(_) => Status::unimplemented(err.to_string()),
            Error::InvalidArgument(_) => Status::invalid_argument(err.to_string()),
            Error::NotFound(_) => Status::not_found(err.to_string()),
            Error::AlreadyExists(_) => Status::already_exists(err.to_string()),
            Error::FailedPrecondition(_) => Status::failed_precondition(err.to_string()),
            Error::DeadlineExceeded(_) => Status::deadline_exceeded(err.to_string()),
            Error::Internal(_) | Error::Store(_) | Error::Pause(_) => {
                Status::internal(err.to_string())
            }
            Error::Netns(ref e) => Status::new(netns_code(e), err.to_string()),
            Error::Cni(ref e) => Status::new(cni_code(e), err.to_string()),
            Error::Spec(ref e) => Status::new(spec_code(e), err.to_string()),
            Error::SandboxFiles(ref e) => Status::new(sandbox_files_code(e), err.to_string()),
            Error::Streaming(ref e) => Status::new(streaming_code(e), err.to_string()),
            // Startup failures never reach a client; should one be raised
            // while serving, it is the daemon's own fault, not the caller's.
            Error::Config(_)
            | Error::SocketInUse(_)
            | Error::NotASocket(_)
            | Error::Io { .. }
            | Error::Serve { .. } => Status::internal(err.to_string()),
        }
    }
}

fn netns_code(e: &crate::netns::NetnsError) -> Code {
    use crate::netns::NetnsError as E;
    match e {
        E::InvalidName(_) => Code::InvalidArgument,
        E::AlreadyExists(_) => Code::AlreadyExists,
        E::NotFound(_) => Code::NotFound,
        _ => Code::Internal,
    }
}

/// A network that is not configured yet is a state the node can leave
/// (kubelet retries); a plugin's failure is the node's, not the caller's.
fn cni_code(e: &crate::cni::CniError) -> Code {
    use crate::cni::CniError as E;
    match e {
        E::NotReady(_) => Code::FailedPrecondition,
        E::InvalidInput(_) => Code::InvalidArgument,
        E::Timeout { .. } => Code::DeadlineExceeded,
        _ => Code::Internal,
    }
}

fn spec_code(e: &crate::spec::SpecError) -> Code {
    use crate::seccomp::SeccompError as S;
    use crate::spec::SpecError as E;
    match e {
        E::InvalidArgument(_) => Code::InvalidArgument,
        // A Localhost profile the node does not have: kubelet shows
        // NotFound as the profile missing, as with containerd.
        E::Seccomp(S::NotFound { .. }) => Code::NotFound,
        E::Seccomp(S::Read { .. }) | E::Io { .. } => Code::Internal,
        E::Seccomp(_) => Code::InvalidArgument,
    }
}

fn streaming_code(e: &crate::streaming::StreamingError) -> Code {
    use crate::streaming::StreamingError as E;
    match e {
        E::InvalidArgument(_) => Code::InvalidArgument,
        E::NotFound(_) => Code::NotFound,
        E::FailedPrecondition(_) => Code::FailedPrecondition,
        E::Unimplemented(_) => Code::Unimplemented,
        E::ResourceExhausted(_) => Code::ResourceExhausted,
        E::ShuttingDown => Code::Unavailable,
        E::Io { .. } | E::Runtime(_) => Code::Internal,
    }
}

fn sandbox_files_code(e: &crate::sandbox_files::SandboxFilesError) -> Code {
    use crate::sandbox_files::SandboxFilesError as E;
    match e {
        E::InvalidInput { .. } => Code::InvalidArgument,
        E::Io { .. } => Code::Internal,
    }
}

/// The status for a runtime-layer error. Its message already names the
/// object (the id, the shim, the path), so it is passed on unchanged.
pub fn runtime_status(err: &corral_runtime::Error) -> Status {
    use corral_runtime::Error as E;
    let code = match err {
        E::InvalidArgument(_) => Code::InvalidArgument,
        E::NotFound(_) => Code::NotFound,
        E::AlreadyExists(_) => Code::AlreadyExists,
        E::FailedPrecondition(_) => Code::FailedPrecondition,
        E::Unimplemented(_) => Code::Unimplemented,
        E::Timeout(_) => Code::DeadlineExceeded,
        // The shim could not be started or reached: the pod's process is
        // not (yet) serving, which a retry may fix.
        E::Shim { .. } => Code::Unavailable,
        // The shim answered with a status of its own; ttrpc and gRPC share
        // code numbers, so its meaning (Unavailable, ResourceExhausted...)
        // goes through. A shim that failed with "OK" is a shim bug.
        E::ShimRpc { code, .. } => match Code::from_i32(code.value()) {
            Code::Ok => Code::Internal,
            other => other,
        },
        E::Io { .. } | E::Internal(_) => Code::Internal,
    };
    Status::new(code, err.to_string())
}

/// The status for an image-store error; its message already names the
/// image and the cause.
///
/// A registry that refused or asked for credentials is `Unauthenticated`:
/// kubelet reports every failed pull as `ErrImagePull` whatever the code,
/// and containerd's CRI plugin, which kubelet is tested against, passes the
/// registry's 401 through as Unauthenticated too (PermissionDenied would
/// claim the caller is known but not allowed, which a 401 does not say).
///
/// Bad content (a digest or diff_id that does not match, a malformed
/// manifest, an unknown media type) is `InvalidArgument`: the image the
/// caller named is not one the node can run, and a retry of the same
/// reference will not help. Internal would blame the node and
/// FailedPrecondition suggest a state that could change.
pub fn image_status(err: &corral_runtime::image::ImageError) -> Status {
    use corral_runtime::image::ImageError as E;
    let code = match err {
        E::NotFound(_) => Code::NotFound,
        E::InvalidArgument(_) | E::BadImage(_) => Code::InvalidArgument,
        E::AlreadyExists(_) => Code::AlreadyExists,
        E::Unauthorized(_) => Code::Unauthenticated,
        E::Unavailable(_) => Code::Unavailable,
        E::FailedPrecondition(_) => Code::FailedPrecondition,
        E::Internal(_) => Code::Internal,
    };
    Status::new(code, err.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use corral_proto::ttrpc;
    use corral_runtime::Error as R;

    fn status(err: R) -> Status {
        Status::from(Error::from(err))
    }

    #[test]
    fn runtime_errors_keep_their_kind_and_message() {
        let cases = [
            (
                R::InvalidArgument("bad id \"a/b\"".into()),
                Code::InvalidArgument,
            ),
            (
                R::NotFound("container abc not found".into()),
                Code::NotFound,
            ),
            (
                R::AlreadyExists("pod web exists".into()),
                Code::AlreadyExists,
            ),
            (
                R::FailedPrecondition("container abc is running".into()),
                Code::FailedPrecondition,
            ),
            (R::Unimplemented("checkpoint".into()), Code::Unimplemented),
            (
                R::Timeout("stop of container abc".into()),
                Code::DeadlineExceeded,
            ),
            (R::Internal("metadata store corrupt".into()), Code::Internal),
        ];
        for (err, code) in cases {
            let message = err.to_string();
            let status = status(err);
            assert_eq!(status.code(), code, "{message}");
            assert_eq!(status.message(), message);
        }
    }

    #[test]
    fn an_unreachable_shim_is_unavailable_and_named() {
        let status = status(R::shim("pod-1234", "connection refused"));
        assert_eq!(status.code(), Code::Unavailable);
        assert!(
            status.message().contains("pod-1234"),
            "{}",
            status.message()
        );
    }

    #[test]
    fn a_shim_status_code_goes_through() {
        let rpc = |code| R::ShimRpc {
            shim: "pod-1".into(),
            method: "Kill",
            code,
            status: "boom".into(),
        };
        assert_eq!(
            status(rpc(ttrpc::Code::DEADLINE_EXCEEDED)).code(),
            Code::DeadlineExceeded
        );
        assert_eq!(
            status(rpc(ttrpc::Code::UNAVAILABLE)).code(),
            Code::Unavailable
        );
        assert_eq!(status(rpc(ttrpc::Code::INTERNAL)).code(), Code::Internal);
        assert_eq!(status(rpc(ttrpc::Code::OK)).code(), Code::Internal);
        let msg = status(rpc(ttrpc::Code::UNKNOWN)).message().to_string();
        assert!(msg.contains("Kill") && msg.contains("pod-1"), "{msg}");
    }

    #[test]
    fn io_errors_are_internal_and_name_the_path() {
        let err = R::io(
            "create bundle",
            "/run/corral/x",
            std::io::Error::from(std::io::ErrorKind::PermissionDenied),
        );
        let status = status(err);
        assert_eq!(status.code(), Code::Internal);
        assert!(status.message().contains("/run/corral/x"));
    }

    #[test]
    fn image_errors_keep_their_kind_and_message() {
        use corral_runtime::image::ImageError as I;
        let cases = [
            (
                I::NotFound("image \"busybox:nope\" not found".into()),
                Code::NotFound,
            ),
            (I::InvalidArgument("bad ref".into()), Code::InvalidArgument),
            (I::BadImage("digest mismatch".into()), Code::InvalidArgument),
            (I::AlreadyExists("snapshot k".into()), Code::AlreadyExists),
            (I::Unauthorized("401 from r".into()), Code::Unauthenticated),
            (I::Unavailable("registry down".into()), Code::Unavailable),
            (
                I::FailedPrecondition("in use".into()),
                Code::FailedPrecondition,
            ),
            (I::Internal("disk".into()), Code::Internal),
        ];
        for (err, code) in cases {
            let message = err.to_string();
            let status = Status::from(Error::from(err));
            assert_eq!(status.code(), code, "{message}");
            assert_eq!(status.message(), message);
        }
    }

    #[test]
    fn daemon_errors_map_too() {
        let s = Status::from(Error::Unimplemented("RunPodSandbox"));
        assert_eq!(s.code(), Code::Unimplemented);
        assert_eq!(s.message(), "RunPodSandbox is not implemented yet");

        let s = Status::from(Error::InvalidArgument(
            "pod CIDR \"x\" is not a CIDR".into(),
        ));
        assert_eq!(s.code(), Code::InvalidArgument);

        let s = Status::from(Error::io(
            "read",
            "/etc/cni/net.d",
            std::io::Error::from(std::io::ErrorKind::PermissionDenied),
        ));
        assert_eq!(s.code(), Code::Internal);
        assert!(s.message().contains("/etc/cni/net.d"));
    }
}
