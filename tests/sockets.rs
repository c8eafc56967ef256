//! Socket options of the connections the service opens, read back from the kernel.
//!
//! A statement (or message) the kernel sends in more than one segment waits for the
//! peer's delayed ACK (up to 40 ms on Linux) unless `TCP_NODELAY` is set: sqlx 0.9.0
//! dropped it (transact-rs/sqlx#4335; 0.9.1 sets it again), and lettre 0.11.23 never
//! sets it on its SMTP sockets (the mailer opens them itself). Each test looks only at
//! sockets to its own server's port, and shows first that the check sees a socket
//! without the option.

use std::os::fd::BorrowedFd;

use invite_worker::{
    config::{DatabaseSettings, Secret, Settings},
    mail::Mailer,
};
use smtp_testkit::SmtpServer;
use socket2::SockRef;

/// The database server the tests use; `TEST_DATABASE_URL` overrides (no database name).
fn server_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

/// Every open TCP socket of this process connected to `port`, with its `TCP_NODELAY`.
fn sockets_to(port: u16) -> Vec<(i32, bool)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fd").expect("/proc/self/fd") {
        let Ok(entry) = entry else { continue };
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let is_socket = std::fs::read_link(entry.path())
            .is_ok_and(|target| target.to_string_lossy().starts_with("socket:"));
        if !is_socket {
            continue;
        }
        // SAFETY: the descriptor is open (listed just now) and only borrowed for the
        // two reads below; no other thread of this test closes descriptors.
        let fd_ref = unsafe { BorrowedFd::borrow_raw(fd) };
        let socket = SockRef::from(&fd_ref);
        let peer = socket.peer_addr().ok().and_then(|a| a.as_socket());
        if peer.is_some_and(|p| p.port() == port) {
            found.push((fd, socket.tcp_nodelay().expect("getsockopt TCP_NODELAY")));
        }
    }
    found
}

#[tokio::test]
async fn every_database_connection_of_the_pool_sets_tcp_nodelay() {
    let url = format!("{}/postgres", server_url());
    let port = url
        .parse::<sqlx::postgres::PgConnectOptions>()
        .expect("a postgres URL")
        .get_port();
    drop(control_without_nodelay(port).await);
    let pool = invite_worker::db::connect(&DatabaseSettings {
        url: Secret::new(url),
        max_connections: 4,
    })
    .await
    .expect("connects");
    let held: Vec<_> = futures::future::try_join_all((0..4).map(|_| pool.acquire()))
        .await
        .expect("four connections");

    let sockets = sockets_to(port);
    assert!(
        sockets.len() >= 4,
        "the pool's four connections are sockets to port {port}: {sockets:?}"
    );
    for (fd, nodelay) in &sockets {
        assert!(
            nodelay,
            "fd {fd}: a database connection without TCP_NODELAY"
        );
    }
    drop(held);
    pool.close().await;
}

/// A socket the check must flag: connected to `port` without `TCP_NODELAY`.
async fn control_without_nodelay(port: u16) -> tokio::net::TcpStream {
    let control = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("a control connection");
    control.set_nodelay(false).expect("nodelay off");
    let flagged = sockets_to(port).iter().any(|(_, nodelay)| !nodelay);
    assert!(flagged, "the check sees a socket without TCP_NODELAY");
    control
}

#[tokio::test]
async fn every_smtp_connection_of_the_mailer_sets_tcp_nodelay() {
    let smtp = SmtpServer::start().await.expect("SMTP server starts");
    let control = control_without_nodelay(smtp.port()).await;
    drop(control);

    let port = smtp.port().to_string();
    let settings = Settings::load_from(
        std::path::Path::new("/nonexistent/worker.toml"),
        false,
        [
            ("INVITES_MAIL__TRANSPORT", "smtp"),
            ("INVITES_SMTP__PORT", port.as_str()),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned())),
    )
    .expect("settings");
    let mailer = Mailer::new(&settings).expect("a mailer");
    let message = |to: &str| {
        lettre::Message::builder()
            .from(settings.mail.from.parse().expect("mail.from"))
            .to(to.parse().expect("an address"))
            .subject("Interview")
            .body("hello".to_owned())
            .expect("a message")
    };
    // Two at once, so the pool holds two connections.
    let (first, second) = (message("a@example.com"), message("b@example.com"));
    let (a, b) = tokio::join!(mailer.send("a", &first), mailer.send("b", &second));
    assert_eq!((a, b), (Ok(()), Ok(())));

    let sockets = sockets_to(smtp.port());
    assert!(!sockets.is_empty(), "the mailer keeps its connections open");
    for (fd, nodelay) in &sockets {
        assert!(nodelay, "fd {fd}: an SMTP connection without TCP_NODELAY");
    }
}
