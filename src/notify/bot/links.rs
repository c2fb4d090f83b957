//! Chats linked to owners, and the one-time codes that link them: a SQLite file of its own
//! in the state directory (`telegram.sqlite`), written by `keywatch telegram link|unlink`
//! from another process and by the bot.
//!
//! Contract: a code is stored as its SHA-256 only (the code itself is shown once, to the
//! operator who asked for it), used at most once, refused after it expires; an owner has at
//! most [`MAX_OPEN_CODES`] codes waiting at a time. A chat is linked to one owner (linking it
//! again moves it); an owner's newest chat gets the owner's messages when `keys.toml` gives
//! no `telegram_chat_id`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension};
use sha2::{Digest, Sha256};

/// The file in the state directory.
pub const LINKS_FILE: &str = "telegram.sqlite";
/// Codes waiting per owner.
pub const MAX_OPEN_CODES: usize = 5;
/// The longest a code may live.
pub const MAX_CODE_TTL: Duration = Duration::from_secs(24 * 3600);
/// Letters of a code: no 0/O, 1/I/L, easy to read out and to type.
const ALPHABET: &[u8] = b"ABCDEFGHJKMNPQRSTUVWXYZ23456789";
/// Characters of a code: 31^10, about 2^49, against at most a few tries per chat and hour.
const CODE_LEN: usize = 10;

/// A chat linked to an owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkedChat {
    pub chat_id: i64,
    pub owner: String,
    pub linked_ms: i64,
    /// Who sent the code (`@name` or the user id).
    pub linked_by: String,
}

/// Why a code did not link a chat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CodeRefused {
    /// No such code.
    Unknown,
    /// Expired, or used already.
    Expired,
}

#[derive(Debug, thiserror::Error)]
pub enum LinksError {
    #[error("{path}: {source}")]
    Sqlite {
        path: String,
        source: rusqlite::Error,
    },
    #[error("{0}")]
    Refused(String),
}

/// The links file.
pub struct Links {
    conn: Connection,
    path: PathBuf,
}

fn code_hash(code: &str) -> String {
    let norm: String = code
        .trim()
        .chars()
        .filter(|c| *c != '-')
        .map(|c| c.to_ascii_uppercase())
        .collect();
    hex::encode(Sha256::digest(norm.as_bytes()))
}

/// A fresh code from the operating system's randomness.
fn new_code() -> std::io::Result<String> {
    use std::io::Read;
    let mut raw = [0u8; CODE_LEN * 2];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut raw)?;
    // Rejection sampling keeps every letter equally likely.
    let limit = 256 - 256 % ALPHABET.len();
    let mut out = String::with_capacity(CODE_LEN);
    let mut more = raw.into_iter();
    while out.len() < CODE_LEN {
        let b = match more.next() {
            Some(b) => b,
            None => {
                let mut one = [0u8; 1];
                std::fs::File::open("/dev/urandom")?.read_exact(&mut one)?;
                one[0]
            }
        };
        if (b as usize) < limit {
            out.push(ALPHABET[b as usize % ALPHABET.len()] as char);
        }
    }
    Ok(out)
}

impl Links {
    /// Opens (creating) the links file in `state_dir`.
    pub fn open(state_dir: &Path) -> Result<Links, LinksError> {
        let path = state_dir.join(LINKS_FILE);
        let err = |source| LinksError::Sqlite {
            path: path.display().to_string(),
            source,
        };
        std::fs::create_dir_all(state_dir).map_err(|e| {
            LinksError::Refused(format!("cannot create {}: {e}", state_dir.display()))
        })?;
        let conn = Connection::open(&path).map_err(err)?;
        conn.busy_timeout(Duration::from_secs(5)).map_err(err)?;
        conn.execute_batch(
            "PRAGMA journal_mode=WAL;
             CREATE TABLE IF NOT EXISTS telegram_codes (
                 code_hash TEXT PRIMARY KEY,
                 owner TEXT NOT NULL,
                 created_ms INTEGER NOT NULL,
                 expires_ms INTEGER NOT NULL,
                 used_ms INTEGER,
                 used_chat INTEGER
             );
             CREATE TABLE IF NOT EXISTS telegram_chats (
                 chat_id INTEGER PRIMARY KEY,
                 owner TEXT NOT NULL,
                 linked_ms INTEGER NOT NULL,
                 linked_by TEXT NOT NULL
             );",
        )
        .map_err(err)?;
        Ok(Links { conn, path })
    }

    fn err(&self, source: rusqlite::Error) -> LinksError {
        LinksError::Sqlite {
            path: self.path.display().to_string(),
            source,
        }
    }

    /// A new one-time code for `owner`, valid for `ttl`.
    pub fn new_code(
        &mut self,
        owner: &str,
        ttl: Duration,
        now_ms: i64,
    ) -> Result<String, LinksError> {
        if ttl.is_zero() || ttl > MAX_CODE_TTL {
            return Err(LinksError::Refused(format!(
                "a code lives between 1 s and {} h",
                MAX_CODE_TTL.as_secs() / 3600
            )));
        }
        let open: i64 = self
            .conn
            .query_row(
                "SELECT count(*) FROM telegram_codes
                 WHERE owner = ?1 AND used_ms IS NULL AND expires_ms > ?2",
                params![owner, now_ms],
                |r| r.get(0),
            )
            .map_err(|e| self.err(e))?;
        if open as usize >= MAX_OPEN_CODES {
            return Err(LinksError::Refused(format!(
                "{owner} has {open} codes waiting already (at most {MAX_OPEN_CODES}): \
                 use one or wait until they expire"
            )));
        }
        let code = new_code()
            .map_err(|e| LinksError::Refused(format!("cannot read /dev/urandom: {e}")))?;
        let expires = now_ms.saturating_add(ttl.as_millis() as i64);
        self.conn
            .execute(
                "INSERT INTO telegram_codes (code_hash, owner, created_ms, expires_ms)
                 VALUES (?1, ?2, ?3, ?4)",
                params![code_hash(&code), owner, now_ms, expires],
            )
            .map_err(|e| self.err(e))?;
        // Old codes are kept a day for `chats`' sake, then dropped.
        self.conn
            .execute(
                "DELETE FROM telegram_codes WHERE expires_ms < ?1",
                params![now_ms - 24 * 3600 * 1000],
            )
            .map_err(|e| self.err(e))?;
        Ok(code)
    }

    /// Links `chat_id` with `code`: the owner it links to, or why not.
    pub fn redeem(
        &mut self,
        code: &str,
        chat_id: i64,
        by: &str,
        now_ms: i64,
    ) -> Result<Result<String, CodeRefused>, LinksError> {
        let tx = self.conn.transaction().map_err(|e| LinksError::Sqlite {
            path: self.path.display().to_string(),
            source: e,
        })?;
        let row: Option<(String, i64, Option<i64>)> = tx
            .query_row(
                "SELECT owner, expires_ms, used_ms FROM telegram_codes WHERE code_hash = ?1",
                params![code_hash(code)],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()
            .map_err(|e| LinksError::Sqlite {
                path: self.path.display().to_string(),
                source: e,
            })?;
        let answer = match row {
            None => Err(CodeRefused::Unknown),
            Some((_, expires, used)) if used.is_some() || expires <= now_ms => {
                Err(CodeRefused::Expired)
            }
            Some((owner, _, _)) => {
                let step = |r: rusqlite::Result<usize>| {
                    r.map_err(|e| LinksError::Sqlite {
                        path: self.path.display().to_string(),
                        source: e,
                    })
                };
                step(tx.execute(
                    "UPDATE telegram_codes SET used_ms = ?1, used_chat = ?2 WHERE code_hash = ?3",
                    params![now_ms, chat_id, code_hash(code)],
                ))?;
                step(tx.execute(
                    "INSERT INTO telegram_chats (chat_id, owner, linked_ms, linked_by)
                     VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (chat_id) DO UPDATE SET
                         owner = excluded.owner, linked_ms = excluded.linked_ms,
                         linked_by = excluded.linked_by",
                    params![chat_id, owner, now_ms, by],
                ))?;
                Ok(owner)
            }
        };
        tx.commit().map_err(|e| self.err(e))?;
        Ok(answer)
    }

    /// Every linked chat, by owner then time.
    pub fn chats(&self) -> Result<Vec<LinkedChat>, LinksError> {
        let mut st = self
            .conn
            .prepare(
                "SELECT chat_id, owner, linked_ms, linked_by FROM telegram_chats
                 ORDER BY owner, linked_ms, chat_id",
            )
            .map_err(|e| self.err(e))?;
        let rows = st
            .query_map([], |r| {
                Ok(LinkedChat {
                    chat_id: r.get(0)?,
                    owner: r.get(1)?,
                    linked_ms: r.get(2)?,
                    linked_by: r.get(3)?,
                })
            })
            .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
            .map_err(|e| self.err(e))?;
        Ok(rows)
    }

    /// The owner `chat_id` is linked to.
    pub fn owner_of(&self, chat_id: i64) -> Result<Option<String>, LinksError> {
        self.conn
            .query_row(
                "SELECT owner FROM telegram_chats WHERE chat_id = ?1",
                params![chat_id],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| self.err(e))
    }

    /// Each owner's newest linked chat.
    pub fn newest_by_owner(&self) -> Result<BTreeMap<String, String>, LinksError> {
        Ok(self
            .chats()?
            .into_iter()
            .map(|c| (c.owner, c.chat_id.to_string()))
            .collect())
    }

    /// Unlinks a chat; false when it was not linked.
    pub fn unlink(&mut self, chat_id: i64) -> Result<bool, LinksError> {
        let n = self
            .conn
            .execute(
                "DELETE FROM telegram_chats WHERE chat_id = ?1",
                params![chat_id],
            )
            .map_err(|e| self.err(e))?;
        Ok(n > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_link_once_until_they_expire_and_are_limited_per_owner() {
        let dir = tempfile::tempdir().unwrap();
        let mut l = Links::open(dir.path()).unwrap();
        let hour = Duration::from_secs(3600);
        let code = l.new_code("acme", hour, 0).unwrap();
        assert_eq!(code.len(), CODE_LEN);
        assert!(code.bytes().all(|b| ALPHABET.contains(&b)), "{code}");
        let stored: String = l
            .conn
            .query_row("SELECT code_hash FROM telegram_codes", [], |r| r.get(0))
            .unwrap();
        assert!(!stored.contains(&code), "only the hash is stored");
        assert_eq!(
            l.redeem("WRONGCODE1", 5, "@x", 10).unwrap(),
            Err(CodeRefused::Unknown)
        );
        // Case and dashes do not matter.
        let typed = code.to_lowercase();
        assert_eq!(l.redeem(&typed, 5, "@x", 10).unwrap(), Ok("acme".into()));
        assert_eq!(
            l.redeem(&code, 6, "@y", 20).unwrap(),
            Err(CodeRefused::Expired),
            "used once"
        );
        let late = l.new_code("acme", hour, 0).unwrap();
        assert_eq!(
            l.redeem(&late, 6, "@y", 3_600_000).unwrap(),
            Err(CodeRefused::Expired)
        );
        assert_eq!(l.owner_of(5).unwrap().as_deref(), Some("acme"));
        assert_eq!(l.newest_by_owner().unwrap()["acme"], "5");
        for _ in 0..MAX_OPEN_CODES {
            l.new_code("globex", hour, 0).unwrap();
        }
        assert!(l.new_code("globex", hour, 0).is_err());
        assert!(l.new_code("acme", MAX_CODE_TTL * 2, 0).is_err());
        assert!(l.unlink(5).unwrap());
        assert!(!l.unlink(5).unwrap());
        assert!(l.chats().unwrap().is_empty());
    }
}
