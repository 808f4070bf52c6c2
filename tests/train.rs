//! The Train RPC end to end, in process, on a narrow model in a temporary store:
//! serving during a run, one run at a time, cancellation, divergence, bad examples,
//! the memory limit, an interrupted write, and a reduced real-data run that survives
//! a restart.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{pairs, sample, serve_config, TestServer};
use fusion_serve::model::ModelConfig;
use fusion_serve::proto;
use fusion_serve::proto::fusion_service_client::FusionServiceClient;
use fusion_serve::weights;
use rand::{Rng, SeedableRng};
use tonic::transport::Channel;
use tonic::Code;

/// A narrow model: the same code paths (ResNet-18 with its max-pool stem, batch norm,
/// LSTM, head), a fraction of the width.
fn narrow_config() -> ModelConfig {
    let mut c = ModelConfig::default();
    c.image.widths = [8, 16, 16, 32];
    c.audio_encoder.hidden_size = 32;
    c.audio_encoder.num_layers = 1;
    c.head.hidden = vec![32];
    c
}

/// A store whose base model is the narrow model (served as version "base").
fn narrow_store(dir: &Path) {
    let cfg = narrow_config();
    let vars = weights::init_random(&cfg, 7).unwrap();
    weights::save_dir(dir, &cfg, &vars).unwrap();
}

async fn server(dir: &Path, extra: &[&str]) -> TestServer {
    let mut args = vec!["--model-dir", dir.to_str().unwrap()];
    args.extend_from_slice(extra);
    TestServer::start(serve_config(&args)).await
}

/// A synthetic sample: a 32x32 image tensor and `frames` frames of log-mel features
/// whose level depends on the label, so there is something to learn.
fn synthetic(label: u32, seed: u64) -> proto::Sample {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let image: Vec<f32> = (0..32 * 32)
        .map(|i| {
            let on = (i / 32) as u32 % 10 == label;
            (if on { 0.8 } else { 0.1 }) + rng.random_range(0.0..0.1)
        })
        .collect();
    let frames = 20;
    let audio: Vec<f32> = (0..frames * 40)
        .map(|i| (i % 40) as f32 * 0.01 * label as f32 - 5.0 + rng.random_range(0.0..0.5))
        .collect();
    proto::Sample {
        image: Some(proto::Image {
            data: Some(proto::image::Data::Tensor(proto::Tensor {
                shape: vec![1, 32, 32],
                values: image,
            })),
        }),
        audio: Some(proto::Audio {
            data: Some(proto::audio::Data::Features(proto::Tensor {
                shape: vec![frames as u32, 40],
                values: audio,
            })),
        }),
    }
}

fn example(sample: proto::Sample, label: u32) -> proto::TrainRequest {
    proto::TrainRequest {
        item: Some(proto::train_request::Item::Example(proto::TrainExample {
            sample: Some(sample),
            label_index: Some(label),
            ..Default::default()
        })),
    }
}

fn config_msg(c: proto::TrainConfig) -> proto::TrainRequest {
    proto::TrainRequest {
        item: Some(proto::train_request::Item::Config(c)),
    }
}

fn synthetic_run(c: proto::TrainConfig, n: usize) -> Vec<proto::TrainRequest> {
    let mut out = vec![config_msg(c)];
    out.extend((0..n).map(|i| example(synthetic((i % 10) as u32, i as u64), (i % 10) as u32)));
    out
}

/// Starts a run; the response stream, or the status it was refused with.
async fn train(
    client: &mut FusionServiceClient<Channel>,
    requests: Vec<proto::TrainRequest>,
) -> Result<tonic::Streaming<proto::TrainEvent>, tonic::Status> {
    client
        .train(tokio_stream::iter(requests))
        .await
        .map(|r| r.into_inner())
}

/// Reads events to the end: the events, and the final status if it failed.
async fn drain(
    mut s: tonic::Streaming<proto::TrainEvent>,
) -> (Vec<proto::train_event::Event>, Option<tonic::Status>) {
    let mut events = Vec::new();
    loop {
        match s.message().await {
            Ok(Some(e)) => events.extend(e.event),
            Ok(None) => return (events, None),
            Err(status) => return (events, Some(status)),
        }
    }
}

/// The run's result: refused at once or failed in the stream.
async fn run_status(
    client: &mut FusionServiceClient<Channel>,
    requests: Vec<proto::TrainRequest>,
) -> (Vec<proto::train_event::Event>, Option<tonic::Status>) {
    match train(client, requests).await {
        Err(status) => (Vec::new(), Some(status)),
        Ok(s) => drain(s).await,
    }
}

async fn version(client: &mut FusionServiceClient<Channel>) -> proto::ModelInfo {
    client
        .get_model_info(proto::GetModelInfoRequest {})
        .await
        .unwrap()
        .into_inner()
}

/// Names under `<store>/versions` and the store root that are temporary or versions.
fn store_entries(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for d in [dir.to_path_buf(), dir.join("versions")] {
        if let Ok(rd) = std::fs::read_dir(&d) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with('.') || name.starts_with('v') || name == "ACTIVE" {
                    out.push(name);
                }
            }
        }
    }
    out.sort();
    out
}

/// Waits until the server takes a new run (the previous one has released the slot):
/// a run with no examples is then refused with INVALID_ARGUMENT, not
/// FAILED_PRECONDITION.
async fn wait_idle(client: &mut FusionServiceClient<Channel>) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, status) = run_status(client, vec![config_msg(Default::default())]).await;
        let status = status.expect("a run without examples must fail");
        if status.code() == Code::InvalidArgument {
            return;
        }
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
        assert!(Instant::now() < deadline, "the run never released its slot");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serving_continues_second_run_is_refused_and_cancel_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    narrow_store(dir.path());
    let server = server(dir.path(), &[]).await;
    let mut client = server.client().await;
    let before = store_entries(dir.path());

    let long = proto::TrainConfig {
        epochs: 1000,
        batch_size: 8,
        ..Default::default()
    };
    let mut events = train(&mut client, synthetic_run(long, 40)).await.unwrap();
    // Wait until it really trains.
    loop {
        let e = events.message().await.unwrap().unwrap();
        if let Some(proto::train_event::Event::Progress(_)) = e.event {
            break;
        }
    }
    // Predict answers from the old model while the run goes on.
    let t = Instant::now();
    let answer = client
        .predict(proto::PredictRequest {
            samples: vec![synthetic(3, 99)],
            top_k: 1,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.model_version, "base");
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());

    // A second run is refused with a clear message.
    let (_, status) = run_status(&mut client, synthetic_run(Default::default(), 4)).await;
    let status = status.unwrap();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(
        status.message().contains("another training run"),
        "{status:?}"
    );

    // The client cancels: the run stops, nothing is stored or swapped.
    drop(events);
    wait_idle(&mut client).await;
    assert_eq!(version(&mut client).await.model_version, "base");
    assert_eq!(store_entries(dir.path()), before, "the store changed");
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_diverging_run_fails_precisely_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    narrow_store(dir.path());
    let server = server(dir.path(), &[]).await;
    let mut client = server.client().await;
    let before = store_entries(dir.path());
    let c = proto::TrainConfig {
        epochs: 3,
        batch_size: 4,
        learning_rate: 1e30,
        weight_decay: Some(0.0),
        validation_fraction: 0.2,
        ..Default::default()
    };
    let (_, status) = run_status(&mut client, synthetic_run(c, 20)).await;
    let status = status.expect("the run must fail");
    assert_eq!(status.code(), Code::Aborted, "{status:?}");
    assert!(status.message().contains("diverged"), "{status:?}");
    assert!(status.message().contains("learning_rate"), "{status:?}");
    assert_eq!(version(&mut client).await.model_version, "base");
    assert_eq!(store_entries(dir.path()), before);
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_examples_and_settings_are_refused_naming_them() {
    let dir = tempfile::tempdir().unwrap();
    narrow_store(dir.path());
    let server = server(dir.path(), &["--train-max-example-bytes", "20000"]).await;
    let mut client = server.client().await;
    let before = store_entries(dir.path());
    let ok = || example(synthetic(1, 1), 1);

    // The first message must be the config.
    let (_, s) = run_status(&mut client, vec![ok(), ok()]).await;
    let s = s.unwrap();
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(s.message().contains("config"), "{s:?}");

    // A bad setting names its field.
    let bad = proto::TrainConfig {
        validation_fraction: 0.9,
        ..Default::default()
    };
    let (_, s) = run_status(&mut client, vec![config_msg(bad), ok()]).await;
    let s = s.unwrap();
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(s.message().contains("config.validation_fraction"), "{s:?}");

    let cases: Vec<(proto::TrainRequest, &str)> = vec![
        (example(synthetic(1, 1), 10), "examples[2].label_index"),
        (
            proto::TrainRequest {
                item: Some(proto::train_request::Item::Example(proto::TrainExample {
                    sample: Some(synthetic(1, 1)),
                    label_name: "eleven".into(),
                    ..Default::default()
                })),
            },
            "examples[2].label_name",
        ),
        (
            example(
                proto::Sample {
                    audio: Some(proto::Audio {
                        data: Some(proto::audio::Data::Features(proto::Tensor {
                            shape: vec![5, 7],
                            values: vec![0.0; 35],
                        })),
                    }),
                    ..synthetic(1, 1)
                },
                1,
            ),
            "examples[2].sample.audio.features.shape",
        ),
        (
            example(
                proto::Sample {
                    image: None,
                    ..synthetic(1, 1)
                },
                1,
            ),
            "examples[2].sample.image",
        ),
    ];
    for (bad, field) in cases {
        let run = vec![config_msg(Default::default()), ok(), ok(), bad, ok()];
        let (events, s) = run_status(&mut client, run).await;
        let s = s.unwrap();
        assert_eq!(s.code(), Code::InvalidArgument, "{field}: {s:?}");
        assert!(s.message().contains(field), "{field}: {s:?}");
        assert!(events.is_empty(), "nothing may train: {events:?}");
    }

    // The memory limit: 20000 bytes hold a few of these examples, not 20.
    let (_, s) = run_status(&mut client, synthetic_run(Default::default(), 20)).await;
    let s = s.unwrap();
    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
    assert!(s.message().contains("20000"), "{s:?}");
    assert!(
        s.message().contains("FUSION_TRAIN_MAX_EXAMPLE_BYTES"),
        "{s:?}"
    );

    assert_eq!(version(&mut client).await.model_version, "base");
    assert_eq!(store_entries(dir.path()), before);
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_write_leaves_the_previous_version_served_and_is_cleaned() {
    let dir = tempfile::tempdir().unwrap();
    narrow_store(dir.path());
    let server = server(dir.path(), &[]).await;
    let mut client = server.client().await;
    let c = proto::TrainConfig {
        epochs: 1,
        batch_size: 8,
        ..Default::default()
    };
    let (events, status) = run_status(&mut client, synthetic_run(c, 16)).await;
    assert!(status.is_none(), "{status:?}");
    let Some(proto::train_event::Event::Finished(f)) = events.last().cloned() else {
        panic!("no finished event: {events:?}")
    };
    assert_eq!(f.model_version, "v1");
    assert!(f.activated);
    server.stop().await.unwrap();

    // A process killed while writing v2 leaves its staging directory with half a file.
    let v1 = dir.path().join("versions/v1");
    let leftover = fusion_serve::store::ModelStore::open(dir.path())
        .unwrap()
        .staging_dir("v2", 4242);
    std::fs::create_dir_all(&leftover).unwrap();
    let weights = std::fs::read(v1.join("model.safetensors")).unwrap();
    std::fs::write(
        leftover.join("model.safetensors"),
        &weights[..weights.len() / 2],
    )
    .unwrap();
    std::fs::copy(v1.join("config.json"), leftover.join("config.json")).unwrap();
    let stray_active = dir.path().join(".tmp-ACTIVE-4242");
    std::fs::write(&stray_active, "v2").unwrap();

    let server = server_again(dir.path()).await;
    let mut client = server.client().await;
    assert_eq!(version(&mut client).await.model_version, "v1");
    assert!(!leftover.exists(), "the leftover must be removed");
    assert!(!stray_active.exists(), "the stray ACTIVE must be removed");
    // The next run numbers after the versions that exist.
    let c = proto::TrainConfig {
        epochs: 1,
        batch_size: 8,
        ..Default::default()
    };
    let (events, status) = run_status(&mut client, synthetic_run(c, 16)).await;
    assert!(status.is_none(), "{status:?}");
    assert!(
        matches!(events.last(), Some(proto::train_event::Event::Finished(f)) if f.model_version == "v2")
    );
    assert_eq!(version(&mut client).await.model_version, "v2");
    server.stop().await.unwrap();
}

async fn server_again(dir: &Path) -> TestServer {
    server(dir, &[]).await
}

/// CI's real-data check: a subset of av-digits, a narrow model, a few epochs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reduced_real_data_run_learns_is_served_and_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    narrow_store(dir.path());
    let server = server(dir.path(), &[]).await;
    let mut client = server.client().await;
    let all = pairs();
    let train_pairs: Vec<_> = all
        .iter()
        .filter(|p| p.split == "train")
        .step_by(5)
        .collect();
    let test_pairs: Vec<_> = all
        .iter()
        .filter(|p| p.split == "test")
        .step_by(2)
        .collect();
    let c = proto::TrainConfig {
        epochs: 6,
        batch_size: 16,
        learning_rate: 3e-3,
        validation_fraction: 0.1,
        seed: 3,
        ..Default::default()
    };
    let mut run = vec![config_msg(c)];
    run.extend(train_pairs.iter().map(|p| example(sample(p), p.label)));
    let (events, status) = run_status(&mut client, run).await;
    assert!(status.is_none(), "{status:?}");
    use proto::train_event::Event as E;
    let losses: Vec<f32> = events
        .iter()
        .filter_map(|e| match e {
            E::Progress(p) => Some(p.running_loss),
            _ => None,
        })
        .collect();
    let validations: Vec<&proto::ValidationResult> = events
        .iter()
        .filter_map(|e| match e {
            E::Validation(v) => Some(v),
            _ => None,
        })
        .collect();
    assert!(
        matches!(events.first(), Some(E::Started(s)) if s.train_examples > 0 && s.validation_examples > 0)
    );
    let Some(E::Finished(f)) = events.last() else {
        panic!("no finished event")
    };
    assert!(
        f.final_train_loss < losses[0] * 0.7,
        "loss must fall: first {} final {}",
        losses[0],
        f.final_train_loss
    );
    assert_eq!(validations.len(), f.epochs_completed as usize);
    assert_eq!(validations[0].per_class_accuracy.len(), 10);
    eprintln!(
        "reduced run: {} examples, loss {} -> {}, {:.1} s",
        train_pairs.len(),
        losses[0],
        f.final_train_loss,
        f.train_seconds
    );

    let mut right = 0;
    let mut served = String::new();
    for chunk in test_pairs.chunks(25) {
        let r = client
            .predict(proto::PredictRequest {
                samples: chunk.iter().map(|p| sample(p)).collect(),
                top_k: 1,
            })
            .await
            .unwrap()
            .into_inner();
        served = r.model_version;
        for (p, pred) in chunk.iter().zip(r.predictions) {
            right += usize::from(pred.top[0].index == p.label);
        }
    }
    let accuracy = right as f32 / test_pairs.len() as f32;
    eprintln!("held-out accuracy {accuracy}");
    assert_eq!(served, f.model_version);
    assert!(
        accuracy > 0.5,
        "held-out accuracy {accuracy} (chance is 0.1)"
    );

    server.stop().await.unwrap();
    let server = server_again(dir.path()).await;
    let mut client = server.client().await;
    let info = version(&mut client).await;
    assert_eq!(info.model_version, f.model_version);
    let t = info.training.expect("the training summary");
    assert_eq!(t.parent_version, "base");
    assert_eq!(t.epochs_completed, f.epochs_completed);
    assert!(t.finished_at.ends_with('Z'), "{}", t.finished_at);
    assert!(
        t.config_json.contains("\"learning_rate\""),
        "{}",
        t.config_json
    );
    assert!(t.validation.is_some());
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_client_times_out_and_frees_the_store() {
    let dir = tempfile::tempdir().unwrap();
    narrow_store(dir.path());
    let server = server(dir.path(), &["--train-idle-timeout-secs", "0.5"]).await;
    let mut client = server.client().await;
    let before = store_entries(dir.path());

    // Sends its settings and one example, then nothing, without closing the stream.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(config_msg(Default::default())).await.unwrap();
    tx.send(example(synthetic(1, 1), 1)).await.unwrap();
    let events = client
        .train(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let (_, status) = drain(events).await;
    let status = status.expect("a stalled run must fail");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(
        status.message().contains("examples[1]")
            && status.message().contains("--train-idle-timeout-secs"),
        "{status:?}"
    );
    drop(tx);

    // Nothing stored, and the next run is not refused as busy.
    assert_eq!(store_entries(dir.path()), before);
    wait_idle(&mut client).await;
}
