//! corrald's ImageService over its real socket, as kubelet and crictl use
//! it, against a real registry (Debian's docker-registry on loopback, plain
//! HTTP, which the registry client allows for loopback hosts). Needs root
//! (the socket lives under /run), `docker-registry`, `busybox-static`, and
//! the built `corrald` (`cargo build --workspace --bins`).

use std::time::Duration;

use corral_e2e::cri::{api, CriClient, Daemon};
use corral_e2e::registry::{PushedImage, Registry};
use corral_e2e::Cleanup;
use tonic::Code;

/// The bound on any single RPC: a hung daemon fails the test, not the run.
const RPC_TIMEOUT: Duration = Duration::from_secs(60);

async fn with_timeout<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(RPC_TIMEOUT, f)
        .await
        .unwrap_or_else(|_| panic!("{what} took longer than {RPC_TIMEOUT:?}"))
}

fn spec(image: &str) -> Option<api::ImageSpec> {
    Some(api::ImageSpec {
        image: image.to_string(),
        ..Default::default()
    })
}

async fn status(client: &mut CriClient, image: &str) -> api::ImageStatusResponse {
    with_timeout(
        "ImageStatus",
        client.images.image_status(api::ImageStatusRequest {
            image: spec(image),
            verbose: true,
        }),
    )
    .await
    .unwrap_or_else(|e| panic!("ImageStatus {image}: {e}"))
    .into_inner()
}

async fn pull(client: &mut CriClient, image: &str) -> Result<String, tonic::Status> {
    with_timeout(
        "PullImage",
        client.images.pull_image(api::PullImageRequest {
            image: spec(image),
            ..Default::default()
        }),
    )
    .await
    .map(|r| r.into_inner().image_ref)
}

struct Setup {
    // Field order is drop order: the daemon stops before the registry goes
    // and the cleanup removes the directories last.
    daemon: Daemon,
    registry: Registry,
    pushed: PushedImage,
    cleanup: Cleanup,
}

fn setup(user: &str) -> Setup {
    let cleanup = Cleanup::new().expect("cleanup");
    let registry = Registry::start(cleanup.work_dir().join("registry")).expect("start registry");
    let scratch = cleanup.work_dir().join("image");
    let pushed = registry
        .push_busybox(&scratch, "e2e/busybox", "1.0", user)
        .unwrap_or_else(|e| panic!("push: {e}\n{}", registry.log()));
    // Loopback is plain HTTP by default; saying so makes the config path
    // (registries → the store's RegistryConfig) part of the test.
    let yaml = format!(
        "registries:\n  \"{}\":\n    insecure: true\n",
        registry.host()
    );
    let daemon = Daemon::start(&cleanup, &yaml).expect("start corrald");
    Setup {
        daemon,
        registry,
        pushed,
        cleanup,
    }
}

#[tokio::test]
async fn pull_status_list_fsinfo_remove() {
    let s = setup("1002");
    let mut client = with_timeout("connect", s.daemon.client())
        .await
        .expect("connect");
    let reference = s.pushed.reference.clone();

    // Absent before the pull: an empty answer, not an error.
    let before = status(&mut client, &reference).await;
    assert!(before.image.is_none(), "{before:?}");
    assert!(before.info.is_empty(), "{before:?}");

    let image_ref = pull(&mut client, &reference)
        .await
        .unwrap_or_else(|e| panic!("PullImage {reference}: {e}\n{}", s.registry.log()));
    assert_eq!(image_ref, s.pushed.id);

    let found = status(&mut client, &reference).await;
    let image = found.image.clone().expect("image after pull");
    assert_eq!(image.id, s.pushed.id);
    assert_eq!(image.repo_tags, std::slice::from_ref(&reference));
    assert_eq!(
        image.repo_digests,
        [format!(
            "{}@{}",
            s.pushed.repository, s.pushed.manifest_digest
        )]
    );
    assert_eq!(image.size, s.pushed.size);
    assert_eq!(image.uid.as_ref().map(|u| u.value), Some(1002));
    assert_eq!(image.username, "");
    let info = found.info.get("info").expect("verbose info");
    let config: serde_json::Value = serde_json::from_str(info).expect("info is JSON");
    assert_eq!(config["user"], "1002", "{info}");

    // The same message whichever name finds it.
    for name in [
        image.id.clone(),
        image.id.trim_start_matches("sha256:").to_string(),
        image.repo_digests[0].clone(),
    ] {
        let other = status(&mut client, &name).await;
        assert_eq!(other.image.as_ref(), Some(&image), "by {name}");
    }

    let all = with_timeout(
        "ListImages",
        client
            .images
            .list_images(api::ListImagesRequest { filter: None }),
    )
    .await
    .expect("ListImages")
    .into_inner()
    .images;
    assert!(all.contains(&image), "{all:?}");
    let filtered = with_timeout(
        "ListImages",
        client.images.list_images(api::ListImagesRequest {
            filter: Some(api::ImageFilter {
                image: spec(&reference),
            }),
        }),
    )
    .await
    .expect("ListImages filtered")
    .into_inner()
    .images;
    assert_eq!(filtered, std::slice::from_ref(&image));
    let none = with_timeout(
        "ListImages",
        client.images.list_images(api::ListImagesRequest {
            filter: Some(api::ImageFilter {
                image: spec(&format!("{}:absent", s.pushed.repository)),
            }),
        }),
    )
    .await
    .expect("ListImages filtered on an absent image")
    .into_inner()
    .images;
    assert!(none.is_empty(), "{none:?}");

    let fs = with_timeout(
        "ImageFsInfo",
        client.images.image_fs_info(api::ImageFsInfoRequest {}),
    )
    .await
    .expect("ImageFsInfo")
    .into_inner();
    let images_dir = s.daemon.config().root.join("images");
    assert_eq!(fs.image_filesystems.len(), 1, "{fs:?}");
    let usage = &fs.image_filesystems[0];
    assert!(usage.timestamp > 0, "{fs:?}");
    assert_eq!(
        usage.fs_id.as_ref().map(|f| f.mountpoint.as_str()),
        Some(images_dir.to_str().expect("utf-8 path"))
    );
    assert!(
        usage.used_bytes.as_ref().map_or(0, |u| u.value) >= s.pushed.size,
        "{fs:?}"
    );
    assert!(
        usage.inodes_used.as_ref().map_or(0, |u| u.value) > 0,
        "{fs:?}"
    );
    assert_eq!(fs.container_filesystems.len(), 1, "{fs:?}");
    assert!(fs.container_filesystems[0].used_bytes.is_some(), "{fs:?}");

    with_timeout(
        "RemoveImage",
        client.images.remove_image(api::RemoveImageRequest {
            image: spec(&reference),
        }),
    )
    .await
    .expect("RemoveImage");
    let after = status(&mut client, &reference).await;
    assert!(after.image.is_none(), "{after:?}");
    let after = status(&mut client, &image.id).await;
    assert!(after.image.is_none(), "{after:?}");

    // Removing what is gone, and a 64-zero id, twice: no error.
    for name in [reference.clone(), format!("sha256:{}", "0".repeat(64))] {
        for _ in 0..2 {
            with_timeout(
                "RemoveImage",
                client
                    .images
                    .remove_image(api::RemoveImageRequest { image: spec(&name) }),
            )
            .await
            .unwrap_or_else(|e| panic!("RemoveImage {name} again: {e}"));
        }
    }
    let _ = &s.cleanup;
}

#[tokio::test]
async fn a_named_user_and_a_missing_image() {
    let s = setup("www-data:www-data");
    let mut client = with_timeout("connect", s.daemon.client())
        .await
        .expect("connect");

    pull(&mut client, &s.pushed.reference)
        .await
        .unwrap_or_else(|e| panic!("PullImage: {e}\n{}", s.registry.log()));
    let image = status(&mut client, &s.pushed.reference)
        .await
        .image
        .expect("image");
    assert_eq!(image.uid, None);
    assert_eq!(image.username, "www-data");

    let missing = format!("{}:no-such-tag", s.pushed.repository);
    let err = pull(&mut client, &missing)
        .await
        .expect_err("pull of a missing tag");
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert!(err.message().contains(&missing), "{}", err.message());

    let missing_repo = format!("{}/e2e/nothing-here:1", s.registry.host());
    let err = pull(&mut client, &missing_repo)
        .await
        .expect_err("pull of a missing repository");
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert!(err.message().contains(&missing_repo), "{}", err.message());

    let err = pull(&mut client, "")
        .await
        .expect_err("pull of an empty reference");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let _ = &s.cleanup;
}

#[tokio::test]
async fn pulls_by_digest_and_without_a_tag() {
    let cleanup = Cleanup::new().expect("cleanup");
    let registry = Registry::start(cleanup.work_dir().join("registry")).expect("start registry");
    let pushed = registry
        .push_busybox(&cleanup.work_dir().join("image"), "e2e/plain", "latest", "")
        .unwrap_or_else(|e| panic!("push: {e}\n{}", registry.log()));
    // No `registries:` entry: loopback is plain HTTP by default.
    let daemon = Daemon::start(&cleanup, "").expect("start corrald");
    let mut client = with_timeout("connect", daemon.client())
        .await
        .expect("connect");

    let by_digest = format!("{}@{}", pushed.repository, pushed.manifest_digest);
    let id = pull(&mut client, &by_digest)
        .await
        .unwrap_or_else(|e| panic!("PullImage {by_digest}: {e}\n{}", registry.log()));
    assert_eq!(id, pushed.id);
    let image = status(&mut client, &by_digest).await.image.expect("image");
    assert!(image.repo_tags.is_empty(), "{image:?}");
    assert_eq!(image.repo_digests, std::slice::from_ref(&by_digest));
    assert_eq!(image.uid, None);
    assert_eq!(image.username, "");

    pull(&mut client, &pushed.repository)
        .await
        .unwrap_or_else(|e| panic!("PullImage {}: {e}", pushed.repository));
    let image = status(&mut client, &pushed.repository)
        .await
        .image
        .expect("image");
    assert_eq!(image.repo_tags, [format!("{}:latest", pushed.repository)]);
    for name in [&pushed.reference, &by_digest, &pushed.id] {
        let other = status(&mut client, name).await;
        assert_eq!(other.image.as_ref(), Some(&image), "by {name}");
    }

    // By id: the image with all its names.
    with_timeout(
        "RemoveImage",
        client.images.remove_image(api::RemoveImageRequest {
            image: spec(&pushed.id),
        }),
    )
    .await
    .expect("RemoveImage by id");
    for name in [&pushed.reference, &by_digest, &pushed.id] {
        assert!(status(&mut client, name).await.image.is_none(), "{name}");
    }
    drop(daemon);
    drop(registry);
}
