//! Writes a `docker save` tarball of Debian's busybox-static, tagged
//! `docker.io/library/busybox:latest`, for nodes with no registry: the
//! quickstart imports it with `corrald image import`.
//!
//! ```sh
//! cargo run --release -q -p corral-e2e --example busybox_image -- /tmp/busybox.tar
//! # another tag and command, e.g. a pause image for `sandbox_image`:
//! cargo run ... -- /tmp/pause.tar example.com/pause:1 sleep 2147483647
//! ```

use std::process::ExitCode;

use corral_e2e::image_builder::{busybox_layer, BuiltImage};

const TAG: &str = "docker.io/library/busybox:latest";

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let Some(path) = args.next() else {
        eprintln!("usage: busybox_image FILE [TAG [CMD...]]");
        return ExitCode::FAILURE;
    };
    let tag = args.next().unwrap_or_else(|| TAG.to_string());
    let mut cmd: Vec<String> = args.collect();
    if cmd.is_empty() {
        cmd.push("sh".into());
    }
    let runtime = serde_json::json!({
        "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
        "Cmd": cmd,
    });
    let tarball = busybox_layer()
        .and_then(|layer| BuiltImage::new(vec![layer], runtime))
        .and_then(|image| image.docker_save(&[tag.as_str()]));
    match tarball.map(|bytes| std::fs::write(&path, bytes).map_err(|e| e.to_string())) {
        Ok(Ok(())) => {
            println!("{tag} written to {path}");
            ExitCode::SUCCESS
        }
        Ok(Err(e)) => {
            eprintln!("busybox_image: write {path}: {e}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("busybox_image: {e}");
            ExitCode::FAILURE
        }
    }
}
