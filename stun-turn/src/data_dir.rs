//! `floe turn-data-dir`: readies TURN's data folder (the usage spool) on a
//! volume the container cannot prepare itself, such as a hostPath the
//! kubelet creates owned by root. Run once, as root with only CAP_CHOWN,
//! from an init container: the folder is created, closed to others
//! (0700) and given to the server's user.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

/// Flags of `floe turn-data-dir`.
#[derive(Debug, Clone, clap::Args)]
pub struct DataDirConfig {
    /// The folder to ready (created with its parents when missing).
    pub path: PathBuf,

    /// Its owner, as UID:GID (the TURN container's user).
    #[arg(long, env = "FLOE_DATA_DIR_OWNER", default_value = "65532:65532")]
    pub owner: String,
}

/// Why the folder could not be readied.
#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    #[error("--owner must be UID:GID (numbers), got {0:?}")]
    Owner(String),
    #[error("{path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        source: std::io::Error,
    },
}

/// Creates `config.path`, sets its mode to 0700 and its owner; returns
/// what it did, for the log.
pub fn prepare(config: &DataDirConfig) -> Result<String, DataDirError> {
    let (uid, gid) = config
        .owner
        .split_once(':')
        .and_then(|(u, g)| Some((u.parse::<u32>().ok()?, g.parse::<u32>().ok()?)))
        .ok_or_else(|| DataDirError::Owner(config.owner.clone()))?;
    let path = config.path.as_path();
    let io = |what| {
        move |source| DataDirError::Io {
            path: path.to_owned(),
            what,
            source,
        }
    };
    std::fs::create_dir_all(path).map_err(io("create"))?;
    // Mode first: once the folder is someone else's, changing it would
    // need CAP_FOWNER too.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))
        .map_err(io("set its mode"))?;
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).map_err(io("set its owner"))?;
    Ok(describe(path, uid, gid))
}

fn describe(path: &Path, uid: u32, gid: u32) -> String {
    format!("{} ready: owner {uid}:{gid}, mode 0700\n", path.display())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt as _;

    #[test]
    fn creates_the_folder_closed_and_owned() {
        let root = tempfile::tempdir().expect("tempdir");
        let me = std::fs::metadata(root.path()).expect("meta");
        let path = root.path().join("a/b/spool");
        let config = DataDirConfig {
            path: path.clone(),
            owner: format!("{}:{}", me.uid(), me.gid()),
        };
        let said = prepare(&config).expect("prepared");
        assert!(said.contains("mode 0700"), "{said}");
        let meta = std::fs::metadata(&path).expect("exists");
        assert!(meta.is_dir());
        assert_eq!(meta.mode() & 0o777, 0o700);
        assert_eq!((meta.uid(), meta.gid()), (me.uid(), me.gid()));
        // Again on a folder that exists, with files in it: nothing lost.
        std::fs::write(path.join("usage-spool.json"), b"{}").expect("write");
        prepare(&config).expect("prepared again");
        assert!(path.join("usage-spool.json").exists());
    }

    #[test]
    fn a_bad_owner_or_path_is_refused() {
        for owner in ["65532", "a:b", "1:-1", ":"] {
            let config = DataDirConfig {
                path: PathBuf::from("/nonexistent"),
                owner: owner.into(),
            };
            assert!(
                matches!(prepare(&config), Err(DataDirError::Owner(_))),
                "{owner}"
            );
        }
        let file = tempfile::NamedTempFile::new().expect("file");
        let config = DataDirConfig {
            path: file.path().join("under-a-file"),
            owner: "0:0".into(),
        };
        let e = prepare(&config).expect_err("a file is in the way");
        assert!(e.to_string().contains("create"), "{e}");
    }
}
