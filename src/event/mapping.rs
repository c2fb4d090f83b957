//! Generic JSON field mapping (in progress).
pub struct FieldMapping;
pub enum TimestampFormat { Auto }
