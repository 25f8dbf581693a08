//! Driving corral's shim through the task API as a daemon would: one
//! [`PodShim`] per pod sandbox, its containers created from busybox bundles.
//!
//! Shared by the shim's end-to-end tests, its benchmark and the quickstart
//! example; everything it makes is registered with the test's [`Cleanup`].

use std::{path::Path, time::Duration};

use corral_proto::{
    containerd::{
        shim::{oci::Options as RuncOptions, shim as api},
        shim_sync::TaskClient,
    },
    protobuf::{well_known_types::any::Any, Message, MessageFull},
    ttrpc::{self, context::Context},
};

use crate::{
    bin,
    bundle::Bundle,
    cleanup::Cleanup,
    error::{Error, Result},
    events::EventsSink,
    shim::{ShimCommand, ShimProcess, ShimStdin},
};

/// Every RPC of a test gets this long; a hang fails the test, it does not
/// block the suite.
pub const RPC_TIMEOUT: Duration = Duration::from_secs(30);

/// The annotation by which containers join their sandbox's shim.
pub const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
pub const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";

pub fn ctx() -> Context {
    ttrpc::context::with_duration(RPC_TIMEOUT)
}

/// `containerd.runc.v1.Options` as containerd packs them: runc's state in
/// `root`, so a test's containers never mix with anyone else's.
pub fn runc_options(root: &Path) -> Any {
    let options = RuncOptions {
        root: root.display().to_string(),
        ..Default::default()
    };
    Any {
        type_url: RuncOptions::descriptor().full_name().to_string(),
        value: options.write_to_bytes().unwrap_or_default(),
        ..Default::default()
    }
}

/// A shim serving one pod, started exactly as containerd starts one.
pub struct PodShim {
    pub sandbox_id: String,
    pub namespace: String,
    pub shim: ShimProcess,
    pub command: ShimCommand,
    /// runc's `--root` for this pod's containers.
    pub runc_root: std::path::PathBuf,
}

impl PodShim {
    /// Writes `sandbox` (whose id becomes the pod's) and starts the shim in
    /// its bundle, publishing to `sink`.
    pub fn start(cleanup: &Cleanup, sink: &EventsSink, sandbox: &Bundle) -> Result<PodShim> {
        // Checked before anything is made: a missing build is an error, not a panic.
        let binary = bin::try_binary(bin::SHIM).ok_or_else(|| {
            Error::Protocol(format!(
                "{} is not built: run `cargo build --workspace --bins` (same profile)",
                bin::SHIM
            ))
        })?;
        let sandbox_id = file_name(sandbox.dir())?;
        let namespace = cleanup.name("ns");
        let runc_root = cleanup.run_dir().join("runc");
        // The shim keeps runc's state per namespace, under the root it is given.
        cleanup.track_runc_root(&crate::runc::Runc::new(runc_root.join(&namespace)));
        sandbox.write()?;
        let mut command = ShimCommand::new(
            binary,
            namespace.clone(),
            sandbox_id.clone(),
            sandbox.dir(),
            cleanup.run_dir().join("corral.sock").to_string_lossy(),
            sink.socket_path().to_string_lossy(),
        );
        command.stdin = ShimStdin::Empty;
        let shim = command.start(cleanup)?;
        Ok(PodShim {
            sandbox_id,
            namespace,
            shim,
            command,
            runc_root,
        })
    }

    pub fn task(&self) -> &TaskClient {
        self.shim.task()
    }

    /// Runs the `start` action for another container of this pod, as
    /// containerd does for every task, and returns the address it answered.
    pub fn start_container_shim(&self, cleanup: &Cleanup, bundle: &Bundle) -> Result<String> {
        bundle.write()?;
        let mut command = self.command.clone();
        command.id = file_name(bundle.dir())?;
        command.bundle = bundle.dir().to_path_buf();
        let shim = command.start(cleanup)?;
        Ok(shim.address().to_string())
    }

    /// A Create request for `bundle` with the pod's runc root and the given
    /// stdio URIs.
    pub fn create_request(
        &self,
        bundle: &Bundle,
        stdout: &str,
        stderr: &str,
    ) -> Result<api::CreateTaskRequest> {
        Ok(api::CreateTaskRequest {
            id: file_name(bundle.dir())?,
            bundle: bundle.dir().display().to_string(),
            stdout: stdout.to_string(),
            stderr: stderr.to_string(),
            options: Some(runc_options(&self.runc_root)).into(),
            ..Default::default()
        })
    }

    /// Writes `bundle`, then Create and Start of its container; its pid.
    pub fn create_and_start(&self, bundle: &Bundle, stdout: &str, stderr: &str) -> Result<u32> {
        bundle.write()?;
        let req = self.create_request(bundle, stdout, stderr)?;
        self.task().create(ctx(), &req).map_err(rpc("create"))?;
        self.start_task(&req.id, "")
    }

    pub fn start_task(&self, id: &str, exec_id: &str) -> Result<u32> {
        let req = api::StartRequest {
            id: id.to_string(),
            exec_id: exec_id.to_string(),
            ..Default::default()
        };
        Ok(self.task().start(ctx(), &req).map_err(rpc("start"))?.pid)
    }

    /// Waits for the process to exit; its exit status.
    pub fn wait(&self, id: &str, exec_id: &str) -> Result<u32> {
        let req = api::WaitRequest {
            id: id.to_string(),
            exec_id: exec_id.to_string(),
            ..Default::default()
        };
        Ok(self
            .task()
            .wait(ctx(), &req)
            .map_err(rpc("wait"))?
            .exit_status)
    }

    pub fn kill(&self, id: &str, exec_id: &str, signal: i32) -> Result<()> {
        let req = api::KillRequest {
            id: id.to_string(),
            exec_id: exec_id.to_string(),
            signal: signal as u32,
            ..Default::default()
        };
        self.task().kill(ctx(), &req).map_err(rpc("kill")).map(drop)
    }

    pub fn delete(&self, id: &str, exec_id: &str) -> Result<api::DeleteResponse> {
        let req = api::DeleteRequest {
            id: id.to_string(),
            exec_id: exec_id.to_string(),
            ..Default::default()
        };
        self.task().delete(ctx(), &req).map_err(rpc("delete"))
    }

    /// SIGKILL, Wait, Delete: how a test tears a running container down.
    pub fn stop_and_delete(&self, id: &str) -> Result<()> {
        self.kill(id, "", libc::SIGKILL)?;
        self.wait(id, "")?;
        self.delete(id, "").map(drop)
    }

    /// Create, Start, Wait and Delete of `bundle`'s container; its exit status.
    pub fn run_to_exit(&self, bundle: &Bundle, stdout: &str, stderr: &str) -> Result<u32> {
        let id = file_name(bundle.dir())?;
        self.create_and_start(bundle, stdout, stderr)?;
        let status = self.wait(&id, "")?;
        self.delete(&id, "")?;
        Ok(status)
    }

    /// Shutdown, once every container is deleted: the shim then exits.
    pub fn shutdown(&self) -> Result<()> {
        // The shim may close the connection before its reply is read.
        let _ = self.task().shutdown(
            ctx(),
            &api::ShutdownRequest {
                id: self.sandbox_id.clone(),
                ..Default::default()
            },
        );
        self.shim.wait_exit(RPC_TIMEOUT)
    }
}

/// Labels a ttrpc failure with the RPC that failed, keeping its status.
pub fn rpc(what: &'static str) -> impl Fn(ttrpc::Error) -> Error {
    move |source| Error::Ttrpc {
        context: what.to_string(),
        source,
    }
}

fn file_name(dir: &Path) -> Result<String> {
    dir.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| Error::Protocol(format!("bundle dir {} has no name", dir.display())))
}
