//! Attach over an upgraded connection: the remote-command streams of
//! [`remotecommand`](super::remotecommand) bound to a running container's
//! own stdio: through its attach socket in corral's shim, or, for another
//! shim's container, through the FIFOs corrald copies
//! ([`CopiedStdio`](crate::container_io::CopiedStdio)).
//!
//! The client gets the container's output from the moment it attaches (the
//! log keeps getting it too), and writes its stdin when the container was
//! created with one. As containerd does: when the client's stdin ends, a
//! `stdin_once` container without a terminal has its stdin closed and the
//! output flows on; any other container's attach ends there. Leaving
//! detaches; the container runs on. When the container's output ends (it
//! exited), the client is told success, as kubelet does.
//!
//! Owns nothing past the connection: it never starts, stops or changes a
//! container.

use std::sync::Arc;

use corral_proto::cri_log::Stream;
use corral_runtime::attach::{AttachInput, AttachOutput, Output};
use k8s_cri::v1 as cri;
use tokio::sync::mpsc;

use super::remotecommand::{end_session, open_session, parse_sizes, Ended, Session, Streams};
use super::server::Upgraded;
use super::{Out, StreamingError};
use crate::container_io::{Chunk, CopiedStdio};
use crate::node::{Container, Node, TASK_NAMESPACE};

/// How long closing a container's stdin in its shim may take.
const CLOSE_IO_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Runs `req` over the upgraded connection until the container's output
/// ends, the client's stdin ends it, or the client goes away.
pub(crate) async fn serve_attach(node: Arc<Node>, req: cri::AttachRequest, upgraded: Upgraded) {
    let what = format!("attach to {}", req.container_id);
    let Some(mut session) = open_session(Streams::from(&req), upgraded, &what).await else {
        return;
    };
    let outcome = run(&node, &req, &mut session).await;
    end_session(session, &[], outcome, &what).await;
}

async fn run(
    node: &Node,
    req: &cri::AttachRequest,
    session: &mut Session,
) -> Result<Ended, StreamingError> {
    let container = node.running_container(&req.container_id)?;
    let (mut output, mut input) = connect(node, &container).await?;
    if req.stdin {
        input.open_stdin().await?;
    }
    // Only `stdin_once` without a terminal outlives the client's stdin.
    let stdin_ends_attach = !container.config.stdin_once || container.config.tty;
    let (stdin, resize) = (session.stdin.take(), session.resize.take());
    let mut gone = session.gone.clone();
    let ended = tokio::select! {
        ended = forward_output(&mut output, session) => ended,
        _ = gone.wait_for(|g| *g) => Ok(Ended::ClientGone),
        () = forward_input(&mut input, stdin, resize, stdin_ends_attach) => Ok(Ended::Exited(0)),
    };
    if req.stdin {
        // Leaving ends this client's stdin (corral's shim sees its
        // connection close; copied stdio is told here).
        input.detach().await;
    }
    ended
}

/// The two ends of a container's stdio, whichever holds it.
enum Source {
    Shim(AttachOutput),
    Copied(mpsc::Receiver<Chunk>),
}

enum Sink<'a> {
    Shim(AttachInput),
    Copied {
        stdio: Arc<CopiedStdio>,
        node: &'a Node,
        id: String,
    },
}

async fn connect<'a>(
    node: &'a Node,
    container: &Container,
) -> Result<(Source, Sink<'a>), StreamingError> {
    if let Some(stdio) = node.copiers.attach(&container.id) {
        let output = Source::Copied(stdio.subscribe());
        let sink = Sink::Copied {
            stdio,
            node,
            id: container.id.clone(),
        };
        return Ok((output, sink));
    }
    let (output, input) = node.tasks.attach(TASK_NAMESPACE, &container.id).await?;
    Ok((Source::Shim(output), Sink::Shim(input)))
}

impl Source {
    async fn next(&mut self) -> Result<Option<Output>, StreamingError> {
        match self {
            Source::Shim(output) => Ok(output.next().await?),
            Source::Copied(rx) => Ok(rx.recv().await.map(|(stream, data)| match stream {
                Stream::Stdout => Output::Stdout(data),
                Stream::Stderr => Output::Stderr(data),
            })),
        }
    }
}

impl Sink<'_> {
    async fn open_stdin(&mut self) -> Result<(), StreamingError> {
        match self {
            Sink::Shim(input) => Ok(input.open_stdin().await?),
            Sink::Copied { .. } => Ok(()),
        }
    }

    /// False once stdin is gone.
    async fn stdin(&mut self, data: &[u8]) -> bool {
        match self {
            Sink::Shim(input) => input.stdin(data).await.is_ok(),
            Sink::Copied { stdio, .. } => stdio.write_stdin(data).await,
        }
    }

    /// This client's stdin ended; `stdin_once` decides for the container's.
    async fn close_stdin(&mut self) {
        match self {
            Sink::Shim(input) => {
                let _ = input.close_stdin().await;
            }
            Sink::Copied { .. } => self.end_copied_stdin().await,
        }
    }

    /// The client left without ending its stdin.
    async fn detach(&self) {
        if let Sink::Copied { .. } = self {
            self.end_copied_stdin().await;
        }
    }

    async fn end_copied_stdin(&self) {
        if let Sink::Copied { stdio, node, id } = self {
            if stdio.end_stdin() {
                let closed = tokio::time::timeout(
                    CLOSE_IO_TIMEOUT,
                    node.tasks.close_io(TASK_NAMESPACE, id, ""),
                )
                .await;
                if !matches!(closed, Ok(Ok(()))) {
                    tracing::debug!(container = %id, "CloseIO after stdin_once: {closed:?}");
                }
            }
        }
    }

    async fn resize(&mut self, width: u16, height: u16) {
        match self {
            Sink::Shim(input) => {
                let _ = input.resize(width, height).await;
            }
            Sink::Copied { node, id, .. } => {
                let _ = node
                    .tasks
                    .resize_pty(TASK_NAMESPACE, id, "", width.into(), height.into())
                    .await;
            }
        }
    }
}

/// Copies the container's output to the client until it ends; a full
/// queue waits here, and the container waits for us.
async fn forward_output(output: &mut Source, session: &Session) -> Result<Ended, StreamingError> {
    while let Some(chunk) = output.next().await? {
        let (stream, data) = match chunk {
            Output::Stdout(data) => (session.stdout, data),
            Output::Stderr(data) => (session.stderr, data),
        };
        let Some(id) = stream else { continue };
        if session.out.send(Out::Data(id, data)).await.is_err() {
            return Ok(Ended::ClientGone);
        }
    }
    Ok(Ended::Exited(0))
}

/// Sends the client's stdin and terminal sizes to the container. Returns
/// when the client's stdin ends and `stdin_ends_attach`, or when stdin is
/// gone; else never.
async fn forward_input(
    input: &mut Sink<'_>,
    mut stdin: Option<mpsc::Receiver<Vec<u8>>>,
    mut resize: Option<mpsc::Receiver<Vec<u8>>>,
    stdin_ends_attach: bool,
) {
    let mut sizes: Vec<u8> = Vec::new();
    loop {
        tokio::select! {
            data = recv(&mut stdin) => match data {
                Some(data) => {
                    if !input.stdin(&data).await {
                        return;
                    }
                }
                None => {
                    stdin = None;
                    input.close_stdin().await;
                    if stdin_ends_attach {
                        return;
                    }
                }
            },
            data = recv(&mut resize) => {
                let Some(data) = data else {
                    resize = None;
                    continue;
                };
                sizes.extend_from_slice(&data);
                let (parsed, used) = parse_sizes(&sizes);
                sizes.drain(..used);
                if sizes.len() > 4096 {
                    sizes.clear();
                }
                for size in parsed {
                    // A container without a terminal ignores sizes.
                    input.resize(size.width, size.height).await;
                }
            }
        }
    }
}

/// The next message of a stream the client opened; never, for one it did
/// not (or that ended).
async fn recv(rx: &mut Option<mpsc::Receiver<Vec<u8>>>) -> Option<Vec<u8>> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}
