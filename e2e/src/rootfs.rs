//! Busybox root filesystems: the smallest real userland a container can run.
//!
//! [`BusyboxRootfs::build`] uses the host's static `/bin/busybox` (Debian's
//! `busybox-static`). [`BusyboxRootfs::build_dynamic`] uses Debian's dynamic
//! `busybox` package, which conflicts with `busybox-static` and so is never
//! installed: its `.deb` is downloaded once with `apt-get download`,
//! extracted into a cache, and the binary is copied with the shared
//! libraries `ldd` names, so that tests see a container that needs its
//! loader and libc.

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use crate::cleanup::run_command;
use crate::error::{Context, Error, Result};

/// The host's static busybox (Debian's `busybox-static`).
pub const STATIC_BUSYBOX: &str = "/bin/busybox";

/// Uid and gid of the unprivileged user in `/etc/passwd`.
pub const USER_ID: u32 = 1000;

/// Uid and gid of `nobody`.
pub const NOBODY_ID: u32 = 65534;

/// Environment variable naming the cache directory of downloaded packages.
pub const CACHE_ENV: &str = "CORRAL_E2E_CACHE";

/// Which busybox a rootfs holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    /// Statically linked: the binary and its applet links, nothing else.
    Static,
    /// Dynamically linked: the binary, its loader and its libraries.
    Dynamic,
}

/// A busybox root filesystem on disk.
#[derive(Clone, Debug)]
pub struct BusyboxRootfs {
    path: PathBuf,
    flavor: Flavor,
}

impl AsRef<Path> for BusyboxRootfs {
    fn as_ref(&self) -> &Path {
        &self.path
    }
}

impl BusyboxRootfs {
    /// Lays out a rootfs in `dir` (created if missing) from the host's static
    /// busybox.
    pub fn build(dir: impl Into<PathBuf>) -> Result<Self> {
        let path = dir.into();
        let busybox = Path::new(STATIC_BUSYBOX);
        if !busybox.is_file() {
            return Err(Error::Unavailable(format!(
                "{STATIC_BUSYBOX} is missing: apt-get install busybox-static"
            )));
        }
        let applets = static_applets()?;
        lay_out(&path, busybox, applets)?;
        Ok(BusyboxRootfs {
            path,
            flavor: Flavor::Static,
        })
    }

    /// Lays out a rootfs in `dir` from Debian's dynamically linked busybox,
    /// with the loader and libraries it needs. Downloads the package the
    /// first time (a few seconds); [`Error::Unavailable`] when apt cannot get it.
    pub fn build_dynamic(dir: impl Into<PathBuf>) -> Result<Self> {
        let path = dir.into();
        let busybox = dynamic_busybox()?;
        let applets = applets_of(&busybox)?;
        lay_out(&path, &busybox, &applets)?;
        for lib in shared_libraries(&busybox)? {
            let relative = lib.strip_prefix("/").unwrap_or(&lib);
            let target = path.join(relative);
            if let Some(parent) = target.parent() {
                fs::create_dir_all(parent).context(|| format!("create {}", parent.display()))?;
            }
            // fs::copy follows symlinks: the rootfs gets the library itself
            // under the name the loader asks for.
            fs::copy(&lib, &target)
                .context(|| format!("copy {} to {}", lib.display(), target.display()))?;
        }
        Ok(BusyboxRootfs {
            path,
            flavor: Flavor::Dynamic,
        })
    }

    /// The rootfs directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Which busybox it holds.
    pub fn flavor(&self) -> Flavor {
        self.flavor
    }
}

/// The static busybox's applets, asked once per process.
fn static_applets() -> Result<&'static [String]> {
    static APPLETS: OnceLock<Vec<String>> = OnceLock::new();
    if let Some(list) = APPLETS.get() {
        return Ok(list);
    }
    let list = applets_of(Path::new(STATIC_BUSYBOX))?;
    Ok(APPLETS.get_or_init(|| list))
}

/// `busybox --list-full`: applet paths relative to `/`, such as `bin/sh` and
/// `usr/bin/env`, so that scripts find them where a distribution puts them.
fn applets_of(busybox: &Path) -> Result<Vec<String>> {
    let out = run_command(Command::new(busybox).arg("--list-full"))?;
    let list: Vec<String> = out
        .lines()
        .map(|l| l.trim().trim_start_matches('/').to_string())
        // A path escaping the rootfs would be a broken busybox, not an applet.
        .filter(|l| !l.is_empty() && !l.split('/').any(|c| c == ".."))
        .collect();
    if list.is_empty() {
        return Err(Error::Protocol(format!(
            "{} lists no applets",
            busybox.display()
        )));
    }
    Ok(list)
}

const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
user:x:1000:1000:user:/home/user:/bin/sh\n\
nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n";

const GROUP: &str = "root:x:0:\nuser:x:1000:\nnogroup:x:65534:\n";

const HOSTS: &str = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n";

fn lay_out(root: &Path, busybox: &Path, applets: &[String]) -> Result<()> {
    let dirs: [(&str, u32); 16] = [
        ("", 0o755),
        ("bin", 0o755),
        ("sbin", 0o755),
        ("usr/bin", 0o755),
        ("usr/sbin", 0o755),
        ("etc", 0o755),
        ("dev", 0o755),
        ("proc", 0o555),
        ("sys", 0o555),
        ("run", 0o755),
        ("tmp", 0o1777),
        ("var/tmp", 0o1777),
        ("var/log", 0o755),
        ("root", 0o700),
        ("home/user", 0o755),
        ("mnt", 0o755),
    ];
    for (dir, mode) in dirs {
        let path = root.join(dir);
        fs::create_dir_all(&path).context(|| format!("create {}", path.display()))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(mode))
            .context(|| format!("chmod {}", path.display()))?;
    }
    let home = root.join("home/user");
    nix::unistd::chown(
        &home,
        Some(nix::unistd::Uid::from_raw(USER_ID)),
        Some(nix::unistd::Gid::from_raw(USER_ID)),
    )
    .context(|| format!("chown {}", home.display()))?;

    let target = root.join("bin/busybox");
    fs::copy(busybox, &target)
        .context(|| format!("copy {} to {}", busybox.display(), target.display()))?;
    fs::set_permissions(&target, fs::Permissions::from_mode(0o755))
        .context(|| format!("chmod {}", target.display()))?;
    for applet in applets {
        let link = root.join(applet);
        if link.symlink_metadata().is_ok() {
            continue;
        }
        if let Some(parent) = link.parent() {
            fs::create_dir_all(parent).context(|| format!("create {}", parent.display()))?;
        }
        // Absolute: resolved inside the container's root, wherever the link is.
        symlink("/bin/busybox", &link).context(|| format!("link {}", link.display()))?;
    }

    let files = [
        ("etc/passwd", PASSWD),
        ("etc/group", GROUP),
        ("etc/hostname", "corral-e2e\n"),
        ("etc/hosts", HOSTS),
        ("etc/resolv.conf", ""),
    ];
    for (file, content) in files {
        let path = root.join(file);
        fs::write(&path, content).context(|| format!("write {}", path.display()))?;
    }
    let mtab = root.join("etc/mtab");
    if mtab.symlink_metadata().is_err() {
        symlink("/proc/mounts", &mtab).context(|| format!("link {}", mtab.display()))?;
    }
    Ok(())
}

/// Where downloaded packages are kept between runs: `$CORRAL_E2E_CACHE`, or
/// `corral-e2e-cache` in the cargo profile directory (gone with `cargo clean`).
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os(CACHE_ENV).filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| crate::bin::profile_dir_of(&exe))
        .unwrap_or_else(std::env::temp_dir)
        .join("corral-e2e-cache")
}

/// The dynamic busybox binary from Debian's `busybox` package, downloaded
/// and extracted on first use.
fn dynamic_busybox() -> Result<PathBuf> {
    let cache = cache_dir();
    let extracted = cache.join("busybox-deb");
    let binary = extracted.join("bin/busybox");
    if binary.is_file() {
        return Ok(binary);
    }
    let scratch = cache.join(format!("download-{}", crate::unique::name()));
    fs::create_dir_all(&scratch).context(|| format!("create {}", scratch.display()))?;
    let result = download_and_extract(&scratch, &extracted);
    let _ = fs::remove_dir_all(&scratch);
    result?;
    if binary.is_file() {
        Ok(binary)
    } else {
        Err(Error::NotFound(binary))
    }
}

fn download_and_extract(scratch: &Path, extracted: &Path) -> Result<()> {
    // As root apt drops to _apt for downloads, which cannot write here.
    run_command(
        Command::new("apt-get")
            .args(["-q", "-o", "APT::Sandbox::User=root", "download", "busybox"])
            .current_dir(scratch),
    )
    .map_err(|e| Error::Unavailable(format!("apt-get download busybox: {e}")))?;
    let deb = fs::read_dir(scratch)
        .context(|| format!("list {}", scratch.display()))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .ok_or_else(|| Error::Unavailable("apt-get download busybox fetched no .deb".into()))?;
    let tree = scratch.join("tree");
    run_command(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tree))?;
    // Another test may have won the race; its tree is as good as ours.
    match fs::rename(&tree, extracted) {
        Ok(()) => Ok(()),
        Err(_) if extracted.join("bin/busybox").is_file() => Ok(()),
        Err(e) => Err(e).context(|| format!("move {} to {}", tree.display(), extracted.display())),
    }
}

/// The absolute paths of the loader and libraries `binary` needs, per `ldd`.
fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let out = run_command(Command::new("ldd").arg(binary))?;
    let libs: Vec<PathBuf> = out
        .lines()
        .filter_map(|line| {
            // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)" or
            // "/lib64/ld-linux-x86-64.so.2 (0x…)"; the vDSO has no path.
            let path = match line.split_once("=>") {
                Some((_, right)) => right.split_whitespace().next()?,
                None => line.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect();
    if libs.is_empty() {
        return Err(Error::Protocol(format!(
            "ldd finds no libraries for {}: not a dynamic binary",
            binary.display()
        )));
    }
    Ok(libs)
}
