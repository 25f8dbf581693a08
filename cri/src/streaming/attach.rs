//! Attach over an upgraded connection: the remote-command streams of
//! [`remotecommand`](super::remotecommand) bound to a running container's
//! own stdio, through its attach socket in corral's shim.
//!
//! The client gets the container's output from the moment it attaches (the
//! log keeps getting it too), and writes its stdin when the container was
//! created with one. Leaving detaches: the container runs on; with
//! `stdin_once` the shim closes the container's stdin when the first
//! client's stdin ends. When the container's output ends (it exited), the
//! client is told success, as kubelet does.
//!
//! Owns nothing past the connection: it never starts, stops or changes a
//! container.

use std::sync::Arc;

use corral_runtime::attach::{AttachInput, Output};
use k8s_cri::v1 as cri;
use tokio::sync::mpsc;

use super::remotecommand::{end_session, open_session, parse_sizes, Ended, Session, Streams};
use super::server::Upgraded;
use super::{Out, StreamingError};
use crate::node::{Node, TASK_NAMESPACE};
use crate::store::ContainerState;

/// Runs `req` over the upgraded connection until the container's output
/// ends or the client goes away.
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
    let container = node.container(&req.container_id)?;
    if container.record().state != ContainerState::Running {
        return Err(StreamingError::FailedPrecondition(format!(
            "container {} is not running",
            container.id
        )));
    }
    let (mut output, mut input) = node.tasks.attach(TASK_NAMESPACE, &container.id).await?;
    let (stdin, resize) = (session.stdin.take(), session.resize.take());
    let mut gone = session.gone.clone();
    let ended = tokio::select! {
        ended = forward_output(&mut output, session) => ended,
        _ = gone.wait_for(|g| *g) => Ok(Ended::ClientGone),
        _ = forward_input(&mut input, stdin, resize) => unreachable!("input never ends the attach"),
    };
    if req.stdin {
        // Detaching ends this client's stdin; the shim decides, by
        // `stdin_once`, whether that ends the container's.
        let _ = input.close_stdin().await;
    }
    ended
}

/// Copies the container's output to the client until it ends; a full
/// queue waits here, and the shim waits for us.
async fn forward_output(
    output: &mut corral_runtime::attach::AttachOutput,
    session: &Session,
) -> Result<Ended, StreamingError> {
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

/// Sends the client's stdin, its end, and terminal sizes to the shim;
/// never returns (the output or the client ends the attach).
async fn forward_input(
    input: &mut AttachInput,
    mut stdin: Option<mpsc::Receiver<Vec<u8>>>,
    mut resize: Option<mpsc::Receiver<Vec<u8>>>,
) {
    let mut sizes: Vec<u8> = Vec::new();
    loop {
        tokio::select! {
            data = recv(&mut stdin) => {
                let sent = match data {
                    Some(data) => input.stdin(&data).await,
                    None => {
                        stdin = None;
                        input.close_stdin().await
                    }
                };
                if sent.is_err() {
                    break;
                }
            }
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
                    let _ = input.resize(size.width, size.height).await;
                }
            }
        }
    }
    std::future::pending::<()>().await
}

/// The next message of a stream the client opened; never, for one it did
/// not (or that ended).
async fn recv(rx: &mut Option<mpsc::Receiver<Vec<u8>>>) -> Option<Vec<u8>> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}
