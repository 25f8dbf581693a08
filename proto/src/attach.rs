//! The attach socket: how corrald reaches a running container's stdio in
//! corral's shim (CRI Attach).
//!
//! The shim listens on `<bundle>/attach` (a unix stream socket, reachable
//! only through the bundle directory, which is root's) for each container
//! whose output it writes to a CRI log. Every connection receives the
//! container's output from the moment it connects, and may send stdin,
//! the end of its stdin, and terminal sizes; a client that writes stdin
//! says so first, and with `stdin_once` its end (or its disconnection)
//! ends the container's stdin. The shim writes to a client
//! synchronously: a client that does not read slows the container, it
//! does not make the shim buffer.
//!
//! Both directions carry frames: a 5-byte header (kind, then the payload
//! length as a big-endian u32) and the payload. This module defines the
//! framing only; the shim and the runtime own their ends of the socket.

use std::io::{self, Read, Write};

/// The socket's name inside a container's bundle directory.
pub const ATTACH_SOCKET: &str = "attach";

/// stdin URI asking corral's shim to keep the container's stdin open for
/// attached clients.
pub const ATTACH_STDIN: &str = "attach://stdin";

/// As [`ATTACH_STDIN`], and the container's stdin is closed when the first
/// attached client ends its stdin (CRI `stdin_once`, without a terminal).
pub const ATTACH_STDIN_ONCE: &str = "attach://stdin-once";

/// The header's size: kind (1 byte) and payload length (4 bytes).
pub const HEADER_LEN: usize = 5;

/// The largest payload either side sends; a longer frame is a protocol
/// error, so a broken peer cannot make the other allocate without bound.
pub const MAX_PAYLOAD: usize = 64 * 1024;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Client to shim: bytes for the container's stdin.
    Stdin,
    /// Shim to client: the container's stdout (all output with a terminal).
    Stdout,
    /// Shim to client: the container's stderr.
    Stderr,
    /// Client to shim: this client's stdin has ended.
    CloseStdin,
    /// Client to shim: the terminal's size, width then height, each a
    /// big-endian u16.
    Resize,
    /// Client to shim, first if at all: this client writes stdin, so its
    /// going away (even without [`Kind::CloseStdin`]: a crash) ends its
    /// stdin.
    OpenStdin,
}

impl Kind {
    fn code(self) -> u8 {
        match self {
            Kind::Stdin => 0,
            Kind::Stdout => 1,
            Kind::Stderr => 2,
            Kind::CloseStdin => 3,
            Kind::Resize => 4,
            Kind::OpenStdin => 5,
        }
    }

    fn from_code(code: u8) -> Option<Kind> {
        Some(match code {
            0 => Kind::Stdin,
            1 => Kind::Stdout,
            2 => Kind::Stderr,
            3 => Kind::CloseStdin,
            4 => Kind::Resize,
            5 => Kind::OpenStdin,
            _ => return None,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("attach frame of unknown kind {0}")]
    UnknownKind(u8),
    #[error("attach frame of {0} bytes, more than the {MAX_PAYLOAD} allowed")]
    TooLong(usize),
    #[error("attach socket: {0}")]
    Io(#[from] io::Error),
}

/// The header of a frame of `kind` carrying `len` bytes.
pub fn header(kind: Kind, len: usize) -> Result<[u8; HEADER_LEN], FrameError> {
    if len > MAX_PAYLOAD {
        return Err(FrameError::TooLong(len));
    }
    let mut h = [0u8; HEADER_LEN];
    h[0] = kind.code();
    h[1..].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(h)
}

/// The kind and payload length a header announces.
pub fn parse_header(h: &[u8; HEADER_LEN]) -> Result<(Kind, usize), FrameError> {
    let kind = Kind::from_code(h[0]).ok_or(FrameError::UnknownKind(h[0]))?;
    let len = u32::from_be_bytes([h[1], h[2], h[3], h[4]]) as usize;
    if len > MAX_PAYLOAD {
        return Err(FrameError::TooLong(len));
    }
    Ok((kind, len))
}

/// The payload of a [`Kind::Resize`] frame.
pub fn resize_payload(width: u16, height: u16) -> [u8; 4] {
    let mut p = [0u8; 4];
    p[..2].copy_from_slice(&width.to_be_bytes());
    p[2..].copy_from_slice(&height.to_be_bytes());
    p
}

/// Width and height from a [`Kind::Resize`] payload; `None` if malformed.
pub fn parse_resize(payload: &[u8]) -> Option<(u16, u16)> {
    match payload {
        [w0, w1, h0, h1] => Some((
            u16::from_be_bytes([*w0, *w1]),
            u16::from_be_bytes([*h0, *h1]),
        )),
        _ => None,
    }
}

/// Writes one frame; payloads longer than [`MAX_PAYLOAD`] go as several.
pub fn write_frame(w: &mut impl Write, kind: Kind, data: &[u8]) -> Result<(), FrameError> {
    if data.is_empty() {
        w.write_all(&header(kind, 0)?)?;
        return Ok(());
    }
    for chunk in data.chunks(MAX_PAYLOAD) {
        w.write_all(&header(kind, chunk.len())?)?;
        w.write_all(chunk)?;
    }
    Ok(())
}

/// Reads one frame into `buf` (resized to the payload); `None` at a clean
/// end of the stream between frames.
pub fn read_frame(r: &mut impl Read, buf: &mut Vec<u8>) -> Result<Option<Kind>, FrameError> {
    let mut h = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match r.read(&mut h[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let (kind, len) = parse_header(&h)?;
    buf.resize(len, 0);
    r.read_exact(buf)?;
    Ok(Some(kind))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_split_long_payloads() {
        let mut wire = Vec::new();
        write_frame(&mut wire, Kind::Stdout, b"hello").unwrap();
        write_frame(&mut wire, Kind::CloseStdin, b"").unwrap();
        let long = vec![7u8; MAX_PAYLOAD + 10];
        write_frame(&mut wire, Kind::Stderr, &long).unwrap();
        write_frame(&mut wire, Kind::Resize, &resize_payload(123, 45)).unwrap();

        let mut r = wire.as_slice();
        let mut buf = Vec::new();
        assert_eq!(read_frame(&mut r, &mut buf).unwrap(), Some(Kind::Stdout));
        assert_eq!(buf, b"hello");
        assert_eq!(
            read_frame(&mut r, &mut buf).unwrap(),
            Some(Kind::CloseStdin)
        );
        assert!(buf.is_empty());
        assert_eq!(read_frame(&mut r, &mut buf).unwrap(), Some(Kind::Stderr));
        assert_eq!(buf.len(), MAX_PAYLOAD);
        assert_eq!(read_frame(&mut r, &mut buf).unwrap(), Some(Kind::Stderr));
        assert_eq!(buf.len(), 10);
        assert_eq!(read_frame(&mut r, &mut buf).unwrap(), Some(Kind::Resize));
        assert_eq!(parse_resize(&buf), Some((123, 45)));
        assert_eq!(read_frame(&mut r, &mut buf).unwrap(), None);
    }

    #[test]
    fn malformed_frames_are_refused() {
        let mut buf = Vec::new();
        let unknown = [9u8, 0, 0, 0, 0];
        assert!(matches!(
            read_frame(&mut unknown.as_slice(), &mut buf),
            Err(FrameError::UnknownKind(9))
        ));
        let huge = [1u8, 0xff, 0xff, 0xff, 0xff];
        assert!(matches!(
            read_frame(&mut huge.as_slice(), &mut buf),
            Err(FrameError::TooLong(_))
        ));
        let cut = [1u8, 0, 0, 0, 4, b'a'];
        assert!(matches!(
            read_frame(&mut cut.as_slice(), &mut buf),
            Err(FrameError::Io(_))
        ));
        let half_header = [1u8, 0];
        assert!(read_frame(&mut half_header.as_slice(), &mut buf).is_err());
        assert_eq!(parse_resize(b"abc"), None);
    }
}
