//! Single-use tokens for the streaming URLs, as kubelet's request cache:
//! an Exec/Attach/PortForward RPC stores its request under a random token,
//! the HTTP request that presents the token takes it out. A token expires
//! after [`TOKEN_TTL`] unused, and at most [`MAX_PENDING`] wait at once.
//!
//! This module owns only the cache; it does not look at the requests.

use std::collections::HashMap;
use std::io::Read;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine;

use super::StreamingError;

/// How long a URL stays valid unused, as kubelet's streaming cache.
pub const TOKEN_TTL: Duration = Duration::from_secs(60);

/// Past this many unused tokens new requests are refused, so a client that
/// asks for URLs and never uses them cannot grow the daemon.
pub const MAX_PENDING: usize = 1000;

pub struct TokenCache<T> {
    ttl: Duration,
    entries: Mutex<HashMap<String, (Instant, T)>>,
}

impl<T> TokenCache<T> {
    pub fn new(ttl: Duration) -> TokenCache<T> {
        TokenCache {
            ttl,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// Stores `value` and returns its new token (URL-safe).
    pub fn insert(&self, value: T) -> Result<String, StreamingError> {
        let token = random_token()?;
        let now = Instant::now();
        let mut entries = self.lock();
        entries.retain(|_, (expires, _)| *expires > now);
        if entries.len() >= MAX_PENDING {
            return Err(StreamingError::ResourceExhausted(format!(
                "{MAX_PENDING} streaming requests are already waiting for their client"
            )));
        }
        entries.insert(token.clone(), (now + self.ttl, value));
        Ok(token)
    }

    /// The value stored under `token`, removed: a token serves once. An
    /// expired token is as unknown as one never issued.
    pub fn take(&self, token: &str) -> Option<T> {
        let (expires, value) = self.lock().remove(token)?;
        (expires > Instant::now()).then_some(value)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Instant, T)>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn random_token() -> Result<String, StreamingError> {
    let mut bytes = [0u8; 18];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|source| StreamingError::Io {
            what: "read /dev/urandom for a streaming token",
            source,
        })?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_serves_once() {
        let cache = TokenCache::new(TOKEN_TTL);
        let token = cache.insert(42).unwrap();
        assert_eq!(token.len(), 24);
        assert!(token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        assert_ne!(cache.insert(43).unwrap(), token);
        assert_eq!(cache.take(&token), Some(42));
        assert_eq!(cache.take(&token), None);
        assert_eq!(cache.take("never-issued"), None);
    }

    #[test]
    fn an_unused_token_expires() {
        let cache = TokenCache::new(Duration::from_millis(50));
        let token = cache.insert("x").unwrap();
        std::thread::sleep(Duration::from_millis(80));
        assert_eq!(cache.take(&token), None);
    }

    #[test]
    fn pending_tokens_are_bounded_and_expired_ones_make_room() {
        let cache = TokenCache::new(Duration::from_millis(100));
        for i in 0..MAX_PENDING {
            cache.insert(i).unwrap();
        }
        assert!(matches!(
            cache.insert(0),
            Err(StreamingError::ResourceExhausted(_))
        ));
        std::thread::sleep(Duration::from_millis(150));
        assert!(cache.insert(0).is_ok());
    }
}
