//! A third-party SMTP server to measure against: aiosmtpd (a plain asyncio server from
//! PyPI, run by `tests/support/aiosmtpd_server.py` with its own defaults), so the
//! throughput figure does not rest on a test server of ours. Installed with pip when
//! missing. Its capacity alone is measured with a minimal client of lettre connections
//! (`TCP_NODELAY` set, as the service's are), in the same run.

use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, bail};
use lettre::{
    Address,
    address::Envelope,
    transport::smtp::{client::AsyncSmtpConnection, extension::ClientId},
};
use tokio::{net::TcpStream, task::JoinSet, time::Instant};

use crate::pipeline::AcceptedCount;

/// The server script, shared with the integration tests.
fn script() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/support/aiosmtpd_server.py"
    ))
}

/// Installs aiosmtpd with pip unless Python can import it already.
pub fn ensure_installed() -> anyhow::Result<String> {
    let version = |()| {
        Command::new("python3")
            .args(["-c", "import aiosmtpd; print(aiosmtpd.__version__)"])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    if let Some(v) = version(()) {
        return Ok(v);
    }
    let status = Command::new("python3")
        .args(["-m", "pip", "install", "--quiet", "aiosmtpd"])
        .status()
        .context("running pip to install aiosmtpd")?;
    if !status.success() {
        bail!("pip could not install aiosmtpd ({status})");
    }
    version(()).context("aiosmtpd is installed but cannot be imported")
}

/// A running aiosmtpd that accepts everything; killed when dropped.
pub struct Aiosmtpd {
    child: Child,
    pub port: u16,
    accepted: Arc<AtomicUsize>,
}

impl Aiosmtpd {
    pub async fn start() -> anyhow::Result<Self> {
        let port = crate::service::free_port()?;
        let mut child = Command::new("python3")
            .arg(script())
            .args(["--port", &port.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting aiosmtpd")?;
        let stdout = child.stdout.take().context("aiosmtpd's stdout")?;
        let accepted = Arc::new(AtomicUsize::new(0));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let counter = accepted.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line == "ready" {
                    let _ = ready_tx.send(());
                } else if let Some(n) = line.strip_prefix("accepted ") {
                    counter.store(n.trim().parse().unwrap_or(0), Ordering::Relaxed);
                }
            }
        });
        let ready =
            tokio::task::spawn_blocking(move || ready_rx.recv_timeout(Duration::from_secs(30)))
                .await?;
        if ready.is_err() {
            let _ = child.kill();
            bail!("aiosmtpd did not start within 30 s");
        }
        Ok(Self {
            child,
            port,
            accepted,
        })
    }
}

impl AcceptedCount for Aiosmtpd {
    fn accepted_count(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for Aiosmtpd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A message of an invitation's size and shape (headers, a text part and an HTML part,
/// about 1.4 KB, as an invitation is), so the server spends on each what it spends on an invitation.
fn message_like_an_invite() -> Vec<u8> {
    let mut m = String::from(
        "From: Interviews <interviews@example.com>\r\nTo: \"Candidate\" <sink@example.com>\r\n\
         Subject: Interview invitation: Backend Engineer\r\nMessage-ID: <capacity@example.com>\r\n\
         MIME-Version: 1.0\r\nContent-Type: multipart/alternative; boundary=\"b\"\r\n\r\n\
         --b\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n",
    );
    for _ in 0..7 {
        m.push_str("You are invited to a 30-minute interview; your link works once.\r\n");
    }
    m.push_str("--b\r\nContent-Type: text/html; charset=utf-8\r\n\r\n");
    for _ in 0..7 {
        m.push_str("<p>You are invited to a 30-minute interview; your link works once.</p>\r\n");
    }
    m.push_str("--b--\r\n");
    m.into_bytes()
}

/// What the server accepts alone: `messages` messages the size of an invitation over
/// `connections` connections, each sending its share one after another.
pub async fn capacity_alone(
    server: &Aiosmtpd,
    messages: usize,
    connections: usize,
) -> anyhow::Result<f64> {
    let per_connection = messages.div_ceil(connections.max(1));
    let body = Arc::new(message_like_an_invite());
    let envelope = Envelope::new(
        Some("bench@example.com".parse::<Address>()?),
        vec!["sink@example.com".parse::<Address>()?],
    )?;
    let started = Instant::now();
    let mut senders = JoinSet::new();
    for _ in 0..connections.max(1) {
        let (envelope, port, body) = (envelope.clone(), server.port, body.clone());
        senders.spawn(async move {
            let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
            tcp.set_nodelay(true)?;
            let mut conn =
                AsyncSmtpConnection::connect_with_transport(Box::new(tcp), &ClientId::default())
                    .await?;
            for _ in 0..per_connection {
                conn.send(&envelope, &body).await?;
            }
            let _ = conn.quit().await;
            anyhow::Ok(per_connection)
        });
    }
    let mut sent = 0;
    while let Some(joined) = senders.join_next().await {
        sent += joined??;
    }
    Ok(sent as f64 / started.elapsed().as_secs_f64())
}
