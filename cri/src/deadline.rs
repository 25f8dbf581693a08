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
}
