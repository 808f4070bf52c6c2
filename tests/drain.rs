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
