//! Runtime handlers: how a RuntimeClass handler name (as kubelet gives it)
//! runs its pods: which shim, which OCI runtime binary, which options.
//! Configuration only; the shim manager turns a handler into a process.

use std::{collections::HashMap, path::PathBuf};

use corral_proto::{
    containerd::shim::oci::Options as RuncOptions,
    protobuf::{well_known_types::any::Any, Message},
};

use crate::error::{Error, Result};

/// containerd's typeurl name of runc's options.
const RUNC_OPTIONS_TYPE: &str = "containerd.runc.v1.Options";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeHandler {
    /// The shim's runtime name, `io.containerd.<name>.v<N>`.
    pub shim: String,
    /// The OCI runtime binary the shim drives (runc's `BinaryName`); empty
    /// for the shim's default.
    pub binary: String,
    /// runc's state directory (`Root`); empty for the shim's default.
    pub root: PathBuf,
    pub systemd_cgroup: bool,
}

impl Default for RuntimeHandler {
    /// corral's shim driving runc.
    fn default() -> Self {
        RuntimeHandler {
            shim: corral_proto::SHIM_RUNTIME_NAME.to_string(),
            binary: "runc".to_string(),
            root: PathBuf::new(),
            systemd_cgroup: false,
        }
    }
}

impl RuntimeHandler {
    /// The runtime options the shim gets in Create, as containerd packs them.
    pub fn options(&self) -> Any {
        let options = RuncOptions {
            binary_name: self.binary.clone(),
            root: self.root.display().to_string(),
            systemd_cgroup: self.systemd_cgroup,
            ..Default::default()
        };
        Any {
            type_url: RUNC_OPTIONS_TYPE.to_string(),
            value: options.write_to_bytes().unwrap_or_default(),
            ..Default::default()
        }
    }

    /// The shim binary's file name: `io.containerd.corral.v2` →
    /// `containerd-shim-corral-v2`, as containerd derives it.
    pub fn shim_binary_name(&self) -> Result<String> {
        shim_binary_name(&self.shim)
    }
}

pub fn shim_binary_name(runtime: &str) -> Result<String> {
    let invalid = || {
        Error::InvalidArgument(format!(
            "runtime name {runtime:?} is not of the form io.containerd.NAME.vN"
        ))
    };
    let rest = runtime.strip_prefix("io.containerd.").ok_or_else(invalid)?;
    let (name, version) = rest.rsplit_once('.').ok_or_else(invalid)?;
    let version_ok = version.len() > 1
        && version.starts_with('v')
        && version[1..].chars().all(|c| c.is_ascii_digit());
    let name_ok = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
    if !version_ok || !name_ok {
        return Err(invalid());
    }
    Ok(format!(
        "containerd-shim-{}-{version}",
        name.replace('.', "-")
    ))
}

/// Handlers by RuntimeClass name; `""` is the default handler.
#[derive(Debug, Clone)]
pub struct Handlers(HashMap<String, RuntimeHandler>);

impl Default for Handlers {
    fn default() -> Self {
        Handlers(HashMap::from([(String::new(), RuntimeHandler::default())]))
    }
}

impl Handlers {
    pub fn new(handlers: HashMap<String, RuntimeHandler>) -> Result<Self> {
        for (name, h) in &handlers {
            h.shim_binary_name()
                .map_err(|e| Error::InvalidArgument(format!("runtime handler {name:?}: {e}")))?;
        }
        let mut handlers = handlers;
        handlers.entry(String::new()).or_default();
        Ok(Handlers(handlers))
    }

    pub fn get(&self, name: &str) -> Result<&RuntimeHandler> {
        self.0.get(name).ok_or_else(|| {
            Error::InvalidArgument(format!("no runtime handler {name:?} is configured"))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_names_follow_containerds_rule() {
        let ok = |r: &str| shim_binary_name(r).expect(r);
        assert_eq!(ok("io.containerd.corral.v2"), "containerd-shim-corral-v2");
        assert_eq!(ok("io.containerd.runc.v2"), "containerd-shim-runc-v2");
        assert_eq!(ok("io.containerd.kata.v2"), "containerd-shim-kata-v2");
        assert_eq!(ok("io.containerd.runsc.v1"), "containerd-shim-runsc-v1");
        for bad in [
            "runc",
            "io.containerd.runc",
            "io.containerd..v2",
            "io.containerd.a/b.v2",
            "io.containerd.runc.2",
            "io.containerd.runc.v",
        ] {
            assert!(
                matches!(shim_binary_name(bad), Err(Error::InvalidArgument(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn unknown_handlers_are_refused_by_name() {
        let handlers = Handlers::default();
        assert!(handlers.get("").is_ok());
        let err = handlers.get("gvisor").expect_err("unknown");
        assert!(err.to_string().contains("gvisor"));
    }

    #[test]
    fn options_carry_the_binary_and_root() {
        let h = RuntimeHandler {
            binary: "/usr/bin/crun".into(),
            root: "/run/x".into(),
            ..Default::default()
        };
        let any = h.options();
        assert_eq!(any.type_url, "containerd.runc.v1.Options");
        let decoded = RuncOptions::parse_from_bytes(&any.value).expect("decode");
        assert_eq!(
            (decoded.binary_name.as_str(), decoded.root.as_str()),
            ("/usr/bin/crun", "/run/x")
        );
    }
}
