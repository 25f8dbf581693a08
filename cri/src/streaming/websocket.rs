//! The server side of RFC 6455 WebSocket with Kubernetes' channel framing
//! (`channel.k8s.io` and its versions): each message starts with the
//! channel number, and the `base64.` variants send text messages whose
//! first character is the channel digit and whose rest is base64.
//!
//! This module owns the handshake answer, the frame codec and the reader
//! and writer tasks of one connection; it hands each channel's payload to
//! the receiver registered for it and knows nothing of what the channels
//! mean.

use std::collections::HashMap;
use std::io;

use base64::Engine;
use sha1::{Digest, Sha1};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch};

use super::{Out, OUT_QUEUE};

const ACCEPT_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

pub const OP_CONTINUATION: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// The largest message accepted from a client (kubelet's clients send
/// stdin in 32 KiB pieces).
const MAX_MESSAGE: usize = 4 << 20;

/// The most one message carries when this side writes.
const MESSAGE_CHUNK: usize = 32 * 1024;

/// v5's out-of-band message: `[255, channel]` half-closes the channel.
pub const CLOSE_CHANNEL: u8 = 255;

/// The `Sec-WebSocket-Accept` answer to a client's key.
pub fn accept_key(key: &str) -> String {
    let mut sha = Sha1::new();
    sha.update(key.trim().as_bytes());
    sha.update(ACCEPT_GUID.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(sha.finalize())
}

#[derive(Debug, thiserror::Error)]
pub enum WsError {
    #[error("WebSocket connection: {0}")]
    Io(#[from] io::Error),

    /// The peer sent something RFC 6455 or the channel framing forbids.
    #[error("WebSocket protocol error: {0}")]
    Protocol(String),
}

fn protocol(msg: impl Into<String>) -> WsError {
    WsError::Protocol(msg.into())
}

/// One frame on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WsFrame {
    pub fin: bool,
    pub opcode: u8,
    pub payload: Vec<u8>,
}

/// Encodes a frame; `mask` is for clients (servers send unmasked).
pub fn encode_frame(fin: bool, opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 14);
    out.push(if fin { 0x80 } else { 0 } | opcode);
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(mask_bit | n as u8),
        n if n <= u16::MAX as usize => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    match mask {
        Some(key) => {
            out.extend_from_slice(&key);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        }
        None => out.extend_from_slice(payload),
    }
    out
}

/// Reads one frame; `None` at a clean end of the connection. Clients must
/// mask (`require_mask`), as RFC 6455 §5.1 says.
pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    require_mask: bool,
) -> Result<Option<WsFrame>, WsError> {
    let mut head = [0u8; 2];
    match r.read_exact(&mut head).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    if head[0] & 0x70 != 0 {
        return Err(protocol("reserved bits set without an extension"));
    }
    let fin = head[0] & 0x80 != 0;
    let opcode = head[0] & 0x0f;
    let masked = head[1] & 0x80 != 0;
    if require_mask && !masked {
        return Err(protocol("client frame is not masked"));
    }
    let len = match head[1] & 0x7f {
        126 => r.read_u16().await? as u64,
        127 => r.read_u64().await?,
        n => n as u64,
    };
    if opcode >= 0x8 && (len > 125 || !fin) {
        return Err(protocol("control frame too long or fragmented"));
    }
    if len > MAX_MESSAGE as u64 {
        return Err(protocol(format!("frame of {len} bytes")));
    }
    let mut key = [0u8; 4];
    if masked {
        r.read_exact(&mut key).await?;
    }
    let mut payload = vec![0u8; len as usize];
    r.read_exact(&mut payload).await?;
    if masked {
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= key[i % 4];
        }
    }
    Ok(Some(WsFrame {
        fin,
        opcode,
        payload,
    }))
}

/// How channel messages are written: binary with a channel byte, or text
/// with a channel digit and base64.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Binary,
    Base64,
}

/// A message's channel and payload, decoded from either encoding.
pub fn decode_message(
    opcode: u8,
    message: &[u8],
    encoding: Encoding,
) -> Result<Option<(u8, Vec<u8>)>, WsError> {
    let Some((&first, rest)) = message.split_first() else {
        return Ok(None);
    };
    match (encoding, opcode) {
        (Encoding::Base64, OP_TEXT) => {
            let channel = first
                .checked_sub(b'0')
                .ok_or_else(|| protocol("bad channel digit"))?;
            let data = base64::engine::general_purpose::STANDARD
                .decode(rest)
                .map_err(|e| protocol(format!("bad base64: {e}")))?;
            Ok(Some((channel, data)))
        }
        _ => Ok(Some((first, rest.to_vec()))),
    }
}

/// One message of `channel` as it goes on the wire.
pub fn channel_message(channel: u8, data: &[u8], encoding: Encoding) -> Vec<u8> {
    match encoding {
        Encoding::Binary => {
            let mut payload = Vec::with_capacity(data.len() + 1);
            payload.push(channel);
            payload.extend_from_slice(data);
            encode_frame(true, OP_BINARY, &payload, None)
        }
        Encoding::Base64 => {
            let mut payload = vec![b'0' + channel];
            payload.extend_from_slice(
                base64::engine::general_purpose::STANDARD
                    .encode(data)
                    .as_bytes(),
            );
            encode_frame(true, OP_TEXT, &payload, None)
        }
    }
}

/// The server side of one upgraded WebSocket connection.
pub struct Connection {
    pub out: mpsc::Sender<Out>,
    /// Turns true when the client is gone (EOF, error, close frame).
    pub gone: watch::Receiver<bool>,
    writer: tokio::task::JoinHandle<()>,
}

impl Connection {
    /// Starts the reader and writer; each message on a channel in `inputs`
    /// goes to its receiver (dropped on a v5 close of that channel), other
    /// channels are ignored.
    pub fn start<R, W>(
        reader: R,
        writer: W,
        encoding: Encoding,
        inputs: HashMap<u8, mpsc::Sender<Vec<u8>>>,
        stream_close: bool,
    ) -> Connection
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let (out_tx, out_rx) = mpsc::channel(OUT_QUEUE);
        let (gone_tx, gone_rx) = watch::channel(false);
        let gone_tx = std::sync::Arc::new(gone_tx);
        tokio::spawn(read_loop(
            reader,
            encoding,
            inputs,
            stream_close,
            out_tx.clone(),
            std::sync::Arc::clone(&gone_tx),
        ));
        let writer = tokio::spawn(write_loop(writer, encoding, out_rx, gone_tx));
        Connection {
            out: out_tx,
            gone: gone_rx,
            writer,
        }
    }

    /// Sends a close frame after everything queued and closes the socket.
    pub async fn finish(self) {
        let _ = self.out.send(Out::Shutdown).await;
        drop(self.out);
        let _ = self.writer.await;
    }
}

async fn read_loop<R: AsyncRead + Unpin>(
    mut reader: R,
    encoding: Encoding,
    mut inputs: HashMap<u8, mpsc::Sender<Vec<u8>>>,
    stream_close: bool,
    out: mpsc::Sender<Out>,
    gone: std::sync::Arc<watch::Sender<bool>>,
) {
    let mut message: Vec<u8> = Vec::new();
    let mut message_op = 0u8;
    loop {
        let frame = match read_frame(&mut reader, true).await {
            Ok(Some(frame)) => frame,
            Ok(None) => break,
            Err(e) => {
                tracing::debug!("streaming: {e}");
                break;
            }
        };
        match frame.opcode {
            OP_PING => {
                if out.send(Out::Pong(frame.payload)).await.is_err() {
                    break;
                }
                continue;
            }
            OP_PONG => continue,
            OP_CLOSE => break,
            OP_CONTINUATION => message.extend_from_slice(&frame.payload),
            op => {
                message_op = op;
                message = frame.payload;
            }
        }
        if message.len() > MAX_MESSAGE {
            break;
        }
        if !frame.fin {
            continue;
        }
        let whole = std::mem::take(&mut message);
        let (channel, data) = match decode_message(message_op, &whole, encoding) {
            Ok(Some(decoded)) => decoded,
            Ok(None) => continue,
            Err(e) => {
                tracing::debug!("streaming: {e}");
                break;
            }
        };
        if stream_close && channel == CLOSE_CHANNEL {
            if let Some(&closed) = data.first() {
                inputs.remove(&closed);
            }
            continue;
        }
        if let Some(tx) = inputs.get(&channel) {
            // Awaiting is the flow control: a slow consumer stops reading.
            if !data.is_empty() && tx.send(data).await.is_err() {
                inputs.remove(&channel);
            }
        }
    }
    let _ = gone.send(true);
}

async fn write_loop<W: AsyncWrite + Unpin>(
    mut writer: W,
    encoding: Encoding,
    mut out: mpsc::Receiver<Out>,
    gone: std::sync::Arc<watch::Sender<bool>>,
) {
    while let Some(msg) = out.recv().await {
        let result = match msg {
            Out::Data(channel, data) => {
                let mut result = Ok(());
                for chunk in data.chunks(MESSAGE_CHUNK) {
                    result = writer
                        .write_all(&channel_message(channel as u8, chunk, encoding))
                        .await;
                    if result.is_err() {
                        break;
                    }
                }
                result
            }
            Out::Pong(payload) => {
                writer
                    .write_all(&encode_frame(true, OP_PONG, &payload, None))
                    .await
            }
            Out::Shutdown => {
                let close = encode_frame(true, OP_CLOSE, &1000u16.to_be_bytes(), None);
                let _ = writer.write_all(&close).await;
                break;
            }
            // Channels have no end of their own before v5, and the server
            // never needs to end one early: the close frame ends them all.
            Out::Fin(_) | Out::Reset(..) | Out::Reply(_) | Out::Ping(_) => Ok(()),
        };
        if result.is_err() {
            break;
        }
    }
    let _ = writer.flush().await;
    let _ = writer.shutdown().await;
    let _ = gone.send(true);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_key_is_rfc_6455s_example() {
        // RFC 6455 §1.3.
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[tokio::test]
    async fn masked_frames_of_every_length_round_trip() {
        for len in [0usize, 1, 125, 126, 65535, 65536, 200_000] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let wire = encode_frame(true, OP_BINARY, &payload, Some([1, 2, 3, 4]));
            if len > 0 {
                assert_ne!(&wire[wire.len() - len..], payload.as_slice(), "len {len}");
            }
            let mut r = wire.as_slice();
            let frame = read_frame(&mut r, true).await.unwrap().unwrap();
            assert_eq!(frame.payload, payload, "len {len}");
            assert!(frame.fin);
        }
    }

    #[tokio::test]
    async fn unmasked_client_frames_and_long_control_frames_are_refused() {
        let wire = encode_frame(true, OP_BINARY, b"x", None);
        assert!(read_frame(&mut wire.as_slice(), true).await.is_err());
        let wire = encode_frame(true, OP_PING, &[0; 126], Some([9; 4]));
        assert!(read_frame(&mut wire.as_slice(), true).await.is_err());
    }

    #[test]
    fn channel_messages_in_both_encodings() {
        for encoding in [Encoding::Binary, Encoding::Base64] {
            let wire = channel_message(2, b"err\n", encoding);
            let opcode = wire[0] & 0x0f;
            let payload = &wire[2..];
            assert_eq!(
                decode_message(opcode, payload, encoding).unwrap(),
                Some((2, b"err\n".to_vec()))
            );
        }
        let wire = channel_message(1, b"hi", Encoding::Base64);
        assert_eq!(&wire[2..], b"1aGk=");
    }

    /// A connection with stdin on channel 0, driven the way a client does.
    #[tokio::test]
    async fn fragments_pings_and_close() {
        let (client, server) = tokio::io::duplex(1 << 16);
        let (sr, sw) = tokio::io::split(server);
        let (stdin_tx, mut stdin_rx) = mpsc::channel(4);
        let conn = Connection::start(
            sr,
            sw,
            Encoding::Binary,
            HashMap::from([(0u8, stdin_tx)]),
            true,
        );
        let (mut cr, mut cw) = tokio::io::split(client);
        let mask = Some([0xa, 0xb, 0xc, 0xd]);
        // One message in three fragments, a ping between two of them.
        cw.write_all(&encode_frame(false, OP_BINARY, &[0, b'a'], mask))
            .await
            .unwrap();
        cw.write_all(&encode_frame(true, OP_PING, b"p", mask))
            .await
            .unwrap();
        cw.write_all(&encode_frame(false, OP_CONTINUATION, b"b", mask))
            .await
            .unwrap();
        cw.write_all(&encode_frame(true, OP_CONTINUATION, b"c", mask))
            .await
            .unwrap();
        let pong = read_frame(&mut cr, false).await.unwrap().unwrap();
        assert_eq!((pong.opcode, pong.payload.as_slice()), (OP_PONG, &b"p"[..]));
        assert_eq!(stdin_rx.recv().await.unwrap(), b"abc");
        // v5 close of channel 0 ends stdin.
        cw.write_all(&encode_frame(true, OP_BINARY, &[CLOSE_CHANNEL, 0], mask))
            .await
            .unwrap();
        assert_eq!(stdin_rx.recv().await, None);

        conn.out.send(Out::Data(1, b"out".to_vec())).await.unwrap();
        let mut gone = conn.gone.clone();
        let finish = tokio::spawn(conn.finish());
        let data = read_frame(&mut cr, false).await.unwrap().unwrap();
        assert_eq!(data.payload, b"\x01out");
        let close = read_frame(&mut cr, false).await.unwrap().unwrap();
        assert_eq!(close.opcode, OP_CLOSE);
        assert_eq!(close.payload, 1000u16.to_be_bytes());
        finish.await.unwrap();
        cw.write_all(&encode_frame(true, OP_CLOSE, &1000u16.to_be_bytes(), mask))
            .await
            .unwrap();
        gone.wait_for(|g| *g).await.unwrap();
    }
}
