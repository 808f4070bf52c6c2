//! The batching middleware against a `tower_test` mock model, on paused tokio time:
//! the test plays the model, so it decides when a batch is running and when it ends.
//! Nothing here sleeps on the wall clock; time only moves by `advance` or by tokio
//! jumping to the next timer once every task is idle.
//!
//! A sample is tagged by putting its id in `image[0]`; the fake model echoes it back in
//! `SampleOutput::image`, so every client can check it got its own samples in order.
//! Metrics go to a `DebuggingRecorder` installed for the test's thread only (paused
//! time runs everything on that one thread).

use std::time::Duration;

use fusion_serve::batching::{BatchLayer, BatchPolicy, BatchService, InferRequest, ResponseFuture};
use fusion_serve::engine::{BatchStats, InferResponse, Job, SampleOutput};
use fusion_serve::error::ServeError;
use fusion_serve::preprocess::PreparedSample;
use fusion_serve::telemetry::metrics as m;
use futures::FutureExt;
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use tokio::time::Instant;
use tonic::Code;
use tower::{Layer, Service, ServiceExt};
use tower_test::mock;

type Handle = mock::Handle<Vec<Job>, BatchStats>;
type Respond = mock::SendResponse<BatchStats>;

fn policy(max_batch_size: usize) -> BatchPolicy {
    BatchPolicy {
        max_batch_size,
        max_delay: Duration::ZERO,
        max_cost: u64::MAX,
        max_queue: 64,
        image_pixels: 0,
    }
}

/// The batching service over a mock model.
fn start(policy: BatchPolicy) -> (BatchService, Handle) {
    let (model, handle) = mock::pair::<Vec<Job>, BatchStats>();
    let model = model.map_err(|e| ServeError::Internal(e.to_string()));
    (BatchLayer::new(policy).layer(model), handle)
}

fn sample(id: u32, frames: usize) -> PreparedSample {
    PreparedSample {
        image: vec![id as f32],
        audio: vec![0.0; frames],
        frames,
    }
}

/// A request of one sample per `(id, frames)`.
fn request(samples: &[(u32, usize)]) -> InferRequest {
    InferRequest {
        samples: samples.iter().map(|&(id, f)| sample(id, f)).collect(),
        // The mock model never looks at it.
        config: Default::default(),
        deadline: None,
    }
}

/// Enqueues (admission happens in `call`, not when the future is first polled).
fn submit(svc: &mut BatchService, req: InferRequest) -> ResponseFuture {
    svc.call(req)
}

/// One request of one sample with `frames` frames.
fn one(svc: &mut BatchService, id: u32, frames: usize) -> ResponseFuture {
    submit(svc, request(&[(id, frames)]))
}

/// The next batch the worker sends to the model.
async fn next_batch(handle: &mut Handle) -> (Vec<Job>, Respond) {
    handle.next_request().await.expect("the worker stopped")
}

/// Sample ids per request, in batch order.
fn ids(jobs: &[Job]) -> Vec<Vec<u32>> {
    jobs.iter()
        .map(|j| j.samples.iter().map(|s| s.image[0] as u32).collect())
        .collect()
}

/// Plays the model: answers every request with its own samples echoed back.
fn finish(jobs: Vec<Job>, respond: Respond) {
    let samples: usize = jobs.iter().map(|j| j.samples.len()).sum();
    for job in jobs {
        let outputs = job
            .samples
            .iter()
            .map(|s| SampleOutput {
                image: s.image.clone(),
                audio: vec![],
                fused: vec![],
                logits: vec![],
            })
            .collect();
        let _ = job.reply.send(Ok(InferResponse {
            version: "mock".into(),
            outputs,
            batch_samples: samples,
            inference: Duration::ZERO,
        }));
    }
    respond.send_response(BatchStats {
        samples,
        ..Default::default()
    });
}

/// The sample ids a client got back.
fn echoed(r: Result<InferResponse, ServeError>) -> Vec<u32> {
    r.expect("the request should succeed")
        .outputs
        .iter()
        .map(|o| o.image[0] as u32)
        .collect()
}

/// Asserts the worker sends no further batch, however long we wait (virtual time).
async fn assert_no_batch(handle: &mut Handle) {
    let got = tokio::time::timeout(Duration::from_secs(3600), handle.next_request()).await;
    if let Ok(Some((jobs, _))) = got {
        panic!("unexpected batch {:?}", ids(&jobs));
    }
}

/// Metric values of one test; a snapshot drains the recorder, so take it once.
struct Recorded(Vec<(String, Labels, DebugValue)>);

type Labels = Vec<(String, String)>;

impl Recorded {
    fn take(s: &Snapshotter) -> Self {
        Self(
            s.snapshot()
                .into_vec()
                .into_iter()
                .map(|(k, _, _, v)| {
                    let key = k.key();
                    let labels = key
                        .labels()
                        .map(|l| (l.key().to_string(), l.value().to_string()))
                        .collect();
                    (key.name().to_string(), labels, v)
                })
                .collect(),
        )
    }

    fn find(&self, name: &str, labels: &[(&str, &str)]) -> Option<&DebugValue> {
        self.0
            .iter()
            .find(|(n, l, _)| {
                n == name
                    && l.len() == labels.len()
                    && labels
                        .iter()
                        .all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v))
            })
            .map(|(_, _, v)| v)
    }

    fn counter(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        match self.find(name, labels) {
            Some(DebugValue::Counter(c)) => *c,
            None => 0,
            other => panic!("{name} is not a counter: {other:?}"),
        }
    }

    fn gauge(&self, name: &str) -> f64 {
        match self.find(name, &[]) {
            Some(DebugValue::Gauge(g)) => g.into_inner(),
            None => 0.0,
            other => panic!("{name} is not a gauge: {other:?}"),
        }
    }

    fn histogram(&self, name: &str) -> Vec<f64> {
        match self.find(name, &[]) {
            Some(DebugValue::Histogram(h)) => h.iter().map(|v| v.into_inner()).collect(),
            None => vec![],
            other => panic!("{name} is not a histogram: {other:?}"),
        }
    }

    fn dropped(&self, reason: &str) -> u64 {
        self.counter(m::REQUESTS_DROPPED, &[("reason", reason)])
    }
}

/// Sets up a recorder for this thread; `$snap` reads it.
macro_rules! record_metrics {
    ($snap:ident) => {
        let recorder = DebuggingRecorder::new();
        let $snap = recorder.snapshotter();
        let _guard = metrics::set_default_local_recorder(&recorder);
    };
}

#[tokio::test(start_paused = true)]
async fn an_idle_model_gets_a_request_at_once_with_zero_delay() {
    record_metrics!(snap);
    let (mut svc, mut handle) = start(policy(8));
    let t0 = Instant::now();
    let answer = one(&mut svc, 1, 10);
    let (jobs, respond) = next_batch(&mut handle).await;
    assert_eq!(ids(&jobs), [[1]]);
    assert_eq!(Instant::now(), t0, "the batch must start without waiting");
    finish(jobs, respond);
    assert_eq!(echoed(answer.await), [1]);

    let r = Recorded::take(&snap);
    assert_eq!(r.histogram(m::BATCH_SIZE), [1.0]);
    assert_eq!(r.histogram(m::QUEUE_DURATION), [0.0]);
    assert_eq!(r.gauge(m::QUEUE_DEPTH), 0.0);
}

#[tokio::test(start_paused = true)]
async fn batches_grow_while_the_model_is_busy() {
    record_metrics!(snap);
    let (mut svc, mut handle) = start(policy(8));
    let first = one(&mut svc, 1, 10);
    let (busy, respond) = next_batch(&mut handle).await;
    assert_eq!(ids(&busy), [[1]]);

    // The model is busy with [1]: these wait and then go together.
    let waiting: Vec<_> = (2..=5).map(|id| one(&mut svc, id, 10)).collect();
    assert_eq!(svc.queue_depth(), 4);
    tokio::time::advance(Duration::from_millis(7)).await;
    assert_no_batch_yet(&mut handle);
    finish(busy, respond);
    let (jobs, respond) = next_batch(&mut handle).await;
    assert_eq!(ids(&jobs), [[2], [3], [4], [5]]);
    finish(jobs, respond);
    assert_eq!(echoed(first.await), [1]);
    for (id, answer) in (2..=5).zip(waiting) {
        assert_eq!(echoed(answer.await), [id]);
    }

    let r = Recorded::take(&snap);
    assert_eq!(r.histogram(m::BATCH_SIZE), [1.0, 4.0]);
    let mut queued = r.histogram(m::QUEUE_DURATION);
    queued.sort_by(f64::total_cmp);
    assert_eq!(queued, [0.0, 0.007, 0.007, 0.007, 0.007]);
    assert_eq!(r.gauge(m::QUEUE_DEPTH), 0.0);
}

/// No batch has been handed over right now (polls once, without waiting).
fn assert_no_batch_yet(handle: &mut Handle) {
    if let Some(Some((jobs, _))) = handle.next_request().now_or_never() {
        panic!("unexpected batch {:?}", ids(&jobs));
    }
}

#[tokio::test(start_paused = true)]
async fn a_delay_lets_a_lone_request_wait_for_company_but_a_full_batch_goes_at_once() {
    let mut p = policy(4);
    p.max_delay = Duration::from_millis(5);
    let (mut svc, mut handle) = start(p);

    let t0 = Instant::now();
    let lone = one(&mut svc, 1, 10);
    let (jobs, respond) = next_batch(&mut handle).await;
    assert_eq!(ids(&jobs), [[1]]);
    assert_eq!(Instant::now() - t0, Duration::from_millis(5));
    finish(jobs, respond);
    assert_eq!(echoed(lone.await), [1]);

    let t1 = Instant::now();
    let full: Vec<_> = (2..=5).map(|id| one(&mut svc, id, 10)).collect();
    let (jobs, respond) = next_batch(&mut handle).await;
    assert_eq!(ids(&jobs), [[2], [3], [4], [5]]);
    assert_eq!(Instant::now(), t1, "a full batch must not wait");
    finish(jobs, respond);
    for answer in full {
        answer.await.unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn a_deadline_passing_in_the_queue_is_answered_and_never_reaches_the_model() {
    record_metrics!(snap);
    let (mut svc, mut handle) = start(policy(8));
    let first = one(&mut svc, 1, 10);
    let (busy, respond) = next_batch(&mut handle).await;

    let t0 = Instant::now();
    let mut late = request(&[(2, 10)]);
    late.deadline = Some((t0 + Duration::from_millis(10)).into_std());
    let late = submit(&mut svc, late);
    let patient = one(&mut svc, 3, 10);

    // Answered at its deadline, while the model is still busy (bounded, so a broken
    // batcher fails here instead of hanging).
    let err = tokio::time::timeout(Duration::from_secs(60), late)
        .await
        .expect("not answered while the model was busy")
        .expect_err("the deadline passed");
    assert_eq!(tonic::Status::from(err).code(), Code::DeadlineExceeded);
    assert_eq!(Instant::now() - t0, Duration::from_millis(10));

    finish(busy, respond);
    let (jobs, respond) = next_batch(&mut handle).await;
    assert_eq!(
        ids(&jobs),
        [[3]],
        "the expired request must not be computed"
    );
    finish(jobs, respond);
    first.await.unwrap();
    patient.await.unwrap();
    assert_no_batch(&mut handle).await;

    let r = Recorded::take(&snap);
    assert_eq!(r.dropped("deadline"), 1);
    assert_eq!(r.dropped("cancelled"), 0);
    assert_eq!(r.gauge(m::QUEUE_DEPTH), 0.0);
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_request_is_dropped_before_compute() {
    record_metrics!(snap);
    let (mut svc, mut handle) = start(policy(8));
    let first = one(&mut svc, 1, 10);
    let (busy, respond) = next_batch(&mut handle).await;

    let gone = one(&mut svc, 2, 10);
    let stays = one(&mut svc, 3, 10);
    drop(gone); // the client went away
    finish(busy, respond);
    let (jobs, respond) = next_batch(&mut handle).await;
    assert_eq!(ids(&jobs), [[3]]);
    finish(jobs, respond);
    first.await.unwrap();
    assert_eq!(echoed(stays.await), [3]);
    assert_eq!(svc.queue_depth(), 0);

    let r = Recorded::take(&snap);
    assert_eq!(r.dropped("cancelled"), 1);
    assert_eq!(r.dropped("deadline"), 0);
    assert_eq!(r.gauge(m::QUEUE_DEPTH), 0.0);
}

#[tokio::test(start_paused = true)]
async fn a_full_queue_refuses_at_once_with_resource_exhausted() {
    record_metrics!(snap);
    let mut p = policy(8);
    p.max_queue = 2;
    let (mut svc, mut handle) = start(p);
    let first = one(&mut svc, 1, 10);
    let (busy, respond) = next_batch(&mut handle).await;
    let queued = [one(&mut svc, 2, 10), one(&mut svc, 3, 10)];

    let refused = one(&mut svc, 4, 10)
        .now_or_never()
        .expect("a full queue must answer without waiting")
        .expect_err("the queue is full");
    let status = tonic::Status::from(refused);
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(
        status.message().contains("queue is full") && status.message().contains('2'),
        "the message should say the queue is full and its limit: {:?}",
        status.message()
    );

    finish(busy, respond);
    let (jobs, respond) = next_batch(&mut handle).await;
    assert_eq!(ids(&jobs), [[2], [3]]);
    // Room again once the queue has gone to the model.
    let later = one(&mut svc, 5, 10);
    finish(jobs, respond);
    let (jobs, respond) = next_batch(&mut handle).await;
    assert_eq!(ids(&jobs), [[5]]);
    finish(jobs, respond);
    first.await.unwrap();
    for q in queued {
        q.await.unwrap();
    }
    later.await.unwrap();

    let r = Recorded::take(&snap);
    assert_eq!(r.dropped("overloaded"), 1);
}

#[tokio::test(start_paused = true)]
async fn batches_respect_the_size_limit() {
    record_metrics!(snap);
    let (mut svc, mut handle) = start(policy(4));
    let first = one(&mut svc, 1, 10);
    let (busy, respond) = next_batch(&mut handle).await;
    let waiting: Vec<_> = (2..=11).map(|id| one(&mut svc, id, 10)).collect();
    finish(busy, respond);
    let mut seen = vec![];
    for _ in 0..3 {
        let (jobs, respond) = next_batch(&mut handle).await;
        seen.push(ids(&jobs).concat());
        finish(jobs, respond);
    }
    assert_eq!(seen, [vec![2, 3, 4, 5], vec![6, 7, 8, 9], vec![10, 11]]);
    first.await.unwrap();
    for w in waiting {
        w.await.unwrap();
    }
    assert_eq!(
        Recorded::take(&snap).histogram(m::BATCH_SIZE),
        [1.0, 4.0, 4.0, 2.0]
    );
}

#[tokio::test(start_paused = true)]
async fn batches_respect_the_cost_budget_and_an_oversized_request_runs_alone() {
    let mut p = policy(32);
    p.image_pixels = 100;
    // Three samples of 10 frames: 3 x (100 + 10) = 330.
    p.max_cost = 330;
    let (mut svc, mut handle) = start(p);
    let first = one(&mut svc, 1, 10);
    let (busy, respond) = next_batch(&mut handle).await;
    let singles: Vec<_> = (2..=6).map(|id| one(&mut svc, id, 10)).collect();
    let big = submit(
        &mut svc,
        request(&[(7, 10), (8, 10), (9, 10), (10, 10), (11, 10)]),
    );
    finish(busy, respond);
    let mut seen = vec![];
    for _ in 0..3 {
        let (jobs, respond) = next_batch(&mut handle).await;
        seen.push(ids(&jobs));
        finish(jobs, respond);
    }
    assert_eq!(
        seen,
        [
            vec![vec![2], vec![3], vec![4]],
            vec![vec![5], vec![6]],
            vec![vec![7, 8, 9, 10, 11]],
        ]
    );
    first.await.unwrap();
    for s in singles {
        s.await.unwrap();
    }
    assert_eq!(echoed(big.await), [7, 8, 9, 10, 11]);
}

#[tokio::test(start_paused = true)]
async fn a_multi_sample_request_is_never_split_and_keeps_its_order() {
    let (mut svc, mut handle) = start(policy(4));
    let first = one(&mut svc, 1, 10);
    let (busy, respond) = next_batch(&mut handle).await;
    let a = submit(&mut svc, request(&[(10, 10), (11, 10), (12, 10)]));
    let b = submit(&mut svc, request(&[(20, 10), (21, 10)]));
    let c = one(&mut svc, 30, 10);
    // Larger than a whole batch: runs alone rather than being refused or split.
    let d = submit(
        &mut svc,
        request(&[(40, 10), (41, 10), (42, 10), (43, 10), (44, 10), (45, 10)]),
    );
    finish(busy, respond);
    let mut seen = vec![];
    for _ in 0..3 {
        let (jobs, respond) = next_batch(&mut handle).await;
        seen.push(ids(&jobs));
        finish(jobs, respond);
    }
    assert_eq!(
        seen,
        [
            // a does not fit with b (5 > 4); c fills the batch.
            vec![vec![10, 11, 12], vec![30]],
            vec![vec![20, 21]],
            vec![vec![40, 41, 42, 43, 44, 45]],
        ]
    );
    first.await.unwrap();
    assert_eq!(echoed(a.await), [10, 11, 12]);
    assert_eq!(echoed(b.await), [20, 21]);
    assert_eq!(echoed(c.await), [30]);
    assert_eq!(echoed(d.await), [40, 41, 42, 43, 44, 45]);
}

#[tokio::test(start_paused = true)]
async fn similar_audio_lengths_are_grouped_and_padding_is_counted() {
    record_metrics!(snap);
    let (mut svc, mut handle) = start(policy(2));
    let first = one(&mut svc, 1, 50);
    let (busy, respond) = next_batch(&mut handle).await;
    // Arrival order short, long, short, long: first-come batching would pad every
    // short clip to a long one.
    let waiting = [
        one(&mut svc, 2, 10),
        one(&mut svc, 3, 100),
        one(&mut svc, 4, 12),
        one(&mut svc, 5, 98),
    ];
    finish(busy, respond);
    let mut seen = vec![];
    for _ in 0..2 {
        let (jobs, respond) = next_batch(&mut handle).await;
        seen.push(ids(&jobs).concat());
        finish(jobs, respond);
    }
    assert_eq!(seen, [vec![2, 4], vec![3, 5]]);
    first.await.unwrap();
    for w in waiting {
        w.await.unwrap();
    }

    let padding = Recorded::take(&snap).histogram(m::BATCH_PADDING_RATIO);
    let expected = [0.0, 2.0 / 24.0, 2.0 / 200.0];
    assert_eq!(padding.len(), expected.len(), "{padding:?}");
    for (got, want) in padding.iter().zip(expected) {
        assert!(
            (got - want).abs() < 1e-12,
            "padding {padding:?}, expected {expected:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_failed_batch_answers_its_requests_and_the_worker_goes_on() {
    let (mut svc, mut handle) = start(policy(8));
    let doomed = one(&mut svc, 1, 10);
    let (jobs, respond) = next_batch(&mut handle).await;
    drop(jobs);
    respond.send_error("the model fell over");
    let err = doomed.await.expect_err("the batch failed");
    assert_eq!(tonic::Status::from(err).code(), Code::Internal);

    let next = one(&mut svc, 2, 10);
    let (jobs, respond) = next_batch(&mut handle).await;
    finish(jobs, respond);
    assert_eq!(echoed(next.await), [2]);
}
