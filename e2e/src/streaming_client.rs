//! Clients of corrald's streaming server, as kubelet's and kubectl's: the
//! HTTP upgrade, SPDY/3.1 remote command and port forward, and WebSocket
//! (`channel.k8s.io` framing) exec and port forward.
//!
//! The frame codecs are corrald's own (`corral_cri::streaming::{spdy,
//! websocket}`, unit-tested there against the RFCs' examples); what this
//! module adds is the client's side of each protocol: which streams it
//! opens, in which order, and what it expects back. Tests check the
//! WebSocket framing against an independent client (Python's
//! websocket-client) as well.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use corral_cri::streaming::spdy::{self, Frame, HeaderDecoder, HeaderEncoder};
use corral_cri::streaming::websocket;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::error::{Error, Result};

fn err(msg: impl Into<String>) -> Error {
    Error::Protocol(msg.into())
}

/// The answer to an upgrade request.
#[derive(Debug)]
pub struct Upgrade {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body_start: Vec<u8>,
}

impl Upgrade {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Sends `POST <url>` with `headers` and reads the answer's head.
pub async fn request(url: &str, headers: &[(&str, &str)]) -> Result<(TcpStream, Upgrade)> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| err(format!("not an http URL: {url}")))?;
    let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let mut stream = TcpStream::connect(host)
        .await
        .map_err(|e| err(format!("connect {host}: {e}")))?;
    let _ = stream.set_nodelay(true);
    let mut head = format!("POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream
        .write_all(head.as_bytes())
        .await
        .map_err(|e| err(format!("send request: {e}")))?;
    let mut buf = Vec::new();
    let end = loop {
        let mut chunk = [0u8; 1024];
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|e| err(format!("read answer: {e}")))?;
        if n == 0 {
            return Err(err("connection closed before the answer"));
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let text = String::from_utf8_lossy(&buf[..end]).into_owned();
    let mut lines = text.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| err(format!("bad answer: {text:?}")))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
        .collect();
    Ok((
        stream,
        Upgrade {
            status,
            headers,
            body_start: buf[end..].to_vec(),
        },
    ))
}

/// What a stream delivers to the client.
#[derive(Debug)]
enum Chunk {
    Data(Vec<u8>),
    End,
}

type Routes = Arc<Mutex<HashMap<u32, mpsc::UnboundedSender<Chunk>>>>;

/// A SPDY/3.1 client connection.
pub struct SpdyClient {
    pub protocol: String,
    writer: Arc<tokio::sync::Mutex<(tokio::net::tcp::OwnedWriteHalf, HeaderEncoder)>>,
    routes: Routes,
    next_id: AtomicU32,
    /// While true the connection is not read at all: the server's writes
    /// back up into the socket, as they do behind a slow client.
    paused: tokio::sync::watch::Sender<bool>,
}

/// A stream this client opened.
pub struct ClientStream {
    pub id: u32,
    rx: mpsc::UnboundedReceiver<Chunk>,
    writer: Arc<tokio::sync::Mutex<(tokio::net::tcp::OwnedWriteHalf, HeaderEncoder)>>,
}

impl SpdyClient {
    /// Upgrades `url` to SPDY/3.1 offering `protocols`.
    pub async fn connect(url: &str, protocols: &[&str]) -> Result<SpdyClient> {
        let mut headers = vec![("Connection", "Upgrade"), ("Upgrade", "SPDY/3.1")];
        for p in protocols {
            headers.push(("X-Stream-Protocol-Version", p));
        }
        let (stream, answer) = request(url, &headers).await?;
        if answer.status != 101 {
            return Err(err(format!("upgrade answered {}", answer.status)));
        }
        let protocol = answer
            .header("X-Stream-Protocol-Version")
            .unwrap_or("")
            .to_string();
        let (reader, writer) = stream.into_split();
        let routes: Routes = Arc::default();
        let reader = std::io::Cursor::new(answer.body_start).chain(reader);
        let (paused, paused_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(read_loop(reader, Arc::clone(&routes), paused_rx));
        Ok(SpdyClient {
            protocol,
            writer: Arc::new(tokio::sync::Mutex::new((writer, HeaderEncoder::new()))),
            routes,
            next_id: AtomicU32::new(1),
            paused,
        })
    }

    /// Stops (`true`) or resumes reading the connection.
    pub fn pause_reading(&self, paused: bool) {
        self.paused.send_replace(paused);
    }

    /// Opens a stream with `headers` (SYN_STREAM); the server's reply is
    /// not awaited.
    pub async fn open(&self, headers: &[(&str, &str)]) -> Result<ClientStream> {
        let id = self.next_id.fetch_add(2, Ordering::SeqCst);
        let (tx, rx) = mpsc::unbounded_channel();
        self.routes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, tx);
        let frame = Frame::SynStream {
            stream_id: id,
            associated_to: 0,
            priority: 0,
            flags: 0,
            headers: headers
                .iter()
                .map(|(n, v)| (n.to_ascii_lowercase(), v.to_string()))
                .collect(),
        };
        let mut w = self.writer.lock().await;
        let (writer, enc) = &mut *w;
        let bytes = spdy::encode(&frame, enc);
        writer
            .write_all(&bytes)
            .await
            .map_err(|e| err(format!("open stream: {e}")))?;
        Ok(ClientStream {
            id,
            rx,
            writer: Arc::clone(&self.writer),
        })
    }
}

impl ClientStream {
    pub async fn write(&self, data: &[u8]) -> Result<()> {
        self.send(data, 0).await
    }

    /// Half-closes: the server reads EOF.
    pub async fn close(&self) -> Result<()> {
        self.send(&[], spdy::FLAG_FIN).await
    }

    async fn send(&self, data: &[u8], flags: u8) -> Result<()> {
        let frame = Frame::Data {
            stream_id: self.id,
            flags,
            data: data.to_vec(),
        };
        let mut w = self.writer.lock().await;
        let (writer, enc) = &mut *w;
        let bytes = spdy::encode(&frame, enc);
        writer
            .write_all(&bytes)
            .await
            .map_err(|e| err(format!("write stream {}: {e}", self.id)))
    }

    /// Everything the server sends on the stream until it ends it.
    pub async fn read_all(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        while let Some(Chunk::Data(d)) = self.rx.recv().await {
            out.extend_from_slice(&d);
        }
        out
    }

    /// The next piece the server sends, `None` at the stream's end.
    pub async fn read(&mut self) -> Option<Vec<u8>> {
        match self.rx.recv().await {
            Some(Chunk::Data(d)) => Some(d),
            _ => None,
        }
    }
}

async fn read_loop<R: tokio::io::AsyncRead + Unpin>(
    mut reader: R,
    routes: Routes,
    mut paused: tokio::sync::watch::Receiver<bool>,
) {
    let mut dec = HeaderDecoder::new();
    loop {
        // A dropped client no longer pauses anything: keep reading.
        let _ = paused.wait_for(|p| !*p).await;
        let Ok(Some(frame)) = spdy::read_frame(&mut reader, &mut dec).await else {
            break;
        };
        let routes_now = routes.lock().unwrap_or_else(|e| e.into_inner());
        match frame {
            Frame::Data {
                stream_id,
                flags,
                data,
            } => {
                if let Some(tx) = routes_now.get(&stream_id) {
                    if !data.is_empty() {
                        let _ = tx.send(Chunk::Data(data));
                    }
                    if flags & spdy::FLAG_FIN != 0 {
                        let _ = tx.send(Chunk::End);
                    }
                }
            }
            Frame::RstStream { stream_id, .. } => {
                if let Some(tx) = routes_now.get(&stream_id) {
                    let _ = tx.send(Chunk::End);
                }
            }
            Frame::GoAway { .. } => break,
            _ => {}
        }
    }
    routes.lock().unwrap_or_else(|e| e.into_inner()).clear();
}

/// What an exec delivered.
#[derive(Debug, Default)]
pub struct ExecOutput {
    pub protocol: String,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// The error stream: a v4 `Status` as JSON.
    pub error: Vec<u8>,
}

impl ExecOutput {
    /// The exit code the v4 status reports (0 for Success).
    pub fn exit_code(&self) -> Option<i32> {
        let status: serde_json::Value = serde_json::from_slice(&self.error).ok()?;
        if status["status"] == "Success" {
            return Some(0);
        }
        status["details"]["causes"]
            .as_array()?
            .iter()
            .find(|c| c["reason"] == "ExitCode")?["message"]
            .as_str()?
            .parse()
            .ok()
    }
}

/// How to drive one exec.
#[derive(Debug, Clone, Default)]
pub struct ExecInput {
    pub stdin: Option<Vec<u8>>,
    pub stdout: bool,
    pub stderr: bool,
    pub tty: bool,
    pub resize: Option<(u16, u16)>,
}

/// An exec over SPDY, streams opened as kubectl's v4 client opens them.
pub async fn exec_spdy(url: &str, input: ExecInput) -> Result<ExecOutput> {
    let conn = SpdyClient::connect(url, &["v4.channel.k8s.io", "v3.channel.k8s.io"]).await?;
    let mut error = conn.open(&[("streamType", "error")]).await?;
    let stdin = match &input.stdin {
        Some(_) => Some(conn.open(&[("streamType", "stdin")]).await?),
        None => None,
    };
    let mut stdout = match input.stdout {
        true => Some(conn.open(&[("streamType", "stdout")]).await?),
        false => None,
    };
    let mut stderr = match input.stderr {
        true => Some(conn.open(&[("streamType", "stderr")]).await?),
        false => None,
    };
    let resize = match input.tty {
        true => Some(conn.open(&[("streamType", "resize")]).await?),
        false => None,
    };
    if let (Some(stream), Some((w, h))) = (&resize, input.resize) {
        stream
            .write(format!("{{\"Width\":{w},\"Height\":{h}}}\n").as_bytes())
            .await?;
    }
    if let (Some(stream), Some(data)) = (&stdin, &input.stdin) {
        stream.write(data).await?;
        stream.close().await?;
    }
    let (out, errs, status) = tokio::join!(
        async {
            match &mut stdout {
                Some(s) => s.read_all().await,
                None => Vec::new(),
            }
        },
        async {
            match &mut stderr {
                Some(s) => s.read_all().await,
                None => Vec::new(),
            }
        },
        error.read_all()
    );
    Ok(ExecOutput {
        protocol: conn.protocol.clone(),
        stdout: out,
        stderr: errs,
        error: status,
    })
}

/// A port-forward connection over SPDY: one (error, data) stream pair per
/// forwarded connection.
pub struct SpdyPortForward {
    conn: SpdyClient,
    next_request: AtomicU32,
}

impl SpdyPortForward {
    pub async fn connect(url: &str) -> Result<SpdyPortForward> {
        Ok(SpdyPortForward {
            conn: SpdyClient::connect(url, &["portforward.k8s.io"]).await?,
            next_request: AtomicU32::new(0),
        })
    }

    /// Opens a connection to `port`, sends `data`, half-closes, and returns
    /// what came back and what the error stream said.
    pub async fn round_trip(&self, port: u16, data: &[u8]) -> Result<(Vec<u8>, Vec<u8>)> {
        let (mut stream, mut error) = self.open(port).await?;
        stream.write(data).await?;
        let (got, failure) = tokio::join!(stream.read_all(), error.read_all());
        Ok((got, failure))
    }

    /// Opens a data/error pair and returns the data stream, for a client
    /// that streams.
    pub async fn open(&self, port: u16) -> Result<(ClientStream, ClientStream)> {
        let request = self.next_request.fetch_add(1, Ordering::SeqCst).to_string();
        let port = port.to_string();
        let error = self
            .conn
            .open(&[
                ("streamType", "error"),
                ("port", &port),
                ("requestID", &request),
            ])
            .await?;
        let data = self
            .conn
            .open(&[
                ("streamType", "data"),
                ("port", &port),
                ("requestID", &request),
            ])
            .await?;
        Ok((data, error))
    }
}

/// A WebSocket client connection with channel framing.
pub struct WsClient {
    pub protocol: String,
    reader: tokio::io::Chain<std::io::Cursor<Vec<u8>>, tokio::net::tcp::OwnedReadHalf>,
    writer: tokio::net::tcp::OwnedWriteHalf,
    encoding: websocket::Encoding,
}

impl WsClient {
    pub async fn connect(url: &str, protocols: &[&str]) -> Result<WsClient> {
        let list = protocols.join(", ");
        let (stream, answer) = request(
            url,
            &[
                ("Connection", "Upgrade"),
                ("Upgrade", "websocket"),
                ("Sec-WebSocket-Version", "13"),
                ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
                ("Sec-WebSocket-Protocol", &list),
            ],
        )
        .await?;
        if answer.status != 101 {
            return Err(err(format!("upgrade answered {}", answer.status)));
        }
        if answer.header("Sec-WebSocket-Accept") != Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=") {
            return Err(err("wrong Sec-WebSocket-Accept"));
        }
        let protocol = answer
            .header("Sec-WebSocket-Protocol")
            .unwrap_or("")
            .to_string();
        let encoding = if protocol.contains("base64") {
            websocket::Encoding::Base64
        } else {
            websocket::Encoding::Binary
        };
        let (reader, writer) = stream.into_split();
        Ok(WsClient {
            protocol,
            reader: std::io::Cursor::new(answer.body_start).chain(reader),
            writer,
            encoding,
        })
    }

    /// Sends `data` on `channel`, masked as a client must.
    pub async fn send(&mut self, channel: u8, data: &[u8]) -> Result<()> {
        let (opcode, payload) = match self.encoding {
            websocket::Encoding::Binary => {
                let mut p = vec![channel];
                p.extend_from_slice(data);
                (websocket::OP_BINARY, p)
            }
            websocket::Encoding::Base64 => {
                use base64::Engine;
                let mut p = vec![b'0' + channel];
                p.extend_from_slice(
                    base64::engine::general_purpose::STANDARD
                        .encode(data)
                        .as_bytes(),
                );
                (websocket::OP_TEXT, p)
            }
        };
        self.send_raw(opcode, &payload).await
    }

    pub async fn send_raw(&mut self, opcode: u8, payload: &[u8]) -> Result<()> {
        let frame = websocket::encode_frame(true, opcode, payload, Some([0x37, 0xfa, 0x21, 0x3d]));
        self.writer
            .write_all(&frame)
            .await
            .map_err(|e| err(format!("websocket write: {e}")))
    }

    /// The next channel message; `None` at the close frame or EOF.
    pub async fn recv(&mut self) -> Result<Option<(u8, Vec<u8>)>> {
        loop {
            let frame = websocket::read_frame(&mut self.reader, false)
                .await
                .map_err(|e| err(e.to_string()))?;
            let Some(frame) = frame else { return Ok(None) };
            match frame.opcode {
                websocket::OP_CLOSE => return Ok(None),
                websocket::OP_TEXT | websocket::OP_BINARY => {
                    if let Some(m) =
                        websocket::decode_message(frame.opcode, &frame.payload, self.encoding)
                            .map_err(|e| err(e.to_string()))?
                    {
                        return Ok(Some(m));
                    }
                }
                _ => {}
            }
        }
    }

    /// Every message until the close, gathered per channel.
    pub async fn read_all(&mut self) -> Result<HashMap<u8, Vec<u8>>> {
        let mut got: HashMap<u8, Vec<u8>> = HashMap::new();
        while let Some((channel, data)) = self.recv().await? {
            got.entry(channel).or_default().extend_from_slice(&data);
        }
        Ok(got)
    }
}

/// An exec over WebSocket with `protocol`; with v5 stdin is half-closed
/// by the close-channel message.
pub async fn exec_websocket(url: &str, protocol: &str, stdin: Option<&[u8]>) -> Result<ExecOutput> {
    let mut ws = WsClient::connect(url, &[protocol]).await?;
    if let Some(data) = stdin {
        ws.send(0, data).await?;
        if ws.protocol.starts_with("v5.") {
            ws.send_raw(websocket::OP_BINARY, &[websocket::CLOSE_CHANNEL, 0])
                .await?;
        }
    }
    let mut got = ws.read_all().await?;
    Ok(ExecOutput {
        protocol: ws.protocol.clone(),
        stdout: got.remove(&1).unwrap_or_default(),
        stderr: got.remove(&2).unwrap_or_default(),
        error: got.remove(&3).unwrap_or_default(),
    })
}
