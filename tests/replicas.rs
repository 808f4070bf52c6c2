//! Two service processes on one model store, as replicas behind a Kubernetes Service
//! with a shared volume: a version trained on one is served by the other after its
//! watcher sees it; a second concurrent Train on the other replica is refused by the
//! store lock; a newly activated version that does not load is refused and counted.

mod common;

use std::time::{Duration, Instant};

use common::process::ServerProcess;
use common::{pairs, sample};
use fusion_serve::proto;
use fusion_serve::proto::fusion_service_client::FusionServiceClient;
use fusion_serve::proto::train_event::Event;
use tonic::transport::Channel;

/// A narrow model (fast to train on 2 cores) as the store's base model.
fn narrow_store() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = fusion_serve::model::ModelConfig::default();
    cfg.image.widths = [8, 8, 16, 16];
    cfg.audio_encoder.hidden_size = 16;
    cfg.audio_encoder.num_layers = 1;
    cfg.head.hidden = vec![16];
    let vars = fusion_serve::weights::init_random(&cfg, 7).unwrap();
    // The store's top level is a plain model directory: its base model.
    let base = dir.path().join("base");
    fusion_serve::weights::save_dir(&base, &cfg, &vars).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::rename(base.join(f), dir.path().join(f)).unwrap();
    }
    std::fs::remove_dir(&base).unwrap();
    dir
}

/// A run of `epochs` over `n` training pairs; `queue` waits for a run in progress.
fn train_messages(epochs: u32, n: usize, queue: bool) -> Vec<proto::TrainRequest> {
    let mut msgs = vec![proto::TrainRequest {
        item: Some(proto::train_request::Item::Config(proto::TrainConfig {
            epochs,
            queue,
            batch_size: 8,
            learning_rate: 1e-3,
            seed: 1,
            ..Default::default()
        })),
    }];
    for p in pairs().iter().filter(|p| p.split == "train").take(n) {
        msgs.push(proto::TrainRequest {
            item: Some(proto::train_request::Item::Example(proto::TrainExample {
                sample: Some(sample(p)),
                label_index: Some(p.label),
                ..Default::default()
            })),
        });
    }
    msgs
}

async fn client(server: &ServerProcess) -> FusionServiceClient<Channel> {
    FusionServiceClient::connect(server.url())
        .await
        .unwrap()
        .max_decoding_message_size(64 << 20)
}

async fn version(c: &mut FusionServiceClient<Channel>) -> String {
    c.get_model_info(proto::GetModelInfoRequest {})
        .await
        .unwrap()
        .into_inner()
        .model_version
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_version_trained_on_one_replica_is_served_by_the_other() {
    let store = narrow_store();
    let dir = store.path().to_str().unwrap().to_string();
    let watch = ["--model-dir", &dir, "--store-watch-interval-secs", "0.5"];
    let a = ServerProcess::start(&watch).await;
    let b = ServerProcess::start(&watch).await;
    let (mut ca, mut cb) = (client(&a).await, client(&b).await);
    assert_eq!(version(&mut ca).await, "base");
    assert_eq!(version(&mut cb).await, "base");

    // A long run on A holds the store's lock: a Train on B is refused meanwhile.
    let mut long = ca
        .train(tokio_stream::iter(train_messages(1000, 16, false)))
        .await
        .unwrap()
        .into_inner();
    loop {
        let ev = long.message().await.unwrap().expect("the run ended early");
        if matches!(ev.event, Some(Event::Started(_))) {
            break;
        }
    }
    let refused = match cb
        .train(tokio_stream::iter(train_messages(1, 8, false)))
        .await
    {
        Err(s) => s,
        Ok(_) => panic!("a second run across the store must be refused"),
    };
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    drop(long); // cancel A's long run: nothing is stored
    assert_eq!(version(&mut cb).await, "base");

    // A short run on A: A serves it at once, B after its watcher sees ACTIVE change.
    // It queues: A notices the cancellation above asynchronously.
    let mut events = ca
        .train(tokio_stream::iter(train_messages(1, 24, true)))
        .await
        .unwrap()
        .into_inner();
    let mut finished = None;
    while let Some(ev) = events.message().await.unwrap() {
        if let Some(Event::Finished(f)) = ev.event {
            finished = Some(f);
        }
    }
    let finished = finished.expect("the run must finish with a `finished` event");
    assert!(finished.activated);
    assert_eq!(version(&mut ca).await, finished.model_version);

    let deadline = Instant::now() + Duration::from_secs(60);
    while version(&mut cb).await != finished.model_version {
        assert!(
            Instant::now() < deadline,
            "replica B never served the new version"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let predicted = cb
        .predict(proto::PredictRequest {
            samples: vec![sample(&pairs()[0])],
            top_k: 1,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(predicted.model_version, finished.model_version);

    // A version that does not load is refused by the watcher; B keeps serving.
    let bad = store.path().join("versions/v99");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::copy(store.path().join("config.json"), bad.join("config.json")).unwrap();
    std::fs::write(bad.join("model.safetensors"), b"not safetensors").unwrap();
    std::fs::write(store.path().join("ACTIVE"), "v99\n").unwrap();
    let metrics_url = format!("http://{}/metrics", b.metrics_addr);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = fetch(&metrics_url).await;
        if text
            .lines()
            .any(|l| l.starts_with("fusion_model_load_failures_total") && !l.ends_with(" 0"))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the failed load was never counted"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(version(&mut cb).await, finished.model_version);
}

/// A plain HTTP GET (the metrics endpoint), without an HTTP client dependency.
async fn fetch(url: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_once('/').unwrap();
    let mut s = tokio::net::TcpStream::connect(host).await.unwrap();
    s.write_all(format!("GET /{path} HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}
