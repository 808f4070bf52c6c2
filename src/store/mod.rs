//! The model store: numbered model versions in one directory, the pointer to the
//! active one, and the lock that lets one process train at a time.
//!
//! ```text
//! <store>/
//!   config.json, model.safetensors   optional base model (a plain model directory)
//!   versions/v1/                     config.json, model.safetensors, metadata.json
//!   versions/v2/ ...
//!   ACTIVE                           the served version's name, e.g. "v2"
//!   train.lock                       held (flock) by the process that is training
//! ```
//!
//! Every write is atomic: a version is written under a temporary name, fsynced and
//! renamed into place; `ACTIVE` is replaced by rename. A crash leaves only temporary
//! names, which [`ModelStore::open`] removes, and the previous version loadable.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::model::ModelConfig;
use crate::weights::{self, TensorSource};

pub const VERSIONS_DIR: &str = "versions";
pub const ACTIVE_FILE: &str = "ACTIVE";
pub const METADATA_FILE: &str = "metadata.json";
pub const LOCK_FILE: &str = "train.lock";
const TMP_PREFIX: &str = ".tmp-";

/// What `metadata.json` of a version says about how it was made.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct VersionMetadata {
    pub version: String,
    /// The version training started from.
    pub parent_version: String,
    /// RFC 3339, UTC.
    pub created_at: String,
    /// The run's settings.
    pub train_config: serde_json::Value,
    /// Final metrics (loss, accuracy, per-class...).
    pub metrics: serde_json::Value,
    pub train_examples: u32,
    pub validation_examples: u32,
    pub epochs_completed: u32,
    /// Whether the run asked for this version to be served.
    pub activate: bool,
}

/// A model store rooted at a directory.
#[derive(Clone, Debug)]
pub struct ModelStore {
    root: PathBuf,
    /// Set for a store that lives only as long as this process.
    _temporary: Option<std::sync::Arc<tempfile::TempDir>>,
}

/// The training lock; released when dropped (or when the process dies).
#[derive(Debug)]
pub struct TrainLock {
    _file: File,
}

impl ModelStore {
    /// Opens the store at `root`, creating the directory if it does not exist. A
    /// read-only directory (e.g. a plain model directory on a read-only volume) opens
    /// fine; only training, which writes, then fails.
    pub fn open(root: impl AsRef<Path>) -> anyhow::Result<Self> {
        let root = root.as_ref().to_path_buf();
        if !root.is_dir() {
            // A typo in --model-dir would otherwise serve random weights silently.
            tracing::warn!(path = %root.display(), "the model directory does not exist: creating a new, empty model store (serving the built-in model until a version is trained)");
            fs::create_dir_all(&root)
                .with_context(|| format!("creating the model store at {}", root.display()))?;
        }
        let store = Self {
            root,
            _temporary: None,
        };
        // Only the lock holder writes, so only with the lock may leftovers of writes
        // that never finished be removed: another replica may be writing right now.
        if let Ok(Some(lock)) = store.try_lock_training() {
            store.remove_leftovers(&lock);
        }
        Ok(store)
    }

    /// A store in a temporary directory, removed when the process ends: used when no
    /// `--model-dir` is given, so training works but does not survive a restart.
    pub fn temporary() -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("fusion-serve-store-")
            .tempdir()
            .context("creating a temporary model store")?;
        Ok(Self {
            root: dir.path().to_path_buf(),
            _temporary: Some(std::sync::Arc::new(dir)),
        })
    }

    /// False for a [`ModelStore::temporary`] store.
    pub fn is_persistent(&self) -> bool {
        self._temporary.is_none()
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The base model at the store's top level, if it is also a plain model directory.
    pub fn base_model_dir(&self) -> Option<&Path> {
        self.root
            .join(weights::CONFIG_FILE)
            .is_file()
            .then_some(self.root.as_path())
    }

    pub fn version_dir(&self, version: &str) -> PathBuf {
        self.root.join(VERSIONS_DIR).join(version)
    }

    /// Complete versions, oldest first, as (number, name).
    pub fn versions(&self) -> anyhow::Result<Vec<(u64, String)>> {
        let dir = self.root.join(VERSIONS_DIR);
        let mut out = Vec::new();
        if !dir.is_dir() {
            return Ok(out);
        }
        for entry in fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if let Some(n) = version_number(&name) {
                out.push((n, name));
            }
        }
        out.sort();
        Ok(out)
    }

    /// The version `ACTIVE` names, if any.
    pub fn active(&self) -> anyhow::Result<Option<String>> {
        let path = self.root.join(ACTIVE_FILE);
        match fs::read_to_string(&path) {
            Ok(s) => {
                let name = s.trim().to_string();
                anyhow::ensure!(
                    version_number(&name).is_some(),
                    "{} names {name:?}, which is not a version name like v3",
                    path.display()
                );
                Ok(Some(name))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    pub fn metadata(&self, version: &str) -> anyhow::Result<VersionMetadata> {
        let path = self.version_dir(version).join(METADATA_FILE);
        let bytes = fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))
    }

    /// Where process `pid` writes `version` before renaming it into place. Anything
    /// under such a name is an unfinished write.
    pub fn staging_dir(&self, version: &str, pid: u32) -> PathBuf {
        self.root
            .join(VERSIONS_DIR)
            .join(format!("{TMP_PREFIX}{version}-{pid}"))
    }

    /// Writes a new version atomically and returns its name and directory. Only the
    /// holder of the [`TrainLock`] may call this (the lock makes numbering safe).
    pub fn write_version(
        &self,
        _lock: &TrainLock,
        config: &ModelConfig,
        tensors: &impl TensorSource,
        mut metadata: VersionMetadata,
    ) -> anyhow::Result<(String, PathBuf)> {
        let next = self.versions()?.last().map_or(1, |(n, _)| n + 1);
        let name = format!("v{next}");
        metadata.version = name.clone();
        let versions = self.root.join(VERSIONS_DIR);
        fs::create_dir_all(&versions)
            .with_context(|| format!("creating {}", versions.display()))?;
        let tmp = self.staging_dir(&name, std::process::id());
        let result = (|| {
            // Staged under our own `.tmp-` name, so a kill at any point leaves only a
            // name that `remove_leftovers` knows.
            weights::write_new_dir(&tmp, config, tensors)?;
            write_synced(
                &tmp.join(METADATA_FILE),
                &serde_json::to_vec_pretty(&metadata)?,
            )?;
            sync_dir(&tmp)?;
            let dest = versions.join(&name);
            fs::rename(&tmp, &dest)
                .with_context(|| format!("renaming {} to {}", tmp.display(), dest.display()))?;
            sync_dir(&versions)?;
            Ok::<_, anyhow::Error>(dest)
        })();
        match result {
            Ok(dest) => Ok((name, dest)),
            Err(e) => {
                let _ = fs::remove_dir_all(&tmp);
                Err(e)
            }
        }
    }

    /// Points `ACTIVE` at `version` (atomically, by rename).
    pub fn activate(&self, _lock: &TrainLock, version: &str) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.version_dir(version).is_dir(),
            "version {version} does not exist in {}",
            self.root.display()
        );
        let tmp = self
            .root
            .join(format!("{TMP_PREFIX}{ACTIVE_FILE}-{}", std::process::id()));
        let dest = self.root.join(ACTIVE_FILE);
        let result = write_synced(&tmp, format!("{version}\n").as_bytes()).and_then(|()| {
            fs::rename(&tmp, &dest).with_context(|| format!("replacing {}", dest.display()))
        });
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
            return result;
        }
        // Once renamed, `ACTIVE` names the version whatever happens next: the caller
        // must treat it as activated (and not remove it), so a failed directory sync
        // is only a warning about durability.
        if let Err(e) = sync_dir(&self.root) {
            tracing::warn!(error = %format!("{e:#}"), "ACTIVE was replaced but the store directory could not be synced");
        }
        Ok(())
    }

    /// Takes the training lock without waiting; `None` if another process (or run)
    /// holds it. The OS releases it if the holder dies, so a crashed trainer never
    /// blocks the store.
    pub fn try_lock_training(&self) -> anyhow::Result<Option<TrainLock>> {
        let path = self.root.join(LOCK_FILE);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => Ok(Some(TrainLock { _file: file })),
            Err(fs::TryLockError::WouldBlock) => Ok(None),
            Err(fs::TryLockError::Error(e)) => {
                Err(e).with_context(|| format!("locking {}", path.display()))
            }
        }
    }

    /// Removes temporary names left by writes that never finished (a crash, a kill).
    pub fn remove_leftovers(&self, _lock: &TrainLock) {
        for dir in [self.root.clone(), self.root.join(VERSIONS_DIR)] {
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with(TMP_PREFIX) {
                    let path = entry.path();
                    let removed = if path.is_dir() {
                        fs::remove_dir_all(&path)
                    } else {
                        fs::remove_file(&path)
                    };
                    match removed {
                        Ok(()) => {
                            tracing::info!(path = %path.display(), "removed an unfinished write")
                        }
                        Err(e) => {
                            tracing::warn!(path = %path.display(), error = %e, "cannot remove an unfinished write")
                        }
                    }
                }
            }
        }
    }
}

/// `v12` -> 12.
pub fn version_number(name: &str) -> Option<u64> {
    name.strip_prefix('v')?.parse().ok().filter(|n| *n > 0)
}

fn write_synced(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let mut f = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}

fn sync_dir(path: &Path) -> anyhow::Result<()> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("syncing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny_config() -> ModelConfig {
        let mut c = ModelConfig::default();
        c.image.widths = [4, 4, 4, 4];
        c.image.height = 16;
        c.image.width = 16;
        c.audio.n_mels = 8;
        c.audio_encoder.hidden_size = 4;
        c.audio_encoder.num_layers = 1;
        c.head.hidden = vec![4];
        c.labels = vec!["a".into(), "b".into()];
        c
    }

    #[test]
    fn versions_are_numbered_written_whole_and_activated() {
        let dir = tempfile::tempdir().unwrap();
        let store = ModelStore::open(dir.path()).unwrap();
        assert_eq!(store.active().unwrap(), None);
        let cfg = tiny_config();
        let vars = weights::init_random(&cfg, 1).unwrap();
        let lock = store.try_lock_training().unwrap().unwrap();
        let (v1, p1) = store
            .write_version(&lock, &cfg, &vars, VersionMetadata::default())
            .unwrap();
        let (v2, _) = store
            .write_version(&lock, &cfg, &vars, VersionMetadata::default())
            .unwrap();
        assert_eq!((v1.as_str(), v2.as_str()), ("v1", "v2"));
        assert!(p1.join(METADATA_FILE).is_file());
        assert_eq!(store.metadata("v2").unwrap().version, "v2");
        weights::load_dir(&p1).unwrap();
        store.activate(&lock, "v2").unwrap();
        assert_eq!(store.active().unwrap().as_deref(), Some("v2"));
        assert!(store.activate(&lock, "v9").is_err());
        assert_eq!(store.active().unwrap().as_deref(), Some("v2"));
    }

    #[test]
    fn one_lock_holder_at_a_time_and_leftovers_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let store = ModelStore::open(dir.path()).unwrap();
        let lock = store.try_lock_training().unwrap().unwrap();
        let other = ModelStore::open(dir.path()).unwrap();
        assert!(other.try_lock_training().unwrap().is_none());
        drop(lock);
        assert!(other.try_lock_training().unwrap().is_some());

        let junk = dir.path().join(VERSIONS_DIR).join(".tmp-v7-123");
        fs::create_dir_all(&junk).unwrap();
        fs::write(junk.join("model.safetensors"), b"half").unwrap();
        let reopened = ModelStore::open(dir.path()).unwrap();
        assert!(!junk.exists());
        assert!(reopened.versions().unwrap().is_empty());
    }
}
