//! The daemon's life: its directories, its socket, serving CRI on it, and a
//! graceful stop.
//!
//! This module owns the unix socket kubelet dials: taking it over from a
//! daemon that died (a stale file) but never from one that still answers,
//! its mode, and removing it on the way out, but only if it is still the one
//! this process bound. It also owns the order of shutdown on SIGTERM or
//! SIGINT: stop accepting, let RPCs in flight finish for a bounded time,
//! remove the socket. Pods are not touched by a stop: they live in their
//! shims, not in the daemon.

use std::fs::DirBuilder;
use std::io::ErrorKind;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use corral_runtime::image::{ImageStore, StoreOptions};
use k8s_cri::v1::image_service_server::ImageServiceServer;
use k8s_cri::v1::runtime_service_server::RuntimeServiceServer;
use nix::sys::stat::Mode;
use tokio::net::{UnixListener, UnixStream};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio_stream::wrappers::UnixListenerStream;

use corral_runtime::shim_manager::ShimManagerConfig;
use corral_runtime::task_service::{TaskService, TaskServiceConfig};

use crate::cni::CniManager;
use crate::config::Config;
use crate::deadline::take_grpc_timeout;
use crate::error::{Error, Result};
use crate::image_service::CriImageService;
use crate::lifecycle;
use crate::metrics::{MetricsLayer, MetricsServer, Registry};
use crate::node::Node;
use crate::pause;
use crate::runtime_service::CriRuntimeService;
use crate::store::Store;
use crate::streaming::StreamingServer;

/// Owner and group may connect: the group is how an operator lets a
/// non-root crictl in without opening the runtime to every local user.
pub const SOCKET_MODE: u32 = 0o660;

/// Mode of the root, state and socket directories the daemon creates:
/// traversable, not listable, by others (containerd's choice for its own).
pub const DIR_MODE: u32 = 0o711;

/// How long RPCs in flight may take to finish once a stop is asked for.
/// systemd's default stop timeout is 90 s; this leaves it ample margin.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// How long a process found on the socket path gets to accept a connection
/// before it counts as alive: one that accepts is certainly alive, one whose
/// backlog is full is too busy to be dead.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Serves CRI on `config.socket` until SIGTERM or SIGINT, then stops
/// gracefully. Returns an error if it could not start or the server failed.
pub async fn run(config: Arc<Config>) -> Result<()> {
    // Installed before the socket exists: a stop asked for the instant the
    // socket appears must still take the graceful path that removes it.
    let mut signals = StopSignals::install()?;

    for dir in [&config.root, &config.state] {
        create_dir(dir)?;
    }
    let mut store_options = StoreOptions::new(config.images_dir());
    store_options.registry = config.registry_config();
    let store = ImageStore::open(store_options).await.map_err(Error::from)?;
    let node = start_node(&config, store.clone()).await?;
    let streaming = StreamingServer::start(
        &config.streaming.address,
        config.streaming.port,
        Arc::downgrade(&node),
    )
    .await?;
    tracing::info!(address = %streaming.address(), "streaming server for exec, attach and port-forward");
    // Recorded whether or not served: the layer costs a few atomics, and
    // one server stack either way keeps the two configurations alike.
    let registry = Arc::new(Registry::new());
    let metrics = if config.metrics.address.is_empty() {
        None
    } else {
        Some(
            MetricsServer::start(
                &config.metrics.address,
                registry.clone(),
                Arc::downgrade(&node),
            )
            .await?,
        )
    };
    let runtime = CriRuntimeService::new(config.clone())?.with_node(node.clone(), streaming);
    let images = CriImageService::new(store);
    let (listener, socket) = CriSocket::bind(&config.socket).await?;
    tracing::info!(
        socket = %config.socket.display(),
        version = crate::RUNTIME_VERSION,
        "corrald serving CRI v1"
    );

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tonic::transport::Server::builder()
        .layer(tower::util::MapRequestLayer::new(take_grpc_timeout))
        .layer(MetricsLayer::new(registry))
        .add_service(RuntimeServiceServer::new(runtime))
        .add_service(ImageServiceServer::new(images))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async {
            // A dropped sender also means stop.
            let _ = stop_rx.await;
        });
    tokio::pin!(server);
    let serve_error = |source| Error::Serve {
        path: config.socket.clone(),
        source,
    };

    let name = tokio::select! {
        result = &mut server => {
            // The server ended without being asked to: a broken listener.
            return result.map_err(serve_error);
        }
        name = signals.next() => name,
    };
    tracing::info!(
        signal = name,
        grace = ?SHUTDOWN_GRACE,
        "stopping: accepting no new connections, finishing RPCs in flight"
    );
    let _ = stop_tx.send(());
    tokio::select! {
        result = &mut server => result.map_err(serve_error)?,
        () = tokio::time::sleep(SHUTDOWN_GRACE) => {
            tracing::warn!(grace = ?SHUTDOWN_GRACE, "RPCs still in flight after the grace period; abandoning them");
        }
        name = signals.next() => {
            tracing::warn!(signal = name, "second stop signal; abandoning RPCs in flight");
        }
    }
    socket.remove();
    // Scrapes stop with the CRI socket: a stopped daemon has nothing to
    // report.
    drop(metrics);
    // The shims stay: pods keep running while no daemon does.
    node.tasks.shutdown().await;
    tracing::info!("corrald stopped");
    Ok(())
}

/// The task service re-attached to the shims an earlier daemon left, and
/// the pods and containers recovered from the metadata store.
async fn start_node(config: &Arc<Config>, images: ImageStore) -> Result<Arc<Node>> {
    let pause_rootfs = pause::install_rootfs(&config.root.join("pause"))?;
    let handlers = config.handlers()?;
    let tasks = TaskService::start(TaskServiceConfig {
        shims: ShimManagerConfig {
            root: config.root.join("tasks"),
            state: config.state.join("tasks"),
            daemon_address: config.socket.clone(),
            publish_binary: std::env::current_exe()
                .map_err(|e| Error::io("find own binary", "/proc/self/exe", e))?,
            shim_dirs: shim_dirs(),
            debug: false,
        },
        events_socket: config.state.join("events.sock"),
        handlers: handlers.clone(),
    })
    .await?;
    // Subscribed before re-attaching: the exits re-attaching reports
    // (shims that died while no daemon ran) must not be missed.
    let events = tasks.subscribe();
    tasks.reattach().await?;
    let store = Store::open(&config.root.join("cri"))?;
    let cni = CniManager::new(
        config.cni.conf_dir.clone(),
        config.cni.bin_dirs.clone(),
        config.root.join("cni-cache"),
    );
    let node = Arc::new(Node::new(
        config.clone(),
        handlers,
        tasks,
        images,
        cni,
        store,
        pause_rootfs,
    ));
    lifecycle::recover(&node).await?;
    lifecycle::spawn_event_loop(node.clone(), events);
    Ok(node)
}

/// Where shim binaries are looked for before `PATH`: beside corrald, where
/// a build or an install puts corral's own shim.
fn shim_dirs() -> Vec<PathBuf> {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_path_buf))
        .into_iter()
        .collect()
}

/// SIGTERM (systemd, kubelet's node shutdown) and SIGINT (a terminal).
struct StopSignals {
    term: Signal,
    int: Signal,
}

impl StopSignals {
    fn install() -> Result<Self> {
        let install = |kind| {
            signal(kind).map_err(|e| Error::io("install signal handler for", "SIGTERM/SIGINT", e))
        };
        Ok(StopSignals {
            term: install(SignalKind::terminate())?,
            int: install(SignalKind::interrupt())?,
        })
    }

    async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

/// Creates `dir` and its parents; a directory made here gets [`DIR_MODE`],
/// an existing one keeps what its operator gave it.
fn create_dir(dir: &Path) -> Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)
        .map_err(|e| Error::io("create directory", dir, e))
}

/// The socket file this process bound. Removed on [`CriSocket::remove`] or
/// drop, unless another daemon has replaced it since.
#[derive(Debug)]
pub struct CriSocket {
    path: PathBuf,
    /// Which file was bound: a path alone cannot tell our socket from the
    /// next daemon's.
    identity: Identity,
}

impl CriSocket {
    /// Binds `path` with [`SOCKET_MODE`], first removing a stale socket
    /// left by a daemon that died. Refuses if a live process answers there
    /// or if the path holds something other than a socket.
    pub async fn bind(path: &Path) -> Result<(UnixListener, CriSocket)> {
        if let Some(parent) = path.parent() {
            create_dir(parent)?;
        }
        clear_stale(path).await?;

        // bind(2) creates the file with 0777 minus the umask: set the umask
        // so that the socket is never, even briefly, open to others. The
        // umask is process-wide; this runs before any other task starts.
        let previous = nix::sys::stat::umask(Mode::from_bits_truncate(0o777 & !SOCKET_MODE));
        let bound = UnixListener::bind(path);
        nix::sys::stat::umask(previous);
        let listener = bound.map_err(|e| Error::io("bind", path, e))?;

        // Not only the umask: a umask never adds bits, and the mode must be
        // exactly this whatever umask the daemon was started with.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE))
            .map_err(|e| Error::io("chmod", path, e))?;
        // After the chmod, which changes the ctime the identity includes.
        let socket = CriSocket {
            path: path.to_path_buf(),
            identity: identity(path).map_err(|e| Error::io("stat", path, e))?,
        };
        Ok((listener, socket))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes the socket file if it is still ours.
    pub fn remove(self) {
        // Drop does the work; this names the intent at the call site.
        drop(self)
    }
}

impl Drop for CriSocket {
    fn drop(&mut self) {
        match identity(&self.path) {
            Ok(id) if id == self.identity => {
                if let Err(e) = std::fs::remove_file(&self.path) {
                    tracing::warn!(socket = %self.path.display(), "cannot remove socket: {e}");
                }
            }
            Ok(_) => tracing::info!(
                socket = %self.path.display(),
                "socket was replaced by another process; leaving it"
            ),
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(socket = %self.path.display(), "cannot stat socket: {e}"),
        }
    }
}

/// Device, inode and change time: a file system reuses a freed inode number
/// at once (tmpfs does), so the number alone would take the next daemon's
/// socket for ours.
type Identity = (u64, u64, i64, i64);

fn identity(path: &Path) -> std::io::Result<Identity> {
    let md = std::fs::symlink_metadata(path)?;
    Ok((md.dev(), md.ino(), md.ctime(), md.ctime_nsec()))
}

/// Makes way for binding `path`: nothing there, or a socket nobody answers
/// on (its daemon died without removing it), which is removed.
async fn clear_stale(path: &Path) -> Result<()> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io("inspect", path, e)),
        Ok(md) if !md.file_type().is_socket() => return Err(Error::NotASocket(path.into())),
        Ok(_) => {}
    }
    match tokio::time::timeout(PROBE_TIMEOUT, UnixStream::connect(path)).await {
        Ok(Ok(_)) | Err(_) => Err(Error::SocketInUse(path.into())),
        Ok(Err(e)) if e.kind() == ErrorKind::ConnectionRefused => {
            tracing::info!(socket = %path.display(), "removing stale socket");
            match std::fs::remove_file(path) {
                Err(e) if e.kind() != ErrorKind::NotFound => {
                    Err(Error::io("remove stale socket", path, e))
                }
                _ => Ok(()),
            }
        }
        // Removed between the stat and the connect: the way is clear.
        Ok(Err(e)) if e.kind() == ErrorKind::NotFound => Ok(()),
        Ok(Err(e)) => Err(Error::io("probe", path, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stale_socket_is_replaced_and_a_live_one_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("cri.sock");

        // A socket whose listener is gone: connect is refused.
        drop(std::os::unix::net::UnixListener::bind(&path).expect("bind"));
        assert!(path.exists());
        let (live, socket) = CriSocket::bind(&path).await.expect("stale socket replaced");
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, SOCKET_MODE);

        let err = CriSocket::bind(&path).await.expect_err("live socket");
        assert!(matches!(err, Error::SocketInUse(_)), "{err}");
        assert!(err.to_string().contains("cri.sock"), "{err}");

        drop(live);
        socket.remove();
        assert!(!path.exists());
    }

    #[tokio::test]
    async fn a_file_that_is_not_a_socket_is_left_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("cri.sock");
        std::fs::write(&path, "precious").expect("write");
        let err = CriSocket::bind(&path).await.expect_err("not a socket");
        assert!(matches!(err, Error::NotASocket(_)), "{err}");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "precious");
    }

    #[tokio::test]
    async fn a_replaced_socket_is_not_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("cri.sock");
        let (listener, socket) = CriSocket::bind(&path).await.expect("bind");
        drop(listener);
        std::fs::remove_file(&path).expect("remove");
        let _other = std::os::unix::net::UnixListener::bind(&path).expect("rebind");
        socket.remove();
        assert!(path.exists(), "another daemon's socket must survive");
    }
}
