//! CRI v1 `ImageService`: pulling, listing, inspecting and removing images.
//!
//! This module owns the translation of ImageService requests into the
//! runtime layer's [`ImageStore`] and of its images into CRI `Image`
//! messages. Naming, lookups, garbage collection and disk accounting are the
//! store's; errors become statuses in `error.rs` only.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use corral_runtime::image::{Credentials, Image, ImageError, ImageStore, Usage};
use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_server::ImageService;
use tonic::{Request, Response};

use crate::error::{Error, RpcResult};

/// The ImageService of one daemon.
#[derive(Debug, Clone)]
pub struct CriImageService {
    store: ImageStore,
}

impl CriImageService {
    pub fn new(store: ImageStore) -> Self {
        CriImageService { store }
    }

    pub fn store(&self) -> &ImageStore {
        &self.store
    }

    fn mountpoint(&self) -> PathBuf {
        self.store.root().to_path_buf()
    }
}

fn spec_image(spec: Option<&cri::ImageSpec>) -> &str {
    spec.map(|s| s.image.trim()).unwrap_or_default()
}

/// The credentials of a PullImage: `username`/`password`, or else the
/// base64 `auth` field (`user:password`) as Docker's config.json holds it.
/// Tokens are not supported by the store: they are refused by name rather
/// than silently dropped.
pub fn credentials(auth: Option<&cri::AuthConfig>) -> Result<Option<Credentials>, Error> {
    let Some(auth) = auth else {
        return Ok(None);
    };
    if !auth.username.is_empty() || !auth.password.is_empty() {
        return Ok(Some(Credentials {
            username: auth.username.clone(),
            password: auth.password.clone(),
        }));
    }
    if !auth.auth.is_empty() {
        let decoded = base64_decode(auth.auth.trim())
            .and_then(|b| String::from_utf8(b).ok())
            .ok_or_else(|| {
                Error::InvalidArgument("auth.auth is not base64 of \"user:password\"".into())
            })?;
        let Some((username, password)) = decoded.split_once(':') else {
            return Err(Error::InvalidArgument(
                "auth.auth does not decode to \"user:password\"".into(),
            ));
        };
        return Ok(Some(Credentials {
            username: username.to_string(),
            password: password.to_string(),
        }));
    }
    if !auth.identity_token.is_empty() || !auth.registry_token.is_empty() {
        return Err(Error::InvalidArgument(
            "auth.identity_token and auth.registry_token are not supported; use username/password"
                .into(),
        ));
    }
    Ok(None)
}

/// Standard base64 with or without padding; `None` if malformed.
fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let value = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            _ => return None,
        } as u32)
    };
    let bytes = text.trim_end_matches('=').as_bytes();
    if bytes.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut acc = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            acc |= value(c)? << (18 - 6 * i);
        }
        let n = chunk.len() - 1;
        out.extend_from_slice(&acc.to_be_bytes()[1..1 + n]);
    }
    Some(out)
}

/// The config's `USER` as CRI splits it: a numeric user (before any
/// `:group`) is the uid, anything else the username.
fn user_of(user: &str) -> (Option<cri::Int64Value>, String) {
    let user = user.split(':').next().unwrap_or_default();
    if user.is_empty() {
        return (None, String::new());
    }
    match user.parse::<i64>() {
        Ok(uid) => (Some(cri::Int64Value { value: uid }), String::new()),
        Err(_) => (None, user.to_string()),
    }
}

/// The CRI message for an image: the same whichever name found it.
pub fn to_cri(image: &Image) -> cri::Image {
    let (uid, username) = user_of(&image.config.user);
    cri::Image {
        id: image.id.clone(),
        repo_tags: image.repo_tags.clone(),
        repo_digests: image.repo_digests.clone(),
        size: image.size,
        uid,
        username,
        spec: Some(cri::ImageSpec {
            image: image.id.clone(),
            ..Default::default()
        }),
        pinned: false,
    }
}

fn now_nanos() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or_default()
}

fn fs_usage(mountpoint: &std::path::Path, usage: Usage, timestamp: i64) -> cri::FilesystemUsage {
    cri::FilesystemUsage {
        timestamp,
        fs_id: Some(cri::FilesystemIdentifier {
            mountpoint: mountpoint.display().to_string(),
        }),
        used_bytes: Some(cri::UInt64Value { value: usage.bytes }),
        inodes_used: Some(cri::UInt64Value {
            value: usage.inodes,
        }),
    }
}

#[tonic::async_trait]
impl ImageService for CriImageService {
    async fn list_images(
        &self,
        request: Request<cri::ListImagesRequest>,
    ) -> RpcResult<cri::ListImagesResponse> {
        let request = request.into_inner();
        let filter = request
            .filter
            .as_ref()
            .map(|f| spec_image(f.image.as_ref()))
            .filter(|f| !f.is_empty());
        let images = self.store.list(filter).await.map_err(Error::from)?;
        Ok(Response::new(cri::ListImagesResponse {
            images: images.iter().map(to_cri).collect(),
        }))
    }

    async fn image_status(
        &self,
        request: Request<cri::ImageStatusRequest>,
    ) -> RpcResult<cri::ImageStatusResponse> {
        let request = request.into_inner();
        let query = spec_image(request.image.as_ref());
        if query.is_empty() {
            return Err(Error::InvalidArgument("image.image is empty".into()).into());
        }
        let image = match self.store.get(query).await {
            Ok(image) => image,
            // An absent image is an empty answer, not an error: kubelet and
            // critest decide to pull on exactly that.
            Err(ImageError::NotFound(_)) => {
                return Ok(Response::new(cri::ImageStatusResponse::default()))
            }
            Err(e) => return Err(Error::from(e).into()),
        };
        let mut info = HashMap::new();
        if request.verbose {
            let config = serde_json::to_string(&image.config).map_err(|e| {
                Error::Image(ImageError::Internal(format!(
                    "image {}: encoding its config: {e}",
                    image.id
                )))
            })?;
            info.insert("info".to_string(), config);
        }
        Ok(Response::new(cri::ImageStatusResponse {
            image: Some(to_cri(&image)),
            info,
        }))
    }

    async fn pull_image(
        &self,
        request: Request<cri::PullImageRequest>,
    ) -> RpcResult<cri::PullImageResponse> {
        let deadline = crate::deadline::deadline(&request);
        let request = request.into_inner();
        let reference = spec_image(request.image.as_ref());
        if reference.is_empty() {
            return Err(Error::InvalidArgument("image.image is empty".into()).into());
        }
        let creds = credentials(request.auth.as_ref())?;
        // A pull cut short by the deadline leaves its finished blobs to the
        // next pull of the same image, which resumes from them.
        let pull = async {
            self.store
                .pull(reference, creds.as_ref())
                .await
                .map_err(Error::from)
        };
        let image = crate::deadline::within(deadline, pull).await?;
        Ok(Response::new(cri::PullImageResponse {
            image_ref: image.id,
        }))
    }

    async fn remove_image(
        &self,
        request: Request<cri::RemoveImageRequest>,
    ) -> RpcResult<cri::RemoveImageResponse> {
        let request = request.into_inner();
        let query = spec_image(request.image.as_ref());
        if query.is_empty() {
            return Err(Error::InvalidArgument("image.image is empty".into()).into());
        }
        // An absent image is already removed: kubelet retries removals.
        match self.store.remove(query).await {
            Ok(_) | Err(ImageError::NotFound(_)) => {}
            Err(e) => return Err(Error::from(e).into()),
        }
        Ok(Response::new(cri::RemoveImageResponse {}))
    }

    async fn image_fs_info(
        &self,
        _request: Request<cri::ImageFsInfoRequest>,
    ) -> RpcResult<cri::ImageFsInfoResponse> {
        let usage = self.store.fs_usage().await.map_err(Error::from)?;
        let now = now_nanos();
        let mountpoint = self.mountpoint();
        Ok(Response::new(cri::ImageFsInfoResponse {
            image_filesystems: vec![fs_usage(&mountpoint, usage.images, now)],
            container_filesystems: vec![fs_usage(&mountpoint, usage.containers, now)],
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_splits_into_uid_or_name() {
        assert_eq!(
            user_of("1002"),
            (Some(cri::Int64Value { value: 1002 }), String::new())
        );
        assert_eq!(
            user_of("1002:100"),
            (Some(cri::Int64Value { value: 1002 }), String::new())
        );
        assert_eq!(user_of("www-data"), (None, "www-data".to_string()));
        assert_eq!(user_of("www-data:www"), (None, "www-data".to_string()));
        assert_eq!(user_of(""), (None, String::new()));
    }

    #[test]
    fn credentials_come_from_fields_or_auth() {
        assert!(credentials(None).expect("none").is_none());
        let c = credentials(Some(&cri::AuthConfig {
            username: "u".into(),
            password: "p".into(),
            ..Default::default()
        }))
        .expect("fields")
        .expect("some");
        assert_eq!((c.username.as_str(), c.password.as_str()), ("u", "p"));
        // base64("user:pa:ss")
        let c = credentials(Some(&cri::AuthConfig {
            auth: "dXNlcjpwYTpzcw==".into(),
            ..Default::default()
        }))
        .expect("auth")
        .expect("some");
        assert_eq!(
            (c.username.as_str(), c.password.as_str()),
            ("user", "pa:ss")
        );
        assert!(credentials(Some(&cri::AuthConfig {
            auth: "!!!".into(),
            ..Default::default()
        }))
        .is_err());
        assert_eq!(base64_decode("YQ").as_deref(), Some(&b"a"[..]));
        assert_eq!(base64_decode("YWJj").as_deref(), Some(&b"abc"[..]));
    }
}
