//! Email over SMTP (lettre, tokio, rustls): STARTTLS (required when configured), implicit
//! TLS, or plain for a local relay; AUTH when a username and password are set.
//!
//! One message per recipient group, to all its addresses, with a `Message-ID` made of the
//! keywatch message id: a message sent twice (a restart in the middle of an attempt)
//! carries the same id, which mail systems use to drop duplicates. The body is
//! `multipart/alternative`: the text part (`text.j2`), then the HTML part (`email.html.j2`),
//! which is `multipart/related` with the pictures it shows by `cid:` (the adoption chart)
//! when it has any. HTML values are escaped by [`escape_email_html`]; the HTML loads nothing
//! from outside. A message without HTML (queued by an older keywatch, or whose HTML
//! templates failed) goes as text/plain alone.
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
use lettre::message::{Attachment, Mailbox, MultiPart, SinglePart};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

use super::{chain, is_certificate_error, scrub, DeliveryError};
use crate::config::ConfigError;
use crate::notify::config::ChannelTable;
use crate::notify::message::Rendered;
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

    /// `check-config --connect`: connects as a send would (TLS and AUTH as configured),
    /// says NOOP and quits; nothing is sent. The error never holds the password.
    pub async fn test_connection(&self) -> Result<(), String> {
        let secrets: Vec<&str> = self.password.iter().map(|p| p.expose()).collect();
        match self.transport.test_connection().await {
            Ok(true) => Ok(()),
            Ok(false) => Err("the server did not answer NOOP".into()),
            Err(e) => Err(scrub(&format!("smtp: {}", chain(&e)), &secrets)),
        }
    }

    pub async fn send(
        &self,
        id: &str,
        to: &[String],
        rendered: &Rendered,
    ) -> Result<(), DeliveryError> {
        let secrets: Vec<&str> = self.password.iter().map(|p| p.expose()).collect();
        let mut b = Message::builder()
            .from(self.from.clone())
            .subject(&rendered.subject)
            .message_id(Some(format!("<{id}@keywatch>")));
        if to.is_empty() {
            return Err(DeliveryError::permanent("no email address"));
        }
        for addr in to {
            let mbox = addr.parse::<Mailbox>().map_err(|e| {
                DeliveryError::permanent(format!("bad email address `{addr}`: {e}"))
            })?;
            b = b.to(mbox);
        }
        let msg = body(b, rendered)
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

/// The message body: text alone, or text and HTML alternatives with the HTML's pictures.
fn body(b: lettre::message::MessageBuilder, r: &Rendered) -> Result<Message, lettre::error::Error> {
    if r.html.is_empty() {
        return b.header(ContentType::TEXT_PLAIN).body(r.text.clone());
    }
    let text = SinglePart::plain(r.text.clone());
    let html = SinglePart::html(r.html.clone());
    let alternative = MultiPart::alternative().singlepart(text);
    if r.images.is_empty() {
        return b.multipart(alternative.singlepart(html));
    }
    let mut related = MultiPart::related().singlepart(html);
    for img in &r.images {
        let ct = ContentType::parse(&img.content_type)
            .unwrap_or_else(|_| ContentType::parse("application/octet-stream").expect("valid"));
        // A name for clients that list inline pictures as attachments.
        let name = format!("{}.png", img.cid.split('@').next().unwrap_or("chart"));
        related = related.singlepart(
            Attachment::new_inline_with_name(img.cid.clone(), name).body(img.data.clone(), ct),
        );
    }
    b.multipart(alternative.multipart(related))
}

/// HTML-escapes a value for the email's HTML part: `&`, `<`, `>`, `"` and `'`, so that it
/// is text both between tags and inside a quoted attribute.
pub fn escape_email_html(s: &str) -> String {
    super::escape_with(s, |c| match c {
        '&' => Some("&amp;"),
        '<' => Some("&lt;"),
        '>' => Some("&gt;"),
        '"' => Some("&quot;"),
        '\'' => Some("&#39;"),
        _ => None,
    })
}
