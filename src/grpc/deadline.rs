//! The client's gRPC deadline (`grpc-timeout` header) as an instant.

use std::time::{Duration, Instant};

use tonic::metadata::MetadataMap;

/// tonic answers CANCELLED itself when the client's timeout fires; finishing a little
/// earlier lets us answer the precise DEADLINE_EXCEEDED instead.
const MARGIN: Duration = Duration::from_millis(2);

/// When we must have answered, if the client set a deadline.
pub fn deadline(metadata: &MetadataMap, received: Instant) -> Option<Instant> {
    let timeout = parse(metadata.get("grpc-timeout")?.to_str().ok()?)?;
    Some(received + timeout.saturating_sub(MARGIN))
}

/// `grpc-timeout` is 1-8 digits and a unit: H, M, S, m (ms), u (us), n (ns).
fn parse(value: &str) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_unit() {
        assert_eq!(parse("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse("3M"), Some(Duration::from_secs(180)));
        assert_eq!(parse("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse("7u"), Some(Duration::from_micros(7)));
        assert_eq!(parse("9n"), Some(Duration::from_nanos(9)));
        assert_eq!(parse("9x"), None);
        assert_eq!(parse("S"), None);
        assert_eq!(parse("123456789S"), None);
    }
}
