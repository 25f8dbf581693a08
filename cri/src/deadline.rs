//! The caller's deadline, answered with DeadlineExceeded.
//!
//! kubelet and critest send a `grpc-timeout` and expect DeadlineExceeded
//! when it passes (critest's image-pull timeout spec checks the code).
//! tonic enforces that header itself but answers Cancelled, so a layer in
//! front of the services takes the header off each request and leaves the
//! deadline as a request extension; the RPCs that can take long run under
//! [`within`], which turns the deadline into the right error.

use std::future::Future;
use std::time::{Duration, Instant};

use tonic::codegen::http;

use crate::error::{Error, Result};

/// When the caller stops waiting.
#[derive(Debug, Clone, Copy)]
pub struct Deadline(pub Instant);

/// For `tower::util::MapRequestLayer`: moves `grpc-timeout` into a
/// [`Deadline`] extension.
pub fn take_grpc_timeout<B>(mut request: http::Request<B>) -> http::Request<B> {
    let timeout = request
        .headers_mut()
        .remove("grpc-timeout")
        .and_then(|v| v.to_str().ok().and_then(parse_grpc_timeout));
    if let Some(timeout) = timeout {
        request
            .extensions_mut()
            .insert(Deadline(Instant::now() + timeout));
    }
    request
}

/// `grpc-timeout` as the gRPC spec writes it: up to 8 digits and a unit.
fn parse_grpc_timeout(text: &str) -> Option<Duration> {
    if text.len() < 2 || text.len() > 9 {
        return None;
    }
    let (digits, unit) = text.split_at(text.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The request's deadline, if the caller set one.
pub fn deadline<T>(request: &tonic::Request<T>) -> Option<Instant> {
    request.extensions().get::<Deadline>().map(|d| d.0)
}

/// Runs `work` until `deadline`; past it, the work is dropped and
/// DeadlineExceeded returned.
pub async fn within<T>(
    deadline: Option<Instant>,
    work: impl Future<Output = Result<T>>,
) -> Result<T> {
    match deadline {
        None => work.await,
        Some(at) => tokio::time::timeout_at(at.into(), work)
            .await
            .unwrap_or_else(|_| {
                Err(Error::DeadlineExceeded(
                    "the caller's deadline passed before the call finished".into(),
                ))
            }),
    }
}

/// Like [`within`], for work that must not stop half-way (a sandbox half
/// set up, an exec not yet killed): it runs as a task of its own, which the
/// caller's deadline leaves running to its end; the caller gets
/// DeadlineExceeded and kubelet's retry finds the finished result.
pub async fn within_detached<T: Send + 'static>(
    deadline: Option<Instant>,
    work: impl Future<Output = Result<T>> + Send + 'static,
) -> Result<T> {
    let task = tokio::spawn(work);
    within(deadline, async move {
        task.await
            .map_err(|e| Error::Internal(format!("the call's task failed: {e}")))?
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_in_every_unit() {
        assert_eq!(parse_grpc_timeout("1m"), Some(Duration::from_millis(1)));
        assert_eq!(parse_grpc_timeout("30S"), Some(Duration::from_secs(30)));
        assert_eq!(parse_grpc_timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_grpc_timeout("500u"), Some(Duration::from_micros(500)));
        assert_eq!(parse_grpc_timeout("10n"), Some(Duration::from_nanos(10)));
        for bad in ["", "S", "1x", "123456789S", "-1S"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_header_becomes_an_extension() {
        let request = http::Request::builder()
            .header("grpc-timeout", "5S")
            .body(())
            .unwrap();
        let request = take_grpc_timeout(request);
        assert!(request.headers().get("grpc-timeout").is_none());
        assert!(request.extensions().get::<Deadline>().is_some());
    }

    #[tokio::test]
    async fn work_past_the_deadline_is_deadline_exceeded() {
        let at = Some(Instant::now() + Duration::from_millis(1));
        let slow = async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            Ok(())
        };
        assert!(matches!(
            within(at, slow).await,
            Err(Error::DeadlineExceeded(_))
        ));
        assert_eq!(within(None, async { Ok(3) }).await.unwrap(), 3);
    }

    #[tokio::test]
    async fn detached_work_finishes_after_the_deadline() {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let at = Some(Instant::now() + Duration::from_millis(1));
        let work = async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let _ = tx.send(());
            Ok(())
        };
        assert!(matches!(
            within_detached(at, work).await,
            Err(Error::DeadlineExceeded(_))
        ));
        rx.await.expect("the work ran to its end");
    }
}
