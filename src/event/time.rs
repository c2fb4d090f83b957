//! Timestamp parsing (in progress).
pub fn parse_timestamp(_s: &str) -> Option<i64> { None }
