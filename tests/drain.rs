//! SIGTERM on the real binary under load: health turns NOT_SERVING at once, requests
//! keep being answered through the drain delay, in-flight work finishes, exit 0.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::process::ServerProcess;
use common::{pairs, sample};
use fusion_serve::proto;
use fusion_serve::proto::fusion_service_client::FusionServiceClient;
use tokio::sync::Mutex;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_drains_under_load_and_exits_zero() {
    let drain = Duration::from_millis(1500);
    let mut server = ServerProcess::start(&["--drain-delay-secs", "1.5"]).await;
    let request = proto::PredictRequest {
        samples: pairs()
            .iter()
            .filter(|p| p.split == "test")
            .take(2)
            .map(sample)
            .collect(),
        top_k: 1,
    };
    // (sent at, ok?, status code)
    let log: Arc<Mutex<Vec<(Instant, bool, String)>>> = Arc::default();
    let stop_at = Arc::new(Mutex::new(None::<Instant>));
    let mut clients = Vec::new();
    for _ in 0..8 {
        let (url, request, log, stop_at) =
            (server.url(), request.clone(), log.clone(), stop_at.clone());
        clients.push(tokio::spawn(async move {
            let mut client = FusionServiceClient::connect(url).await.unwrap();
            // Bounded: at most 400 requests per client.
            for _ in 0..400 {
                if let Some(t) = *stop_at.lock().await {
                    if Instant::now() > t {
                        break;
                    }
                }
                let sent = Instant::now();
                let result = client.predict(request.clone()).await;
                let code = match &result {
                    Ok(_) => "OK".to_string(),
                    Err(s) => format!("{:?}: {}", s.code(), s.message()),
                };
                log.lock().await.push((sent, result.is_ok(), code));
                if result.is_err() {
                    // The listener closed: reconnecting would only fail too.
                    break;
                }
            }
        }));
    }
    // Let load build up, then SIGTERM.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let term_at = Instant::now();
    server.sigterm();
    *stop_at.lock().await = Some(term_at + drain + Duration::from_secs(2));
    // Health must turn NOT_SERVING well before the drain delay is over.
    server.wait_status(2, drain / 2).await;
    let code = tokio::task::spawn_blocking(move || server.wait_exit(Duration::from_secs(60)))
        .await
        .unwrap();
    for c in clients {
        tokio::time::timeout(Duration::from_secs(60), c)
            .await
            .expect("a client hung")
            .unwrap();
    }
    assert_eq!(code, Some(0), "the server must exit 0 after a drain");

    let log = log.lock().await;
    let drain_end = term_at + drain;
    let before: Vec<_> = log
        .iter()
        .filter(|(sent, _, _)| *sent < drain_end)
        .collect();
    let during = before
        .iter()
        .filter(|(sent, _, _)| *sent >= term_at)
        .count();
    assert!(
        during > 0,
        "no request was sent during the drain delay: the test did not exercise it"
    );
    let failed: Vec<_> = before.iter().filter(|(_, ok, _)| !ok).collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests sent before the drain ended failed: {:?}",
        failed.len(),
        before.len(),
        failed.iter().map(|(_, _, c)| c).take(5).collect::<Vec<_>>()
    );
}

/// SIGTERM during a training run stops it cleanly: the stream ends UNAVAILABLE,
/// nothing is stored (no version, no temporary files), and the process exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_stops_a_training_run_cleanly() {
    use fusion_serve::proto::train_event::Event;
    let store = tempfile::tempdir().unwrap();
    let dir = store.path().to_str().unwrap().to_string();
    let mut server = ServerProcess::start(&["--model-dir", &dir]).await;
    let mut client = FusionServiceClient::connect(server.url()).await.unwrap();
    let mut msgs = vec![proto::TrainRequest {
        item: Some(proto::train_request::Item::Config(proto::TrainConfig {
            epochs: 1000,
            batch_size: 4,
            ..Default::default()
        })),
    }];
    for p in pairs().iter().filter(|p| p.split == "train").take(8) {
        msgs.push(proto::TrainRequest {
            item: Some(proto::train_request::Item::Example(proto::TrainExample {
                sample: Some(sample(p)),
                label_index: Some(p.label),
                ..Default::default()
            })),
        });
    }
    let mut events = client
        .train(tokio_stream::iter(msgs))
        .await
        .unwrap()
        .into_inner();
    loop {
        let ev = events
            .message()
            .await
            .unwrap()
            .expect("the run ended early");
        if matches!(ev.event, Some(Event::Progress(_))) {
            break;
        }
    }
    server.sigterm();
    let status = loop {
        match events.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the run ended without a status"),
            Err(s) => break s,
        }
    };
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(status.message().contains("shutting down"), "{status:?}");
    let code = tokio::task::spawn_blocking(move || server.wait_exit(Duration::from_secs(60)))
        .await
        .unwrap();
    assert_eq!(code, Some(0));
    let versions = store.path().join("versions");
    let leftovers: Vec<_> = std::fs::read_dir(&versions)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(leftovers.is_empty(), "the store changed: {leftovers:?}");
    assert!(!store.path().join("ACTIVE").exists());
}
