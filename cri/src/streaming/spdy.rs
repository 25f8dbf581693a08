//! SPDY/3.1 as kubelet's clients speak it: the frame codec, the zlib header
//! compression with SPDY/3's dictionary, and the server side of one
//! upgraded connection.
//!
//! This module owns the bytes on the wire of a SPDY connection and nothing
//! above them: which streams mean what (remote command, port forward) is
//! decided by the callers, which get each stream the client opens as an
//! [`IncomingStream`] and write through the connection's [`Out`] queue.
//!
//! Flow control is TCP's, as with Go's spdystream (which neither sends nor
//! honours WINDOW_UPDATE): every queue here is bounded, so a slow reader on
//! either side stops the reading of the other.

use std::collections::HashMap;
use std::io;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch};

use super::{Out, INPUT_QUEUE, OUT_QUEUE};

pub const VERSION: u16 = 3;

const SYN_STREAM: u16 = 1;
const SYN_REPLY: u16 = 2;
const RST_STREAM: u16 = 3;
const SETTINGS: u16 = 4;
const PING: u16 = 6;
const GOAWAY: u16 = 7;
const HEADERS: u16 = 8;
const WINDOW_UPDATE: u16 = 9;

pub const FLAG_FIN: u8 = 0x01;

/// RST_STREAM status codes this side sends.
pub const RST_PROTOCOL_ERROR: u32 = 1;
pub const RST_CANCEL: u32 = 5;

/// The largest frame payload accepted: SPDY's 24-bit length allows 16 MiB,
/// which no client of ours sends; a bound keeps a bad peer from making the
/// daemon allocate it.
const MAX_FRAME: usize = 1 << 20;

/// The most one data frame carries when this side writes.
pub const DATA_CHUNK: usize = 32 * 1024;

/// A decoded header block can not grow past this (zlib bombs).
const MAX_HEADER_BLOCK: usize = 256 * 1024;

/// Name/value pairs of a header block; names lower-case as SPDY/3 requires.
pub type Headers = Vec<(String, String)>;

/// The value of header `name` (names compare case-insensitively).
pub fn header<'a>(headers: &'a Headers, name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    SynStream {
        stream_id: u32,
        associated_to: u32,
        priority: u8,
        flags: u8,
        headers: Headers,
    },
    SynReply {
        stream_id: u32,
        flags: u8,
        headers: Headers,
    },
    RstStream {
        stream_id: u32,
        status: u32,
    },
    Settings,
    Ping(u32),
    GoAway {
        last_good: u32,
        status: u32,
    },
    Headers {
        stream_id: u32,
        flags: u8,
        headers: Headers,
    },
    WindowUpdate {
        stream_id: u32,
        delta: u32,
    },
    Data {
        stream_id: u32,
        flags: u8,
        data: Vec<u8>,
    },
    /// A control frame type SPDY/3 defines but nothing here needs.
    Other(u16),
}

#[derive(Debug, thiserror::Error)]
pub enum SpdyError {
    #[error("SPDY connection: {0}")]
    Io(#[from] io::Error),

    /// The peer sent something that is not SPDY/3.1.
    #[error("SPDY protocol error: {0}")]
    Protocol(String),
}

fn protocol(msg: impl Into<String>) -> SpdyError {
    SpdyError::Protocol(msg.into())
}

/// One direction's header compression: a zlib stream over the whole
/// connection, primed with SPDY/3's dictionary.
pub struct HeaderEncoder {
    z: Compress,
}

impl Default for HeaderEncoder {
    fn default() -> Self {
        HeaderEncoder::new()
    }
}

impl HeaderEncoder {
    pub fn new() -> HeaderEncoder {
        let mut z = Compress::new(Compression::default(), true);
        // A fresh zlib stream always accepts a dictionary.
        let _ = z.set_dictionary(&dictionary());
        HeaderEncoder { z }
    }

    pub fn encode(&mut self, headers: &Headers) -> Vec<u8> {
        let mut plain = Vec::new();
        plain.extend_from_slice(&(headers.len() as u32).to_be_bytes());
        for (name, value) in headers {
            for s in [name.to_ascii_lowercase().as_str(), value.as_str()] {
                plain.extend_from_slice(&(s.len() as u32).to_be_bytes());
                plain.extend_from_slice(s.as_bytes());
            }
        }
        // A sync flush ends each block on a byte boundary, so the peer can
        // decode it without the blocks that follow.
        let mut out = Vec::with_capacity(plain.len() + 64);
        let mut input = plain.as_slice();
        loop {
            out.reserve(256);
            let before = self.z.total_in();
            let _ = self.z.compress_vec(input, &mut out, FlushCompress::Sync);
            input = &input[(self.z.total_in() - before) as usize..];
            if input.is_empty() && out.len() < out.capacity() {
                return out;
            }
        }
    }
}

/// The other direction's decompression, the same zlib stream for every
/// header block of the connection.
pub struct HeaderDecoder {
    z: Decompress,
}

impl Default for HeaderDecoder {
    fn default() -> Self {
        HeaderDecoder::new()
    }
}

impl HeaderDecoder {
    pub fn new() -> HeaderDecoder {
        HeaderDecoder {
            z: Decompress::new(true),
        }
    }

    pub fn decode(&mut self, block: &[u8]) -> Result<Headers, SpdyError> {
        let plain = self.inflate(block)?;
        parse_header_block(&plain)
    }

    fn inflate(&mut self, block: &[u8]) -> Result<Vec<u8>, SpdyError> {
        let mut out = Vec::with_capacity(block.len() * 4 + 64);
        let mut input = block;
        loop {
            out.reserve(1024);
            let before = self.z.total_in();
            let status = match self
                .z
                .decompress_vec(input, &mut out, FlushDecompress::Sync)
            {
                Ok(status) => status,
                Err(e) if e.needs_dictionary().is_some() => {
                    self.z
                        .set_dictionary(&dictionary())
                        .map_err(|e| protocol(format!("header dictionary: {e}")))?;
                    Status::Ok
                }
                Err(e) => return Err(protocol(format!("header block: {e}"))),
            };
            input = &input[(self.z.total_in() - before) as usize..];
            if out.len() > MAX_HEADER_BLOCK {
                return Err(protocol("header block too large"));
            }
            let stalled = status == Status::BufError || status == Status::StreamEnd;
            if (input.is_empty() && out.len() < out.capacity()) || stalled {
                return Ok(out);
            }
        }
    }
}

fn parse_header_block(mut b: &[u8]) -> Result<Headers, SpdyError> {
    let count = take_u32(&mut b)? as usize;
    if count > 1024 {
        return Err(protocol("too many headers"));
    }
    let mut headers = Vec::with_capacity(count);
    for _ in 0..count {
        let name = take_string(&mut b)?;
        let value = take_string(&mut b)?;
        // SPDY joins repeated values with NUL; each is a header of its own.
        for v in value.split('\0') {
            headers.push((name.to_ascii_lowercase(), v.to_string()));
        }
    }
    Ok(headers)
}

fn take_u32(b: &mut &[u8]) -> Result<u32, SpdyError> {
    if b.len() < 4 {
        return Err(protocol("truncated header block"));
    }
    let v = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    *b = &b[4..];
    Ok(v)
}

fn take_string(b: &mut &[u8]) -> Result<String, SpdyError> {
    let len = take_u32(b)? as usize;
    if b.len() < len {
        return Err(protocol("truncated header block"));
    }
    let s = String::from_utf8(b[..len].to_vec()).map_err(|_| protocol("header is not UTF-8"))?;
    *b = &b[len..];
    Ok(s)
}

/// Encodes `frame`; header blocks go through `enc`, which must see every
/// header-carrying frame of the connection in order.
pub fn encode(frame: &Frame, enc: &mut HeaderEncoder) -> Vec<u8> {
    match frame {
        Frame::Data {
            stream_id,
            flags,
            data,
        } => {
            let mut out = Vec::with_capacity(8 + data.len());
            out.extend_from_slice(&(stream_id & 0x7fff_ffff).to_be_bytes());
            out.push(*flags);
            out.extend_from_slice(&(data.len() as u32).to_be_bytes()[1..]);
            out.extend_from_slice(data);
            out
        }
        Frame::SynStream {
            stream_id,
            associated_to,
            priority,
            flags,
            headers,
        } => {
            let mut body = Vec::new();
            body.extend_from_slice(&(stream_id & 0x7fff_ffff).to_be_bytes());
            body.extend_from_slice(&(associated_to & 0x7fff_ffff).to_be_bytes());
            body.push((priority & 0x7) << 5);
            body.push(0);
            body.extend_from_slice(&enc.encode(headers));
            control(SYN_STREAM, *flags, &body)
        }
        Frame::SynReply {
            stream_id,
            flags,
            headers,
        } => {
            let mut body = (stream_id & 0x7fff_ffff).to_be_bytes().to_vec();
            body.extend_from_slice(&enc.encode(headers));
            control(SYN_REPLY, *flags, &body)
        }
        Frame::Headers {
            stream_id,
            flags,
            headers,
        } => {
            let mut body = (stream_id & 0x7fff_ffff).to_be_bytes().to_vec();
            body.extend_from_slice(&enc.encode(headers));
            control(HEADERS, *flags, &body)
        }
        Frame::RstStream { stream_id, status } => {
            control(RST_STREAM, 0, &two_words(*stream_id & 0x7fff_ffff, *status))
        }
        Frame::Ping(id) => control(PING, 0, &id.to_be_bytes()),
        Frame::GoAway { last_good, status } => {
            control(GOAWAY, 0, &two_words(*last_good & 0x7fff_ffff, *status))
        }
        Frame::WindowUpdate { stream_id, delta } => control(
            WINDOW_UPDATE,
            0,
            &two_words(*stream_id & 0x7fff_ffff, *delta & 0x7fff_ffff),
        ),
        Frame::Settings => control(SETTINGS, 0, &0u32.to_be_bytes()),
        Frame::Other(kind) => control(*kind, 0, &[]),
    }
}

fn two_words(a: u32, b: u32) -> [u8; 8] {
    let mut out = [0u8; 8];
    out[..4].copy_from_slice(&a.to_be_bytes());
    out[4..].copy_from_slice(&b.to_be_bytes());
    out
}

fn control(kind: u16, flags: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + body.len());
    out.extend_from_slice(&(0x8000 | VERSION).to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.push(flags);
    out.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    out.extend_from_slice(body);
    out
}

/// Reads one frame; `None` at a clean end of the connection (between
/// frames).
pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    dec: &mut HeaderDecoder,
) -> Result<Option<Frame>, SpdyError> {
    let mut head = [0u8; 8];
    match r.read_exact(&mut head).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let flags = head[4];
    let len = u32::from_be_bytes([0, head[5], head[6], head[7]]) as usize;
    if len > MAX_FRAME {
        return Err(protocol(format!("frame of {len} bytes")));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    if head[0] & 0x80 == 0 {
        let stream_id = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
        return Ok(Some(Frame::Data {
            stream_id,
            flags,
            data: body,
        }));
    }
    let version = u16::from_be_bytes([head[0], head[1]]) & 0x7fff;
    if version != VERSION {
        return Err(protocol(format!("SPDY version {version}")));
    }
    let kind = u16::from_be_bytes([head[2], head[3]]);
    decode_control(kind, flags, &body, dec).map(Some)
}

fn decode_control(
    kind: u16,
    flags: u8,
    body: &[u8],
    dec: &mut HeaderDecoder,
) -> Result<Frame, SpdyError> {
    let word = |i: usize| -> Result<u32, SpdyError> {
        body.get(i..i + 4)
            .map(|w| u32::from_be_bytes([w[0], w[1], w[2], w[3]]))
            .ok_or_else(|| protocol(format!("control frame {kind} too short")))
    };
    Ok(match kind {
        SYN_STREAM => {
            if body.len() < 10 {
                return Err(protocol("SYN_STREAM too short"));
            }
            Frame::SynStream {
                stream_id: word(0)? & 0x7fff_ffff,
                associated_to: word(4)? & 0x7fff_ffff,
                priority: body[8] >> 5,
                flags,
                headers: dec.decode(&body[10..])?,
            }
        }
        SYN_REPLY => Frame::SynReply {
            stream_id: word(0)? & 0x7fff_ffff,
            flags,
            headers: dec.decode(&body[4..])?,
        },
        HEADERS => Frame::Headers {
            stream_id: word(0)? & 0x7fff_ffff,
            flags,
            headers: dec.decode(&body[4..])?,
        },
        RST_STREAM => Frame::RstStream {
            stream_id: word(0)? & 0x7fff_ffff,
            status: word(4)?,
        },
        SETTINGS => Frame::Settings,
        PING => Frame::Ping(word(0)?),
        GOAWAY => Frame::GoAway {
            last_good: word(0)? & 0x7fff_ffff,
            status: word(4).unwrap_or(0),
        },
        WINDOW_UPDATE => Frame::WindowUpdate {
            stream_id: word(0)? & 0x7fff_ffff,
            delta: word(4)? & 0x7fff_ffff,
        },
        other => Frame::Other(other),
    })
}

/// A stream the client opened: its headers and what it sends on it (the
/// receiver ends when the client half-closes or resets the stream).
pub struct IncomingStream {
    pub id: u32,
    pub headers: Headers,
    pub data: mpsc::Receiver<Vec<u8>>,
}

/// The server side of one upgraded SPDY connection.
pub struct Connection {
    /// Streams as the client opens them (already answered with SYN_REPLY).
    pub incoming: mpsc::Receiver<IncomingStream>,
    /// Everything this side sends goes through here, in order.
    pub out: mpsc::Sender<Out>,
    /// Turns true when the client is gone (EOF, error, GOAWAY).
    pub gone: watch::Receiver<bool>,
    writer: tokio::task::JoinHandle<()>,
}

impl Connection {
    /// Starts the reader and writer tasks over an upgraded socket.
    pub fn start<R, W>(reader: R, writer: W) -> Connection
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let (out_tx, out_rx) = mpsc::channel(OUT_QUEUE);
        let (incoming_tx, incoming_rx) = mpsc::channel(64);
        let (gone_tx, gone_rx) = watch::channel(false);
        let gone_tx = std::sync::Arc::new(gone_tx);
        tokio::spawn(read_loop(
            reader,
            incoming_tx,
            out_tx.clone(),
            std::sync::Arc::clone(&gone_tx),
        ));
        let writer = tokio::spawn(write_loop(writer, out_rx, gone_tx));
        Connection {
            incoming: incoming_rx,
            out: out_tx,
            gone: gone_rx,
            writer,
        }
    }

    /// Sends GOAWAY after everything queued, flushes and closes the socket.
    pub async fn finish(self) {
        let _ = self.out.send(Out::Shutdown).await;
        drop(self.out);
        let _ = self.writer.await;
    }
}

async fn read_loop<R: AsyncRead + Unpin>(
    mut reader: R,
    incoming: mpsc::Sender<IncomingStream>,
    out: mpsc::Sender<Out>,
    gone: std::sync::Arc<watch::Sender<bool>>,
) {
    let mut dec = HeaderDecoder::new();
    let mut streams: HashMap<u32, mpsc::Sender<Vec<u8>>> = HashMap::new();
    loop {
        let frame = match read_frame(&mut reader, &mut dec).await {
            Ok(Some(frame)) => frame,
            Ok(None) => break,
            Err(e) => {
                tracing::debug!("streaming: {e}");
                break;
            }
        };
        match frame {
            Frame::SynStream {
                stream_id,
                flags,
                headers,
                ..
            } => {
                // Go's client waits for the reply before it uses the stream.
                if out.send(Out::Reply(stream_id)).await.is_err() {
                    break;
                }
                let (tx, rx) = mpsc::channel(INPUT_QUEUE);
                if flags & FLAG_FIN == 0 {
                    streams.insert(stream_id, tx);
                }
                let stream = IncomingStream {
                    id: stream_id,
                    headers,
                    data: rx,
                };
                if incoming.send(stream).await.is_err() {
                    // Nobody accepts streams any more: refuse it.
                    let _ = out.send(Out::Reset(stream_id, RST_CANCEL)).await;
                }
            }
            Frame::Data {
                stream_id,
                flags,
                data,
            } => {
                if let Some(tx) = streams.get(&stream_id) {
                    // Awaiting here is the flow control: a stream whose
                    // consumer is slow stops the reading of the connection.
                    if !data.is_empty() && tx.send(data).await.is_err() {
                        streams.remove(&stream_id);
                    }
                }
                if flags & FLAG_FIN != 0 {
                    streams.remove(&stream_id);
                }
            }
            Frame::RstStream { stream_id, .. } => {
                streams.remove(&stream_id);
            }
            Frame::Headers {
                stream_id, flags, ..
            } if flags & FLAG_FIN != 0 => {
                streams.remove(&stream_id);
            }
            // Answering a ping fails only when the writer is gone.
            Frame::Ping(id) if out.send(Out::Ping(id)).await.is_err() => break,
            Frame::GoAway { .. } => break,
            _ => {}
        }
    }
    let _ = gone.send(true);
}

async fn write_loop<W: AsyncWrite + Unpin>(
    mut writer: W,
    mut out: mpsc::Receiver<Out>,
    gone: std::sync::Arc<watch::Sender<bool>>,
) {
    let mut enc = HeaderEncoder::new();
    let mut last_stream = 0u32;
    while let Some(msg) = out.recv().await {
        let frame = match msg {
            Out::Data(stream_id, data) => {
                if write_data(&mut writer, stream_id, &data).await.is_err() {
                    break;
                }
                continue;
            }
            Out::Fin(stream_id) => Frame::Data {
                stream_id,
                flags: FLAG_FIN,
                data: Vec::new(),
            },
            Out::Reset(stream_id, status) => Frame::RstStream { stream_id, status },
            Out::Reply(stream_id) => {
                last_stream = last_stream.max(stream_id);
                Frame::SynReply {
                    stream_id,
                    flags: 0,
                    headers: Vec::new(),
                }
            }
            Out::Ping(id) => Frame::Ping(id),
            Out::Pong(_) => continue,
            Out::Shutdown => {
                let goaway = encode(
                    &Frame::GoAway {
                        last_good: last_stream,
                        status: 0,
                    },
                    &mut enc,
                );
                let _ = writer.write_all(&goaway).await;
                break;
            }
        };
        if writer.write_all(&encode(&frame, &mut enc)).await.is_err() {
            break;
        }
    }
    let _ = writer.flush().await;
    let _ = writer.shutdown().await;
    let _ = gone.send(true);
}

async fn write_data<W: AsyncWrite + Unpin>(
    writer: &mut W,
    stream_id: u32,
    data: &[u8],
) -> io::Result<()> {
    for chunk in data.chunks(DATA_CHUNK) {
        let mut head = [0u8; 8];
        head[..4].copy_from_slice(&(stream_id & 0x7fff_ffff).to_be_bytes());
        head[5..].copy_from_slice(&(chunk.len() as u32).to_be_bytes()[1..]);
        writer.write_all(&head).await?;
        writer.write_all(chunk).await?;
    }
    Ok(())
}

/// SPDY/3's header compression dictionary (draft-mbelshe-httpbis-spdy-00
/// §2.6.10.1): the length-prefixed names of common headers and values,
/// then a run of common text. Built from its parts rather than spelled out
/// as bytes; the test pins its length and checksum.
pub fn dictionary() -> Vec<u8> {
    const WORDS: &[&str] = &[
        "options",
        "head",
        "post",
        "put",
        "delete",
        "trace",
        "accept",
        "accept-charset",
        "accept-encoding",
        "accept-language",
        "accept-ranges",
        "age",
        "allow",
        "authorization",
        "cache-control",
        "connection",
        "content-base",
        "content-encoding",
        "content-language",
        "content-length",
        "content-location",
        "content-md5",
        "content-range",
        "content-type",
        "date",
        "etag",
        "expect",
        "expires",
        "from",
        "host",
        "if-match",
        "if-modified-since",
        "if-none-match",
        "if-range",
        "if-unmodified-since",
        "last-modified",
        "location",
        "max-forwards",
        "pragma",
        "proxy-authenticate",
        "proxy-authorization",
        "range",
        "referer",
        "retry-after",
        "server",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "user-agent",
        "vary",
        "via",
        "warning",
        "www-authenticate",
        "method",
        "get",
        "status",
        "200 OK",
        "version",
        "HTTP/1.1",
        "url",
        "public",
        "set-cookie",
        "keep-alive",
        "origin",
    ];
    const TAIL: &str = concat!(
        "100101201202205206300302303304305306307402405406407408409410411412413414415416417502504505",
        "203 Non-Authoritative Information204 No Content301 Moved Permanently400 Bad Request",
        "401 Unauthorized403 Forbidden404 Not Found500 Internal Server Error",
        "501 Not Implemented503 Service Unavailable",
        "Jan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 ",
        "Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMT",
        "chunked,text/html,image/png,image/jpg,image/gif,application/xml,application/xhtml+xml,",
        "text/plain,text/javascript,publicprivatemax-age=gzip,deflate,sdch",
        "charset=utf-8charset=iso-8859-1,utf-,*,enq=0."
    );
    let mut out = Vec::with_capacity(1423);
    for word in WORDS {
        out.extend_from_slice(&(word.len() as u32).to_be_bytes());
        out.extend_from_slice(word.as_bytes());
    }
    out.extend_from_slice(TAIL.as_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn adler32(data: &[u8]) -> u32 {
        let (mut a, mut b) = (1u32, 0u32);
        for &byte in data {
            a = (a + byte as u32) % 65521;
            b = (b + a) % 65521;
        }
        (b << 16) | a
    }

    #[test]
    fn dictionary_is_spdy3s() {
        let dict = dictionary();
        assert_eq!(dict.len(), 1423);
        assert_eq!(&dict[..11], b"\0\0\0\x07options");
        assert!(dict.ends_with(b"enq=0."));
        // The id Go's zlib writes into every header stream (FDICT).
        assert_eq!(adler32(&dict), 0xe3c6_a7c2);
    }

    fn headers(pairs: &[(&str, &str)]) -> Headers {
        pairs
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    #[tokio::test]
    async fn frames_round_trip_through_one_compression_context() {
        let frames = vec![
            Frame::SynStream {
                stream_id: 1,
                associated_to: 0,
                priority: 0,
                flags: 0,
                headers: headers(&[("streamtype", "error")]),
            },
            Frame::SynStream {
                stream_id: 3,
                associated_to: 0,
                priority: 2,
                flags: FLAG_FIN,
                headers: headers(&[("streamtype", "data"), ("port", "80"), ("requestid", "0")]),
            },
            Frame::SynReply {
                stream_id: 3,
                flags: 0,
                headers: Vec::new(),
            },
            Frame::Data {
                stream_id: 3,
                flags: FLAG_FIN,
                data: b"hello".to_vec(),
            },
            Frame::RstStream {
                stream_id: 5,
                status: RST_CANCEL,
            },
            Frame::Ping(7),
            Frame::GoAway {
                last_good: 3,
                status: 0,
            },
            Frame::WindowUpdate {
                stream_id: 1,
                delta: 65536,
            },
            Frame::Headers {
                stream_id: 1,
                flags: 0,
                headers: headers(&[("a", "b")]),
            },
        ];
        let mut enc = HeaderEncoder::new();
        let mut wire = Vec::new();
        for f in &frames {
            wire.extend_from_slice(&encode(f, &mut enc));
        }
        let mut dec = HeaderDecoder::new();
        let mut r = wire.as_slice();
        for f in &frames {
            assert_eq!(
                read_frame(&mut r, &mut dec).await.unwrap().as_ref(),
                Some(f)
            );
        }
        assert_eq!(read_frame(&mut r, &mut dec).await.unwrap(), None);
    }

    #[test]
    fn header_blocks_use_zlib_with_the_dictionary() {
        let mut enc = HeaderEncoder::new();
        let block = enc.encode(&headers(&[("streamtype", "stdout")]));
        // zlib header with FDICT set, then the dictionary's Adler-32.
        assert_eq!(block[0] & 0x0f, 8);
        assert_ne!(block[1] & 0x20, 0);
        assert_eq!(
            u32::from_be_bytes([block[2], block[3], block[4], block[5]]),
            adler32(&dictionary())
        );
        // A second block continues the stream: no new zlib header.
        let second = enc.encode(&headers(&[("streamtype", "stdout")]));
        assert!(second.len() < block.len());
        let mut dec = HeaderDecoder::new();
        assert_eq!(
            dec.decode(&block).unwrap(),
            headers(&[("streamtype", "stdout")])
        );
        assert_eq!(
            dec.decode(&second).unwrap(),
            headers(&[("streamtype", "stdout")])
        );
    }

    #[test]
    fn repeated_values_split_on_nul_and_big_blocks_decode() {
        let mut enc = HeaderEncoder::new();
        let long = "x".repeat(100_000);
        let block = enc.encode(&headers(&[("a", "1\u{0}2"), ("big", &long)]));
        let got = HeaderDecoder::new().decode(&block).unwrap();
        assert_eq!(got[0], ("a".into(), "1".into()));
        assert_eq!(got[1], ("a".into(), "2".into()));
        assert_eq!(got[2].1.len(), 100_000);
    }

    #[tokio::test]
    async fn garbage_is_a_protocol_error() {
        let mut dec = HeaderDecoder::new();
        // A control frame of version 2.
        let mut r: &[u8] = &[0x80, 2, 0, 6, 0, 0, 0, 4, 0, 0, 0, 1];
        assert!(matches!(
            read_frame(&mut r, &mut dec).await,
            Err(SpdyError::Protocol(_))
        ));
        assert!(dec.decode(&[1, 2, 3, 4, 5]).is_err());
    }

    #[tokio::test]
    async fn connection_replies_to_streams_and_delivers_data() {
        let (client, server) = tokio::io::duplex(1 << 16);
        let (sr, sw) = tokio::io::split(server);
        let mut conn = Connection::start(sr, sw);
        let (mut cr, mut cw) = tokio::io::split(client);
        let mut enc = HeaderEncoder::new();
        let mut dec = HeaderDecoder::new();
        let syn = Frame::SynStream {
            stream_id: 1,
            associated_to: 0,
            priority: 0,
            flags: 0,
            headers: headers(&[("streamtype", "stdin")]),
        };
        cw.write_all(&encode(&syn, &mut enc)).await.unwrap();
        let reply = read_frame(&mut cr, &mut dec).await.unwrap().unwrap();
        assert!(matches!(reply, Frame::SynReply { stream_id: 1, .. }));
        let mut stream = conn.incoming.recv().await.unwrap();
        assert_eq!(header(&stream.headers, "streamType"), Some("stdin"));
        let data = Frame::Data {
            stream_id: 1,
            flags: FLAG_FIN,
            data: b"abc".to_vec(),
        };
        cw.write_all(&encode(&data, &mut enc)).await.unwrap();
        assert_eq!(stream.data.recv().await.unwrap(), b"abc");
        assert_eq!(stream.data.recv().await, None);

        conn.out.send(Out::Data(1, vec![7; 70_000])).await.unwrap();
        conn.out.send(Out::Fin(1)).await.unwrap();
        let collect = tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(f) = read_frame(&mut cr, &mut dec).await.unwrap() {
                got.push(f);
            }
            got
        });
        conn.finish().await;
        let got = collect.await.unwrap();
        let payload: usize = got
            .iter()
            .map(|f| match f {
                Frame::Data { data, .. } => data.len(),
                _ => 0,
            })
            .sum();
        assert_eq!(payload, 70_000);
        assert!(matches!(got.last(), Some(Frame::GoAway { .. })));
    }
}
