//! The client end of a container's attach socket in corral's shim (framing
//! in `corral_proto::attach`): the container's output as it is written,
//! and its stdin and terminal size.
//!
//! Owns one connection; it knows nothing of the streaming protocols that
//! carry these bytes on to a user.

use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use corral_proto::attach::{self, FrameError, Kind, ATTACH_SOCKET, HEADER_LEN};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

use crate::error::{Error, Result};

/// What a container wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
}

/// Connects to the attach socket of the container whose bundle is `bundle`.
pub async fn connect(bundle: &Path) -> Result<(AttachOutput, AttachInput)> {
    let socket = bundle.join(ATTACH_SOCKET);
    // Through the directory's descriptor: the full path may not fit in a
    // socket address.
    let dir = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(bundle)
        .map_err(|e| Error::io("open bundle", bundle, e))?;
    let address = format!("/proc/self/fd/{}/{ATTACH_SOCKET}", dir.as_raw_fd());
    let stream = match UnixStream::connect(&address).await {
        Ok(stream) => stream,
        Err(e) if is_absent(&e) => {
            return Err(Error::FailedPrecondition(format!(
                "the container of bundle {} has no attach socket: its shim does not \
                 serve attach, or its output has ended",
                bundle.display()
            )))
        }
        Err(e) => return Err(Error::io("connect to attach socket", socket, e)),
    };
    drop(dir);
    let (reader, writer) = stream.into_split();
    Ok((
        AttachOutput {
            reader,
            socket: socket.clone(),
            buf: Vec::new(),
        },
        AttachInput { writer, socket },
    ))
}

/// The shim shut the socket: the container's output has ended.
fn is_end(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::UnexpectedEof
            | std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::BrokenPipe
    )
}

fn is_absent(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
    )
}

/// The container's output, from the moment of connecting.
pub struct AttachOutput {
    reader: OwnedReadHalf,
    socket: PathBuf,
    buf: Vec<u8>,
}

impl AttachOutput {
    /// The next chunk of output; `None` once the container's output has
    /// ended (it exited, or it was deleted: the shim shuts the socket,
    /// possibly mid-frame).
    pub async fn next(&mut self) -> Result<Option<Output>> {
        loop {
            let mut header = [0u8; HEADER_LEN];
            match self.reader.read_exact(&mut header).await {
                Ok(_) => {}
                Err(e) if is_end(&e) => return Ok(None),
                Err(e) => return Err(Error::io("read attach socket", &self.socket, e)),
            }
            let (kind, len) = attach::parse_header(&header).map_err(|e| self.protocol(e))?;
            self.buf.resize(len, 0);
            match self.reader.read_exact(&mut self.buf).await {
                Ok(_) => {}
                Err(e) if is_end(&e) => return Ok(None),
                Err(e) => return Err(Error::io("read attach socket", &self.socket, e)),
            }
            let data = std::mem::take(&mut self.buf);
            match kind {
                Kind::Stdout => return Ok(Some(Output::Stdout(data))),
                Kind::Stderr => return Ok(Some(Output::Stderr(data))),
                // Only clients send the others.
                _ => continue,
            }
        }
    }
}

impl AttachOutput {
    fn protocol(&self, e: FrameError) -> Error {
        Error::Internal(format!("attach socket {}: {e}", self.socket.display()))
    }
}

/// What a client sends the container. Dropping it detaches; a client that
/// opened stdin ends it so.
pub struct AttachInput {
    writer: OwnedWriteHalf,
    socket: PathBuf,
}

impl AttachInput {
    /// Declares that this client writes stdin (before any stdin).
    pub async fn open_stdin(&mut self) -> Result<()> {
        self.send(Kind::OpenStdin, &[]).await
    }

    /// Writes to the container's stdin (ignored by the shim if the
    /// container was created without stdin).
    pub async fn stdin(&mut self, data: &[u8]) -> Result<()> {
        for chunk in data.chunks(attach::MAX_PAYLOAD) {
            self.send(Kind::Stdin, chunk).await?;
        }
        Ok(())
    }

    /// This client's stdin has ended: with `stdin_once`, so does the
    /// container's.
    pub async fn close_stdin(&mut self) -> Result<()> {
        self.send(Kind::CloseStdin, &[]).await
    }

    /// Sets the container's terminal size (ignored without a terminal).
    pub async fn resize(&mut self, width: u16, height: u16) -> Result<()> {
        self.send(Kind::Resize, &attach::resize_payload(width, height))
            .await
    }

    /// Header and payload in one buffer, so one `write_all` sends the
    /// frame. A send cancelled part way leaves a partial frame: the
    /// connection is then only good for dropping.
    async fn send(&mut self, kind: Kind, data: &[u8]) -> Result<()> {
        let header = attach::header(kind, data.len()).map_err(|e| {
            Error::InvalidArgument(format!("attach socket {}: {e}", self.socket.display()))
        })?;
        let mut frame = Vec::with_capacity(header.len() + data.len());
        frame.extend_from_slice(&header);
        frame.extend_from_slice(data);
        self.writer
            .write_all(&frame)
            .await
            .map_err(|e| Error::io("write attach socket", &self.socket, e))
    }
}
