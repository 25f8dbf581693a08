//! Builds corral's pause process (`pause/pause.rs`) into
//! `$OUT_DIR/corral-pause`, which `src/pause.rs` embeds.
//!
//! It is compiled with bare rustc rather than as a workspace member: it must
//! be a static, libc-free executable whatever the profile, the target's
//! default relocation model or the workspace's RUSTFLAGS say, and it must
//! not be installed next to corrald as a binary of its own.

use std::env;
use std::path::PathBuf;
use std::process::Command;

const SOURCE: &str = "pause/pause.rs";

fn main() {
    println!("cargo:rerun-if-changed={SOURCE}");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let rustc = env::var_os("RUSTC").expect("cargo sets RUSTC");
    let target = env::var("TARGET").expect("cargo sets TARGET");
    let output = out_dir.join("corral-pause");
    let source =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"))
            .join(SOURCE);

    let mut build = Command::new(rustc);
    build
        .args(["--edition", "2021", "--crate-name", "corral_pause"])
        .args(["--target", &target])
        .args(["-C", "opt-level=s", "-C", "panic=abort"])
        // Static and non-PIE: there is no loader and no libc to relocate it.
        .args([
            "-C",
            "target-feature=+crt-static",
            "-C",
            "relocation-model=static",
        ])
        .args(["-C", "strip=symbols", "-C", "debuginfo=0"])
        // pause brings its own `_start` and needs nothing from libc or libgcc.
        .args(["-C", "link-arg=-nostartfiles", "-C", "link-arg=-nostdlib"])
        .arg("-o")
        .arg(&output)
        .arg(&source);
    if let Some(linker) = target_linker(&target) {
        build.arg("-C").arg(format!("linker={linker}"));
    }

    let status = build.status().expect("run rustc for the pause process");
    assert!(status.success(), "building {SOURCE} failed: {status}");
}

/// The linker configured for a cross build, as cargo's own env var names it.
fn target_linker(target: &str) -> Option<String> {
    let key = format!(
        "CARGO_TARGET_{}_LINKER",
        target.to_uppercase().replace(['-', '.'], "_")
    );
    println!("cargo:rerun-if-env-changed={key}");
    env::var(key).ok()
}
