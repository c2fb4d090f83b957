//! Email over SMTP (lettre, tokio, rustls): STARTTLS (required when configured), implicit
//! TLS, or plain for a local relay; AUTH when a username and password are set.
//!
//! One message per recipient group, to all its addresses, as text/plain UTF-8, with a
//! `Message-ID` made of the keywatch message id: a message sent twice (a restart in the
//! middle of an attempt) carries the same id, which mail systems use to drop duplicates.
//!
//! Outcomes: accepted; 4xx replies, timeouts, connection and network failures retried; 5xx
//! replies (a refused recipient, failed authentication), TLS failures (an untrusted
//! certificate, also when it comes as a connection error; no STARTTLS offered) and addresses
//! that do not parse are permanent.
//!
//! This module owns the channel whole: its settings in `routes.toml` ([`settings`]), its
//! sending, and what its errors may show (the password is scrubbed).

use std::path::PathBuf;
use std::time::Duration;

use lettre::message::header::ContentType;
use lettre::message::Mailbox;
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

use super::{chain, is_certificate_error, scrub, DeliveryError};
use crate::config::ConfigError;
use crate::notify::config::ChannelTable;
use crate::registry::{Secret, SecretRef};

/// The fields of an email channel in `routes.toml`.
pub(crate) const FIELDS: &[&str] = &[
    "host",
    "port",
    "security",
    "username",
    "password_env",
    "password_file",
    "from",
    "tls_server_name",
    "ca_file",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmtpSecurity {
    /// Plain connection upgraded with STARTTLS, which must be offered (port 587).
    Starttls,
    /// TLS from the first byte (port 465).
    Tls,
    /// No encryption: only for a relay on the same host or in tests.
    None,
}

#[derive(Debug, Clone, PartialEq)]
pub struct EmailSettings {
    pub host: String,
    pub port: u16,
    pub security: SmtpSecurity,
    pub username: Option<String>,
    pub password: Option<SecretRef>,
    /// `keywatch <keywatch@example.com>`
    pub from: String,
    /// The name the server's certificate must have, when not `host`.
    pub tls_server_name: Option<String>,
    /// A PEM file of extra trusted CA certificates (an internal CA).
    pub ca_file: Option<PathBuf>,
}

/// Reads an email channel's table: a host, a parsable from address, a username and a
/// password together or neither; the port defaults to the security's.
pub(crate) fn settings(t: &ChannelTable<'_>) -> Result<EmailSettings, ConfigError> {
    let c = t.raw;
    let host = c
        .host
        .as_ref()
        .filter(|h| !h.get_ref().trim().is_empty())
        .ok_or_else(|| t.err("host", None, "an email channel needs a host"))?;
    let security = match &c.security {
        None => SmtpSecurity::Starttls,
        Some(v) => match v.get_ref().trim() {
            "starttls" => SmtpSecurity::Starttls,
            "tls" => SmtpSecurity::Tls,
            "none" => SmtpSecurity::None,
            other => {
                return Err(t.err(
                    "security",
                    Some(v.span()),
                    format!("expected \"starttls\", \"tls\" or \"none\", found `{other}`"),
                ))
            }
        },
    };
    let from = c
        .from
        .as_ref()
        .ok_or_else(|| t.err("from", None, "an email channel needs a from address"))?;
    from.get_ref().parse::<Mailbox>().map_err(|e| {
        t.err(
            "from",
            Some(from.span()),
            format!("expected an address like \"keywatch <keywatch@example.com>\": {e}"),
        )
    })?;
    let password: Option<SecretRef> = t.secret("password", &c.password_env, &c.password_file)?;
    if password.is_some() != c.username.is_some() {
        return Err(t.err(
            if password.is_some() {
                "username"
            } else {
                "password_env"
            },
            None,
            "set username and password_env (or password_file) together",
        ));
    }
    let port = match (&c.port, security) {
        (Some(p), _) if *p.get_ref() == 0 => {
            return Err(t.err("port", Some(p.span()), "must not be 0"))
        }
        (Some(p), _) => *p.get_ref(),
        (None, SmtpSecurity::Tls) => 465,
        (None, SmtpSecurity::Starttls) => 587,
        (None, SmtpSecurity::None) => 25,
    };
    Ok(EmailSettings {
        host: host.get_ref().trim().to_owned(),
        port,
        security,
        username: c.username.as_ref().map(|u| u.get_ref().clone()),
        password,
        from: from.get_ref().trim().to_owned(),
        tls_server_name: c.tls_server_name.as_ref().map(|v| v.get_ref().clone()),
        ca_file: c.ca_file.as_ref().map(|v| v.get_ref().clone()),
    })
}

pub struct Mailer {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
    password: Option<Secret>,
}

impl Mailer {
    /// Builds the transport; reads `ca_file` when set. Connects only when sending.
    pub fn new(
        s: &EmailSettings,
        password: Option<Secret>,
        timeout: Duration,
    ) -> Result<Mailer, String> {
        let server_name = s.tls_server_name.clone().unwrap_or_else(|| s.host.clone());
        let params = || -> Result<TlsParameters, String> {
            let mut b = TlsParameters::builder(server_name.clone());
            if let Some(ca) = &s.ca_file {
                let pem = std::fs::read(ca)
                    .map_err(|e| format!("ca_file: cannot read {}: {e}", ca.display()))?;
                let cert = Certificate::from_pem(&pem)
                    .map_err(|e| format!("ca_file: {}: {e}", ca.display()))?;
                b = b.add_root_certificate(cert);
            }
            b.build_rustls().map_err(|e| format!("tls: {e}"))
        };
        let tls = match s.security {
            SmtpSecurity::Starttls => Tls::Required(params()?),
            SmtpSecurity::Tls => Tls::Wrapper(params()?),
            SmtpSecurity::None => Tls::None,
        };
        let mut b = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&s.host)
            .port(s.port)
            .tls(tls)
            .timeout(Some(timeout));
        if let (Some(user), Some(pass)) = (&s.username, &password) {
            b = b.credentials(Credentials::new(user.clone(), pass.expose().to_owned()));
        }
        let from = s
            .from
            .parse::<Mailbox>()
            .map_err(|e| format!("from: {e}"))?;
        Ok(Mailer {
            transport: b.build(),
            from,
            password,
        })
    }

    pub async fn send(
        &self,
        id: &str,
        to: &[String],
        subject: &str,
        text: &str,
    ) -> Result<(), DeliveryError> {
        let secrets: Vec<&str> = self.password.iter().map(|p| p.expose()).collect();
        let mut b = Message::builder()
            .from(self.from.clone())
            .subject(subject)
            .message_id(Some(format!("<{id}@keywatch>")))
            .header(ContentType::TEXT_PLAIN);
        if to.is_empty() {
            return Err(DeliveryError::permanent("no email address"));
        }
        for addr in to {
            let mbox = addr.parse::<Mailbox>().map_err(|e| {
                DeliveryError::permanent(format!("bad email address `{addr}`: {e}"))
            })?;
            b = b.to(mbox);
        }
        let msg = b
            .body(text.to_owned())
            .map_err(|e| DeliveryError::permanent(format!("cannot build the email: {e}")))?;
        match self.transport.send(msg).await {
            Ok(_) => Ok(()),
            Err(e) => {
                let detail = scrub(&format!("smtp: {}", chain(&e)), &secrets);
                if e.is_permanent() || e.is_tls() || e.is_client() || is_certificate_error(&detail)
                {
                    Err(DeliveryError::permanent(detail))
                } else {
                    Err(DeliveryError::transient(detail))
                }
            }
        }
    }
}
