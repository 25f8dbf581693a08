//! A stand-in for the Kubernetes API server in front of corrald, so that
//! the real `kubectl` can be the client of corrald's streaming server.
//!
//! - [`KubeApi`]: an HTTP/1.1 server on loopback answering what `kubectl
//!   exec`, `attach` and `port-forward` ask: discovery (`/api`, `/api/v1`,
//!   `/apis`), the pod object (built from the CRI pod sandbox and its
//!   containers), and the streaming subresources. For those it does what
//!   the API server and kubelet do together: calls the CRI RPC (Exec,
//!   Attach, PortForward) and proxies the upgrading connection, bytes
//!   untouched, to the URL corrald returned. It records every request and
//!   which protocol each streaming connection asked for and got, so that a
//!   test can tell SPDY from WebSocket.
//! - [`Kubectl`]: the kubectl binary (`$CORRAL_KUBECTL`, else `kubectl` on
//!   `PATH`) with a kubeconfig pointing at a [`KubeApi`], and
//!   [`run_bounded`], which runs a command with stdin bytes and a timeout.
//!
//! The server owns its own runtime, the listener and the proxied
//! connections; dropping it ends them all. It never changes a pod: every
//! CRI call it makes is one kubelet would make for the same kubectl
//! command.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::cri::{api, CriClient};
use crate::error::{Context, Error, Result};
use crate::pod::within;

/// Environment variable naming the kubectl binary; `kubectl` on `PATH`
/// when unset.
pub const KUBECTL_ENV: &str = "CORRAL_KUBECTL";

/// The longest request or response head accepted.
const MAX_HEAD: usize = 64 * 1024;

/// What one streaming connection asked for and what corrald answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamRecord {
    /// `exec`, `attach` or `portforward`.
    pub kind: String,
    /// The request's `Upgrade` header: `SPDY/3.1` or `websocket`.
    pub upgrade: String,
    /// The subprotocols offered: `X-Stream-Protocol-Version` headers for
    /// SPDY, `Sec-WebSocket-Protocol` for WebSocket.
    pub offered: Vec<String>,
    /// corrald's status code (101 when upgraded); 0 when the CRI RPC
    /// failed and corrald was never asked.
    pub status: u16,
    /// The subprotocol corrald chose, from the same headers of its answer.
    pub negotiated: String,
    /// The CRI RPC's error, when it failed.
    pub rpc_error: Option<String>,
}

impl StreamRecord {
    pub fn is_websocket(&self) -> bool {
        self.upgrade.eq_ignore_ascii_case("websocket")
    }

    pub fn is_spdy(&self) -> bool {
        self.upgrade.to_ascii_uppercase().starts_with("SPDY/")
    }

    pub fn upgraded(&self) -> bool {
        self.status == 101
    }
}

/// What a container was created with that the CRI lists do not report but
/// kubectl reads from the pod spec.
#[derive(Debug, Clone, Copy, Default)]
struct ContainerSpec {
    stdin: bool,
    stdin_once: bool,
    tty: bool,
}

/// What the server's connections share.
struct State {
    client: CriClient,
    /// By (pod sandbox id, container name).
    specs: Mutex<HashMap<(String, String), ContainerSpec>>,
    requests: Mutex<Vec<String>>,
    streams: Mutex<Vec<StreamRecord>>,
}

/// The fake API server; see the module documentation.
pub struct KubeApi {
    address: SocketAddr,
    state: Arc<State>,
    /// Shut down without blocking on drop: proxied connections end with it.
    runtime: Option<tokio::runtime::Runtime>,
}

impl KubeApi {
    /// Listens on `127.0.0.1:0` and serves on a runtime of its own, making
    /// its CRI calls through `client`.
    pub fn start(client: CriClient) -> Result<KubeApi> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("kube-api")
            .enable_all()
            .build()
            .context(|| "start the fake API server's runtime".into())?;
        // Bound here, so that the address is known on return; served on the
        // server's runtime, which adopts the socket.
        let listener = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .context(|| "bind the fake API server".into())?;
        let address = listener
            .local_addr()
            .context(|| "the fake API server's address".into())?;
        let state = Arc::new(State {
            client,
            specs: Mutex::new(HashMap::new()),
            requests: Mutex::new(Vec::new()),
            streams: Mutex::new(Vec::new()),
        });
        let shared = Arc::clone(&state);
        runtime.spawn(async move {
            match TcpListener::from_std(listener) {
                Ok(listener) => accept_loop(listener, shared).await,
                Err(e) => lock(&shared.requests).push(format!("listener error: {e}")),
            }
        });
        Ok(KubeApi {
            address,
            state,
            runtime: Some(runtime),
        })
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// Tells the server what `config` (created in `pod`) asked for stdin
    /// and tty, which the pod object reports and kubectl attach checks.
    pub fn describe_container(&self, pod: &str, config: &api::ContainerConfig) {
        let name = config
            .metadata
            .as_ref()
            .map(|m| m.name.clone())
            .unwrap_or_default();
        let spec = ContainerSpec {
            stdin: config.stdin,
            stdin_once: config.stdin_once,
            tty: config.tty,
        };
        lock(&self.state.specs).insert((pod.to_string(), name), spec);
    }

    /// Every request so far, as `METHOD target`, in order.
    pub fn requests(&self) -> Vec<String> {
        lock(&self.state.requests).clone()
    }

    /// Every streaming connection so far, in order.
    pub fn streams(&self) -> Vec<StreamRecord> {
        lock(&self.state.streams).clone()
    }

    /// Writes `<dir>/kubeconfig`: this server, no authentication, and
    /// `namespace` as the context's namespace.
    pub fn write_kubeconfig(&self, dir: &Path, namespace: &str) -> Result<PathBuf> {
        let config = json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "corral-e2e", "cluster": {"server": self.url()}}],
            "users": [{"name": "corral-e2e", "user": {}}],
            "contexts": [{
                "name": "corral-e2e",
                "context": {"cluster": "corral-e2e", "user": "corral-e2e", "namespace": namespace}
            }],
            "current-context": "corral-e2e",
        });
        std::fs::create_dir_all(dir).context(|| format!("create {}", dir.display()))?;
        let path = dir.join("kubeconfig");
        // kubeconfig is YAML, of which JSON is a subset.
        let text = serde_json::to_string_pretty(&config).context(|| "encode kubeconfig".into())?;
        std::fs::write(&path, text).context(|| format!("write {}", path.display()))?;
        Ok(path)
    }
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

async fn accept_loop(listener: TcpListener, state: Arc<State>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            if let Err(e) = serve_connection(stream, &state).await {
                lock(&state.requests).push(format!("connection error: {e}"));
            }
        });
    }
}

/// A parsed HTTP/1.1 head: request or response.
#[derive(Debug)]
struct Head {
    /// `METHOD target VERSION` or `VERSION CODE REASON`.
    first: Vec<String>,
    headers: Vec<(String, String)>,
}

impl Head {
    fn parse(bytes: &[u8]) -> Result<Head> {
        let text = String::from_utf8_lossy(bytes);
        let mut lines = text.split("\r\n");
        let first: Vec<String> = lines
            .next()
            .unwrap_or_default()
            .splitn(3, ' ')
            .map(str::to_string)
            .collect();
        if first.len() < 2 {
            return Err(Error::Protocol(format!("not an HTTP head: {text:?}")));
        }
        let headers = lines
            .filter(|l| !l.is_empty())
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect();
        Ok(Head { first, headers })
    }

    /// Every value of header `name`, comma-separated lists split.
    fn values(&self, name: &str) -> Vec<String> {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .flat_map(|(_, v)| v.split(','))
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
            .collect()
    }

    fn value(&self, name: &str) -> String {
        self.values(name).join(", ")
    }
}

/// Reads from `stream` until a head ends; returns it, and leaves what came
/// after it in `buf`. `None` when the peer closed between messages.
async fn read_head(
    stream: &mut (impl AsyncRead + Unpin),
    buf: &mut Vec<u8>,
) -> Result<Option<Vec<u8>>> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(end + 4);
            let head = std::mem::replace(buf, rest);
            return Ok(Some(head));
        }
        if buf.len() > MAX_HEAD {
            return Err(Error::Protocol("HTTP head too long".into()));
        }
        let mut chunk = [0u8; 8192];
        let n = stream
            .read(&mut chunk)
            .await
            .context(|| "read an HTTP head".into())?;
        if n == 0 {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err(Error::Protocol(
                    "connection closed inside an HTTP head".into(),
                ))
            };
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// The requests of one client connection, kept alive until the client
/// closes it or a streaming request takes it over.
async fn serve_connection(mut client: TcpStream, state: &State) -> Result<()> {
    let mut buf = Vec::new();
    while let Some(bytes) = read_head(&mut client, &mut buf).await? {
        let head = Head::parse(&bytes)?;
        let (method, target) = (head.first[0].clone(), head.first[1].clone());
        lock(&state.requests).push(format!("{method} {target}"));
        let (path, query) = target.split_once('?').unwrap_or((&target, ""));
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        if let ["api", "v1", "namespaces", ns, "pods", pod, kind @ ("exec" | "attach" | "portforward")] =
            segments.as_slice()
        {
            let call = StreamCall {
                kind: kind.to_string(),
                namespace: ns.to_string(),
                pod: pod.to_string(),
                query: parse_query(query),
            };
            return proxy_stream(client, &head, buf, call, state).await;
        }
        skip_body(&mut client, &head, &mut buf).await?;
        let (status, body) = answer(&method, &segments, state).await;
        write_json(&mut client, status, &body).await?;
    }
    Ok(())
}

/// Drops a request's body (kubectl's GETs have none; be lenient anyway).
async fn skip_body(client: &mut TcpStream, head: &Head, buf: &mut Vec<u8>) -> Result<()> {
    let length: usize = head.value("Content-Length").parse().unwrap_or(0);
    while buf.len() < length {
        let mut chunk = [0u8; 8192];
        let n = client
            .read(&mut chunk)
            .await
            .context(|| "read a request body".into())?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    buf.drain(..length.min(buf.len()));
    Ok(())
}

async fn write_json(client: &mut TcpStream, status: u16, body: &Value) -> Result<()> {
    let body = body.to_string();
    let reason = if status == 200 { "OK" } else { "Error" };
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    client
        .write_all(response.as_bytes())
        .await
        .context(|| "write a response".into())
}

/// The answer to a plain (non-streaming) request.
async fn answer(method: &str, segments: &[&str], state: &State) -> (u16, Value) {
    if method != "GET" {
        return status_json(405, "MethodNotAllowed", &format!("{method} is not served"));
    }
    match segments {
        ["api"] => (
            200,
            json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}),
        ),
        ["apis"] => (
            200,
            json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": []}),
        ),
        ["api", "v1"] => (200, core_v1_resources()),
        ["version"] => (
            200,
            json!({"major": "1", "minor": "32", "gitVersion": "v1.32.0-corral-e2e"}),
        ),
        ["api", "v1", "namespaces", ns, "pods", name] => match pod_object(state, ns, name).await {
            Ok(Some(pod)) => (200, pod),
            Ok(None) => status_json(404, "NotFound", &format!("pods \"{name}\" not found")),
            Err(e) => status_json(500, "InternalError", &e.to_string()),
        },
        _ => status_json(
            404,
            "NotFound",
            "the server could not find the requested resource",
        ),
    }
}

/// A `Status` object as the API server sends with an error.
fn status_json(code: u16, reason: &str, message: &str) -> (u16, Value) {
    let body = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    });
    (code, body)
}

/// Legacy discovery of the core group: enough for kubectl's REST mapper
/// to resolve `pods` and its streaming subresources.
fn core_v1_resources() -> Value {
    let resource = |name: &str, kind: &str, verbs: &[&str]| json!({"name": name, "singularName": "", "namespaced": true, "kind": kind, "verbs": verbs});
    json!({
        "kind": "APIResourceList",
        "groupVersion": "v1",
        "resources": [
            {"name": "pods", "singularName": "pod", "namespaced": true, "kind": "Pod",
             "verbs": ["get", "list"], "shortNames": ["po"], "categories": ["all"]},
            resource("pods/exec", "PodExecOptions", &["create", "get"]),
            resource("pods/attach", "PodAttachOptions", &["create", "get"]),
            resource("pods/portforward", "PodPortForwardOptions", &["create", "get"]),
        ]
    })
}

/// The ready pod sandbox named `name` in `namespace`, the newest if
/// several.
async fn find_sandbox(
    state: &State,
    namespace: &str,
    name: &str,
) -> Result<Option<api::PodSandbox>> {
    let mut client = state.client.clone();
    let request = api::ListPodSandboxRequest { filter: None };
    let listed = within("ListPodSandbox", client.runtime.list_pod_sandbox(request))
        .await?
        .map_err(|s| Error::Protocol(format!("ListPodSandbox: {}", s.message())))?;
    Ok(listed
        .into_inner()
        .items
        .into_iter()
        .filter(|p| p.state == api::PodSandboxState::SandboxReady as i32)
        .filter(|p| {
            p.metadata
                .as_ref()
                .is_some_and(|m| m.name == name && m.namespace == namespace)
        })
        .max_by_key(|p| p.created_at))
}

async fn containers_of(state: &State, sandbox: &str) -> Result<Vec<api::Container>> {
    let mut client = state.client.clone();
    let request = api::ListContainersRequest {
        filter: Some(api::ContainerFilter {
            pod_sandbox_id: sandbox.to_string(),
            ..Default::default()
        }),
    };
    let listed = within("ListContainers", client.runtime.list_containers(request))
        .await?
        .map_err(|s| Error::Protocol(format!("ListContainers: {}", s.message())))?;
    let mut containers = listed.into_inner().containers;
    containers.sort_by_key(|c| c.created_at);
    Ok(containers)
}

fn container_name(container: &api::Container) -> &str {
    container
        .metadata
        .as_ref()
        .map(|m| m.name.as_str())
        .unwrap_or_default()
}

/// The Pod object kubectl reads before it streams: the sandbox's
/// metadata, one spec entry and one status per container (a name listed
/// twice, after a restart, counts once: the newest), phase Running.
async fn pod_object(state: &State, namespace: &str, name: &str) -> Result<Option<Value>> {
    let Some(sandbox) = find_sandbox(state, namespace, name).await? else {
        return Ok(None);
    };
    let mut newest: Vec<api::Container> = Vec::new();
    for container in containers_of(state, &sandbox.id).await? {
        newest.retain(|c| container_name(c) != container_name(&container));
        newest.push(container);
    }
    let specs = lock(&state.specs).clone();
    let mut spec_containers = Vec::new();
    let mut statuses = Vec::new();
    for container in &newest {
        let cname = container_name(container);
        let spec = specs
            .get(&(sandbox.id.clone(), cname.to_string()))
            .copied()
            .unwrap_or_default();
        let image = container
            .image
            .as_ref()
            .map(|i| i.image.clone())
            .unwrap_or_else(|| container.image_ref.clone());
        spec_containers.push(json!({
            "name": cname,
            "image": image,
            "stdin": spec.stdin,
            "stdinOnce": spec.stdin_once,
            "tty": spec.tty,
        }));
        let running = container.state == api::ContainerState::ContainerRunning as i32;
        let container_state = if running {
            json!({"running": {}})
        } else {
            json!({"terminated": {"exitCode": 0}})
        };
        statuses.push(json!({
            "name": cname,
            "ready": running,
            "started": running,
            "restartCount": 0,
            "image": image,
            "imageID": container.image_ref,
            "containerID": format!("corral://{}", container.id),
            "state": container_state,
        }));
    }
    let uid = sandbox
        .metadata
        .as_ref()
        .map(|m| m.uid.clone())
        .unwrap_or_default();
    Ok(Some(json!({
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": {"name": name, "namespace": namespace, "uid": uid, "resourceVersion": "1"},
        "spec": {"containers": spec_containers, "restartPolicy": "Always", "nodeName": "corral-e2e"},
        "status": {"phase": "Running", "containerStatuses": statuses},
    })))
}

/// A streaming request as kubectl sent it to the API server.
struct StreamCall {
    kind: String,
    namespace: String,
    pod: String,
    query: Vec<(String, String)>,
}

impl StreamCall {
    fn all(&self, key: &str) -> Vec<String> {
        self.query
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
            .collect()
    }

    fn flag(&self, key: &str) -> bool {
        self.all(key)
            .last()
            .is_some_and(|v| matches!(v.as_str(), "true" | "1"))
    }
}

/// What kubelet does with a streaming request: the CRI call, then the
/// connection proxied to the URL it returned (the client's head with the
/// URL's path, every other header kept; then bytes both ways).
async fn proxy_stream(
    mut client: TcpStream,
    head: &Head,
    leftover: Vec<u8>,
    call: StreamCall,
    state: &State,
) -> Result<()> {
    let upgrade = head.value("Upgrade");
    let mut record = StreamRecord {
        kind: call.kind.clone(),
        offered: if upgrade.eq_ignore_ascii_case("websocket") {
            head.values("Sec-WebSocket-Protocol")
        } else {
            head.values("X-Stream-Protocol-Version")
        },
        upgrade,
        status: 0,
        negotiated: String::new(),
        rpc_error: None,
    };
    let url = match stream_url(state, &call).await {
        Ok(url) => url,
        Err((code, message)) => {
            record.rpc_error = Some(message.clone());
            lock(&state.streams).push(record);
            let reason = match code {
                404 => "NotFound",
                400 => "BadRequest",
                _ => "InternalError",
            };
            let (status, body) = status_json(code, reason, &message);
            return write_json(&mut client, status, &body).await;
        }
    };
    let (authority, path) = split_url(&url)?;
    let mut upstream = TcpStream::connect(&authority)
        .await
        .context(|| format!("connect to the streaming server at {authority}"))?;
    upstream
        .write_all(&rewritten_head(head, &authority, &path))
        .await
        .context(|| "forward the request head".into())?;
    upstream
        .write_all(&leftover)
        .await
        .context(|| "forward the request's first bytes".into())?;

    let mut after = Vec::new();
    let answer = read_head(&mut upstream, &mut after)
        .await?
        .ok_or_else(|| Error::Protocol(format!("{url} closed without answering")))?;
    let response = Head::parse(&answer)?;
    record.status = response.first[1].parse().unwrap_or(0);
    record.negotiated = if record.is_websocket() {
        response.value("Sec-WebSocket-Protocol")
    } else {
        response.value("X-Stream-Protocol-Version")
    };
    lock(&state.streams).push(record);
    client
        .write_all(&answer)
        .await
        .context(|| "forward the response head".into())?;
    client
        .write_all(&after)
        .await
        .context(|| "forward the response's first bytes".into())?;
    // Either side closing ends the session; a reset is how some end it.
    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
    Ok(())
}

/// The CRI call behind a streaming request; an error as the HTTP code and
/// message the API server would answer with.
async fn stream_url(
    state: &State,
    call: &StreamCall,
) -> std::result::Result<String, (u16, String)> {
    let internal = |e: Error| (500, e.to_string());
    let sandbox = find_sandbox(state, &call.namespace, &call.pod)
        .await
        .map_err(internal)?
        .ok_or_else(|| (404, format!("pods \"{}\" not found", call.pod)))?;
    let mut client = state.client.clone();
    let rpc =
        |name: &str, s: tonic::Status| (http_code(s.code()), format!("{name}: {}", s.message()));
    if call.kind == "portforward" {
        let port = call
            .all("ports")
            .iter()
            .flat_map(|p| p.split(','))
            .filter_map(|p| p.trim().parse().ok())
            .collect();
        let request = api::PortForwardRequest {
            pod_sandbox_id: sandbox.id,
            port,
        };
        let response = within("PortForward", client.runtime.port_forward(request))
            .await
            .map_err(internal)?
            .map_err(|s| rpc("PortForward", s))?;
        return Ok(response.into_inner().url);
    }
    let container_id = container_id(state, &sandbox.id, call).await?;
    if call.kind == "attach" {
        let request = api::AttachRequest {
            container_id,
            stdin: call.flag("stdin"),
            tty: call.flag("tty"),
            stdout: call.flag("stdout"),
            stderr: call.flag("stderr"),
        };
        let response = within("Attach", client.runtime.attach(request))
            .await
            .map_err(internal)?
            .map_err(|s| rpc("Attach", s))?;
        return Ok(response.into_inner().url);
    }
    let request = api::ExecRequest {
        container_id,
        cmd: call.all("command"),
        tty: call.flag("tty"),
        stdin: call.flag("stdin"),
        stdout: call.flag("stdout"),
        stderr: call.flag("stderr"),
    };
    let response = within("Exec", client.runtime.exec(request))
        .await
        .map_err(internal)?
        .map_err(|s| rpc("Exec", s))?;
    Ok(response.into_inner().url)
}

/// The id of the request's container (the `container` parameter, else the
/// pod's first), running ones first: kubelet resolves a name the same way.
async fn container_id(
    state: &State,
    sandbox: &str,
    call: &StreamCall,
) -> std::result::Result<String, (u16, String)> {
    let containers = containers_of(state, sandbox)
        .await
        .map_err(|e| (500, e.to_string()))?;
    let wanted = call.all("container").pop();
    let running = api::ContainerState::ContainerRunning as i32;
    containers
        .iter()
        .filter(|c| wanted.as_deref().is_none_or(|w| container_name(c) == w))
        .max_by_key(|c| (c.state == running, c.created_at))
        .map(|c| c.id.clone())
        .ok_or_else(|| {
            let name = wanted.unwrap_or_default();
            (
                404,
                format!("container {name:?} not found in pod {}", call.pod),
            )
        })
}

fn http_code(code: tonic::Code) -> u16 {
    match code {
        tonic::Code::NotFound => 404,
        tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition => 400,
        tonic::Code::Unimplemented => 501,
        _ => 500,
    }
}

/// `http://host:port/path?query` → (`host:port`, `/path?query`).
fn split_url(url: &str) -> Result<(String, String)> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| Error::Protocol(format!("streaming URL is not http: {url}")))?;
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let path = if path.is_empty() { "/" } else { path };
    Ok((authority.to_string(), path.to_string()))
}

/// The client's request head for `path` on `authority`: the URL's path,
/// the client's query (kubelet's proxy keeps it) unless the URL has one,
/// `Host` naming the streaming server, every other header as sent.
fn rewritten_head(head: &Head, authority: &str, path: &str) -> Vec<u8> {
    let client_query = head.first[1].split_once('?').map(|(_, q)| q);
    let target = match client_query {
        Some(query) if !path.contains('?') => format!("{path}?{query}"),
        _ => path.to_string(),
    };
    let version = head.first.get(2).map(String::as_str).unwrap_or("HTTP/1.1");
    let mut out = format!("{} {target} {version}\r\n", head.first[0]);
    for (name, value) in &head.headers {
        if name.eq_ignore_ascii_case("Host") {
            out.push_str(&format!("Host: {authority}\r\n"));
        } else {
            out.push_str(&format!("{name}: {value}\r\n"));
        }
    }
    out.push_str("\r\n");
    out.into_bytes()
}

/// `a=1&b=x%20y` → pairs, percent-decoded (`+` is a space in a query).
fn parse_query(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What a kubectl run printed, and how it ended.
#[derive(Debug)]
pub struct Output {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub status: ExitStatus,
}

impl Output {
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }

    /// The exit code; `None` when a signal ended the process.
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }
}

/// The kubectl binary, set up to talk to one [`KubeApi`].
#[derive(Debug, Clone)]
pub struct Kubectl {
    binary: PathBuf,
    kubeconfig: PathBuf,
    /// Discovery is cached per server; a directory of the test's own keeps
    /// `$HOME` clean and tests apart.
    cache_dir: PathBuf,
}

impl Kubectl {
    /// `$CORRAL_KUBECTL`, else `kubectl` on `PATH`, with `kubeconfig`; an
    /// error naming both when neither exists.
    pub fn find(kubeconfig: &Path, cache_dir: &Path) -> Result<Kubectl> {
        let binary = match std::env::var_os(KUBECTL_ENV).filter(|b| !b.is_empty()) {
            Some(binary) => PathBuf::from(binary),
            None => on_path("kubectl").ok_or_else(|| {
                Error::Unavailable(format!(
                    "kubectl is not on PATH and {KUBECTL_ENV} is unset: install kubectl \
                     (Debian: `apt-get install kubernetes-client`) or set {KUBECTL_ENV}"
                ))
            })?,
        };
        if !binary.is_file() {
            return Err(Error::Unavailable(format!(
                "kubectl {} ({KUBECTL_ENV}) does not exist",
                binary.display()
            )));
        }
        Ok(Kubectl {
            binary,
            kubeconfig: kubeconfig.to_path_buf(),
            cache_dir: cache_dir.to_path_buf(),
        })
    }

    pub fn binary(&self) -> &Path {
        &self.binary
    }

    /// The client's (major, minor) version, from `kubectl version --client
    /// -o json` (the minor may carry a `+`).
    pub fn version(&self) -> Result<(u32, u32)> {
        let out = std::process::Command::new(&self.binary)
            .args(["version", "--client", "-o", "json"])
            .env("KUBECONFIG", &self.kubeconfig)
            .output()
            .context(|| format!("run {} version", self.binary.display()))?;
        let info: Value = serde_json::from_slice(&out.stdout)
            .context(|| format!("parse `kubectl version` output {:?}", out.stdout))?;
        let number = |key: &str| {
            info["clientVersion"][key]
                .as_str()
                .map(|v| {
                    v.chars()
                        .take_while(char::is_ascii_digit)
                        .collect::<String>()
                })
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| Error::Protocol(format!("no clientVersion.{key} in {info}")))
        };
        Ok((number("major")?, number("minor")?))
    }

    /// The arguments that point kubectl at the server, before `args`.
    pub fn args(&self, args: &[&str]) -> Vec<String> {
        let mut all = vec![
            format!("--kubeconfig={}", self.kubeconfig.display()),
            format!("--cache-dir={}", self.cache_dir.display()),
        ];
        all.extend(args.iter().map(|a| a.to_string()));
        all
    }

    /// `kubectl args...` with the kubeconfig, killed when dropped. The
    /// environment variables choosing the streaming protocol are removed:
    /// the test sets the ones it means.
    pub fn command(&self, args: &[&str]) -> tokio::process::Command {
        let mut command = tokio::process::Command::new(&self.binary);
        command
            .args(self.args(args))
            .env("KUBECONFIG", &self.kubeconfig)
            .env_remove("KUBECTL_REMOTE_COMMAND_WEBSOCKETS")
            .env_remove("KUBECTL_PORT_FORWARD_WEBSOCKETS")
            .kill_on_drop(true);
        command
    }

    /// The same command as one shell-quoted line, for `script -c`.
    pub fn shell_line(&self, args: &[&str]) -> String {
        std::iter::once(self.binary.display().to_string())
            .chain(self.args(args))
            .map(|a| shell_quote(&a))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

fn shell_quote(arg: &str) -> String {
    format!("'{}'", arg.replace('\'', r"'\''"))
}

/// What a run's stdin gets.
#[derive(Debug, Clone, Copy)]
pub enum Input<'a> {
    /// These bytes, then the end of the input.
    Bytes(&'a [u8]),
    /// These bytes, then nothing until the process exits: `script` would
    /// type a byte of its own into the terminal at the end of its input.
    KeptOpen(&'a [u8]),
}

/// Runs `command` with `input` on its stdin, collecting both outputs; a
/// run longer than `timeout` is killed and is an error, so that a hang
/// fails the test.
pub async fn run_bounded(
    mut command: tokio::process::Command,
    input: Input<'_>,
    timeout: Duration,
) -> Result<Output> {
    command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = command
        .spawn()
        .context(|| format!("spawn {:?}", command.as_std().get_program()))?;
    // Written from its own task: a command echoing its input would block
    // on a full stdout pipe while this side still writes.
    let (bytes, keep_open) = match input {
        Input::Bytes(bytes) => (bytes.to_vec(), false),
        Input::KeptOpen(bytes) => (bytes.to_vec(), true),
    };
    let writer = child.stdin.take().map(|mut pipe| {
        tokio::spawn(async move {
            let _ = pipe.write_all(&bytes).await;
            if keep_open {
                std::future::pending::<()>().await;
            }
        })
    });
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let collect = async {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let read_out = async {
            if let Some(pipe) = stdout.as_mut() {
                let _ = pipe.read_to_end(&mut out).await;
            }
        };
        let read_err = async {
            if let Some(pipe) = stderr.as_mut() {
                let _ = pipe.read_to_end(&mut err).await;
            }
        };
        tokio::join!(read_out, read_err);
        let status = child.wait().await;
        (out, err, status)
    };
    let finished = tokio::time::timeout(timeout, collect).await;
    if let Some(writer) = writer {
        writer.abort();
    }
    let (stdout, stderr, status) = finished.map_err(|_| {
        Error::Timeout(format!(
            "{:?} still running after {timeout:?}",
            command.as_std().get_args().collect::<Vec<_>>()
        ))
    })?;
    let status = status.context(|| "wait for kubectl".into())?;
    Ok(Output {
        stdout,
        stderr,
        status,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_decode() {
        let q = parse_query("command=sh&command=-c&command=echo+a%3B%20exit%203&tty=true");
        assert_eq!(q[2], ("command".to_string(), "echo a; exit 3".to_string()));
        assert_eq!(q[3].1, "true");
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
    }

    #[test]
    fn heads_parse_and_rewrite() {
        let head = Head::parse(
            b"POST /api/v1/namespaces/n/pods/p/exec?command=ls HTTP/1.1\r\nHost: 127.0.0.1:1\r\n\
              X-Stream-Protocol-Version: v4.channel.k8s.io\r\n\
              X-Stream-Protocol-Version: v3.channel.k8s.io\r\nUpgrade: SPDY/3.1\r\n\r\n",
        )
        .unwrap();
        assert_eq!(
            head.values("x-stream-protocol-version"),
            ["v4.channel.k8s.io", "v3.channel.k8s.io"]
        );
        let (authority, path) = split_url("http://127.0.0.1:9/exec/tok").unwrap();
        let out = String::from_utf8(rewritten_head(&head, &authority, &path)).unwrap();
        assert!(out.starts_with("POST /exec/tok?command=ls HTTP/1.1\r\nHost: 127.0.0.1:9\r\n"));
        assert!(out.ends_with("Upgrade: SPDY/3.1\r\n\r\n"));
    }
}
