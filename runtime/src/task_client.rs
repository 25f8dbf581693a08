//! The task API over ttrpc, in either version a shim announces.
//!
//! `containerd.task.v2.Task` (containerd 1.x shims such as Debian's
//! `containerd-shim-runc-v2`) and `containerd.task.v3.Task` (containerd 2.x
//! shims, corral's) carry the same messages on the wire; only the service
//! name differs. One client speaks both by choosing that name per shim.

use std::time::Duration;

use containerd_shim_protos::api;
use corral_proto::protobuf::{well_known_types::empty::Empty, Message};
use serde::{Deserialize, Serialize};
use ttrpc::{
    asynchronous::Client,
    proto::{Codec, RequestInit},
};

use crate::error::{Error, Result};

/// How long a call may take unless the method blocks by design (Wait).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TaskApi {
    V2,
    V3,
}

impl TaskApi {
    /// The version a bootstrap reply names; a plain address means v2.
    pub fn from_version(version: u32) -> Result<TaskApi> {
        match version {
            2 => Ok(TaskApi::V2),
            3 => Ok(TaskApi::V3),
            other => Err(Error::InvalidArgument(format!(
                "task API version {other} is not supported (2 or 3)"
            ))),
        }
    }

    pub fn version(self) -> u32 {
        match self {
            TaskApi::V2 => 2,
            TaskApi::V3 => 3,
        }
    }

    fn service(self) -> &'static str {
        match self {
            TaskApi::V2 => "containerd.task.v2.Task",
            TaskApi::V3 => "containerd.task.v3.Task",
        }
    }
}

/// A connection to one shim. Cheap to clone: clones share the connection.
#[derive(Clone)]
pub struct TaskClient {
    client: Client,
    api: TaskApi,
    /// Names the shim in errors.
    shim: String,
}

impl TaskClient {
    /// Dials `address` (`unix:///…` or a path), giving up after `timeout`:
    /// a dead shim must not hold up a daemon re-attaching to hundreds.
    pub async fn connect(
        address: &str,
        api: TaskApi,
        shim: &str,
        timeout: Duration,
    ) -> Result<Self> {
        let address = if address.starts_with("unix://") {
            address.to_string()
        } else {
            format!("unix://{address}")
        };
        let client = tokio::time::timeout(timeout, Client::connect(&address))
            .await
            .map_err(|_| Error::Timeout(format!("connecting to shim {shim} at {address}")))?
            .map_err(|e| Error::shim(shim, format!("connect {address}: {e}")))?;
        Ok(TaskClient {
            client,
            api,
            shim: shim.to_string(),
        })
    }

    pub fn api(&self) -> TaskApi {
        self.api
    }

    async fn call<Req: Message, Resp: Message>(
        &self,
        method: &'static str,
        req: &Req,
        timeout: Option<Duration>,
    ) -> Result<Resp> {
        self.call_service(self.api.service(), method, req, timeout)
            .await
    }

    async fn call_service<Req: Message, Resp: Message>(
        &self,
        service: &str,
        method: &'static str,
        req: &Req,
        timeout: Option<Duration>,
    ) -> Result<Resp> {
        let payload = req
            .write_to_bytes()
            .map_err(|e| Error::Internal(format!("encode {method}: {e}")))?;
        let timeout_nano = timeout.map(|t| t.as_nanos() as i64).unwrap_or(0);
        let mut request = ttrpc::Request::init_request(
            service.to_string(),
            method.to_string(),
            timeout_nano,
            Vec::new(),
        );
        request.set_payload(payload);
        let response = self
            .client
            .request(request)
            .await
            .map_err(|e| Error::from_shim_status(&self.shim, method, e))?;
        let mut out = Resp::new();
        Codec::merge(&mut out, &response.payload)
            .map_err(|e| Error::shim(&self.shim, format!("decode {method} reply: {e}")))?;
        Ok(out)
    }

    /// corral's own `corral.shim.v1.Log/Reopen`, served beside the task API
    /// by corral's shim (any other shim answers Unimplemented).
    pub async fn reopen_log(&self, id: &str) -> Result<()> {
        let req = corral_proto::shim::log::ReopenRequest {
            id: id.to_string(),
            ..Default::default()
        };
        self.call_service::<_, Empty>("corral.shim.v1.Log", "Reopen", &req, Some(DEFAULT_TIMEOUT))
            .await
            .map(drop)
    }

    pub async fn create(&self, req: &api::CreateTaskRequest) -> Result<api::CreateTaskResponse> {
        self.call("Create", req, Some(DEFAULT_TIMEOUT)).await
    }

    pub async fn start(&self, req: &api::StartRequest) -> Result<api::StartResponse> {
        self.call("Start", req, Some(DEFAULT_TIMEOUT)).await
    }

    pub async fn delete(&self, req: &api::DeleteRequest) -> Result<api::DeleteResponse> {
        self.call("Delete", req, Some(DEFAULT_TIMEOUT)).await
    }

    pub async fn state(&self, req: &api::StateRequest) -> Result<api::StateResponse> {
        self.call("State", req, Some(DEFAULT_TIMEOUT)).await
    }

    pub async fn pids(&self, req: &api::PidsRequest) -> Result<api::PidsResponse> {
        self.call("Pids", req, Some(DEFAULT_TIMEOUT)).await
    }

    pub async fn pause(&self, req: &api::PauseRequest) -> Result<()> {
        self.call::<_, Empty>("Pause", req, Some(DEFAULT_TIMEOUT))
            .await
            .map(drop)
    }

    pub async fn resume(&self, req: &api::ResumeRequest) -> Result<()> {
        self.call::<_, Empty>("Resume", req, Some(DEFAULT_TIMEOUT))
            .await
            .map(drop)
    }

    pub async fn kill(&self, req: &api::KillRequest) -> Result<()> {
        self.call::<_, Empty>("Kill", req, Some(DEFAULT_TIMEOUT))
            .await
            .map(drop)
    }

    pub async fn exec(&self, req: &api::ExecProcessRequest) -> Result<()> {
        self.call::<_, Empty>("Exec", req, Some(DEFAULT_TIMEOUT))
            .await
            .map(drop)
    }

    pub async fn resize_pty(&self, req: &api::ResizePtyRequest) -> Result<()> {
        self.call::<_, Empty>("ResizePty", req, Some(DEFAULT_TIMEOUT))
            .await
            .map(drop)
    }

    pub async fn close_io(&self, req: &api::CloseIORequest) -> Result<()> {
        self.call::<_, Empty>("CloseIO", req, Some(DEFAULT_TIMEOUT))
            .await
            .map(drop)
    }

    pub async fn update(&self, req: &api::UpdateTaskRequest) -> Result<()> {
        self.call::<_, Empty>("Update", req, Some(DEFAULT_TIMEOUT))
            .await
            .map(drop)
    }

    /// Blocks until the process exits: no deadline but the caller's.
    pub async fn wait(&self, req: &api::WaitRequest) -> Result<api::WaitResponse> {
        self.call("Wait", req, None).await
    }

    pub async fn stats(&self, req: &api::StatsRequest) -> Result<api::StatsResponse> {
        self.call("Stats", req, Some(DEFAULT_TIMEOUT)).await
    }

    pub async fn connect_info(&self, req: &api::ConnectRequest) -> Result<api::ConnectResponse> {
        self.call("Connect", req, Some(DEFAULT_TIMEOUT)).await
    }

    /// The shim may exit before its reply is out; that is a success.
    pub async fn shutdown(&self, req: &api::ShutdownRequest) -> Result<()> {
        match self
            .call::<_, Empty>("Shutdown", req, Some(DEFAULT_TIMEOUT))
            .await
        {
            Ok(_) => Ok(()),
            Err(Error::Shim { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }
}
