//! Exec over an upgraded connection: Kubernetes' remote-command protocol
//! (stdin, stdout, stderr, error and resize streams) on SPDY or WebSocket,
//! bound to an exec process in the container's shim.
//!
//! This module owns the exec process it starts: the FIFOs its stdio goes
//! through (under `<state>/exec/<exec id>`), its life, and its removal from
//! the shim. A client that goes away gets its process SIGKILLed; the exit
//! is reported on the error stream as the protocol version says (v4 and
//! v5: a `Status` object with the exit code as a cause).

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use corral_runtime::task_service::ExecProcess;
use k8s_cri::v1 as cri;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::{mpsc, watch};

use super::server::{Transport, Upgraded};
use super::{spdy, websocket, Out, StreamingError, INPUT_QUEUE, READ_CHUNK};
use crate::container_io::{ExecFifos, ExecPipes};
use crate::node::{new_id, Node, TASK_NAMESPACE};

/// How long a client gets to open every stream it announced.
const STREAM_SETUP_TIMEOUT: Duration = Duration::from_secs(30);

/// After the exit, how long the output may still take to reach EOF (a
/// background child can hold the pipe open forever).
const OUTPUT_DRAIN: Duration = Duration::from_secs(5);

/// How long a SIGKILLed exec gets to be reported gone.
const KILL_WAIT: Duration = Duration::from_secs(10);

/// How long a terminal exec waits for the client's first size before
/// starting the process: kubectl sends it as soon as its streams are open,
/// and a process started first reads a 0x0 terminal.
const FIRST_SIZE_WAIT: Duration = Duration::from_millis(500);

/// With a terminal, stdin's end is an EOF character sent by the shim: it
/// waits this long at most for the shim to copy what is still in the FIFO.
const STDIN_DRAIN: Duration = Duration::from_secs(2);

/// The remote-command protocol version negotiated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Version {
    V1,
    V2,
    V3,
    V4,
    V5,
}

impl Version {
    pub fn of(protocol: &str) -> Version {
        match protocol {
            p if p.starts_with("v5.") => Version::V5,
            p if p.starts_with("v4.") => Version::V4,
            p if p.starts_with("v3.") => Version::V3,
            p if p.starts_with("v2.") => Version::V2,
            _ => Version::V1,
        }
    }
}

/// The streams a client asked for.
#[derive(Debug, Clone, Copy)]
pub(super) struct Streams {
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
    pub tty: bool,
}

impl From<&cri::ExecRequest> for Streams {
    fn from(r: &cri::ExecRequest) -> Streams {
        Streams {
            stdin: r.stdin,
            stdout: r.stdout,
            stderr: r.stderr,
            tty: r.tty,
        }
    }
}

impl From<&cri::AttachRequest> for Streams {
    fn from(r: &cri::AttachRequest) -> Streams {
        Streams {
            stdin: r.stdin,
            stdout: r.stdout,
            stderr: r.stderr,
            tty: r.tty,
        }
    }
}

/// The streams of one exec or attach, whatever the transport.
pub(super) struct Session {
    pub out: mpsc::Sender<Out>,
    pub gone: watch::Receiver<bool>,
    pub stdin: Option<mpsc::Receiver<Vec<u8>>>,
    pub resize: Option<mpsc::Receiver<Vec<u8>>>,
    pub stdout: Option<u32>,
    pub stderr: Option<u32>,
    error: Option<u32>,
    version: Version,
    /// Set once the exit went out on the error stream.
    reported: bool,
    conn: Conn,
}

enum Conn {
    Spdy(spdy::Connection),
    WebSocket(websocket::Connection),
}

/// Runs `req` over the upgraded connection until the process exits or the
/// client goes away.
pub(crate) async fn serve_exec(node: Arc<Node>, req: cri::ExecRequest, upgraded: Upgraded) {
    let what = format!("exec in {}", req.container_id);
    let Some(mut session) = open_session(Streams::from(&req), upgraded, &what).await else {
        return;
    };
    let outcome = run(&node, &req, &mut session).await;
    end_session(session, &req.cmd, outcome, &what).await;
}

/// The session of the streams `req` asks for; `None` (logged) if the
/// client did not open them.
pub(super) async fn open_session(req: Streams, up: Upgraded, what: &str) -> Option<Session> {
    let version = Version::of(&up.protocol);
    let session = match up.transport {
        Transport::Spdy => open_spdy(req, version, up).await,
        Transport::WebSocket => Ok(open_websocket(req, version, up)),
    };
    session.map_err(|e| tracing::debug!("{what}: {e}")).ok()
}

/// Tells the client how it ended (a system failure is logged too) and
/// closes the connection.
pub(super) async fn end_session(
    session: Session,
    cmd: &[String],
    outcome: Result<Ended, StreamingError>,
    what: &str,
) {
    if let Err(StreamingError::Runtime(e)) = &outcome {
        tracing::warn!("{what}: {e}");
    }
    report(&session, cmd, outcome).await;
    finish(session).await;
}

/// Waits for the client to open every stream the request implies, as
/// kubelet's server does.
async fn open_spdy(
    req: Streams,
    version: Version,
    up: Upgraded,
) -> Result<Session, StreamingError> {
    let mut conn = spdy::Connection::start(up.reader, up.writer);
    let mut expected = vec!["error"];
    if req.stdin {
        expected.push("stdin");
    }
    if req.stdout {
        expected.push("stdout");
    }
    if req.stderr {
        expected.push("stderr");
    }
    if req.tty && version >= Version::V3 {
        expected.push("resize");
    }
    let mut streams: HashMap<String, spdy::IncomingStream> = HashMap::new();
    let deadline = tokio::time::Instant::now() + STREAM_SETUP_TIMEOUT;
    while expected.iter().any(|k| !streams.contains_key(*k)) {
        let stream = tokio::time::timeout_at(deadline, conn.incoming.recv())
            .await
            .map_err(|_| {
                StreamingError::InvalidArgument(
                    "the client did not open its streams in time".into(),
                )
            })?
            .ok_or_else(|| {
                StreamingError::InvalidArgument("the client left before opening its streams".into())
            })?;
        let kind = spdy::header(&stream.headers, "streamtype")
            .unwrap_or("")
            .to_string();
        if expected.contains(&kind.as_str()) {
            streams.insert(kind, stream);
        } else {
            let _ = conn
                .out
                .send(Out::Reset(stream.id, spdy::RST_PROTOCOL_ERROR))
                .await;
        }
    }
    // Streams opened later are refused by the connection.
    conn.incoming.close();
    let mut take = |k: &str| streams.remove(k);
    let stdin = take("stdin").map(|s| s.data);
    let resize = take("resize").map(|s| s.data);
    let stdout = take("stdout").map(|s| s.id);
    let stderr = take("stderr").map(|s| s.id);
    let error = take("error").map(|s| s.id);
    Ok(Session {
        out: conn.out.clone(),
        gone: conn.gone.clone(),
        stdin,
        resize,
        stdout,
        stderr,
        error,
        version,
        reported: false,
        conn: Conn::Spdy(conn),
    })
}

fn open_websocket(req: Streams, version: Version, up: Upgraded) -> Session {
    let encoding = if up.protocol.contains("base64") {
        websocket::Encoding::Base64
    } else {
        websocket::Encoding::Binary
    };
    let mut inputs = HashMap::new();
    let (stdin_tx, stdin_rx) = mpsc::channel(INPUT_QUEUE);
    if req.stdin {
        inputs.insert(0u8, stdin_tx);
    }
    let (resize_tx, resize_rx) = mpsc::channel(INPUT_QUEUE);
    if req.tty {
        inputs.insert(4u8, resize_tx);
    }
    let conn = websocket::Connection::start(
        up.reader,
        up.writer,
        encoding,
        inputs,
        version >= Version::V5,
    );
    Session {
        out: conn.out.clone(),
        gone: conn.gone.clone(),
        stdin: req.stdin.then_some(stdin_rx),
        resize: req.tty.then_some(resize_rx),
        stdout: req.stdout.then_some(1),
        stderr: req.stderr.then_some(2),
        error: Some(3),
        version,
        reported: false,
        conn: Conn::WebSocket(conn),
    }
}

async fn finish(session: Session) {
    let Session {
        out,
        conn,
        stdout,
        stderr,
        error,
        ..
    } = session;
    if let Conn::Spdy(_) = conn {
        for id in [stdout, stderr, error].into_iter().flatten() {
            let _ = out.send(Out::Fin(id)).await;
        }
    }
    drop(out);
    match conn {
        Conn::Spdy(c) => c.finish().await,
        Conn::WebSocket(c) => c.finish().await,
    }
}

/// Why the exec ended, as far as the client is told.
pub(super) enum Ended {
    Exited(u32),
    ClientGone,
}

async fn run(
    node: &Node,
    req: &cri::ExecRequest,
    session: &mut Session,
) -> Result<Ended, StreamingError> {
    let container = node.running_container(&req.container_id)?;
    let spec = crate::container::container_spec(node, &container).await?;
    let mut process = crate::spec::exec_process(&spec, &req.cmd, req.tty)
        .map_err(|e| StreamingError::InvalidArgument(e.to_string()))?;
    let mut sizes = Vec::new();
    if let Some(size) = first_size(session, &mut sizes).await {
        // runc sizes the terminal before the process runs.
        let console = oci_spec::runtime::BoxBuilder::default()
            .width(size.width)
            .height(size.height)
            .build()
            .map_err(|e| StreamingError::Runtime(format!("terminal size: {e}")))?;
        process.set_console_size(Some(console));
    }
    let process = serde_json::to_vec(&process)
        .map_err(|e| StreamingError::Runtime(format!("encode exec process: {e}")))?;
    let exec_id = format!("exec-{}", &new_id()?[..16]);
    let fifos = ExecFifos::create(
        &node.config.state.join("exec").join(&exec_id),
        session.stdin.is_some(),
        session.stdout.is_some(),
        session.stderr.is_some() && !req.tty,
    )?;
    let pipes = fifos.open()?;
    let tasks = &node.tasks;
    tasks
        .exec(
            TASK_NAMESPACE,
            &container.id,
            ExecProcess {
                exec_id: exec_id.clone(),
                spec: process,
                stdio: fifos.stdio(req.tty),
            },
        )
        .await?;
    let exec = Exec {
        node,
        container: &container.id,
        id: &exec_id,
    };
    let outcome = match tasks
        .start_process(TASK_NAMESPACE, &container.id, &exec_id)
        .await
    {
        Ok(_) => pump(&exec, session, pipes, req.tty, sizes).await,
        Err(e) => Err(e.into()),
    };
    // The client learns the exit before the shim forgets the process.
    if let Ok(Ended::Exited(code)) = outcome {
        report(session, &req.cmd, Ok(Ended::Exited(code))).await;
        session.reported = true;
    }
    exec.remove().await;
    drop(fifos);
    outcome
}

/// The exec process in its shim.
struct Exec<'a> {
    node: &'a Node,
    container: &'a str,
    id: &'a str,
}

impl Exec<'_> {
    async fn wait(&self) -> Result<u32, StreamingError> {
        let exit = self
            .node
            .tasks
            .wait(TASK_NAMESPACE, self.container, self.id)
            .await?;
        Ok(exit.status)
    }

    async fn kill(&self) {
        let tasks = &self.node.tasks;
        let _ = tasks
            .kill(TASK_NAMESPACE, self.container, self.id, 9, false)
            .await;
        let _ = tokio::time::timeout(KILL_WAIT, self.wait()).await;
    }

    async fn remove(&self) {
        let tasks = &self.node.tasks;
        if let Err(e) = tasks
            .delete_exec(TASK_NAMESPACE, self.container, self.id)
            .await
        {
            // A process still running (start failed half way): kill, retry.
            tracing::debug!("delete exec {}: {e}", self.id);
            self.kill().await;
            let _ = tasks
                .delete_exec(TASK_NAMESPACE, self.container, self.id)
                .await;
        }
    }
}

/// The terminal size the client sends first, waited for a short while;
/// what followed it in the same message is left in `rest`.
async fn first_size(session: &mut Session, rest: &mut Vec<u8>) -> Option<TerminalSize> {
    let rx = session.resize.as_mut()?;
    let data = tokio::time::timeout(FIRST_SIZE_WAIT, rx.recv())
        .await
        .ok()??;
    let (sizes, used) = parse_sizes(&data);
    rest.extend_from_slice(&data[used..]);
    sizes.into_iter().last()
}

/// Moves bytes between the client and the process until it exits or the
/// client leaves; `sizes`: a terminal size begun before the start.
async fn pump(
    exec: &Exec<'_>,
    session: &mut Session,
    pipes: ExecPipes,
    tty: bool,
    sizes: Vec<u8>,
) -> Result<Ended, StreamingError> {
    let ExecPipes {
        stdin,
        stdout,
        stderr,
        keepalive,
    } = pipes;
    let mut output = tokio::task::JoinSet::new();
    if let (Some(reader), Some(id)) = (stdout, session.stdout) {
        output.spawn(copy_out(reader, session.out.clone(), id));
    }
    if let (Some(reader), Some(id)) = (stderr, session.stderr) {
        output.spawn(copy_out(reader, session.out.clone(), id));
    }
    let (stdin_rx, resize_rx) = (session.stdin.take(), session.resize.take());
    let input = async {
        if let (Some(rx), Some(fifo)) = (stdin_rx, stdin) {
            copy_in(rx, fifo, tty).await;
            if tty {
                // The terminal stays open after the FIFO's EOF: end it.
                let _ = exec
                    .node
                    .tasks
                    .close_io(TASK_NAMESPACE, exec.container, exec.id)
                    .await;
            }
        }
        std::future::pending::<()>().await
    };
    let resize = async {
        if let Some(rx) = resize_rx {
            apply_resizes(exec, rx, sizes).await;
        }
        std::future::pending::<()>().await
    };
    let mut gone = session.gone.clone();
    let ended = tokio::select! {
        status = exec.wait() => Ended::Exited(status?),
        _ = gone.wait_for(|g| *g) => Ended::ClientGone,
        _ = input => unreachable!("stdin copying never ends the exec"),
        _ = resize => unreachable!("resizing never ends the exec"),
    };
    // Our write ends kept the output FIFOs from reading EOF before the
    // shim's copier opened its own (it may do so after the start returns);
    // the shim has drained them by the time it reports the exit.
    drop(keepalive);
    match ended {
        Ended::ClientGone => {
            exec.kill().await;
            output.abort_all();
        }
        Ended::Exited(_) => {
            let drained = tokio::time::timeout(OUTPUT_DRAIN, async {
                while output.join_next().await.is_some() {}
            });
            if drained.await.is_err() {
                output.abort_all();
            }
        }
    }
    Ok(ended)
}

async fn copy_out(mut reader: pipe::Receiver, out: mpsc::Sender<Out>, id: u32) {
    let mut buf = vec![0u8; READ_CHUNK];
    loop {
        match reader.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                // A full queue waits here, and the process blocks on its
                // full pipe: the client's pace is the process's pace.
                if out.send(Out::Data(id, buf[..n].to_vec())).await.is_err() {
                    return;
                }
            }
        }
    }
}

async fn copy_in(mut rx: mpsc::Receiver<Vec<u8>>, mut fifo: pipe::Sender, tty: bool) {
    while let Some(data) = rx.recv().await {
        if fifo.write_all(&data).await.is_err() {
            return;
        }
    }
    if tty {
        wait_fifo_empty(&fifo).await;
    }
}

/// Waits (a bounded time) until the shim has read everything written to
/// the FIFO.
async fn wait_fifo_empty(fifo: &pipe::Sender) {
    let deadline = tokio::time::Instant::now() + STDIN_DRAIN;
    while tokio::time::Instant::now() < deadline {
        let mut queued: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int through the pointer, which lives
        // for the call.
        let rc = unsafe { libc::ioctl(fifo.as_raw_fd(), libc::FIONREAD, &mut queued) };
        if rc != 0 || queued == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[derive(serde::Deserialize)]
pub(super) struct TerminalSize {
    #[serde(rename = "Width")]
    pub width: u16,
    #[serde(rename = "Height")]
    pub height: u16,
}

/// Applies each `{"Width":..,"Height":..}` the client sends; the objects
/// may arrive split or several in one message.
async fn apply_resizes(exec: &Exec<'_>, mut rx: mpsc::Receiver<Vec<u8>>, mut buf: Vec<u8>) {
    while let Some(data) = rx.recv().await {
        buf.extend_from_slice(&data);
        let (sizes, used) = parse_sizes(&buf);
        buf.drain(..used);
        if buf.len() > 4096 {
            buf.clear();
        }
        for size in sizes {
            let result = exec
                .node
                .tasks
                .resize_pty(
                    TASK_NAMESPACE,
                    exec.container,
                    exec.id,
                    size.width as u32,
                    size.height as u32,
                )
                .await;
            if let Err(e) = result {
                tracing::debug!("resize exec {}: {e}", exec.id);
            }
        }
    }
}

/// The complete sizes at the start of `buf` and how many bytes they took;
/// a malformed object is skipped with everything before it.
pub(super) fn parse_sizes(buf: &[u8]) -> (Vec<TerminalSize>, usize) {
    let mut sizes = Vec::new();
    let mut stream = serde_json::Deserializer::from_slice(buf).into_iter::<TerminalSize>();
    let mut used = 0;
    loop {
        match stream.next() {
            Some(Ok(size)) => {
                sizes.push(size);
                used = stream.byte_offset();
            }
            Some(Err(e)) if e.is_eof() => break,
            Some(Err(_)) => {
                used = buf.len();
                break;
            }
            None => {
                used = buf.len();
                break;
            }
        }
    }
    (sizes, used)
}

/// Tells the client how the exec ended, on the error stream.
async fn report(session: &Session, cmd: &[String], outcome: Result<Ended, StreamingError>) {
    let Some(error) = session.error.filter(|_| !session.reported) else {
        return;
    };
    let message = match outcome {
        Ok(Ended::ClientGone) => return,
        Ok(Ended::Exited(code)) => status_message(session.version, cmd, Ok(code)),
        Err(e) => status_message(session.version, cmd, Err(e.to_string())),
    };
    if let Some(message) = message {
        let _ = session.out.send(Out::Data(error, message)).await;
    }
}

/// What the error stream carries: v4 and later a `metav1.Status`, before
/// that the error text alone (nothing on success).
pub fn status_message(
    version: Version,
    cmd: &[String],
    outcome: Result<u32, String>,
) -> Option<Vec<u8>> {
    let status = match outcome {
        Ok(0) => serde_json::json!({"metadata": {}, "status": "Success"}),
        Ok(code) => serde_json::json!({
            "metadata": {},
            "status": "Failure",
            "message": format!("command terminated with non-zero exit code: error executing command {cmd:?}, exit code {code}"),
            "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]},
        }),
        Err(e) => serde_json::json!({
            "metadata": {},
            "status": "Failure",
            "message": e,
            "reason": "InternalError",
            "details": {"causes": [{"message": e}]},
            "code": 500,
        }),
    };
    if version >= Version::V4 {
        return Some(status.to_string().into_bytes());
    }
    status["message"].as_str().map(|m| m.as_bytes().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_status_carries_the_exit_code_as_a_cause() {
        let cmd = vec!["sh".to_string()];
        let ok = status_message(Version::V4, &cmd, Ok(0)).unwrap();
        assert_eq!(ok, br#"{"metadata":{},"status":"Success"}"#);
        let failed: serde_json::Value =
            serde_json::from_slice(&status_message(Version::V5, &cmd, Ok(3)).unwrap()).unwrap();
        assert_eq!(failed["status"], "Failure");
        assert_eq!(failed["reason"], "NonZeroExitCode");
        assert_eq!(failed["details"]["causes"][0]["reason"], "ExitCode");
        assert_eq!(failed["details"]["causes"][0]["message"], "3");
        assert_eq!(status_message(Version::V3, &cmd, Ok(0)), None);
        let v2 = status_message(Version::V2, &cmd, Ok(3)).unwrap();
        assert!(String::from_utf8(v2).unwrap().contains("exit code 3"));
    }

    #[test]
    fn versions_from_subprotocols() {
        assert_eq!(Version::of("v4.channel.k8s.io"), Version::V4);
        assert_eq!(Version::of("v4.base64.channel.k8s.io"), Version::V4);
        assert_eq!(Version::of("v5.channel.k8s.io"), Version::V5);
        assert_eq!(Version::of("channel.k8s.io"), Version::V1);
    }

    #[test]
    fn resize_objects_split_and_joined() {
        let (sizes, used) = parse_sizes(br#"{"Width":80,"Height":24}{"Width":100,"He"#);
        assert_eq!(sizes.len(), 1);
        assert_eq!((sizes[0].width, sizes[0].height), (80, 24));
        assert_eq!(used, 24);
        let (sizes, used) = parse_sizes(b"{\"Width\":100,\"Height\":50}\n");
        assert_eq!((sizes[0].width, sizes[0].height), (100, 50));
        assert!(used >= 26);
        let (sizes, used) = parse_sizes(b"garbage");
        assert!(sizes.is_empty());
        assert_eq!(used, 7);
    }
}
