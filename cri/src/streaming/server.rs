//! The streaming server's HTTP/1.1 side: the listener, the validation and
//! tokens behind each URL, and the upgrade of a request that presents a
//! token to SPDY/3.1 or WebSocket.
//!
//! Only `GET|POST /exec/<token>`, `/attach/<token>` and
//! `/portforward/<token>` are served, each once; after the upgrade the
//! connection belongs to [`remotecommand`](super::remotecommand),
//! [`attach`](super::attach) or
//! [`portforward`](super::portforward).

use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::Duration;

use k8s_cri::v1 as cri;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::token::{TokenCache, TOKEN_TTL};
use super::{attach, portforward, remotecommand, StreamingError};
use crate::node::Node;
use crate::store::SandboxState;

/// A client gets this long to send its request head after connecting.
const HEAD_TIMEOUT: Duration = Duration::from_secs(30);

/// The longest request head accepted.
const MAX_HEAD: usize = 16 * 1024;

/// The remote-command subprotocols served over SPDY, newest first.
const SPDY_REMOTECOMMAND: &[&str] = &[
    "v4.channel.k8s.io",
    "v3.channel.k8s.io",
    "v2.channel.k8s.io",
    "channel.k8s.io",
];

/// The remote-command subprotocols served over WebSocket.
const WS_REMOTECOMMAND: &[&str] = &[
    "v5.channel.k8s.io",
    "v4.channel.k8s.io",
    "v4.base64.channel.k8s.io",
    "channel.k8s.io",
    "base64.channel.k8s.io",
];

const SPDY_PORTFORWARD: &[&str] = &["portforward.k8s.io"];
const WS_PORTFORWARD: &[&str] = &["v4.channel.k8s.io", "v4.base64.channel.k8s.io"];

/// A request waiting for its client, stored under its token.
#[derive(Debug, Clone)]
pub(crate) enum Pending {
    Exec(cri::ExecRequest),
    Attach(cri::AttachRequest),
    PortForward(cri::PortForwardRequest),
}

pub struct StreamingServer {
    address: SocketAddr,
    pending: Arc<TokenCache<Pending>>,
    node: Weak<Node>,
    accept: tokio::task::JoinHandle<()>,
}

impl Drop for StreamingServer {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl StreamingServer {
    /// Binds `address:port` (0: any free port) and serves until dropped.
    pub async fn start(
        address: &str,
        port: u16,
        node: Weak<Node>,
    ) -> Result<Arc<StreamingServer>, StreamingError> {
        let ip: std::net::IpAddr = address.parse().map_err(|_| {
            StreamingError::InvalidArgument(format!(
                "streaming address {address:?} is not an IP address"
            ))
        })?;
        let listener =
            TcpListener::bind((ip, port))
                .await
                .map_err(|source| StreamingError::Io {
                    what: "bind the streaming server",
                    source,
                })?;
        let address = listener.local_addr().map_err(|source| StreamingError::Io {
            what: "streaming server address",
            source,
        })?;
        let pending = Arc::new(TokenCache::new(TOKEN_TTL));
        let accept = tokio::spawn(accept_loop(listener, Arc::clone(&pending), node.clone()));
        tracing::info!("streaming server on http://{address}");
        Ok(Arc::new(StreamingServer {
            address,
            pending,
            node,
            accept,
        }))
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Validates an Exec and returns the URL that runs it, once.
    pub fn exec_url(&self, req: cri::ExecRequest) -> Result<String, StreamingError> {
        if req.cmd.is_empty() {
            return Err(StreamingError::InvalidArgument("Exec cmd is empty".into()));
        }
        validate_streams(req.stdin, req.stdout, req.stderr, req.tty)?;
        let id = self
            .node()?
            .running_container(&req.container_id)?
            .id
            .clone();
        self.url(
            "exec",
            Pending::Exec(cri::ExecRequest {
                container_id: id,
                ..req
            }),
        )
    }

    /// Validates an Attach and returns the URL that runs it, once. Attach
    /// goes through the attach socket of corral's shim, or, for another
    /// shim's container, the FIFOs corrald copies (which a container
    /// without a log path does not have: refused as unimplemented).
    pub fn attach_url(&self, req: cri::AttachRequest) -> Result<String, StreamingError> {
        validate_streams(req.stdin, req.stdout, req.stderr, req.tty)?;
        let node = self.node()?;
        let container = node.running_container(&req.container_id)?;
        if req.stdin && !container.config.stdin {
            return Err(StreamingError::InvalidArgument(format!(
                "container {} was not created with stdin: it cannot be attached with stdin",
                container.id
            )));
        }
        let handler = node
            .sandbox(&container.sandbox_id)?
            .record()
            .runtime_handler
            .clone();
        if !crate::container::shim_writes_log(&node, &handler)
            && node.copiers.attach(&container.id).is_none()
        {
            return Err(StreamingError::Unimplemented(format!(
                "Attach to container {}: its shim (runtime handler {handler:?}) is not \
                 corral's and it has no log path, so corrald holds none of its stdio",
                container.id
            )));
        }
        let req = cri::AttachRequest {
            container_id: container.id.clone(),
            ..req
        };
        self.url("attach", Pending::Attach(req))
    }

    /// Validates a PortForward and returns the URL that runs it, once.
    pub fn port_forward_url(&self, req: cri::PortForwardRequest) -> Result<String, StreamingError> {
        let node = self.node()?;
        let sandbox = node.sandbox(&req.pod_sandbox_id)?;
        if sandbox.record().state != SandboxState::Ready {
            return Err(StreamingError::FailedPrecondition(format!(
                "pod sandbox {} is not ready",
                sandbox.id
            )));
        }
        if let Some(port) = req.port.iter().find(|p| !(1..=65535).contains(*p)) {
            return Err(StreamingError::InvalidArgument(format!(
                "port {port} is not a TCP port"
            )));
        }
        let req = cri::PortForwardRequest {
            pod_sandbox_id: sandbox.id.clone(),
            ..req
        };
        self.url("portforward", Pending::PortForward(req))
    }

    fn url(&self, kind: &str, pending: Pending) -> Result<String, StreamingError> {
        let token = self.pending.insert(pending)?;
        Ok(format!("http://{}/{kind}/{token}", self.url_address()))
    }

    /// An unspecified bind address is not one a client can dial: the URL
    /// names loopback of the same family instead.
    fn url_address(&self) -> SocketAddr {
        let mut address = self.address;
        if address.ip().is_unspecified() {
            address.set_ip(match address {
                SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
        }
        address
    }

    fn node(&self) -> Result<Arc<Node>, StreamingError> {
        self.node.upgrade().ok_or(StreamingError::ShuttingDown)
    }
}

fn validate_streams(
    stdin: bool,
    stdout: bool,
    stderr: bool,
    tty: bool,
) -> Result<(), StreamingError> {
    if !(stdin || stdout || stderr) {
        return Err(StreamingError::InvalidArgument(
            "one of stdin, stdout or stderr must be asked for".into(),
        ));
    }
    if tty && stderr {
        return Err(StreamingError::InvalidArgument(
            "tty and stderr cannot both be true: a terminal has one output".into(),
        ));
    }
    Ok(())
}

async fn accept_loop(listener: TcpListener, pending: Arc<TokenCache<Pending>>, node: Weak<Node>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of descriptors and the like: back off, do not spin.
                tracing::warn!("streaming server accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let pending = Arc::clone(&pending);
        let node = node.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_connection(stream, &pending, &node).await {
                tracing::debug!("streaming request from {peer}: {e}");
            }
        });
    }
}

/// The request head of an HTTP/1.1 request, as far as routing needs it.
#[derive(Debug)]
pub(crate) struct Head {
    pub method: String,
    pub path: String,
    pub query: String,
    pub headers: Vec<(String, String)>,
}

impl Head {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Every value of a header that may repeat or hold a comma list.
    pub fn list(&self, name: &str) -> Vec<String> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .flat_map(|(_, v)| v.split(','))
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
            .collect()
    }

    pub fn query_values(&self, key: &str) -> Vec<String> {
        self.query
            .split('&')
            .filter_map(|pair| pair.split_once('='))
            .filter(|(k, _)| *k == key)
            .map(|(_, v)| v.to_string())
            .collect()
    }
}

/// The connection after the 101 answer.
pub(crate) struct Upgraded {
    pub reader: tokio::io::Chain<std::io::Cursor<Vec<u8>>, tokio::net::tcp::OwnedReadHalf>,
    pub writer: tokio::net::tcp::OwnedWriteHalf,
    pub transport: Transport,
    pub protocol: String,
    pub head: Head,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transport {
    Spdy,
    WebSocket,
}

async fn serve_connection(
    mut stream: TcpStream,
    pending: &TokenCache<Pending>,
    node: &Weak<Node>,
) -> Result<(), StreamingError> {
    let (head, leftover) = match tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut stream)).await {
        Ok(Ok(read)) => read,
        Ok(Err(e)) => {
            respond(&mut stream, 400, &e.to_string()).await;
            return Err(e);
        }
        Err(_) => return Ok(()),
    };
    if head.method != "GET" && head.method != "POST" {
        respond(&mut stream, 405, "only GET and POST are served").await;
        return Ok(());
    }
    let Some(request) = route(&head, pending) else {
        respond(&mut stream, 404, "unknown or expired streaming token").await;
        return Ok(());
    };
    let Some(node) = node.upgrade() else {
        respond(&mut stream, 503, "corrald is shutting down").await;
        return Ok(());
    };
    let offered = match &request {
        Pending::PortForward(_) => (SPDY_PORTFORWARD, WS_PORTFORWARD),
        _ => (SPDY_REMOTECOMMAND, WS_REMOTECOMMAND),
    };
    let upgraded = match upgrade(stream, head, leftover, offered).await? {
        Some(upgraded) => upgraded,
        None => return Ok(()),
    };
    match request {
        Pending::Exec(req) => remotecommand::serve_exec(node, req, upgraded).await,
        Pending::Attach(req) => attach::serve_attach(node, req, upgraded).await,
        Pending::PortForward(req) => portforward::serve(node, req, upgraded).await,
    }
    Ok(())
}

fn route(head: &Head, pending: &TokenCache<Pending>) -> Option<Pending> {
    let mut parts = head.path.trim_start_matches('/').splitn(2, '/');
    let (kind, token) = (parts.next()?, parts.next()?);
    if token.is_empty() || token.contains('/') {
        return None;
    }
    let request = pending.take(token)?;
    let matches = matches!(
        (kind, &request),
        ("exec", Pending::Exec(_))
            | ("attach", Pending::Attach(_))
            | ("portforward", Pending::PortForward(_))
    );
    matches.then_some(request)
}

/// Answers 101 in the transport and subprotocol the client asked for, or
/// an error status (and `None`) when there is no common one.
async fn upgrade(
    mut stream: TcpStream,
    head: Head,
    leftover: Vec<u8>,
    (spdy, ws): (&[&str], &[&str]),
) -> Result<Option<Upgraded>, StreamingError> {
    let upgrade = head.header("upgrade").unwrap_or("").to_ascii_lowercase();
    let (transport, offered, supported) = if upgrade == "spdy/3.1" {
        (
            Transport::Spdy,
            head.list("x-stream-protocol-version"),
            spdy,
        )
    } else if upgrade == "websocket" {
        (
            Transport::WebSocket,
            head.list("sec-websocket-protocol"),
            ws,
        )
    } else {
        respond(
            &mut stream,
            400,
            "the request must upgrade to SPDY/3.1 or websocket",
        )
        .await;
        return Ok(None);
    };
    // A client that names no subprotocol gets the oldest one, as kubelet's.
    let protocol = if offered.is_empty() {
        supported[supported.len() - 1].to_string()
    } else if let Some(p) = offered.iter().find(|p| supported.contains(&p.as_str())) {
        p.clone()
    } else {
        let msg = format!(
            "unable to upgrade: unable to negotiate protocol: client supports {offered:?}, server supports {supported:?}"
        );
        respond(&mut stream, 403, &msg).await;
        return Ok(None);
    };
    let answer = match transport {
        Transport::Spdy => format!(
            "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: {protocol}\r\n\r\n"
        ),
        Transport::WebSocket => {
            let Some(key) = head.header("sec-websocket-key") else {
                respond(&mut stream, 400, "Sec-WebSocket-Key is missing").await;
                return Ok(None);
            };
            let mut answer = format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n",
                super::websocket::accept_key(key)
            );
            if !offered.is_empty() {
                answer.push_str(&format!("Sec-WebSocket-Protocol: {protocol}\r\n"));
            }
            answer.push_str("\r\n");
            answer
        }
    };
    stream
        .write_all(answer.as_bytes())
        .await
        .map_err(|source| StreamingError::Io {
            what: "answer the upgrade",
            source,
        })?;
    let (reader, writer) = stream.into_split();
    Ok(Some(Upgraded {
        reader: std::io::Cursor::new(leftover).chain(reader),
        writer,
        transport,
        protocol,
        head,
    }))
}

/// Reads up to the end of the request head; returns it and whatever the
/// client sent after it.
async fn read_head(stream: &mut TcpStream) -> Result<(Head, Vec<u8>), StreamingError> {
    let mut buf = Vec::with_capacity(2048);
    loop {
        let mut chunk = [0u8; 2048];
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|source| StreamingError::Io {
                what: "read the request",
                source,
            })?;
        if n == 0 {
            return Err(StreamingError::InvalidArgument(
                "connection closed in the request head".into(),
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => {
                let target = req.path.unwrap_or("/");
                let (path, query) = target.split_once('?').unwrap_or((target, ""));
                let head = Head {
                    method: req.method.unwrap_or("").to_string(),
                    path: path.to_string(),
                    query: query.to_string(),
                    headers: req
                        .headers
                        .iter()
                        .map(|h| {
                            (
                                h.name.to_string(),
                                String::from_utf8_lossy(h.value).into_owned(),
                            )
                        })
                        .collect(),
                };
                return Ok((head, buf[len..].to_vec()));
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => continue,
            Ok(httparse::Status::Partial) => {
                return Err(StreamingError::InvalidArgument(
                    "request head too large".into(),
                ))
            }
            Err(e) => {
                return Err(StreamingError::InvalidArgument(format!(
                    "bad HTTP request: {e}"
                )))
            }
        }
    }
}

async fn respond(stream: &mut TcpStream, code: u16, body: &str) {
    let reason = match code {
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Service Unavailable",
    };
    let answer = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(answer.as_bytes()).await;
    let _ = stream.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_choices_are_validated() {
        assert!(validate_streams(false, false, false, false).is_err());
        assert!(validate_streams(false, true, true, true).is_err());
        assert!(validate_streams(true, false, false, true).is_ok());
        assert!(validate_streams(false, true, true, false).is_ok());
    }

    fn head(path: &str) -> Head {
        Head {
            method: "POST".into(),
            path: path.into(),
            query: "port=80&port=8080&x".into(),
            headers: vec![
                (
                    "X-Stream-Protocol-Version".into(),
                    "v4.channel.k8s.io".into(),
                ),
                (
                    "x-stream-protocol-version".into(),
                    "v3.channel.k8s.io, v2.channel.k8s.io".into(),
                ),
            ],
        }
    }

    #[test]
    fn tokens_route_to_their_kind_once() {
        let cache = TokenCache::new(TOKEN_TTL);
        let token = cache
            .insert(Pending::PortForward(cri::PortForwardRequest::default()))
            .unwrap();
        // The wrong kind consumes the token too: a URL is used once.
        assert!(route(&head(&format!("/exec/{token}")), &cache).is_none());
        let token = cache
            .insert(Pending::PortForward(cri::PortForwardRequest::default()))
            .unwrap();
        assert!(route(&head(&format!("/portforward/{token}")), &cache).is_some());
        assert!(route(&head(&format!("/portforward/{token}")), &cache).is_none());
    }

    #[test]
    fn repeated_and_listed_headers_and_query_values() {
        let h = head("/");
        assert_eq!(
            h.list("X-Stream-Protocol-Version"),
            [
                "v4.channel.k8s.io",
                "v3.channel.k8s.io",
                "v2.channel.k8s.io"
            ]
        );
        assert_eq!(h.query_values("port"), ["80", "8080"]);
    }
}
