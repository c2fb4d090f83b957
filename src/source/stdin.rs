//! Reads lines from standard input (in progress).
