//! The operations endpoint: Prometheus `/metrics` and `/healthz`; in the owners' bot's
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

/// What `/healthz` reports; updated by the pipeline.
#[derive(Debug, Default)]
pub struct Health {
    /// Unix ms of the last successful store commit (0: none yet).
    pub last_commit_ms: AtomicI64,
    /// Set when the pipeline stopped on an error it cannot recover from.
    pub failed: AtomicBool,
}

impl Health {
    pub fn committed(&self) {
        self.last_commit_ms
            .store(chrono::Utc::now().timestamp_millis(), Ordering::Relaxed);
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
