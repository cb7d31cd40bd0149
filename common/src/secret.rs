//! Secrets from configuration: given inline (flag or env) or read from a
//! file (a mounted Kubernetes Secret). Values never reach logs.

use std::path::{Path, PathBuf};

/// Why a secret could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("cannot read {what} from {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what} is given both inline and as a file; give one")]
    Both { what: &'static str },
    #[error("{what} is empty")]
    Empty { what: &'static str },
}

/// The secret from `inline` or from the file at `file` (trimmed), or `None`
/// when neither is given.
pub fn load(
    what: &'static str,
    inline: Option<&str>,
    file: Option<&Path>,
) -> Result<Option<String>, SecretError> {
    let value = match (inline, file) {
        (Some(_), Some(_)) => return Err(SecretError::Both { what }),
        (Some(v), None) => v.trim().to_owned(),
        (None, Some(path)) => std::fs::read_to_string(path)
            .map_err(|source| SecretError::Read {
                what,
                path: path.to_owned(),
                source,
            })?
            .trim()
            .to_owned(),
        (None, None) => return Ok(None),
    };
    if value.is_empty() {
        return Err(SecretError::Empty { what });
    }
    Ok(Some(value))
}

/// A random token of `bytes` random bytes, hex-encoded.
pub fn random_token(bytes: usize) -> String {
    use std::fmt::Write as _;
    let mut raw = vec![0u8; bytes];
    fill_random(&mut raw);
    raw.iter()
        .fold(String::with_capacity(bytes * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

fn fill_random(buf: &mut [u8]) {
    // ThreadRng is a CSPRNG seeded from the operating system.
    rand::RngCore::fill_bytes(&mut rand::rng(), buf);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inline_file_or_nothing() {
        assert_eq!(load("x", None, None).expect("ok"), None);
        assert_eq!(
            load("x", Some(" abc \n"), None).expect("ok").as_deref(),
            Some("abc")
        );
        let dir = std::env::temp_dir().join(format!("floe-secret-{}", random_token(4)));
        std::fs::write(&dir, "from-file\n").expect("write");
        assert_eq!(
            load("x", None, Some(&dir)).expect("ok").as_deref(),
            Some("from-file")
        );
        assert!(matches!(
            load("x", Some("a"), Some(&dir)),
            Err(SecretError::Both { .. })
        ));
        assert!(matches!(
            load("x", Some("  "), None),
            Err(SecretError::Empty { .. })
        ));
        std::fs::remove_file(&dir).expect("cleanup");
        assert!(matches!(
            load("x", None, Some(&dir)),
            Err(SecretError::Read { .. })
        ));
        let t = random_token(16);
        assert_eq!(t.len(), 32);
        assert_ne!(t, random_token(16));
    }
}
