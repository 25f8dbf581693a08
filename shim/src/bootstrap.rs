//! The `start` action: containerd (or corrald) asks for a shim for a task
//! and reads back where to reach it.
//!
//! One shim serves a whole pod: a container whose spec names its sandbox
//! (`io.kubernetes.cri.sandbox-id`) is given the address of the shim that
//! already serves that sandbox. Otherwise a server is spawned (this binary
//! again, with `-socket`), and `start` returns once it is listening.
//!
//! Both bootstrap protocols of containerd 2.x are spoken: the 2.3+
//! `BootstrapParams` protobuf on stdin answered with a `BootstrapResult`,
//! and the older flags/environment with runtime options on stdin, answered
//! with JSON `{"version":3,"address":…,"protocol":"ttrpc"}`.

use std::{
    fs::{self, File},
    io::{IsTerminal, Read, Write},
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::Path,
    process::{Command, Stdio},
};

use containerd_shim::{bootstrap::BootstrapParams, Flags, StartOpts};
use corral_proto::containerd::{
    bootstrap_api::{BootstrapResult, LogLevel},
    protobuf::{well_known_types::any::Any, Message},
    shim::oci::Options,
    TASK_API_VERSION,
};

use crate::{
    error::{Error, Result},
    service::RuntimeOptions,
};

/// Annotations that group containers into one shim, in order of precedence.
const GROUP_ANNOTATIONS: [&str; 2] = [
    "io.containerd.runc.v2.group",
    "io.kubernetes.cri.sandbox-id",
];
const MAX_INPUT: u64 = 10 << 20;
const PROTOCOL: &str = "ttrpc";

enum Protocol {
    Bootstrap,
    Legacy,
}

/// What `start` learned from containerd, whichever protocol it used.
struct StartParams {
    protocol: Protocol,
    ttrpc_address: String,
    grpc_address: String,
    publish_binary: String,
    socket_dir: Option<String>,
    debug: bool,
    options: Option<Options>,
}

pub fn start(flags: &Flags) -> Result<()> {
    if flags.namespace.is_empty() || flags.id.is_empty() {
        return Err(Error::InvalidArgument(
            "start needs -namespace and -id".into(),
        ));
    }
    let params = read_params(flags)?;
    let bundle = std::env::current_dir().map_err(|e| Error::io("current directory", e))?;
    let grouping = grouping_id(&bundle, &flags.id);
    let address = socket_address(&params, &flags.namespace, &grouping);
    if let Some(opts) = &params.options {
        RuntimeOptions::from_proto(opts).store(&bundle)?;
    }

    let socket_path = address.trim_start_matches("unix://").to_string();
    let _lock = lock_socket(&socket_path)?;
    if !is_serving(&socket_path) {
        let _ = fs::remove_file(&socket_path);
        spawn_server(flags, &params, &address)?;
        if !is_serving(&socket_path) {
            return Err(Error::Internal(format!(
                "the shim server for {} exited before serving {address}",
                flags.id
            )));
        }
    }
    fs::write(bundle.join("address"), &address).map_err(|e| Error::io("write address", e))?;
    write_reply(&params.protocol, &address)
}

fn read_params(flags: &Flags) -> Result<StartParams> {
    let mut input = Vec::new();
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        stdin
            .lock()
            .take(MAX_INPUT)
            .read_to_end(&mut input)
            .map_err(|e| Error::io("read bootstrap parameters", e))?;
    }
    let env = |k: &str| std::env::var(k).unwrap_or_default();

    // 2.3+: BootstrapParams naming this very task. A legacy `Any` also
    // decodes as BootstrapParams, but with the wrong identity.
    if let Ok(p) = BootstrapParams::parse_from_bytes(&input) {
        if !input.is_empty() && p.instance_id == flags.id && p.namespace == flags.namespace {
            let options = p
                .extensions
                .iter()
                .filter_map(|ext| ext.value.as_ref())
                .find_map(decode_options);
            let level = p.log_level.value();
            return Ok(StartParams {
                protocol: Protocol::Bootstrap,
                ttrpc_address: required(
                    p.containerd_ttrpc_address.clone(),
                    "bootstrap containerd_ttrpc_address",
                )?,
                grpc_address: p.containerd_grpc_address.clone(),
                publish_binary: p.containerd_binary.clone(),
                socket_dir: p.socket_dir.clone(),
                debug: flags.debug || (level != 0 && level <= LogLevel::LOG_LEVEL_DEBUG as i32),
                options,
            });
        }
    }
    let options = Any::parse_from_bytes(&input)
        .ok()
        .as_ref()
        .and_then(decode_options);
    Ok(StartParams {
        protocol: Protocol::Legacy,
        ttrpc_address: required(env("TTRPC_ADDRESS"), "environment variable TTRPC_ADDRESS")?,
        grpc_address: if flags.address.is_empty() {
            env("GRPC_ADDRESS")
        } else {
            flags.address.clone()
        },
        publish_binary: flags.publish_binary.clone(),
        socket_dir: None,
        debug: flags.debug,
        options,
    })
}

fn required(value: String, what: &str) -> Result<String> {
    if value.is_empty() {
        return Err(Error::InvalidArgument(format!("{what} is not set")));
    }
    Ok(value)
}

fn decode_options(any: &Any) -> Option<Options> {
    if any.type_url.ends_with("containerd.runc.v1.Options") {
        Options::parse_from_bytes(&any.value).ok()
    } else {
        None
    }
}

/// The sandbox this container belongs to, from its spec's annotations;
/// its own id when it names none.
fn grouping_id(bundle: &Path, id: &str) -> String {
    let spec = fs::read(bundle.join("config.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok());
    let annotations = spec.as_ref().and_then(|s| s.get("annotations"));
    GROUP_ANNOTATIONS
        .iter()
        .find_map(|key| annotations?.get(*key)?.as_str())
        .filter(|g| !g.is_empty() && !g.contains('/'))
        .unwrap_or(id)
        .to_string()
}

/// `unix://<dir>/<sha256(address/namespace/group)>`, containerd's naming.
/// The directory is the one containerd asked for, else `s/` beside the
/// daemon's socket: `/run/containerd/s` under containerd, `/run/corral/s`
/// under corrald.
fn socket_address(params: &StartParams, namespace: &str, grouping: &str) -> String {
    let dir = params.socket_dir.clone().unwrap_or_else(|| {
        let daemon = params.grpc_address.trim_start_matches("unix://");
        Path::new(daemon)
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("/run/containerd"))
            .join("s")
            .display()
            .to_string()
    });
    let opts = StartOpts {
        address: params.grpc_address.clone(),
        namespace: namespace.to_string(),
        socket_dir: Some(dir),
        ..Default::default()
    };
    opts.socket_address(grouping)
}

/// Serializes `start`s of one pod, so two containers created at once end up
/// in the same shim instead of racing to bind its socket.
fn lock_socket(socket: &str) -> Result<File> {
    let lock_path = format!("{socket}.lock");
    if let Some(dir) = Path::new(socket).parent() {
        fs::create_dir_all(dir).map_err(|e| Error::io_path("create", dir, e))?;
    }
    let file = File::create(&lock_path).map_err(|e| Error::io(format!("create {lock_path}"), e))?;
    // SAFETY: flock on an fd this function owns.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(Error::io(
            format!("lock {lock_path}"),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(file)
}

fn is_serving(socket: &str) -> bool {
    std::os::unix::net::UnixStream::connect(socket).is_ok()
}

/// Spawns the server and waits until it listens: it closes the stdout it
/// inherited once its socket accepts connections.
fn spawn_server(flags: &Flags, params: &StartParams, address: &str) -> Result<()> {
    let exe = std::env::current_exe().map_err(|e| Error::io("locate the shim binary", e))?;
    let mut cmd = Command::new(exe);
    cmd.args([
        "-namespace",
        &flags.namespace,
        "-id",
        &flags.id,
        "-address",
        &params.grpc_address,
    ])
    .args([
        "-publish-binary",
        &params.publish_binary,
        "-socket",
        address,
    ])
    .env("TTRPC_ADDRESS", &params.ttrpc_address)
    .env("GRPC_ADDRESS", &params.grpc_address)
    .env("NAMESPACE", &flags.namespace)
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::null());
    if params.debug {
        cmd.arg("-debug");
    }
    // SAFETY: setsid is async-signal-safe. The server leaves the daemon's
    // session and process group, so signals aimed at those miss the pods.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| Error::io("spawn the shim server", e))?;
    if let Some(mut ready) = child.stdout.take() {
        let mut sink = Vec::new();
        let _ = ready.read_to_end(&mut sink);
    }
    // The server runs on; this process exits right after replying, and the
    // server is re-parented, so there is nothing to wait for here.
    Ok(())
}

fn write_reply(protocol: &Protocol, address: &str) -> Result<()> {
    let reply = match protocol {
        Protocol::Legacy => serde_json::to_vec(&serde_json::json!({
            "version": TASK_API_VERSION,
            "address": address,
            "protocol": PROTOCOL,
        }))
        .map_err(|e| Error::Internal(e.to_string()))?,
        Protocol::Bootstrap => BootstrapResult {
            version: TASK_API_VERSION,
            address: address.to_string(),
            protocol: PROTOCOL.to_string(),
            ..Default::default()
        }
        .write_to_bytes()
        .map_err(|e| Error::Internal(e.to_string()))?,
    };
    let mut out = std::io::stdout().lock();
    out.write_all(&reply)
        .and_then(|_| out.flush())
        .map_err(|e| Error::io("write the bootstrap reply", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(grpc: &str) -> StartParams {
        StartParams {
            protocol: Protocol::Legacy,
            ttrpc_address: format!("{grpc}.ttrpc"),
            grpc_address: grpc.into(),
            publish_binary: String::new(),
            socket_dir: None,
            debug: false,
            options: None,
        }
    }

    #[test]
    fn socket_lives_beside_the_daemon_socket_like_containerds() {
        let a = socket_address(&params("/run/containerd/containerd.sock"), "default", "123");
        // containerd's own hash for these inputs.
        assert_eq!(a, "unix:///run/containerd/s/0ddfbd72d02b3551e75f3a0ed90b9965b533401be618f43a568bc522764e0ad0");
        let b = socket_address(&params("/run/corral/corral.sock"), "k8s.io", "pod");
        assert!(b.starts_with("unix:///run/corral/s/"), "{b}");
    }

    #[test]
    fn containers_of_a_sandbox_share_its_grouping() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(
            dir.path().join("config.json"),
            r#"{"annotations":{"io.kubernetes.cri.sandbox-id":"sb1","io.kubernetes.cri.container-type":"container"}}"#,
        )
        .expect("write");
        assert_eq!(grouping_id(dir.path(), "ctr"), "sb1");
        fs::write(dir.path().join("config.json"), r#"{"annotations":{}}"#).expect("write");
        assert_eq!(grouping_id(dir.path(), "ctr"), "ctr");
        fs::write(dir.path().join("config.json"), "not json").expect("write");
        assert_eq!(grouping_id(dir.path(), "ctr"), "ctr");
    }
}
