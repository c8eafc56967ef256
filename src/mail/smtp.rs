//! The SMTP client: lettre's connection type on sockets this crate opens, kept in a
//! pool of its own.
//!
//! Why not lettre's own transport: lettre 0.11.23 never sets `TCP_NODELAY`, and it
//! writes the end of a message (`\r\n.\r\n`) as a write of its own. Against a server
//! that delays its ACKs (Linux does, by default) that last write waits for the ACK of
//! the message (Nagle's algorithm): up to 40 ms per message and connection. Here every
//! socket is opened by [`SmtpClient::connect`], which sets `TCP_NODELAY` before lettre
//! sees it (`AsyncSmtpConnection::connect_with_transport`); STARTTLS and implicit TLS
//! are lettre's own upgrade of that socket.
//!
//! A connection goes back to the pool only after an exchange that ended normally (a
//! reply, not an error: lettre breaks the connection on any error), and the caller
//! drops a connection whose exchange it abandons (a timeout): a half-finished exchange
//! is never handed to the next send.

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Mutex,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use lettre::{
    address::Envelope,
    transport::smtp::{
        Error,
        authentication::{Credentials, Mechanism},
        client::{AsyncSmtpConnection, AsyncTokioStream, Certificate, TlsParameters},
        extension::ClientId,
        response::Response,
    },
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};

use crate::config::{Settings, SmtpTls};

/// An idle connection is checked with a NOOP before it is used again once it has been
/// idle this long (the server may have closed it); a busy connection is not.
const CHECK_AFTER_IDLE: Duration = Duration::from_secs(1);

/// An idle connection is closed after this long, rather than reused.
const MAX_IDLE: Duration = Duration::from_secs(30);

/// Opens, pools and reuses SMTP connections to the configured server.
pub(crate) struct SmtpClient {
    host: String,
    port: u16,
    tls: SmtpTls,
    tls_parameters: Option<TlsParameters>,
    credentials: Option<Credentials>,
    hello: ClientId,
    connect_timeout: Duration,
    idle: Mutex<Vec<Idle>>,
    max_idle: usize,
}

struct Idle {
    connection: AsyncSmtpConnection,
    since: Instant,
}

impl SmtpClient {
    pub(crate) fn new(settings: &Settings) -> anyhow::Result<Self> {
        let s = &settings.smtp;
        let tls_parameters = match s.tls {
            SmtpTls::None => None,
            SmtpTls::Starttls | SmtpTls::Tls => {
                let mut builder = TlsParameters::builder(s.host.clone());
                if let Some(path) = &s.tls_ca_file {
                    let pem = std::fs::read(path).map_err(|e| {
                        anyhow::anyhow!("smtp.tls_ca_file: cannot read {}: {e}", path.display())
                    })?;
                    let certificate = Certificate::from_pem(&pem).map_err(|e| {
                        anyhow::anyhow!("smtp.tls_ca_file: not a PEM certificate: {e}")
                    })?;
                    builder = builder.add_root_certificate(certificate);
                }
                Some(builder.build()?)
            }
        };
        let credentials = (!s.username.is_empty())
            .then(|| Credentials::new(s.username.clone(), s.password.expose().to_owned()));
        Ok(Self {
            host: s.host.clone(),
            port: s.port,
            tls: s.tls,
            tls_parameters,
            credentials,
            hello: ClientId::default(),
            connect_timeout: settings.smtp_timeout(),
            idle: Mutex::new(Vec::new()),
            max_idle: settings.worker.concurrency.max(1),
        })
    }

    /// Sends one message on a pooled connection, or a new one. Dropping the returned
    /// future drops the connection with it.
    pub(crate) async fn send(
        &self,
        envelope: &Envelope,
        message: &[u8],
    ) -> Result<Response, SmtpError> {
        let mut connection = self.checkout().await?;
        let sent = connection.send(envelope, message).await;
        if !connection.has_broken() {
            self.checkin(connection);
        }
        Ok(sent?)
    }

    /// The most recently used idle connection that still answers, or a new one.
    async fn checkout(&self) -> Result<AsyncSmtpConnection, SmtpError> {
        loop {
            let idle = self.lock_idle().pop();
            let Some(Idle {
                mut connection,
                since,
            }) = idle
            else {
                return self.connect().await;
            };
            let idle_for = since.elapsed();
            if idle_for > MAX_IDLE {
                continue;
            }
            if idle_for < CHECK_AFTER_IDLE || connection.test_connected().await {
                return Ok(connection);
            }
        }
    }

    fn checkin(&self, connection: AsyncSmtpConnection) {
        let mut idle = self.lock_idle();
        if idle.len() < self.max_idle {
            idle.push(Idle {
                connection,
                since: Instant::now(),
            });
        }
    }

    fn lock_idle(&self) -> std::sync::MutexGuard<'_, Vec<Idle>> {
        self.idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A new connection: TCP with `TCP_NODELAY`, then (per `smtp.tls`) implicit TLS or
    /// STARTTLS through lettre's own upgrade, EHLO, and AUTH when credentials are set.
    async fn connect(&self) -> Result<AsyncSmtpConnection, SmtpError> {
        let tcp = tokio::time::timeout(
            self.connect_timeout,
            TcpStream::connect((self.host.as_str(), self.port)),
        )
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))
        .and_then(|connected| connected)
        .map_err(connection_error)?;
        tcp.set_nodelay(true).map_err(connection_error)?;

        let mut connection = match (&self.tls, &self.tls_parameters) {
            (SmtpTls::Tls, Some(parameters)) => {
                let stream = tls_wrapped(tcp, parameters.clone()).await?;
                AsyncSmtpConnection::connect_with_transport(stream, &self.hello).await?
            }
            _ => AsyncSmtpConnection::connect_with_transport(Box::new(tcp), &self.hello).await?,
        };
        if let (SmtpTls::Starttls, Some(parameters)) = (&self.tls, &self.tls_parameters) {
            connection.starttls(parameters.clone(), &self.hello).await?;
        }
        if let Some(credentials) = &self.credentials {
            connection
                .auth(&[Mechanism::Plain, Mechanism::Login], credentials)
                .await?;
        }
        Ok(connection)
    }
}

/// Why an exchange failed: the socket could not be opened, or lettre's error (a reply,
/// or what went wrong on an open connection).
#[derive(Debug, thiserror::Error)]
pub(crate) enum SmtpError {
    #[error("cannot connect to the mail server: {0}")]
    Connect(io::Error),
    #[error(transparent)]
    Smtp(#[from] Error),
}

fn connection_error(e: io::Error) -> SmtpError {
    SmtpError::Connect(e)
}

/// Implicit TLS (`smtp.tls = "tls"`) on our own socket: lettre's TLS upgrade of the
/// stream, handed back to lettre as a stream of its own.
#[allow(deprecated)] // lettre's stream type is public but deprecated; its upgrade is what we want.
async fn tls_wrapped(
    tcp: TcpStream,
    parameters: TlsParameters,
) -> Result<Box<dyn AsyncTokioStream>, SmtpError> {
    use lettre::transport::smtp::client::AsyncNetworkStream;
    use tokio_util::compat::FuturesAsyncReadCompatExt;
    let peer = tcp.peer_addr().map_err(connection_error)?;
    let mut stream = AsyncNetworkStream::use_existing_tokio1(Box::new(tcp));
    stream.upgrade_tls(parameters).await?;
    Ok(Box::new(Encrypted {
        inner: stream.compat(),
        peer,
    }))
}

/// A TLS stream as lettre's `AsyncTokioStream`.
#[allow(deprecated)]
#[derive(Debug)]
struct Encrypted {
    inner: tokio_util::compat::Compat<lettre::transport::smtp::client::AsyncNetworkStream>,
    peer: SocketAddr,
}

impl AsyncTokioStream for Encrypted {
    fn peer_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.peer)
    }
}

impl AsyncRead for Encrypted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Encrypted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
