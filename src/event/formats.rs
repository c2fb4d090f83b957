//! Gateway presets (in progress).
pub enum Format { Kong }
pub struct Decoder;
pub const PRESETS: &[&str] = &[];
