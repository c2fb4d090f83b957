//! Any bytes through every decoder (first byte: which one): each preset, the generic
//! mapping, Kong batches, Kong with key fallbacks, and Kong with a small line limit.
#![no_main]

use keywatch_fuzz::{check_decode, decoders};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&which, line)) = data.split_first() else {
        return;
    };
    let all = decoders();
    check_decode(&all[which as usize % all.len()], line);
});
