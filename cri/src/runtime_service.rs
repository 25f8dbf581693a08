//! CRI v1 `RuntimeService`: what kubelet asks of the runtime about pods and
//! containers.
//!
//! This module owns the translation of RuntimeService requests into corral's
//! terms and back. This slice answers the node-level RPCs (Version, Status,
//! RuntimeConfig, UpdateRuntimeConfig); every pod and container RPC answers
//! `Unimplemented`, naming itself, until the slices that implement it.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, RwLock};

use corral_runtime::handlers::Handlers;
use k8s_cri::v1 as cri;
use k8s_cri::v1::runtime_service_server::RuntimeService;
use tonic::{Request, Response};

use crate::cni::{self, NetworkStatus};
use crate::config::{CgroupDriver, Config};
use crate::deadline::{deadline, within_detached};
use crate::error::{not_yet, Error, Result, RpcResult};
use crate::node::Node;
use crate::streaming::StreamingServer;
use crate::{container, sandbox, stats};

/// Condition types kubelet requires (cri-api `RuntimeReady`, `NetworkReady`).
pub const RUNTIME_READY: &str = "RuntimeReady";
pub const NETWORK_READY: &str = "NetworkReady";
/// The reason kubelet shows on the node while pods cannot get a network;
/// the string containerd and CRI-O use, which operators search for.
pub const NETWORK_NOT_READY_REASON: &str = "NetworkPluginNotReady";

/// The RuntimeService of one daemon.
pub struct CriRuntimeService {
    config: Arc<Config>,
    handlers: Handlers,
    /// Set by kubelet through UpdateRuntimeConfig; empty until then. Kept for
    /// CNI configurations that ask for the node's pod range.
    pod_cidr: RwLock<String>,
    /// The pods and containers; `None` only in unit tests of the
    /// node-level RPCs, which need no task service.
    node: Option<Arc<Node>>,
    /// Serves the URLs Exec, Attach and PortForward hand out.
    streaming: Option<Arc<StreamingServer>>,
}

impl CriRuntimeService {
    /// Fails when a configured runtime handler is invalid; [`Config::load`]
    /// has already checked that, so this only guards configs built in code.
    pub fn new(config: Arc<Config>) -> Result<Self> {
        let handlers = config.handlers()?;
        Ok(CriRuntimeService {
            config,
            handlers,
            pod_cidr: RwLock::new(String::new()),
            node: None,
            streaming: None,
        })
    }

    /// Serves pods and containers on `node`, streaming through `streaming`.
    pub fn with_node(mut self, node: Arc<Node>, streaming: Arc<StreamingServer>) -> Self {
        self.node = Some(node);
        self.streaming = Some(streaming);
        self
    }

    fn streaming(&self) -> Result<&StreamingServer> {
        self.streaming
            .as_deref()
            .ok_or_else(|| Error::Internal("this RuntimeService serves no streaming".into()))
    }

    fn node(&self) -> Result<&Node> {
        self.node
            .as_deref()
            .ok_or_else(|| Error::Internal("this RuntimeService serves no node".into()))
    }

    /// The node, owned: for work that runs as a task of its own.
    fn shared_node(&self) -> Result<Arc<Node>> {
        self.node
            .clone()
            .ok_or_else(|| Error::Internal("this RuntimeService serves no node".into()))
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn handlers(&self) -> &Handlers {
        &self.handlers
    }

    /// The pod CIDR(s) kubelet last sent, comma-separated; empty if none.
    pub fn pod_cidr(&self) -> String {
        // A panic elsewhere while holding the lock leaves a plain string that
        // is still valid: use it rather than fail every later call.
        self.pod_cidr
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set_pod_cidr(&self, cidr: String) {
        *self.pod_cidr.write().unwrap_or_else(|e| e.into_inner()) = cidr;
    }

    fn network_condition(&self) -> (cri::RuntimeCondition, String) {
        match cni::network_status(&self.config.cni.conf_dir) {
            NetworkStatus::Ready { file, name } => (
                cri::RuntimeCondition {
                    r#type: NETWORK_READY.into(),
                    status: true,
                    ..Default::default()
                },
                format!("OK: network {name:?} from {}", file.display()),
            ),
            NetworkStatus::NotReady { message } => (
                cri::RuntimeCondition {
                    r#type: NETWORK_READY.into(),
                    status: false,
                    reason: NETWORK_NOT_READY_REASON.into(),
                    message: format!("Network plugin returns error: {message}"),
                },
                message,
            ),
        }
    }

    /// The `info` map of a verbose Status. `config` mirrors containerd's key
    /// of the same name: critest reads `config.stateDir` from it.
    fn verbose_info(&self, cni_status: String) -> HashMap<String, String> {
        let c = &self.config;
        let config = serde_json::json!({
            "socket": c.socket,
            "rootDir": c.root,
            "stateDir": c.state,
            "cgroupDriver": c.cgroup_driver.as_str(),
            "sandboxImage": c.sandbox_image,
            "cni": { "confDir": c.cni.conf_dir, "binDirs": c.cni.bin_dirs },
            "streaming": { "address": c.streaming.address, "port": c.streaming.port },
            "runtimeHandlers": c.handler_names(),
            "podCIDR": self.pod_cidr(),
        });
        HashMap::from([
            ("config".to_string(), config.to_string()),
            (
                "lastCNILoadStatus".to_string(),
                serde_json::Value::String(cni_status).to_string(),
            ),
        ])
    }
}

/// Checks kubelet's pod CIDR: one CIDR, or an IPv4 and an IPv6 one
/// comma-separated (dual stack).
fn validate_pod_cidr(cidr: &str) -> Result<()> {
    let bad = |why: &str| Error::InvalidArgument(format!("pod CIDR {cidr:?}: {why}"));
    for part in cidr.split(',') {
        let (addr, prefix) = part
            .trim()
            .split_once('/')
            .ok_or_else(|| bad("not of the form ADDRESS/PREFIX"))?;
        let addr: IpAddr = addr.parse().map_err(|_| bad("not an IP address"))?;
        let prefix: u8 = prefix.parse().map_err(|_| bad("prefix is not a number"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix > max {
            return Err(bad("prefix is too long"));
        }
    }
    Ok(())
}

#[tonic::async_trait]
impl RuntimeService for CriRuntimeService {
    async fn version(
        &self,
        request: Request<cri::VersionRequest>,
    ) -> RpcResult<cri::VersionResponse> {
        tracing::debug!(kubelet_api = %request.get_ref().version, "Version");
        Ok(Response::new(cri::VersionResponse {
            version: crate::KUBE_RUNTIME_API_VERSION.into(),
            runtime_name: crate::RUNTIME_NAME.into(),
            runtime_version: crate::RUNTIME_VERSION.into(),
            runtime_api_version: crate::RUNTIME_API_VERSION.into(),
        }))
    }

    async fn status(&self, request: Request<cri::StatusRequest>) -> RpcResult<cri::StatusResponse> {
        let runtime = cri::RuntimeCondition {
            r#type: RUNTIME_READY.into(),
            status: true,
            ..Default::default()
        };
        // A few small files: cheap enough to read on the async thread, and
        // reading them on every call is what makes a newly dropped config
        // count at once.
        let (network, cni_status) = self.network_condition();
        let info = if request.get_ref().verbose {
            self.verbose_info(cni_status)
        } else {
            HashMap::new()
        };
        let runtime_handlers = self
            .config
            .handler_names()
            .into_iter()
            .map(|name| cri::RuntimeHandler {
                name,
                // Neither is implemented yet; claiming them would make the
                // conformance suite run tests that must then fail.
                features: Some(cri::RuntimeHandlerFeatures {
                    recursive_read_only_mounts: false,
                    user_namespaces: false,
                }),
            })
            .collect();
        Ok(Response::new(cri::StatusResponse {
            status: Some(cri::RuntimeStatus {
                conditions: vec![runtime, network],
            }),
            info,
            runtime_handlers,
            features: Some(cri::RuntimeFeatures {
                supplemental_groups_policy: false,
            }),
        }))
    }

    async fn runtime_config(
        &self,
        _request: Request<cri::RuntimeConfigRequest>,
    ) -> RpcResult<cri::RuntimeConfigResponse> {
        let driver = match self.config.cgroup_driver {
            CgroupDriver::Systemd => cri::CgroupDriver::Systemd,
            CgroupDriver::Cgroupfs => cri::CgroupDriver::Cgroupfs,
        };
        Ok(Response::new(cri::RuntimeConfigResponse {
            linux: Some(cri::LinuxRuntimeConfiguration {
                cgroup_driver: driver as i32,
            }),
        }))
    }

    async fn update_runtime_config(
        &self,
        request: Request<cri::UpdateRuntimeConfigRequest>,
    ) -> RpcResult<cri::UpdateRuntimeConfigResponse> {
        let cidr = request
            .into_inner()
            .runtime_config
            .and_then(|c| c.network_config)
            .map(|n| n.pod_cidr)
            .unwrap_or_default();
        // kubelet sends an empty CIDR when it has none to give; that must
        // not erase one it sent before.
        if !cidr.is_empty() {
            validate_pod_cidr(&cidr)?;
            tracing::info!(pod_cidr = %cidr, "pod CIDR updated");
            self.set_pod_cidr(cidr);
        }
        Ok(Response::new(cri::UpdateRuntimeConfigResponse {}))
    }

    type GetContainerEventsStream = tonic::codegen::BoxStream<cri::ContainerEventResponse>;

    async fn get_container_events(
        &self,
        _request: Request<cri::GetEventsRequest>,
    ) -> RpcResult<Self::GetContainerEventsStream> {
        use tokio_stream::StreamExt;
        let events = tokio_stream::wrappers::BroadcastStream::new(self.node()?.events.subscribe());
        // A subscriber that fell more than the buffer behind misses events,
        // as with containerd's bounded queue; kubelet's relist covers it.
        let stream = events.filter_map(|event| event.ok().map(Ok));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn run_pod_sandbox(
        &self,
        request: Request<cri::RunPodSandboxRequest>,
    ) -> RpcResult<cri::RunPodSandboxResponse> {
        let node = self.shared_node()?;
        let deadline = deadline(&request);
        let req = request.into_inner();
        let config = req
            .config
            .ok_or_else(|| Error::InvalidArgument("RunPodSandbox without a config".into()))?;
        let work = async move { sandbox::run(&node, config, &req.runtime_handler).await };
        let id = within_detached(deadline, work).await?;
        Ok(Response::new(cri::RunPodSandboxResponse {
            pod_sandbox_id: id,
        }))
    }

    async fn stop_pod_sandbox(
        &self,
        request: Request<cri::StopPodSandboxRequest>,
    ) -> RpcResult<cri::StopPodSandboxResponse> {
        let deadline = deadline(&request);
        let id = request.into_inner().pod_sandbox_id;
        let node = self.shared_node()?;
        within_detached(deadline, async move { sandbox::stop(&node, &id).await }).await?;
        Ok(Response::new(cri::StopPodSandboxResponse {}))
    }

    async fn remove_pod_sandbox(
        &self,
        request: Request<cri::RemovePodSandboxRequest>,
    ) -> RpcResult<cri::RemovePodSandboxResponse> {
        let deadline = deadline(&request);
        let id = request.into_inner().pod_sandbox_id;
        let node = self.shared_node()?;
        within_detached(deadline, async move { sandbox::remove(&node, &id).await }).await?;
        Ok(Response::new(cri::RemovePodSandboxResponse {}))
    }

    async fn pod_sandbox_status(
        &self,
        request: Request<cri::PodSandboxStatusRequest>,
    ) -> RpcResult<cri::PodSandboxStatusResponse> {
        let node = self.node()?;
        let req = request.into_inner();
        let found = node.sandbox(&req.pod_sandbox_id)?;
        let mut response = sandbox::status(node, &found, req.verbose);
        response.containers_statuses = node
            .containers_of(&found.id)
            .iter()
            .filter_map(|c| container::status(c, false).status)
            .collect();
        response.timestamp = crate::node::now_ns();
        Ok(Response::new(response))
    }

    async fn list_pod_sandbox(
        &self,
        request: Request<cri::ListPodSandboxRequest>,
    ) -> RpcResult<cri::ListPodSandboxResponse> {
        let filter = request.into_inner().filter.unwrap_or_default();
        let items = self
            .node()?
            .sandboxes()
            .iter()
            .filter(|s| sandbox::matches(s, &filter))
            .map(|s| sandbox::summary(s))
            .collect();
        Ok(Response::new(cri::ListPodSandboxResponse { items }))
    }

    async fn create_container(
        &self,
        request: Request<cri::CreateContainerRequest>,
    ) -> RpcResult<cri::CreateContainerResponse> {
        let deadline = deadline(&request);
        let req = request.into_inner();
        let config = req
            .config
            .ok_or_else(|| Error::InvalidArgument("CreateContainer without a config".into()))?;
        let node = self.shared_node()?;
        let work = async move { container::create(&node, &req.pod_sandbox_id, config).await };
        let id = within_detached(deadline, work).await?;
        Ok(Response::new(cri::CreateContainerResponse {
            container_id: id,
        }))
    }

    async fn start_container(
        &self,
        request: Request<cri::StartContainerRequest>,
    ) -> RpcResult<cri::StartContainerResponse> {
        let deadline = deadline(&request);
        let id = request.into_inner().container_id;
        let node = self.shared_node()?;
        within_detached(deadline, async move { container::start(&node, &id).await }).await?;
        Ok(Response::new(cri::StartContainerResponse {}))
    }

    async fn stop_container(
        &self,
        request: Request<cri::StopContainerRequest>,
    ) -> RpcResult<cri::StopContainerResponse> {
        let deadline = deadline(&request);
        let req = request.into_inner();
        let node = self.shared_node()?;
        let work = async move { container::stop(&node, &req.container_id, req.timeout).await };
        within_detached(deadline, work).await?;
        Ok(Response::new(cri::StopContainerResponse {}))
    }

    async fn remove_container(
        &self,
        request: Request<cri::RemoveContainerRequest>,
    ) -> RpcResult<cri::RemoveContainerResponse> {
        let deadline = deadline(&request);
        let id = request.into_inner().container_id;
        let node = self.shared_node()?;
        within_detached(deadline, async move { container::remove(&node, &id).await }).await?;
        Ok(Response::new(cri::RemoveContainerResponse {}))
    }

    async fn list_containers(
        &self,
        request: Request<cri::ListContainersRequest>,
    ) -> RpcResult<cri::ListContainersResponse> {
        let filter = request.into_inner().filter.unwrap_or_default();
        let containers = self
            .node()?
            .containers()
            .iter()
            .filter(|c| container::matches(c, &filter))
            .map(|c| container::summary(c))
            .collect();
        Ok(Response::new(cri::ListContainersResponse { containers }))
    }

    async fn container_status(
        &self,
        request: Request<cri::ContainerStatusRequest>,
    ) -> RpcResult<cri::ContainerStatusResponse> {
        let req = request.into_inner();
        let found = self.node()?.container(&req.container_id)?;
        Ok(Response::new(container::status(&found, req.verbose)))
    }

    async fn update_container_resources(
        &self,
        request: Request<cri::UpdateContainerResourcesRequest>,
    ) -> RpcResult<cri::UpdateContainerResourcesResponse> {
        let req = request.into_inner();
        container::update_resources(self.node()?, &req.container_id, req.linux).await?;
        Ok(Response::new(cri::UpdateContainerResourcesResponse {}))
    }

    async fn reopen_container_log(
        &self,
        request: Request<cri::ReopenContainerLogRequest>,
    ) -> RpcResult<cri::ReopenContainerLogResponse> {
        let id = request.into_inner().container_id;
        container::reopen_log(self.node()?, &id).await?;
        Ok(Response::new(cri::ReopenContainerLogResponse {}))
    }

    async fn exec_sync(
        &self,
        request: Request<cri::ExecSyncRequest>,
    ) -> RpcResult<cri::ExecSyncResponse> {
        let deadline = deadline(&request);
        let req = request.into_inner();
        let node = self.shared_node()?;
        let work = async move {
            container::exec_sync(&node, &req.container_id, req.cmd, req.timeout).await
        };
        let response = within_detached(deadline, work).await?;
        Ok(Response::new(response))
    }

    async fn exec(&self, request: Request<cri::ExecRequest>) -> RpcResult<cri::ExecResponse> {
        let url = self
            .streaming()?
            .exec_url(request.into_inner())
            .map_err(Error::from)?;
        Ok(Response::new(cri::ExecResponse { url }))
    }

    async fn attach(&self, request: Request<cri::AttachRequest>) -> RpcResult<cri::AttachResponse> {
        let url = self
            .streaming()?
            .attach_url(request.into_inner())
            .map_err(Error::from)?;
        Ok(Response::new(cri::AttachResponse { url }))
    }

    async fn port_forward(
        &self,
        request: Request<cri::PortForwardRequest>,
    ) -> RpcResult<cri::PortForwardResponse> {
        let url = self
            .streaming()?
            .port_forward_url(request.into_inner())
            .map_err(Error::from)?;
        Ok(Response::new(cri::PortForwardResponse { url }))
    }

    async fn container_stats(
        &self,
        request: Request<cri::ContainerStatsRequest>,
    ) -> RpcResult<cri::ContainerStatsResponse> {
        let node = self.node()?;
        let found = node.container(&request.into_inner().container_id)?;
        let stats = stats::container_stats(node, &found).await;
        Ok(Response::new(cri::ContainerStatsResponse {
            stats: Some(stats),
        }))
    }

    async fn list_container_stats(
        &self,
        request: Request<cri::ListContainerStatsRequest>,
    ) -> RpcResult<cri::ListContainerStatsResponse> {
        let node = self.node()?;
        let filter = request.into_inner().filter.unwrap_or_default();
        let filter = cri::ContainerFilter {
            id: filter.id,
            pod_sandbox_id: filter.pod_sandbox_id,
            label_selector: filter.label_selector,
            state: None,
        };
        let mut out = Vec::new();
        for c in node
            .containers()
            .iter()
            .filter(|c| container::matches(c, &filter))
        {
            out.push(stats::container_stats(node, c).await);
        }
        Ok(Response::new(cri::ListContainerStatsResponse {
            stats: out,
        }))
    }

    async fn pod_sandbox_stats(
        &self,
        request: Request<cri::PodSandboxStatsRequest>,
    ) -> RpcResult<cri::PodSandboxStatsResponse> {
        let node = self.node()?;
        let found = node.sandbox(&request.into_inner().pod_sandbox_id)?;
        let stats = stats::sandbox_stats(node, &found).await;
        Ok(Response::new(cri::PodSandboxStatsResponse {
            stats: Some(stats),
        }))
    }

    async fn list_pod_sandbox_stats(
        &self,
        request: Request<cri::ListPodSandboxStatsRequest>,
    ) -> RpcResult<cri::ListPodSandboxStatsResponse> {
        let node = self.node()?;
        let filter = request.into_inner().filter.unwrap_or_default();
        let filter = cri::PodSandboxFilter {
            id: filter.id,
            label_selector: filter.label_selector,
            state: None,
        };
        let mut out = Vec::new();
        for s in node
            .sandboxes()
            .iter()
            .filter(|s| sandbox::matches(s, &filter))
        {
            out.push(stats::sandbox_stats(node, s).await);
        }
        Ok(Response::new(cri::ListPodSandboxStatsResponse {
            stats: out,
        }))
    }

    async fn checkpoint_container(
        &self,
        _request: Request<cri::CheckpointContainerRequest>,
    ) -> RpcResult<cri::CheckpointContainerResponse> {
        not_yet("CheckpointContainer")
    }

    async fn list_metric_descriptors(
        &self,
        _request: Request<cri::ListMetricDescriptorsRequest>,
    ) -> RpcResult<cri::ListMetricDescriptorsResponse> {
        // No CRI-served metrics yet: kubelet then relies on ContainerStats,
        // which is what an empty list tells it.
        Ok(Response::new(cri::ListMetricDescriptorsResponse {
            descriptors: Vec::new(),
        }))
    }

    async fn list_pod_sandbox_metrics(
        &self,
        _request: Request<cri::ListPodSandboxMetricsRequest>,
    ) -> RpcResult<cri::ListPodSandboxMetricsResponse> {
        Ok(Response::new(cri::ListPodSandboxMetricsResponse {
            pod_metrics: Vec::new(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(yaml: &str) -> CriRuntimeService {
        let config = Config::from_yaml(yaml, "test").expect("config");
        CriRuntimeService::new(Arc::new(config)).expect("service")
    }

    #[test]
    fn pod_cidrs_are_checked() {
        for ok in ["10.88.0.0/16", "10.0.0.0/24,fd00::/64", "fd00::/128"] {
            validate_pod_cidr(ok).expect(ok);
        }
        for bad in [
            "10.88.0.0",
            "10.88.0.0/33",
            "x/8",
            "10.0.0.0/a",
            "fd00::/129",
            "",
        ] {
            let err = validate_pod_cidr(bad).expect_err(bad);
            assert!(err.to_string().contains("pod CIDR"), "{err}");
        }
    }

    #[tokio::test]
    async fn unimplemented_rpcs_name_themselves() {
        let svc = service("");
        let status = svc
            .checkpoint_container(Request::new(cri::CheckpointContainerRequest::default()))
            .await
            .expect_err("unimplemented");
        assert_eq!(status.code(), tonic::Code::Unimplemented);
        assert_eq!(
            status.message(),
            "CheckpointContainer is not implemented yet"
        );
    }

    #[tokio::test]
    async fn verbose_status_carries_the_state_dir() {
        let svc = service("state: /run/corral-test\n");
        let response = svc
            .status(Request::new(cri::StatusRequest { verbose: true }))
            .await
            .expect("status")
            .into_inner();
        let config: serde_json::Value =
            serde_json::from_str(&response.info["config"]).expect("config is JSON");
        assert_eq!(config["stateDir"], "/run/corral-test");
        assert!(response.info.contains_key("lastCNILoadStatus"));

        let quiet = svc
            .status(Request::new(cri::StatusRequest { verbose: false }))
            .await
            .expect("status")
            .into_inner();
        assert!(quiet.info.is_empty());
        assert_eq!(quiet.runtime_handlers.len(), 1);
        assert_eq!(quiet.runtime_handlers[0].name, "");
    }

    #[tokio::test]
    async fn an_empty_pod_cidr_keeps_the_previous_one() {
        let svc = service("");
        let update = |cidr: &str| cri::UpdateRuntimeConfigRequest {
            runtime_config: Some(cri::RuntimeConfig {
                network_config: Some(cri::NetworkConfig {
                    pod_cidr: cidr.into(),
                }),
            }),
        };
        svc.update_runtime_config(Request::new(update("10.88.0.0/16")))
            .await
            .expect("update");
        svc.update_runtime_config(Request::new(update("")))
            .await
            .expect("empty update");
        assert_eq!(svc.pod_cidr(), "10.88.0.0/16");
        let status = svc
            .update_runtime_config(Request::new(update("10.88.0.0")))
            .await
            .expect_err("bad cidr");
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert_eq!(svc.pod_cidr(), "10.88.0.0/16");
    }
}
