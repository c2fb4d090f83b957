//! The operations endpoint: Prometheus `/metrics`, `/healthz` (liveness) and `/readyz`
//! (readiness, with the reasons when not ready); in the owners' bot's
//! webhook mode also `POST /telegram/webhook` ([`crate::notify::bot::WEBHOOK_PATH`]), which
//! takes an update only with the right `X-Telegram-Bot-Api-Secret-Token` (401 otherwise,
//! nothing logged of it) and hands it to the bot.
//!
//! Anyone who can reach the port can talk to it, so each connection is bounded (served with
//! hyper directly, as `axum::serve` has no such settings): the request head (request line
//! and headers) at most [`MAX_HEAD_BYTES`] (a longer one is answered 431 and the connection
//! closed), read within [`HEADER_READ_TIMEOUT`] (a slow or silent client is disconnected),
//! request bodies at most [`MAX_BODY_BYTES`] (for routes that read one: 413 past it), and
//! at most [`MAX_CONNECTIONS`] connections served at once (more wait in the listen
//! backlog). On cancel the server stops accepting; open connections are dropped with it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// Request line and headers, bytes at most (hyper's smallest buffer is 8 KiB).
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Time a client has to send a request's head, from its first byte or from the end of the
/// previous response.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Request body bytes at most, for routes that read a body.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 64;

/// What `/readyz` waits for at start, each until the daemon says it is done.
pub const WAIT_STORE: &str = "the store: opening it and migrating its schema";
pub const WAIT_LIFECYCLE: &str = "the lifecycle topic, read to its end";
pub const WAIT_WARM_UP: &str = "the anomaly models' warm-up from stored history";
pub const WAIT_ASSIGNMENT: &str = "the consumer group's assignment of partitions";

/// What `/healthz` (liveness) and `/readyz` (readiness) report; updated by the daemon and
/// the pipeline.
#[derive(Debug, Default)]
pub struct Health {
    /// Unix ms of the last successful store commit (0: none yet).
    pub last_commit_ms: AtomicI64,
    /// Set when the pipeline stopped on an error it cannot recover from.
    pub failed: AtomicBool,
    /// The start-up steps not done yet (`WAIT_*`).
    waiting: std::sync::Mutex<Vec<&'static str>>,
    /// The last error of a store that is being retried; cleared when it answers.
    store_error: std::sync::Mutex<Option<String>>,
    /// A consumer-group member: set once the group has assigned its partitions.
    assigned: std::sync::Mutex<Option<Arc<AtomicBool>>>,
}

impl Health {
    /// Health that is not ready until each of `steps` is [`Health::done`].
    pub fn starting(steps: &[&'static str]) -> Health {
        Health {
            waiting: std::sync::Mutex::new(steps.to_vec()),
            ..Health::default()
        }
    }

    pub fn committed(&self) {
        self.last_commit_ms
            .store(chrono::Utc::now().timestamp_millis(), Ordering::Relaxed);
        self.store_answers();
    }

    /// A start-up step is over.
    pub fn done(&self, step: &'static str) {
        self.waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|s| *s != step);
    }

    /// Ready only once `assigned` is set (the Kafka source sets it at its first assignment).
    pub fn wait_for_assignment(&self, assigned: Arc<AtomicBool>) {
        *self.assigned.lock().unwrap_or_else(|e| e.into_inner()) = Some(assigned);
    }

    /// The store refused an attempt that is being retried.
    pub fn store_failing(&self, error: &str) {
        *self.store_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(error.to_owned());
    }

    /// The store took an attempt.
    pub fn store_answers(&self) {
        *self.store_error.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Why the instance is not ready; empty: ready.
    pub fn not_ready(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.failed.load(Ordering::Relaxed) {
            out.push("the pipeline stopped on an error (see the log)".to_owned());
        }
        for w in self
            .waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            out.push(format!("waiting for {w}"));
        }
        let assigned = self.assigned.lock().unwrap_or_else(|e| e.into_inner());
        if assigned
            .as_ref()
            .is_some_and(|a| !a.load(Ordering::Relaxed))
        {
            out.push(format!("waiting for {WAIT_ASSIGNMENT}"));
        }
        if let Some(e) = &*self.store_error.lock().unwrap_or_else(|e| e.into_inner()) {
            out.push(format!("the store does not answer (retrying): {e}"));
        }
        out
    }
}

/// Where the webhook route hands Telegram's updates, and the secret they must carry.
#[derive(Clone)]
pub struct TelegramHook {
    pub secret: crate::registry::Secret,
    pub updates: tokio::sync::mpsc::Sender<teloxide_core::types::Update>,
}

#[derive(Clone)]
struct AppState {
    health: Arc<Health>,
    metrics: Option<PrometheusHandle>,
    telegram: Option<TelegramHook>,
}

/// Binds `addr` and serves until `cancel`; returns the bound address (useful with port 0).
pub async fn serve(
    addr: SocketAddr,
    health: Arc<Health>,
    metrics: Option<PrometheusHandle>,
    cancel: CancellationToken,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    serve_with(addr, health, metrics, None, cancel).await
}

/// [`serve`], with the Telegram webhook route when `telegram` is given.
pub async fn serve_with(
    addr: SocketAddr,
    health: Arc<Health>,
    metrics: Option<PrometheusHandle>,
    telegram: Option<TelegramHook>,
    cancel: CancellationToken,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route(
            crate::notify::bot::WEBHOOK_PATH,
            axum::routing::post(telegram_update),
        )
        .with_state(AppState {
            health,
            metrics,
            telegram,
        })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES));
    let task = tokio::spawn(async move {
        let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        loop {
            let permit = tokio::select! {
                _ = cancel.cancelled() => return,
                p = permits.clone().acquire_owned() => p.expect("the semaphore is never closed"),
            };
            let stream = tokio::select! {
                _ = cancel.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // Out of file descriptors, mostly: wait rather than spin.
                        tracing::warn!(error = %e, "metrics server cannot accept");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .max_buf_size(MAX_HEAD_BYTES)
                .serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
            let cancel = cancel.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = cancel.cancelled() => {}
                    // Errors are the client's (gone, too slow, head too large).
                    r = conn => if let Err(e) = r { tracing::debug!(error = %e, "metrics connection ended") },
                }
                drop(permit);
            });
        }
    });
    Ok((bound, task))
}

async fn render_metrics(State(state): State<AppState>) -> (StatusCode, String) {
    match &state.metrics {
        Some(handle) => (StatusCode::OK, handle.render()),
        None => (
            StatusCode::NOT_FOUND,
            "metrics are not enabled in this process\n".into(),
        ),
    }
}

async fn healthz(State(state): State<AppState>) -> (StatusCode, Json<serde_json::Value>) {
    let last = state.health.last_commit_ms.load(Ordering::Relaxed);
    let failed = state.health.failed.load(Ordering::Relaxed);
    let status = if failed {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    let body = serde_json::json!({
        "status": if failed { "failed" } else { "ok" },
        "last_commit_ms": (last > 0).then_some(last),
    });
    (status, Json(body))
}

/// Readiness: 200 once the store is open and answers, the lifecycle topic is read to its
/// end, the models are warmed up and (in a consumer group) the partitions are assigned;
/// otherwise 503 with the reasons.
async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<serde_json::Value>) {
    let reasons = state.health.not_ready();
    if reasons.is_empty() {
        (StatusCode::OK, Json(serde_json::json!({"status": "ready"})))
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"status": "not ready", "reasons": reasons})),
        )
    }
}

async fn telegram_update(
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> StatusCode {
    let Some(hook) = &state.telegram else {
        return StatusCode::NOT_FOUND;
    };
    let got = headers
        .get("x-telegram-bot-api-secret-token")
        .map(|v| v.as_bytes());
    if !crate::notify::bot::webhook_secret_ok(got, &hook.secret) {
        return StatusCode::UNAUTHORIZED;
    }
    match serde_json::from_slice::<teloxide_core::types::Update>(&body) {
        // Telegram sends again what is not answered 2xx: a full queue asks for that.
        Ok(u) => match hook.updates.try_send(u) {
            Ok(()) => StatusCode::OK,
            Err(_) => StatusCode::SERVICE_UNAVAILABLE,
        },
        Err(_) => StatusCode::BAD_REQUEST,
    }
}
