//! Sorting ClickHouse failures into "retry", "dead-letter the rows" and "stop".
//!
//! ClickHouse reports errors as `Code: NNN` in the body (18.16: `Code: 53,
//! e.displayText() = DB::Exception: ...`; current versions: `Code: 53. DB::Exception: ...`,
//! plus an `X-ClickHouse-Exception-Code` header that the client turns into the same text
//! when the body is empty). The codes are stable across versions
//! (`src/Common/ErrorCodes.cpp`). Like vector's ClickHouse sink, anything that can pass by
//! itself (network, timeouts, overload, too many parts, memory) is transient; a code that
//! says the data itself is bad, during an insert of event-derived rows, is a rejection; the
//! rest (unknown table, authentication, syntax: a bug or an operator's job) is fatal.

use super::super::StoreError;

/// What keywatch was doing when the error happened; a "bad data" code only means the
/// rows were rejected while inserting them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Inserting rows derived from events (events, rollups, sources, keys).
    InsertRows,
    /// Anything else: offsets, migrations, recovery, reports.
    Query,
}

/// Codes worth retrying: the server is overloaded, shutting down, or the network failed.
const TRANSIENT: &[u32] = &[
    3,    // UNEXPECTED_END_OF_FILE
    23,   // CANNOT_READ_FROM_ISTREAM
    24,   // CANNOT_WRITE_TO_OSTREAM
    74,   // CANNOT_READ_FROM_FILE_DESCRIPTOR
    75,   // CANNOT_WRITE_TO_FILE_DESCRIPTOR
    76,   // CANNOT_OPEN_FILE
    159,  // TIMEOUT_EXCEEDED
    164,  // READONLY
    173,  // CANNOT_ALLOCATE_MEMORY
    201,  // QUOTA_EXCEEDED
    202,  // TOO_MANY_SIMULTANEOUS_QUERIES
    203,  // NO_FREE_CONNECTION
    209,  // SOCKET_TIMEOUT
    210,  // NETWORK_ERROR
    218,  // TABLE_IS_DROPPED
    225,  // NO_ZOOKEEPER
    236,  // ABORTED
    241,  // MEMORY_LIMIT_EXCEEDED
    242,  // TABLE_IS_READ_ONLY
    243,  // NOT_ENOUGH_SPACE
    252,  // TOO_MANY_PARTS
    285,  // TOO_FEW_LIVE_REPLICAS
    286,  // UNSATISFIED_QUORUM_FOR_PREVIOUS_WRITE (18.16: one quorum insert per table)
    289,  // REPLICA_IS_NOT_IN_QUORUM (select_sequential_consistency, a lagging replica)
    290,  // LIMIT_EXCEEDED
    319,  // UNKNOWN_STATUS_OF_INSERT
    341,  // UNFINISHED
    373,  // SESSION_IS_LOCKED
    394,  // QUERY_WAS_CANCELLED
    425,  // SYSTEM_ERROR
    439,  // CANNOT_SCHEDULE_TASK
    473,  // DEADLOCK_AVOIDED
    999,  // KEEPER_EXCEPTION
    1000, // POCO_EXCEPTION
];

/// Codes that, while inserting rows, mean the server refuses these rows for good.
const REJECTED: &[u32] = &[
    6,   // CANNOT_PARSE_TEXT
    26,  // CANNOT_PARSE_QUOTED_STRING
    27,  // CANNOT_PARSE_INPUT_ASSERTION_FAILED
    32,  // ATTEMPT_TO_READ_AFTER_EOF
    33,  // CANNOT_READ_ALL_DATA
    38,  // CANNOT_PARSE_DATE
    41,  // CANNOT_PARSE_DATETIME
    53,  // TYPE_MISMATCH
    69,  // ARGUMENT_OUT_OF_BOUND
    70,  // CANNOT_CONVERT_TYPE
    72,  // CANNOT_PARSE_NUMBER
    117, // INCORRECT_DATA
    131, // TOO_LARGE_STRING_SIZE
    349, // CANNOT_INSERT_NULL_IN_ORDINARY_COLUMN
    395, // FUNCTION_THROW_IF_VALUE_IS_NON_ZERO (a throwIf guard in a column)
    469, // VIOLATED_CONSTRAINT
    691, // UNKNOWN_ELEMENT_OF_ENUM
];

/// `TABLE_ALREADY_EXISTS` and `DATABASE_ALREADY_EXISTS`: a concurrent migration won a race.
pub(crate) const ALREADY_EXISTS: &[u32] = &[57, 82];

/// The `Code: NNN` of a ClickHouse error text.
pub(crate) fn code_of(msg: &str) -> Option<u32> {
    let at = msg.find("Code: ")?;
    let digits: String = msg[at + 6..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
}

/// Keeps messages short and free of the password.
pub(crate) fn clean(msg: &str, password: Option<&str>) -> String {
    let mut m = msg.trim().to_owned();
    if let Some(pw) = password.filter(|p| !p.is_empty()) {
        m = m.replace(pw, "***");
    }
    // 18.16 appends `, e.what() = DB::Exception`, current versions a stack trace on some
    // errors: neither helps an operator.
    if let Some(i) = m.find(", e.what() = ") {
        m.truncate(i);
    }
    if let Some(i) = m.find("\nStack trace") {
        m.truncate(i);
    }
    const MAX: usize = 600;
    if m.len() > MAX {
        let mut end = MAX;
        while !m.is_char_boundary(end) {
            end -= 1;
        }
        m.truncate(end);
        m.push('…');
    }
    m
}

/// Sorts a client error. `what` says what was being done ("inserting into events").
pub(crate) fn classify(
    e: &clickhouse::error::Error,
    phase: Phase,
    what: &str,
    password: Option<&str>,
) -> StoreError {
    use clickhouse::error::Error as E;
    match e {
        E::Network(_) => {
            let detail = clean(&chain(e), password);
            match tls_problem(&detail) {
                Some(why) => StoreError::Fatal(format!("{what}: {why} ({detail})")),
                None => StoreError::Transient(format!("{what}: {detail}")),
            }
        }
        E::TimedOut => {
            StoreError::Transient(format!("{what}: {}", clean(&e.to_string(), password)))
        }
        E::BadResponse(body) => classify_text(body, phase, what, password),
        // Anything else is a mismatch between keywatch and the server's answer.
        other => StoreError::Fatal(format!("{what}: {}", clean(&other.to_string(), password))),
    }
}

/// An error and its sources, `: `-joined (hyper hides the cause of a failed connect in
/// its sources; rustls' reason is at the bottom).
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let t = s.to_string();
        if !out.contains(&t) {
            out.push_str(": ");
            out.push_str(&t);
        }
        src = s.source();
    }
    out
}

/// What a refused TLS connection means, in words, from rustls' error text (it comes
/// inside hyper's connection error, so the text is all there is). `None`: not a TLS
/// problem. Retrying cannot fix these: they are fatal, and say what to change.
pub(crate) fn tls_problem(chain: &str) -> Option<String> {
    let c = chain;
    let why = if c.contains("UnknownIssuer") || c.contains("unknown issuer") {
        "ClickHouse's TLS certificate is signed by a CA keywatch does not trust: set \
         store.clickhouse.ca_file to that CA's certificate (PEM)"
    } else if c.contains("NotValidForName") || c.contains("not valid for name") {
        "ClickHouse's TLS certificate is not valid for the host name of store.clickhouse.url: \
         use a name the certificate lists (subjectAltName), or a certificate that lists this one"
    } else if c.contains("Expired") || c.contains("expired") {
        "ClickHouse's TLS certificate has expired (or the clock here is wrong)"
    } else if c.contains("NotValidYet") {
        "ClickHouse's TLS certificate is not valid yet (or the clock here is wrong)"
    } else if c.contains("Revoked") {
        "ClickHouse's TLS certificate is revoked"
    } else if c.contains("BadSignature") || c.contains("BadEncoding") {
        "ClickHouse's TLS certificate is malformed or its signature is wrong"
    } else if c.contains("CaUsedAsEndEntity") {
        "ClickHouse presents a CA certificate as its own: it needs a server certificate \
         signed by that CA"
    } else if c.contains("InvalidContentType") || c.contains("corrupt message") {
        "the server at store.clickhouse.url does not speak TLS on that port (an http port? \
         use http://, or ClickHouse's https_port)"
    } else if c.contains("invalid peer certificate") {
        "ClickHouse's TLS certificate was refused"
    } else {
        return None;
    };
    Some(why.to_owned())
}

/// Sorts an error text from the server (or a proxy in front of it).
pub(crate) fn classify_text(
    body: &str,
    phase: Phase,
    what: &str,
    password: Option<&str>,
) -> StoreError {
    let msg = format!("{what}: {}", clean(body, password));
    match code_of(body) {
        Some(code) if TRANSIENT.contains(&code) => StoreError::Transient(msg),
        Some(code) if phase == Phase::InsertRows && REJECTED.contains(&code) => {
            StoreError::Rejected(msg)
        }
        Some(_) => StoreError::Fatal(msg),
        None => {
            // No ClickHouse code: the status line when the body was empty, or a proxy's
            // page. Client errors that retrying cannot fix are fatal; the rest (5xx, a
            // load balancer with no backend) pass.
            let status: Option<u16> = body.split_whitespace().next().and_then(|s| s.parse().ok());
            match status {
                Some(400..=407 | 409..=428 | 430..=499) => StoreError::Fatal(msg),
                _ => StoreError::Transient(msg),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(e: &StoreError) -> &'static str {
        match e {
            StoreError::Transient(_) => "transient",
            StoreError::Rejected(_) => "rejected",
            StoreError::Fatal(_) => "fatal",
        }
    }

    #[test]
    fn tls_problems_say_what_to_change() {
        let unknown = "network error: client error (Connect): invalid peer certificate: \
                       UnknownIssuer";
        assert!(tls_problem(unknown).unwrap().contains("ca_file"));
        let name = "client error (Connect): invalid peer certificate: NotValidForName";
        assert!(tls_problem(name).unwrap().contains("host name"));
        let plain = "received corrupt message of type InvalidContentType";
        assert!(tls_problem(plain).unwrap().contains("does not speak TLS"));
        assert_eq!(tls_problem("connection refused"), None);
    }

    #[test]
    fn codes_from_old_and_new_servers() {
        assert_eq!(
            code_of("Code: 53, e.displayText() = DB::Exception: Type mismatch"),
            Some(53)
        );
        assert_eq!(
            code_of(
                "Code: 252. DB::Exception: Too many parts (300). (TOO_MANY_PARTS) (version 24.3.1)"
            ),
            Some(252)
        );
        assert_eq!(code_of("502 Bad Gateway"), None);
    }

    #[test]
    fn sorts_by_code_and_phase() {
        let cases = [
            (
                "Code: 252. DB::Exception: Too many parts",
                Phase::InsertRows,
                "transient",
            ),
            (
                "Code: 241. DB::Exception: Memory limit",
                Phase::Query,
                "transient",
            ),
            (
                "Code: 53, e.displayText() = DB::Exception: Type mismatch",
                Phase::InsertRows,
                "rejected",
            ),
            (
                "Code: 53, e.displayText() = DB::Exception: Type mismatch",
                Phase::Query,
                "fatal",
            ),
            (
                "Code: 27. DB::Exception: Cannot parse input",
                Phase::InsertRows,
                "rejected",
            ),
            (
                "Code: 395. DB::Exception: Value passed to 'throwIf'",
                Phase::InsertRows,
                "rejected",
            ),
            (
                "Code: 60. DB::Exception: Table kw.events doesn't exist",
                Phase::InsertRows,
                "fatal",
            ),
            (
                "Code: 193, e.displayText() = DB::Exception: Wrong password",
                Phase::Query,
                "fatal",
            ),
            (
                "Code: 516. DB::Exception: Authentication failed",
                Phase::Query,
                "fatal",
            ),
            ("502 Bad Gateway", Phase::InsertRows, "transient"),
            ("503 Service Unavailable", Phase::Query, "transient"),
            (
                "<html>nginx: no live upstreams</html>",
                Phase::Query,
                "transient",
            ),
            ("401 Unauthorized", Phase::Query, "fatal"),
            ("429 Too Many Requests", Phase::Query, "transient"),
        ];
        for (text, phase, want) in cases {
            assert_eq!(kind(&classify_text(text, phase, "x", None)), want, "{text}");
        }
    }

    #[test]
    fn messages_are_short_and_never_show_the_password() {
        let e = classify_text(
            "Code: 193, e.displayText() = DB::Exception: Wrong password hunter2 for user kw, e.what() = DB::Exception",
            Phase::Query,
            "connecting",
            Some("hunter2"),
        );
        let m = e.to_string();
        assert!(!m.contains("hunter2"), "{m}");
        assert!(!m.contains("e.what()"), "{m}");
        assert!(m.contains("connecting: Code: 193"), "{m}");
        let long = "Code: 6. ".to_owned() + &"é".repeat(2000);
        assert!(clean(&long, None).len() < 700);
    }
}
