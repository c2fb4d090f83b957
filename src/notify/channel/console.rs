//! The console channel: messages on standard output (the embedded default, and where a
//! recipient without any usable contact is told), or in a buffer that tests read.
//!
//! It has no settings, no escaping (plain text) and cannot fail.

use std::sync::{Arc, Mutex};

/// Where the console channel writes: standard output, or a buffer in tests.
#[derive(Debug, Clone, Default)]
pub enum Console {
    #[default]
    Stdout,
    Capture(Arc<Mutex<Vec<String>>>),
}

impl Console {
    pub fn capture() -> (Console, Arc<Mutex<Vec<String>>>) {
        let buf = Arc::new(Mutex::new(Vec::new()));
        (Console::Capture(buf.clone()), buf)
    }

    pub(crate) fn write(&self, text: &str) {
        match self {
            Console::Stdout => {
                use std::io::Write;
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "{text}");
                let _ = out.flush();
            }
            Console::Capture(buf) => buf.lock().expect("console buffer").push(text.to_owned()),
        }
    }
}
