//! A finished run becomes a version: written to the store atomically with its
//! metadata, then (if asked) loaded fresh from disk, warmed up, pointed to by
//! `ACTIVE` and swapped into the slot. Any failure removes what was written and
//! leaves the served model and `ACTIVE` as they were.

use std::sync::Arc;

use crate::app::Backend;
use crate::engine::{self, ServedModel};
use crate::loader;
use crate::model::ModelConfig;
use crate::store::{TrainLock, VersionMetadata};

use super::settings::TrainSettings;
use super::trainer::TrainOutcome;
use super::{Finished, TrainError};

pub fn publish(
    backend: &Backend,
    lock: &TrainLock,
    base: &Arc<ServedModel>,
    config: &ModelConfig,
    settings: &TrainSettings,
    outcome: TrainOutcome,
    (n_train, n_val): (usize, usize),
) -> Result<Finished, TrainError> {
    let store = &backend.store;
    let metadata = VersionMetadata {
        version: String::new(),
        parent_version: base.version.clone(),
        created_at: rfc3339_now(),
        train_config: settings.to_json(),
        metrics: serde_json::json!({
            "final_train_loss": outcome.final_train_loss,
            "validation": outcome.validation,
            "train_seconds": outcome.train_seconds,
            "stopped_early": outcome.stopped_early,
        }),
        train_examples: n_train as u32,
        validation_examples: n_val as u32,
        epochs_completed: outcome.epochs_completed as u32,
        activate: settings.activate,
    };
    let (version, path) = store
        .write_version(lock, config, &outcome.tensors, metadata)
        .map_err(|e| TrainError::Internal(format!("writing the new version: {e:#}")))?;
    let finished = Finished {
        version: version.clone(),
        path: path.display().to_string(),
        activated: settings.activate,
        epochs_completed: outcome.epochs_completed,
        final_train_loss: outcome.final_train_loss,
        validation: outcome.validation,
        train_seconds: outcome.train_seconds,
    };
    if !settings.activate {
        tracing::info!(%version, path = %path.display(), "trained version stored (not activated)");
        return Ok(finished);
    }
    let served = (|| {
        let served = loader::load_version(
            store,
            &version,
            &backend.device,
            backend.dtype,
            &backend.input_limits,
        )
        .map_err(|e| TrainError::Internal(format!("loading {version} back: {e:#}")))?;
        let warm = crate::watcher::warmup_sample(&served);
        engine::forward(&served, &[&warm])?;
        store
            .activate(lock, &version)
            .map_err(|e| TrainError::Internal(format!("activating {version}: {e:#}")))?;
        Ok::<_, TrainError>(served)
    })();
    match served {
        Ok(served) => {
            backend.slot.swap(served);
            tracing::info!(%version, path = %path.display(), "trained version activated and served");
            Ok(finished)
        }
        Err(e) => {
            if let Err(rm) = std::fs::remove_dir_all(&path) {
                tracing::warn!(path = %path.display(), error = %rm, "cannot remove a version that failed to activate");
            }
            Err(e)
        }
    }
}

pub fn unix_seconds() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The current UTC time as RFC 3339, e.g. `2026-12-03T18:40:00Z`.
pub fn rfc3339_now() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}
