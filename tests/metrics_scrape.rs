//! The real binary's `/metrics`, scraped by a real Prometheus server and checked with
//! `promtool check metrics`, after it has served requests.
//!
//! Needs the `prometheus` binary (Debian: `apt-get install -y prometheus`, which also
//! brings `promtool`). Without it the test says so loudly and passes.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{pairs, sample, write_model_dir};
use fusion_serve::proto;
use fusion_serve::proto::fusion_service_client::FusionServiceClient;
use tonic::Code;

/// Every metric the service must export once it has served requests, with its type.
const EXPECTED: &[(&str, &str)] = &[
    ("fusion_requests_total", "counter"),
    ("fusion_request_duration_seconds", "histogram"),
    ("fusion_samples_total", "counter"),
    ("fusion_queue_duration_seconds", "histogram"),
    ("fusion_preprocess_duration_seconds", "histogram"),
    ("fusion_inference_duration_seconds", "histogram"),
    ("fusion_batch_size", "histogram"),
    ("fusion_batch_padding_ratio", "histogram"),
    ("fusion_queue_depth", "gauge"),
    ("fusion_inflight_requests", "gauge"),
    ("fusion_requests_dropped_total", "counter"),
    ("fusion_model_version", "gauge"),
    ("fusion_ready", "gauge"),
];

fn on_path(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process killed when the test ends, however it ends.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(cmd: &mut Command, log: &Path) -> Running {
    let out = std::fs::File::create(log).unwrap();
    let child = cmd
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
    Running(child)
}

/// A plain HTTP/1.0 GET (no chunked bodies); `None` if nothing answers yet.
fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n").ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).ok()?;
    let (head, body) = raw.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_string()))
}

/// Runs a PromQL instant query; the result vector, if it has any series.
fn query(port: u16, promql: &str) -> Option<Vec<serde_json::Value>> {
    let (status, body) = http_get(port, &format!("/api/v1/query?query={promql}"))?;
    if status != 200 {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    let result = v["data"]["result"].as_array()?.clone();
    (!result.is_empty()).then_some(result)
}

/// The value of one sample line `name{...} value` or `name value` in an exposition.
fn exposed_value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[tokio::test]
async fn prometheus_scrapes_the_running_binary() {
    if !on_path("prometheus") {
        // CI installs it (.ci/run): there a missing binary is a failure, not a skip.
        assert!(
            std::env::var_os("CI").is_none(),
            "CI is set but `prometheus` is not on PATH: .ci/run must install it"
        );
        eprintln!(
            "\n\n*** SKIPPED prometheus_scrapes_the_running_binary: no `prometheus` binary on \
             PATH. Install it (Debian: apt-get update && apt-get install -y prometheus) to \
             run this test. ***\n\n"
        );
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    // A store whose active version is v7: fusion_model_version must say 7.
    let store = tmp.path().join("store");
    write_model_dir(&store.join("versions"), "v7", 7);
    std::fs::write(store.join("ACTIVE"), "v7\n").unwrap();
    let model = store;
    let (grpc, metrics_port, prom_port) = (free_port(), free_port(), free_port());
    let server_log = tmp.path().join("server.log");
    let _server = spawn(
        Command::new(env!("CARGO_BIN_EXE_fusion-serve")).args([
            "serve",
            "--grpc-addr",
            &format!("127.0.0.1:{grpc}"),
            "--metrics-addr",
            &format!("127.0.0.1:{metrics_port}"),
            "--model-dir",
            model.to_str().unwrap(),
        ]),
        &server_log,
    );

    // Serve a few requests: OK on Predict and Fuse, one INVALID_ARGUMENT.
    let url = format!("http://127.0.0.1:{grpc}");
    let until = Instant::now() + Duration::from_secs(120);
    let not_ready = |what: &str| {
        assert!(
            Instant::now() < until,
            "server never became ready ({what}); its log:\n{}",
            std::fs::read_to_string(&server_log).unwrap_or_default()
        );
    };
    let mut client = loop {
        match FusionServiceClient::connect(url.clone()).await {
            Ok(c) => break c,
            Err(e) => not_ready(&e.to_string()),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    while let Err(s) = client.get_model_info(proto::GetModelInfoRequest {}).await {
        assert_eq!(s.code(), Code::Unavailable, "{s:?}");
        not_ready(s.message());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let test: Vec<_> = pairs()
        .into_iter()
        .filter(|p| p.split == "test")
        .take(3)
        .collect();
    client
        .predict(proto::PredictRequest {
            samples: test.iter().map(sample).collect(),
            top_k: 1,
        })
        .await
        .unwrap();
    client
        .fuse(proto::FuseRequest {
            samples: vec![sample(&test[0])],
            include_modalities: false,
        })
        .await
        .unwrap();
    let bad = client
        .predict(proto::PredictRequest {
            samples: vec![],
            top_k: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    // Two Train runs refused: one before its stream starts (no config), one on its
    // stream (a bad label). Each counts as one request.
    let refused = client
        .train(tokio_stream::iter(Vec::<proto::TrainRequest>::new()))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    let run = vec![
        proto::TrainRequest {
            item: Some(proto::train_request::Item::Config(
                proto::TrainConfig::default(),
            )),
        },
        proto::TrainRequest {
            item: Some(proto::train_request::Item::Example(proto::TrainExample {
                sample: Some(sample(&test[0])),
                label_index: Some(99),
                ..Default::default()
            })),
        },
    ];
    let mut events = client
        .train(tokio_stream::iter(run))
        .await
        .unwrap()
        .into_inner();
    let ended = loop {
        match events.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("a run with a bad label must fail"),
            Err(s) => break s,
        }
    };
    assert_eq!(ended.code(), Code::InvalidArgument, "{ended:?}");

    // The exposition: every metric, histograms as histograms, the right values.
    let (status, text) = http_get(metrics_port, "/metrics").expect("no /metrics");
    assert_eq!(status, 200);
    for (name, kind) in EXPECTED {
        assert!(
            text.contains(&format!("# TYPE {name} {kind}\n")),
            "{name} is not exported as a {kind}:\n{text}"
        );
    }
    assert!(!text.contains("quantile="), "a summary slipped in:\n{text}");
    assert_eq!(exposed_value(&text, "fusion_model_version"), Some(7.0));
    assert_eq!(exposed_value(&text, "fusion_ready"), Some(1.0));
    assert_eq!(
        exposed_value(&text, r#"fusion_samples_total{rpc="Predict"}"#),
        Some(3.0)
    );
    for series in [
        r#"fusion_requests_total{rpc="Predict",code="OK"}"#,
        r#"fusion_requests_total{rpc="Predict",code="INVALID_ARGUMENT"}"#,
        r#"fusion_requests_total{rpc="Fuse",code="OK"}"#,
    ] {
        assert_eq!(exposed_value(&text, series), Some(1.0), "{series}:\n{text}");
    }
    assert_eq!(
        exposed_value(
            &text,
            r#"fusion_requests_total{rpc="Train",code="INVALID_ARGUMENT"}"#
        ),
        Some(2.0),
        "{text}"
    );
    assert_eq!(exposed_value(&text, "fusion_inflight_requests"), Some(0.0));
    assert_eq!(exposed_value(&text, "fusion_queue_depth"), Some(0.0));

    if on_path("promtool") {
        let mut check = Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        check
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let out = check.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "promtool check metrics failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    } else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI is set but `promtool` is not on PATH"
        );
        eprintln!("*** promtool not on PATH: `promtool check metrics` skipped ***");
    }

    // A real Prometheus scrapes it every second; query the series back.
    let config = tmp.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: fusion\n    static_configs:\n      \
             - targets: ['127.0.0.1:{metrics_port}']\n"
        ),
    )
    .unwrap();
    let prom_log = tmp.path().join("prometheus.log");
    let _prometheus = spawn(
        Command::new("prometheus").args([
            &format!("--config.file={}", config.display()),
            &format!("--storage.tsdb.path={}", tmp.path().join("tsdb").display()),
            &format!("--web.listen-address=127.0.0.1:{prom_port}"),
        ]),
        &prom_log,
    );
    let show_log = || std::fs::read_to_string(&prom_log).unwrap_or_default();
    let requests = poll_query(prom_port, "fusion_requests_total", &show_log).await;
    assert!(
        requests.iter().any(|s| s["metric"]["job"] == "fusion"
            && s["metric"]["rpc"] == "Predict"
            && s["metric"]["code"] == "OK"
            && s["value"][1] == "1"),
        "{requests:?}"
    );
    let version = poll_query(prom_port, "fusion_model_version", &show_log).await;
    assert_eq!(version[0]["value"][1], "7", "{version:?}");
    poll_query(prom_port, "fusion_batch_size_bucket", &show_log).await;
}

async fn poll_query(port: u16, promql: &str, log: &dyn Fn() -> String) -> Vec<serde_json::Value> {
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(r) = query(port, promql) {
            return r;
        }
        assert!(
            Instant::now() < until,
            "Prometheus never returned {promql}; its log:\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
