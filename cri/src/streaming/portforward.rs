//! Port forwarding over an upgraded connection: each forwarded connection
//! is a TCP connection to loopback inside the pod's network namespace.
//!
//! Over SPDY (`portforward.k8s.io`) the client opens an error stream and a
//! data stream per connection, paired by their `requestID` header; over
//! WebSocket (`v4.channel.k8s.io`) the ports come from the URL's query,
//! port i on channels 2i (data) and 2i+1 (error), each channel's first
//! message being the port in two little-endian bytes.
//!
//! This module owns those TCP connections; a refused one is reported on
//! its error stream and the others go on.

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use k8s_cri::v1 as cri;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use super::server::{Transport, Upgraded};
use super::{spdy, websocket, Out, StreamingError, INPUT_QUEUE, READ_CHUNK};
use crate::netns::NetNs;
use crate::node::Node;

/// A stream whose partner has not come after this long is dropped.
const PAIR_TIMEOUT: Duration = Duration::from_secs(30);

/// Where connections go: loopback of the pod's network namespace (`None`
/// for a pod on the host network).
#[derive(Debug, Clone)]
struct Target {
    sandbox: String,
    netns: Option<PathBuf>,
}

pub(crate) async fn serve(node: Arc<Node>, req: cri::PortForwardRequest, upgraded: Upgraded) {
    let target = match node.sandbox(&req.pod_sandbox_id) {
        Ok(sandbox) => Target {
            sandbox: sandbox.id.clone(),
            netns: sandbox.record().netns.clone(),
        },
        Err(e) => {
            tracing::debug!("port forward: {e}");
            return;
        }
    };
    drop(node);
    match upgraded.transport {
        Transport::Spdy => serve_spdy(target, upgraded).await,
        Transport::WebSocket => serve_websocket(target, upgraded).await,
    }
}

/// A pair's streams as they arrive.
#[derive(Default)]
struct Pair {
    data: Option<spdy::IncomingStream>,
    error: Option<spdy::IncomingStream>,
    port: Option<u16>,
    since: Option<tokio::time::Instant>,
}

async fn serve_spdy(target: Target, up: Upgraded) {
    let mut conn = spdy::Connection::start(up.reader, up.writer);
    let mut pairs: HashMap<String, Pair> = HashMap::new();
    let mut forwards = tokio::task::JoinSet::new();
    let mut sweep = tokio::time::interval(PAIR_TIMEOUT / 2);
    loop {
        let stream = tokio::select! {
            stream = conn.incoming.recv() => match stream {
                Some(stream) => stream,
                None => break,
            },
            _ = sweep.tick() => {
                drop_stale_pairs(&mut pairs, &conn.out).await;
                continue;
            }
            Some(_) = forwards.join_next(), if !forwards.is_empty() => continue,
        };
        let Some(key) = add_to_pair(&mut pairs, stream, &conn.out).await else {
            continue;
        };
        if !pairs
            .get(&key)
            .is_some_and(|p| p.data.is_some() && p.error.is_some())
        {
            continue;
        }
        if let Some(Pair {
            data: Some(data),
            error: Some(error),
            port: Some(port),
            ..
        }) = pairs.remove(&key)
        {
            forwards.spawn(forward_spdy(
                target.clone(),
                port,
                data,
                error,
                conn.out.clone(),
            ));
        }
    }
    // The client is gone: every connection of it ends with it.
    forwards.abort_all();
    conn.finish().await;
}

/// Files `stream` under its request id; returns that id.
async fn add_to_pair(
    pairs: &mut HashMap<String, Pair>,
    stream: spdy::IncomingStream,
    out: &mpsc::Sender<Out>,
) -> Option<String> {
    let kind = spdy::header(&stream.headers, "streamtype")
        .unwrap_or("")
        .to_string();
    let port = spdy::header(&stream.headers, "port").and_then(|p| p.parse::<u16>().ok());
    let Some(port) = port.filter(|p| *p > 0) else {
        let _ = out
            .send(Out::Reset(stream.id, spdy::RST_PROTOCOL_ERROR))
            .await;
        return None;
    };
    // Clients older than request ids open the error stream right before
    // the data stream: the data stream's id pairs them.
    let key = match spdy::header(&stream.headers, "requestid") {
        Some(id) => id.to_string(),
        None if kind == "error" => (stream.id + 2).to_string(),
        None => stream.id.to_string(),
    };
    let pair = pairs.entry(key.clone()).or_default();
    pair.since.get_or_insert_with(tokio::time::Instant::now);
    let slot = match kind.as_str() {
        "data" => &mut pair.data,
        "error" => &mut pair.error,
        _ => {
            let _ = out
                .send(Out::Reset(stream.id, spdy::RST_PROTOCOL_ERROR))
                .await;
            return None;
        }
    };
    if slot.is_some() || pair.port.is_some_and(|p| p != port) {
        let _ = out
            .send(Out::Reset(stream.id, spdy::RST_PROTOCOL_ERROR))
            .await;
        return None;
    }
    *slot = Some(stream);
    pair.port = Some(port);
    Some(key)
}

async fn drop_stale_pairs(pairs: &mut HashMap<String, Pair>, out: &mpsc::Sender<Out>) {
    let stale: Vec<String> = pairs
        .iter()
        .filter(|(_, p)| p.since.is_some_and(|s| s.elapsed() > PAIR_TIMEOUT))
        .map(|(k, _)| k.clone())
        .collect();
    for key in stale {
        if let Some(pair) = pairs.remove(&key) {
            for stream in [pair.data, pair.error].into_iter().flatten() {
                let _ = out.send(Out::Reset(stream.id, spdy::RST_CANCEL)).await;
            }
        }
    }
}

async fn forward_spdy(
    target: Target,
    port: u16,
    data: spdy::IncomingStream,
    error: spdy::IncomingStream,
    out: mpsc::Sender<Out>,
) {
    match connect(&target, port).await {
        Ok(socket) => {
            copy_both_ways(socket, data.data, out.clone(), data.id).await;
        }
        Err(e) => {
            let message = format!(
                "error forwarding port {port} to pod {}: {e}",
                target.sandbox
            );
            let _ = out.send(Out::Data(error.id, message.into_bytes())).await;
            let _ = out.send(Out::Fin(data.id)).await;
        }
    }
    let _ = out.send(Out::Fin(error.id)).await;
}

/// Client → socket and socket → client until the socket's side ends: as
/// kubectl's client, the connection is over once the pod has said all it
/// will (the client may never half-close its own side).
async fn copy_both_ways(
    socket: TcpStream,
    mut from_client: mpsc::Receiver<Vec<u8>>,
    out: mpsc::Sender<Out>,
    id: u32,
) {
    let (mut rd, mut wr) = socket.into_split();
    let up = async move {
        while let Some(chunk) = from_client.recv().await {
            if wr.write_all(&chunk).await.is_err() {
                break;
            }
        }
        let _ = wr.shutdown().await;
        // Half-closed: the pod may still answer.
        std::future::pending::<()>().await
    };
    let down = async {
        let mut buf = vec![0u8; READ_CHUNK];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if out.send(Out::Data(id, buf[..n].to_vec())).await.is_err() {
                        return;
                    }
                }
            }
        }
        let _ = out.send(Out::Fin(id)).await;
    };
    tokio::select! {
        _ = up => {}
        _ = down => {}
    }
}

async fn serve_websocket(target: Target, up: Upgraded) {
    let ports: Vec<u16> = up
        .head
        .query_values("port")
        .iter()
        .filter_map(|p| p.parse().ok())
        .collect();
    let encoding = if up.protocol.contains("base64") {
        websocket::Encoding::Base64
    } else {
        websocket::Encoding::Binary
    };
    let mut inputs = HashMap::new();
    let mut receivers = Vec::new();
    for i in 0..ports.len() {
        let (tx, rx) = mpsc::channel(INPUT_QUEUE);
        inputs.insert((2 * i) as u8, tx);
        receivers.push(rx);
    }
    let conn = websocket::Connection::start(up.reader, up.writer, encoding, inputs, false);
    let mut forwards = tokio::task::JoinSet::new();
    for (i, (port, rx)) in ports.iter().copied().zip(receivers).enumerate() {
        let (data, error) = ((2 * i) as u32, (2 * i + 1) as u32);
        for ch in [data, error] {
            let _ = conn
                .out
                .send(Out::Data(ch, port.to_le_bytes().to_vec()))
                .await;
        }
        let (target, out) = (target.clone(), conn.out.clone());
        forwards.spawn(async move {
            match connect(&target, port).await {
                Ok(socket) => copy_both_ways(socket, rx, out, data).await,
                Err(e) => {
                    let message = format!(
                        "error forwarding port {port} to pod {}: {e}",
                        target.sandbox
                    );
                    let _ = out.send(Out::Data(error, message.into_bytes())).await;
                }
            }
        });
    }
    let mut gone = conn.gone.clone();
    tokio::select! {
        _ = gone.wait_for(|g| *g) => forwards.abort_all(),
        _ = async { while forwards.join_next().await.is_some() {} } => {}
    }
    conn.finish().await;
}

/// Connects to `port` on loopback inside the pod's network namespace.
async fn connect(target: &Target, port: u16) -> Result<TcpStream, StreamingError> {
    let netns = target.netns.clone();
    let socket =
        tokio::task::spawn_blocking(move || -> Result<std::net::TcpStream, StreamingError> {
            let dial = || {
                std::net::TcpStream::connect(SocketAddr::from((Ipv4Addr::LOCALHOST, port))).or_else(
                    |_| std::net::TcpStream::connect(SocketAddr::from((Ipv6Addr::LOCALHOST, port))),
                )
            };
            let io = |source| StreamingError::Io {
                what: "connect inside the pod",
                source,
            };
            match netns {
                Some(path) => NetNs::open(path)
                    .map_err(|e| StreamingError::Runtime(e.to_string()))?
                    .run(dial)
                    .map_err(|e| StreamingError::Runtime(e.to_string()))?
                    .map_err(io),
                None => dial().map_err(io),
            }
        })
        .await
        .map_err(|e| StreamingError::Runtime(format!("connect task: {e}")))??;
    socket
        .set_nonblocking(true)
        .and_then(|_| socket.set_nodelay(true))
        .map_err(|source| StreamingError::Io {
            what: "set up a forwarded socket",
            source,
        })?;
    TcpStream::from_std(socket).map_err(|source| StreamingError::Io {
        what: "register a forwarded socket",
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Connecting on the host network (no namespace) to a listener, and a
    /// refused port reported as an error.
    #[tokio::test]
    async fn connects_on_loopback_and_reports_refusal() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let target = Target {
            sandbox: "pod".into(),
            netns: None,
        };
        let accept = tokio::spawn(async move { listener.accept().await.unwrap() });
        let socket = connect(&target, port).await.unwrap();
        let (mut server, _) = accept.await.unwrap();
        let (tx, rx) = mpsc::channel(4);
        let (out_tx, mut out_rx) = mpsc::channel(16);
        let copy = tokio::spawn(copy_both_ways(socket, rx, out_tx, 5));
        tx.send(b"ping".to_vec()).await.unwrap();
        drop(tx);
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"ping");
        server.write_all(b"pong").await.unwrap();
        drop(server);
        copy.await.unwrap();
        assert!(matches!(out_rx.recv().await, Some(Out::Data(5, d)) if d == b"pong"));
        assert!(matches!(out_rx.recv().await, Some(Out::Fin(5))));

        // Nothing listens on the port any more.
        assert!(connect(&target, port).await.is_err());
    }
}
