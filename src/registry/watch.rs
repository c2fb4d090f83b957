//! Reloading the registry file when it changes, by polling (no file-watch dependency).
//!
//! Contract: the watcher always has a valid registry. A file that changes into something
//! invalid is reported once (logged, and returned from [`RegistryWatcher::poll`]) and the
//! last valid registry stays in force until the file is fixed. Lifecycle events applied
//! through the watcher are replayed on top of every reloaded file, so that a reload does
//! not forget a rotation that only Kafka announced (an event the new file makes invalid,
//! such as a rotation of a key the file now says is revoked, is skipped with a warning).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use super::{LifecycleEvent, Registry};
use crate::config::ConfigError;

/// What identifies a version of the file without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    mtime: Option<SystemTime>,
    len: u64,
    /// Changes when an editor or a ConfigMap update replaces the file by a rename.
    ino: u64,
}

fn stamp(path: &Path) -> Option<Stamp> {
    let md = std::fs::metadata(path).ok()?;
    #[cfg(unix)]
    let ino = std::os::unix::fs::MetadataExt::ino(&md);
    #[cfg(not(unix))]
    let ino = 0;
    Some(Stamp {
        mtime: md.modified().ok(),
        len: md.len(),
        ino,
    })
}

/// The outcome of one [`RegistryWatcher::poll`].
#[derive(Debug)]
pub enum Reload {
    Unchanged,
    /// The file changed and is valid: this is the new registry.
    Reloaded(Arc<Registry>),
    /// The file changed and is invalid (or gone); the previous registry stays in force.
    Invalid(ConfigError),
}

#[derive(Debug)]
pub struct RegistryWatcher {
    /// `None` for a registry made of lifecycle events only.
    path: Option<PathBuf>,
    /// `None` while the file cannot be read.
    stamp: Option<Stamp>,
    /// The last valid file.
    base: Registry,
    /// Lifecycle events applied since start, replayed on every reload.
    events: Vec<LifecycleEvent>,
    current: Arc<Registry>,
}

impl RegistryWatcher {
    /// Loads the file. An invalid file at start is an error: a bad config never starts.
    pub fn open(path: &Path) -> Result<RegistryWatcher, ConfigError> {
        let stamp = stamp(path);
        let base = Registry::load(path)?;
        Ok(RegistryWatcher {
            path: Some(path.to_owned()),
            stamp,
            current: Arc::new(base.clone()),
            base,
            events: Vec::new(),
        })
    }

    /// A registry without a file: it starts empty and only lifecycle events fill it.
    pub fn without_file() -> RegistryWatcher {
        RegistryWatcher {
            path: None,
            stamp: None,
            base: Registry::empty(),
            events: Vec::new(),
            current: Arc::new(Registry::empty()),
        }
    }

    /// A registry given as it is, without a file (a backtest's, a test's); lifecycle events
    /// still apply to it.
    pub fn fixed(registry: Registry) -> RegistryWatcher {
        RegistryWatcher {
            path: None,
            stamp: None,
            current: Arc::new(registry.clone()),
            base: registry,
            events: Vec::new(),
        }
    }

    /// The registry file, if there is one.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The registry in force.
    pub fn registry(&self) -> Arc<Registry> {
        Arc::clone(&self.current)
    }

    /// Reloads the file if its modification time, length or inode changed. Call it every
    /// few seconds.
    pub fn poll(&mut self) -> Reload {
        let Some(path) = self.path.clone() else {
            return Reload::Unchanged;
        };
        let now = stamp(&path);
        if now == self.stamp {
            return Reload::Unchanged;
        }
        // Remember the new stamp before reading: a change during the read is seen next time,
        // and an invalid version is reported once, not on every poll.
        self.stamp = now;
        match Registry::load(&path) {
            Ok(base) => {
                self.base = base;
                self.current = Arc::new(self.replay());
                tracing::info!(
                    file = %path.display(),
                    keys = self.current.keys().count(),
                    "reloaded the key registry"
                );
                Reload::Reloaded(self.registry())
            }
            Err(e) => {
                tracing::error!(error = %e, "the key registry file is invalid; keeping the previous one");
                Reload::Invalid(e)
            }
        }
    }

    /// Applies a lifecycle event to the registry in force and remembers it for reloads
    /// (an event seen before, such as a redelivery, is not remembered twice).
    pub fn apply(&mut self, ev: LifecycleEvent) -> Result<Arc<Registry>, String> {
        let mut next = (*self.current).clone();
        next.apply(&ev)?;
        if !self.events.contains(&ev) {
            self.events.push(ev);
        }
        self.current = Arc::new(next);
        Ok(self.registry())
    }

    fn replay(&self) -> Registry {
        let mut reg = self.base.clone();
        for ev in &self.events {
            if let Err(e) = reg.apply(ev) {
                tracing::warn!(key = ev.key_id(), error = %e, "a lifecycle event no longer applies to the reloaded registry");
            }
        }
        reg
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::KeyState;

    const V1: &str = "[owners.o]\n[[keys]]\nid = \"A\"\nowner = \"o\"\n";

    #[test]
    fn reloads_on_change_and_keeps_the_last_valid_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        std::fs::write(&path, V1).unwrap();
        let mut w = RegistryWatcher::open(&path).unwrap();
        assert!(matches!(w.poll(), Reload::Unchanged));
        assert_eq!(w.registry().key("A").unwrap().state, KeyState::Active);

        // Kafka says A is rotating to B; the file knows nothing of it.
        w.apply(
            LifecycleEvent::from_json(
                br#"{"type":"rotation_started","key_id":"A","successor":"B","started_at":"2026-11-21T00:00:00Z"}"#,
            )
            .unwrap(),
        )
        .unwrap();
        assert_eq!(w.registry().key("A").unwrap().state, KeyState::Rotating);

        // A new file adds key C: the rotation survives the reload.
        std::fs::write(&path, format!("{V1}[[keys]]\nid = \"C\"\nowner = \"o\"\n")).unwrap();
        let Reload::Reloaded(reg) = w.poll() else {
            panic!("expected a reload")
        };
        assert!(reg.key("C").is_some());
        assert_eq!(reg.key("A").unwrap().state, KeyState::Rotating);
        assert!(matches!(w.poll(), Reload::Unchanged));

        // An invalid file is reported once and changes nothing.
        std::fs::write(&path, "[[keys]]\nid = \"A\"\nowner = \"nobody\"\n").unwrap();
        let Reload::Invalid(e) = w.poll() else {
            panic!("expected an error")
        };
        assert_eq!(e.field, "keys[0].owner");
        assert!(matches!(w.poll(), Reload::Unchanged));
        assert!(w.registry().key("C").is_some());

        // A file that says A is revoked wins over the older rotation event.
        std::fs::write(
            &path,
            "[owners.o]\n[[keys]]\nid = \"A\"\nowner = \"o\"\nstate = \"revoked\"\n",
        )
        .unwrap();
        let Reload::Reloaded(reg) = w.poll() else {
            panic!("expected a reload")
        };
        assert_eq!(reg.key("A").unwrap().state, KeyState::Revoked);
        assert!(reg.key("C").is_none());

        // A removed file keeps the registry.
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(w.poll(), Reload::Invalid(_)));
        assert_eq!(w.registry().key("A").unwrap().state, KeyState::Revoked);
    }

    #[test]
    fn an_invalid_file_at_start_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        std::fs::write(&path, "[[keys]]\nid = 1\n").unwrap();
        let e = RegistryWatcher::open(&path).unwrap_err();
        assert_eq!(e.line, Some(2));
        assert_eq!(e.field, "keys[0].id");
    }
}
