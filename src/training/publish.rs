//! A finished run becomes a version: written to the store atomically with its
//! metadata, then (if asked) loaded fresh from disk, warmed up, pointed to by
//! `ACTIVE` and swapped into the slot. Any failure removes what was written and
//! leaves the served model and `ACTIVE` as they were.

use std::sync::Arc;

use crate::app::Backend;
use crate::engine::{self, ServedModel};
use crate::loader;
use crate::model::ModelConfig;
use crate::preprocess::PreparedSample;
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
        let warm = warmup_sample(&served);
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

/// A blank image and one second of silence-level features.
fn warmup_sample(model: &ServedModel) -> PreparedSample {
    let c = &model.config;
    let frames = (c.audio.sample_rate as usize / c.audio.hop_length).max(1);
    PreparedSample {
        image: vec![0.0; c.image.channels * c.image.height * c.image.width],
        audio: vec![c.audio.log_eps.ln(); frames * c.audio.n_mels],
        frames,
    }
}

pub fn unix_seconds() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The current UTC time as RFC 3339, e.g. `2026-12-03T18:40:00Z`.
pub fn rfc3339_now() -> String {
    rfc3339(unix_seconds())
}

fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(mo <= 2);
    format!(
        "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn rfc3339_dates() {
        assert_eq!(super::rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(super::rfc3339(1_796_300_000), "2026-12-03T12:13:20Z");
    }
}
