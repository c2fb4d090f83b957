//! Follows a file like `tail -F` (in progress).
use std::path::PathBuf;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilePosition {
    pub path: PathBuf,
    pub dev: u64,
    pub inode: u64,
    pub offset: u64,
}

pub struct FollowOptions;
pub struct FileFollower;
