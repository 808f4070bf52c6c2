//! Batching through the whole stack, in process, on real av-digits pairs: the same
//! answers with batching on and off, and an overload that is refused cleanly.
//!
//! Both servers load one model directory written here, so they serve identical
//! weights. Batch sizes are read from the batcher's own metrics: these tests run on
//! tokio's current-thread runtime, where the batching worker runs on the test's
//! thread and so records into the thread's local `DebuggingRecorder`.

mod common;

use std::time::Duration;

use common::{max_abs_diff, pairs, sample, serve_config, write_model_dir, Pair, TestServer};
use fusion_serve::proto;
use fusion_serve::telemetry::metrics as m;
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use tonic::Code;

/// Test pairs spread over the whole range of clip lengths.
fn spread_of_lengths(n: usize) -> Vec<Pair> {
    let mut test: Vec<Pair> = pairs().into_iter().filter(|p| p.split == "test").collect();
    test.sort_by_key(|p| std::fs::metadata(&p.wav).unwrap().len());
    (0..n)
        .map(|i| test[i * (test.len() - 1) / (n - 1)].clone())
        .collect()
}

/// Every batch size the batcher recorded since the last call.
fn batch_sizes(snap: &Snapshotter) -> Vec<f64> {
    snap.snapshot()
        .into_vec()
        .into_iter()
        .filter(|(k, ..)| k.key().name() == m::BATCH_SIZE)
        .flat_map(|(.., v)| match v {
            DebugValue::Histogram(h) => h.into_iter().map(|x| x.into_inner()).collect(),
            _ => vec![],
        })
        .collect()
}

/// Fuse and Predict for each pair, one single-sample request per pair, all at once.
async fn all_at_once(server: &TestServer, chosen: &[Pair]) -> Vec<(Vec<f32>, Vec<f32>)> {
    let client = server.client().await;
    let calls = chosen.iter().map(|p| {
        let mut client = client.clone();
        let s = sample(p);
        async move {
            let fused = client
                .fuse(proto::FuseRequest {
                    samples: vec![s.clone()],
                    include_modalities: true,
                })
                .await
                .unwrap()
                .into_inner();
            let predicted = client
                .predict(proto::PredictRequest {
                    samples: vec![s],
                    top_k: 1,
                })
                .await
                .unwrap()
                .into_inner();
            (
                fused.results[0].fused.clone(),
                predicted.predictions[0].scores.clone(),
            )
        }
    });
    futures::future::join_all(calls).await
}

#[tokio::test]
async fn batching_on_and_off_give_the_same_answers_on_real_pairs() {
    let recorder = DebuggingRecorder::new();
    let snap = recorder.snapshotter();
    let _local = metrics::set_default_local_recorder(&recorder);
    let models = tempfile::tempdir().unwrap();
    let dir = write_model_dir(models.path(), "v1", 1);
    let dir = dir.to_str().unwrap();
    let chosen = spread_of_lengths(24);

    let off = TestServer::start(serve_config(&["--model-dir", dir, "--max-batch-size", "1"])).await;
    let alone = all_at_once(&off, &chosen).await;
    off.stop().await.unwrap();
    let sizes = batch_sizes(&snap);
    assert!(sizes.iter().all(|&b| b == 1.0), "batching off: {sizes:?}");

    // A generous delay makes the concurrent requests meet even on a fast machine.
    let on = TestServer::start(serve_config(&[
        "--model-dir",
        dir,
        "--max-batch-delay-us",
        "50000",
    ]))
    .await;
    let batched = all_at_once(&on, &chosen).await;
    on.stop().await.unwrap();
    let sizes = batch_sizes(&snap);
    assert!(
        sizes.iter().any(|&b| b > 1.0),
        "batching on never formed a batch: {sizes:?}"
    );

    for (i, ((fa, sa), (fb, sb))) in alone.iter().zip(&batched).enumerate() {
        let d = max_abs_diff(fa, fb);
        assert!(d <= 1e-5, "pair {i}: fused differs by {d} with batching on");
        let d = max_abs_diff(sa, sb);
        assert!(d <= 1e-5, "pair {i}: scores differ by {d} with batching on");
    }
}

/// 64 clients on their own connections against a queue of 16: every request is
/// answered, OK or RESOURCE_EXHAUSTED, and the server still serves afterwards.
#[tokio::test]
async fn overload_is_refused_with_resource_exhausted_and_nothing_else() {
    let server = TestServer::start(serve_config(&["--max-queue", "16"])).await;
    let chosen = spread_of_lengths(16);
    let requests: Vec<proto::PredictRequest> = chosen
        .iter()
        .map(|p| proto::PredictRequest {
            samples: vec![sample(p)],
            top_k: 1,
        })
        .collect();
    let mut clients = Vec::new();
    for _ in 0..64 {
        clients.push(server.client().await);
    }
    let storm = clients.into_iter().enumerate().map(|(c, mut client)| {
        let requests = requests.clone();
        async move {
            let mut codes = Vec::new();
            for r in 0..4 {
                let req = requests[(c + r) % requests.len()].clone();
                codes.push(match client.predict(req).await {
                    Ok(_) => Code::Ok,
                    Err(status) => status.code(),
                });
            }
            codes
        }
    });
    // Generous: a hang fails here; how long it takes is not asserted.
    let codes: Vec<Code> =
        tokio::time::timeout(Duration::from_secs(600), futures::future::join_all(storm))
            .await
            .expect("requests hung under overload")
            .concat();
    let ok = codes.iter().filter(|&&c| c == Code::Ok).count();
    let refused = codes
        .iter()
        .filter(|&&c| c == Code::ResourceExhausted)
        .count();
    eprintln!("overload: {ok} OK, {refused} RESOURCE_EXHAUSTED");
    assert_eq!(ok + refused, 256, "unexpected codes: {codes:?}");
    assert!(ok > 0, "nothing got through");

    let mut client = server.client().await;
    client
        .predict(requests[0].clone())
        .await
        .expect("still serving after the overload");
    server.stop().await.unwrap();
}
