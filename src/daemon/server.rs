//! The operations endpoint: Prometheus `/metrics` and `/healthz`; in the owners' bot's
//! webhook mode also `POST /telegram/webhook` ([`crate::notify::bot::WEBHOOK_PATH`]), which
//! takes an update only with the right `X-Telegram-Bot-Api-Secret-Token` (401 otherwise,
//! nothing logged of it) and hands it to the bot.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;

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
        });
    let task = tokio::spawn(async move {
        let shutdown = async move { cancel.cancelled().await };
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::error!(error = %e, "metrics server failed");
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
