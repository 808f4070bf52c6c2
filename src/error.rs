//! One error type for the service and its one mapping to a gRPC status.

use tonic::{Code, Status};

/// What went wrong with one field of one sample; the message names both.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct InputError {
    /// A path into the request, for example `samples[2].audio.wav`.
    pub field: String,
    /// What is wrong with it, for example `truncated WAV: data chunk ends early`.
    pub message: String,
}

impl InputError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("invalid argument: {0}")]
    Invalid(#[from] InputError),
    #[error("{0}")]
    InvalidRequest(String),
    #[error("overloaded: {0}")]
    Overloaded(String),
    #[error("deadline exceeded: {0}")]
    DeadlineExceeded(String),
    #[error("cancelled: {0}")]
    Cancelled(String),
    #[error("unavailable: {0}")]
    Unavailable(String),
    #[error("failed precondition: {0}")]
    FailedPrecondition(String),
    /// A concurrent change (a model swap) got in the way; retrying succeeds.
    #[error("aborted: {0}")]
    Aborted(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl ServeError {
    pub fn code(&self) -> Code {
        match self {
            ServeError::Invalid(_) | ServeError::InvalidRequest(_) => Code::InvalidArgument,
            ServeError::Overloaded(_) => Code::ResourceExhausted,
            ServeError::DeadlineExceeded(_) => Code::DeadlineExceeded,
            ServeError::Cancelled(_) => Code::Cancelled,
            ServeError::Unavailable(_) => Code::Unavailable,
            ServeError::FailedPrecondition(_) => Code::FailedPrecondition,
            ServeError::Aborted(_) => Code::Aborted,
            ServeError::Internal(_) => Code::Internal,
        }
    }

    /// The text for the client: the status code already says what kind of error.
    pub fn message(&self) -> String {
        match self {
            ServeError::Invalid(i) => i.to_string(),
            ServeError::InvalidRequest(m)
            | ServeError::Overloaded(m)
            | ServeError::DeadlineExceeded(m)
            | ServeError::Cancelled(m)
            | ServeError::Unavailable(m)
            | ServeError::FailedPrecondition(m)
            | ServeError::Aborted(m)
            | ServeError::Internal(m) => m.clone(),
        }
    }
}

/// The message a caught panic carried, for an error that says what happened.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

impl From<candle_core::Error> for ServeError {
    fn from(e: candle_core::Error) -> Self {
        ServeError::Internal(format!("model error: {e}"))
    }
}

impl From<ServeError> for Status {
    fn from(e: ServeError) -> Self {
        Status::new(e.code(), e.message())
    }
}
