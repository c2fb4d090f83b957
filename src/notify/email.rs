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

use std::time::Duration;

use lettre::message::header::ContentType;
use lettre::message::Mailbox;
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

use super::channel::{chain, is_certificate_error, scrub, DeliveryError};
use super::config::{EmailSettings, SmtpSecurity};
use crate::registry::Secret;

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
