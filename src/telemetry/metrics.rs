//! Every metric name in one place.

pub const REQUESTS: &str = "fusion_requests_total";
pub const REQUEST_DURATION: &str = "fusion_request_duration_seconds";
pub const SAMPLES: &str = "fusion_samples_total";
pub const QUEUE_DURATION: &str = "fusion_queue_duration_seconds";
pub const PREPROCESS_DURATION: &str = "fusion_preprocess_duration_seconds";
pub const INFERENCE_DURATION: &str = "fusion_inference_duration_seconds";
pub const BATCH_SIZE: &str = "fusion_batch_size";
pub const BATCH_PADDING_RATIO: &str = "fusion_batch_padding_ratio";
pub const QUEUE_DEPTH: &str = "fusion_queue_depth";
pub const INFLIGHT_REQUESTS: &str = "fusion_inflight_requests";
pub const REQUESTS_DROPPED: &str = "fusion_requests_dropped_total";
pub const MODEL_VERSION: &str = "fusion_model_version";
pub const MODEL_LOAD_FAILURES: &str = "fusion_model_load_failures_total";
pub const READY: &str = "fusion_ready";
pub const TRAIN_RUNS: &str = "fusion_train_runs_total";
pub const TRAIN_LOSS: &str = "fusion_train_loss";
pub const TRAIN_EPOCH: &str = "fusion_train_epoch";
