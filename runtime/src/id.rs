//! Ids and namespaces become directory names and shim arguments: they are
//! checked before anything touches the disk.

use crate::error::{Error, Result};

/// containerd's limit for identifiers.
pub const MAX_LEN: usize = 76;

/// Refuses an id that is empty, too long, or could name another directory:
/// containerd's identifier rules (alphanumerics, `.`, `_`, `-`, starting
/// with an alphanumeric).
pub fn validate(kind: &str, id: &str) -> Result<()> {
    let refuse = |why: &str| {
        Err(Error::InvalidArgument(format!(
            "invalid {kind} {id:?}: {why}"
        )))
    };
    if id.is_empty() {
        return refuse("empty");
    }
    if id.len() > MAX_LEN {
        return refuse("longer than 76 characters");
    }
    let mut chars = id.chars();
    if !chars.next().is_some_and(|c| c.is_ascii_alphanumeric()) {
        return refuse("must start with a letter or digit");
    }
    if !id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        return refuse("only letters, digits, '.', '_' and '-' are allowed");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_what_containerd_accepts() {
        for ok in [
            "a",
            "k8s.io",
            "0123abc",
            "pod_1-x.y",
            &"f".repeat(64),
            &"x".repeat(76),
        ] {
            assert!(validate("id", ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn refuses_what_could_escape_or_clash() {
        for bad in [
            "",
            "..",
            ".",
            "a/b",
            "/abs",
            "../up",
            "a\0b",
            "-lead",
            ".hidden",
            "sp ace",
            &"x".repeat(77),
        ] {
            match validate("id", bad) {
                Err(Error::InvalidArgument(msg)) => assert!(msg.contains("invalid id"), "{msg}"),
                other => panic!("{bad:?}: {other:?}"),
            }
        }
    }
}
