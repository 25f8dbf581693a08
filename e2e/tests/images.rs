//! corrald's ImageService over its real socket, as kubelet and crictl use
//! it, against a real registry (Debian's docker-registry on loopback, plain
//! HTTP, which the registry client allows for loopback hosts): pulls,
//! lookups, removal, Basic auth with PullImage's credentials, hostile images
//! that must fail without writing outside corrald's root, and `corrald image
//! import` of a `docker save` tarball. Needs root (the socket lives under
//! /run), `docker-registry`, `apache2-utils` (htpasswd), `busybox-static`,
//! and the built `corrald` (`cargo build --workspace --bins`).

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use corral_e2e::cri::{api, run_corrald, CriClient, Daemon, DaemonConfig};
use corral_e2e::image_builder::{busybox_layer, noise, BuiltImage, Layer, Tar, BUSYBOX};
use corral_e2e::registry::{Canned, PushedImage, Registry, RegistryFront, RegistryOptions};
use corral_e2e::Cleanup;
use serde_json::json;
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
    pull_with(client, image, None).await
}

async fn pull_with(
    client: &mut CriClient,
    image: &str,
    auth: Option<api::AuthConfig>,
) -> Result<String, tonic::Status> {
    with_timeout(
        "PullImage",
        client.images.pull_image(api::PullImageRequest {
            image: spec(image),
            auth,
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

#[tokio::test]
async fn a_registry_behind_basic_auth_takes_the_pull_credentials() {
    let cleanup = Cleanup::new().expect("cleanup");
    let (user, password) = ("e2e-user", "e2e-s3cret:with-colon");
    let options = RegistryOptions {
        htpasswd: Some((user.into(), password.into())),
    };
    let registry = Registry::start_with(cleanup.work_dir().join("registry"), &options)
        .expect("start registry");
    let pushed = registry
        .push_busybox(
            &cleanup.work_dir().join("image"),
            "private/busybox",
            "1.0",
            "",
        )
        .unwrap_or_else(|e| panic!("push: {e}\n{}", registry.log()));
    let daemon = Daemon::start(&cleanup, "").expect("start corrald");
    let mut client = with_timeout("connect", daemon.client())
        .await
        .expect("connect");
    let reference = pushed.reference.clone();
    let credentials = |username: &str, password: &str| {
        Some(api::AuthConfig {
            username: username.into(),
            password: password.into(),
            ..Default::default()
        })
    };

    let anonymous = pull(&mut client, &reference)
        .await
        .expect_err("a pull without credentials");
    let wrong = pull_with(&mut client, &reference, credentials(user, "wrong"))
        .await
        .expect_err("a pull with a wrong password");
    for (what, err) in [("anonymous", &anonymous), ("wrong password", &wrong)] {
        assert_eq!(err.code(), Code::Unauthenticated, "{what}: {err:?}");
        assert!(
            err.message().contains(&reference),
            "{what}: {}",
            err.message()
        );
        assert!(err.message().contains("401"), "{what}: {}", err.message());
    }
    assert!(status(&mut client, &reference).await.image.is_none());

    let id = pull_with(&mut client, &reference, credentials(user, password))
        .await
        .unwrap_or_else(|e| panic!("PullImage with credentials: {e}\n{}", registry.log()));
    assert_eq!(id, pushed.id);
    let image = status(&mut client, &reference).await.image.expect("image");
    assert_eq!(image.repo_tags, std::slice::from_ref(&reference));

    // Docker's config.json form, `auth: base64(user:password)`, as kubelet
    // passes it on from an image pull secret.
    with_timeout(
        "RemoveImage",
        client.images.remove_image(api::RemoveImageRequest {
            image: spec(&reference),
        }),
    )
    .await
    .expect("RemoveImage");
    let auth = registry_auth_field(user, password);
    let id = pull_with(
        &mut client,
        &reference,
        Some(api::AuthConfig {
            auth,
            ..Default::default()
        }),
    )
    .await
    .unwrap_or_else(|e| panic!("PullImage with the auth field: {e}"));
    assert_eq!(id, pushed.id);
    drop(daemon);
    drop(registry);
}

/// The `auth` field of Docker's config.json: base64 of `user:password`.
fn registry_auth_field(user: &str, password: &str) -> String {
    corral_e2e::registry::basic_authorization(user, password)
        .trim_start_matches("Basic ")
        .to_string()
}

/// Everything under `dir` but the metadata database, which every RPC may
/// touch: what a failed pull must leave as it found it.
fn listing(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let rel = path
                .strip_prefix(dir)
                .unwrap_or(&path)
                .display()
                .to_string();
            if rel == "meta.db" {
                continue;
            }
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(path);
            }
            out.push(rel);
        }
    }
    out.sort();
    out
}

/// `../` enough times to climb from anywhere under the root to `/`, then
/// `path`: where a naive unpacker would write an entry of this name.
fn climbing_to(path: &Path) -> String {
    format!(
        "{}{}",
        "../".repeat(32),
        path.display().to_string().trim_start_matches('/')
    )
}

fn assert_untouched(sentinel: &Path, secret: &Path, what: &str) {
    let left: Vec<_> = fs::read_dir(sentinel)
        .expect("read sentinel")
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(
        left.is_empty(),
        "{what}: written outside the root: {left:?}"
    );
    assert_eq!(
        fs::read(secret).expect("read secret"),
        b"secret\n",
        "{what}: the outside file changed"
    );
    assert_eq!(
        fs::metadata(secret).expect("stat secret").nlink(),
        1,
        "{what}: the outside file got a hard link"
    );
}

#[tokio::test]
async fn hostile_images_fail_by_name_and_write_nothing_outside() {
    let cleanup = Cleanup::new().expect("cleanup");
    let registry = Registry::start(cleanup.work_dir().join("registry")).expect("start registry");
    let daemon = Daemon::start(&cleanup, "").expect("start corrald");
    let mut client = with_timeout("connect", daemon.client())
        .await
        .expect("connect");
    let host = registry.host().to_string();
    let images_dir = daemon.config().root.join("images");
    // Beside corrald's root: where an escape would land.
    let sentinel = daemon.config().dir.join("sentinel");
    let outside = daemon.config().dir.join("outside");
    let secret = outside.join("secret");
    fs::create_dir_all(&sentinel).expect("create sentinel");
    fs::create_dir_all(&outside).expect("create outside");
    fs::write(&secret, b"secret\n").expect("write secret");

    let good = registry
        .push_busybox(&cleanup.work_dir().join("good"), "good/app", "v1", "")
        .unwrap_or_else(|e| panic!("push: {e}\n{}", registry.log()));
    pull(&mut client, &good.reference)
        .await
        .unwrap_or_else(|e| panic!("PullImage {}: {e}", good.reference));
    let before = listing(&images_dir);

    // A lower layer that unpacks fine, then the hostile one: the first
    // layer's snapshot must go too.
    let base = Layer::tar(
        Tar::new()
            .file("base.txt", b"a lower layer that unpacks fine\n", 0o644)
            .finish(),
    );
    let hostile = |tar: Tar| {
        BuiltImage::new(vec![base.clone(), Layer::tar(tar.finish())], json!({})).expect("image")
    };
    let sentinel_abs = sentinel.display().to_string();
    let secret_abs = secret.display().to_string();
    let mut cases: Vec<(String, &str)> = Vec::new();
    let mut push = |name: &str, image: &BuiltImage, cause: &'static str| {
        let pushed = registry
            .push_image(&format!("bad/{name}"), "v1", image)
            .unwrap_or_else(|e| panic!("push {name}: {e}\n{}", registry.log()));
        cases.push((pushed.reference, cause));
    };
    push(
        "dotdot",
        &hostile(Tar::new().file(&climbing_to(&sentinel.join("dotdot")), b"pwned", 0o644)),
        "climbs above the layer root",
    );
    push(
        "symlink",
        &hostile(Tar::new().symlink("evil", &sentinel_abs).file(
            "evil/through-symlink",
            b"pwned",
            0o644,
        )),
        "parent \"evil\" is a symlink",
    );
    push(
        "hardlink",
        &hostile(
            Tar::new()
                .hardlink("stolen", &climbing_to(&secret))
                .file("stolen", b"pwned", 0o644),
        ),
        "climbs above the layer root",
    );
    // Absolute link targets name members of the layer, as tar reads them:
    // this one does not exist there.
    push(
        "hardlink-absolute",
        &hostile(
            Tar::new()
                .hardlink("stolen", &secret_abs)
                .file("stolen", b"pwned", 0o644),
        ),
        "does not exist",
    );
    let mismatch = hostile(Tar::new().file("data", &noise(7, 64 * 1024), 0o644));
    push("mismatch", &mismatch, "digest mismatch");
    // The registry checked the bytes on push; its storage is changed after.
    let stored = registry.blob_path(&mismatch.layers[1].digest);
    let mut bytes = fs::read(&stored).expect("read the registry's blob");
    bytes[5000] ^= 0xff;
    fs::write(&stored, bytes).expect("corrupt the registry's blob");
    let mut oversized = hostile(Tar::new().file("data", &noise(8, 64 * 1024), 0o644));
    oversized
        .edit_manifest(|m| {
            let size = m["layers"][1]["size"].as_u64().expect("size");
            m["layers"][1]["size"] = json!(size - 512);
        })
        .expect("edit manifest");
    push("oversized", &oversized, "larger than its declared");

    // No registry stores a manifest of a kind it does not know; the front
    // serves one for this path and passes the rest to the registry.
    let unknown_type = "application/vnd.example.unknown.manifest.v1+json";
    let unknown = json!({
        "schemaVersion": 2,
        "mediaType": unknown_type,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": good.id, "size": 100},
        "layers": [],
    });
    let front = RegistryFront::start(
        &host,
        HashMap::from([(
            "/v2/bad/unknown/manifests/v1".to_string(),
            Canned {
                status: 200,
                content_type: unknown_type.to_string(),
                body: serde_json::to_vec(&unknown).expect("json"),
            },
        )]),
    )
    .expect("start registry front");
    cases.push((
        format!("{}/bad/unknown:v1", front.host()),
        "unsupported manifest media type",
    ));

    for (reference, cause) in &cases {
        let err = pull(&mut client, reference)
            .await
            .expect_err(&format!("PullImage {reference} must fail"));
        assert_eq!(err.code(), Code::InvalidArgument, "{reference}: {err:?}");
        let message = err.message();
        assert!(
            message.contains(reference.as_str()),
            "{reference}: {message}"
        );
        assert!(
            message.contains(cause),
            "{reference}: wanted {cause:?} in {message}"
        );
        assert_eq!(
            listing(&images_dir),
            before,
            "{reference}: something was left"
        );
        assert!(
            status(&mut client, reference).await.image.is_none(),
            "{reference}"
        );
        assert_untouched(&sentinel, &secret, reference);
    }

    // An absolute member name is taken as relative to the layer's root, as
    // tar and containerd take it: the pull succeeds, and the file lands in
    // the snapshot, not at that path.
    let absolute = hostile(Tar::new().file(
        &sentinel.join("absolute").display().to_string(),
        b"inside\n",
        0o644,
    ));
    let pushed = registry
        .push_image("bad/absolute", "v1", &absolute)
        .unwrap_or_else(|e| panic!("push absolute: {e}"));
    pull(&mut client, &pushed.reference)
        .await
        .unwrap_or_else(|e| panic!("PullImage {}: {e}", pushed.reference));
    assert_untouched(&sentinel, &secret, "absolute");
    let inside = sentinel.join("absolute");
    let inside = inside.strip_prefix("/").expect("absolute path");
    let found = snapshot_files(&images_dir, inside);
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(fs::read(&found[0]).expect("read"), b"inside\n");

    // And the next good image pulls.
    let next =
        BuiltImage::new(vec![busybox_layer().expect("busybox layer")], json!({})).expect("image");
    let next = registry.push_image("good/next", "v1", &next).expect("push");
    let id = pull(&mut client, &next.reference)
        .await
        .unwrap_or_else(|e| panic!("PullImage after the hostile ones: {e}"));
    assert_eq!(id, next.id);
    drop(front);
    drop(daemon);
    drop(registry);
}

/// Every committed snapshot's copy of `rel`.
fn snapshot_files(images_dir: &Path, rel: &Path) -> Vec<PathBuf> {
    let snapshots = images_dir.join("snapshots");
    let mut found: Vec<PathBuf> = fs::read_dir(&snapshots)
        .expect("read snapshots")
        .flatten()
        .map(|e| e.path().join("fs").join(rel))
        .filter(|p| p.exists())
        .collect();
    found.sort();
    found
}

#[tokio::test]
async fn import_a_docker_save_tarball_then_serve_it() {
    let cleanup = Cleanup::new().expect("cleanup");
    let hello = b"hello from an archive\n";
    let data = Layer::tar(
        Tar::new()
            .dir("data", 0o755)
            .file("data/hello.txt", hello, 0o644)
            .finish(),
    );
    let image = BuiltImage::new(
        vec![busybox_layer().expect("busybox layer"), data],
        json!({"User": "1001", "Env": ["PATH=/bin"], "Cmd": ["/bin/sh"], "WorkingDir": "/data"}),
    )
    .expect("image");
    let archive = cleanup.work_dir().join("saved.tar");
    fs::write(
        &archive,
        image
            .docker_save(&["e2e/imported:1.0"])
            .expect("docker save"),
    )
    .expect("write archive");
    let name = "docker.io/e2e/imported:1.0";

    let mut config = DaemonConfig::new(&cleanup, "");
    let config_file = config.write().expect("write config");
    let corrald = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--config", config_file.to_str().expect("utf-8 path")]);
        run_corrald(&all).expect("run corrald")
    };
    let archive_arg = archive.to_str().expect("utf-8 path");

    let out = corrald(&["image", "import", archive_arg]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout.contains(name), "{stdout}");
    assert!(stdout.contains(&image.config_digest), "{stdout}");
    let out = corrald(&["image", "list"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        stdout
            .lines()
            .any(|l| l.contains(name) && l.contains(&image.config_digest)),
        "{stdout}"
    );

    // Not an archive: refused by name, nothing imported.
    let junk = cleanup.work_dir().join("junk.tar");
    fs::write(&junk, b"not a tar archive at all").expect("write junk");
    let out = corrald(&["image", "import", junk.to_str().expect("utf-8 path")]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{out:?}");
    assert!(stderr.contains(&*junk.to_string_lossy()), "{stderr}");

    let daemon = Daemon::start_with(&cleanup, config.clone()).expect("start corrald");
    let mut client = with_timeout("connect", daemon.client())
        .await
        .expect("connect");
    let found = status(&mut client, "e2e/imported:1.0").await;
    let served = found.image.expect("the imported image");
    assert_eq!(served.id, image.config_digest);
    assert_eq!(served.repo_tags, [name]);
    assert_eq!(served.uid.as_ref().map(|u| u.value), Some(1001));
    assert_eq!(served.size, image.size());
    let listed = with_timeout(
        "ListImages",
        client
            .images
            .list_images(api::ListImagesRequest { filter: None }),
    )
    .await
    .expect("ListImages")
    .into_inner()
    .images;
    assert_eq!(listed, [served]);

    // The unpacked tree, byte for byte.
    let images_dir = config.root.join("images");
    let hello_files = snapshot_files(&images_dir, Path::new("data/hello.txt"));
    assert_eq!(hello_files.len(), 1, "{hello_files:?}");
    assert_eq!(fs::read(&hello_files[0]).expect("read"), hello);
    let busyboxes = snapshot_files(&images_dir, Path::new("bin/busybox"));
    assert_eq!(busyboxes.len(), 1, "{busyboxes:?}");
    assert_eq!(
        fs::read(&busyboxes[0]).expect("read"),
        fs::read(BUSYBOX).expect("read busybox")
    );

    // While the daemon holds the store: refused, and said why.
    for args in [&["image", "import", archive_arg][..], &["image", "list"]] {
        let out = corrald(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}: {out:?}");
        assert!(
            stderr.contains(&format!(
                "the image store at {} is in use by a running corrald",
                images_dir.display()
            )),
            "{args:?}: {stderr}"
        );
    }
    let import_err =
        String::from_utf8_lossy(&corrald(&["image", "import", archive_arg]).stderr).into_owned();
    assert!(
        import_err.contains("stop it first, or import before starting it"),
        "{import_err}"
    );
    // The daemon did not notice.
    assert!(status(&mut client, name).await.image.is_some());
    drop(daemon);
}
