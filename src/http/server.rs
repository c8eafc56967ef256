//! The HTTP server: hyper's HTTP/1.1 connections with the limits of `[http]`, and a
//! graceful shutdown that lets requests in flight finish.
//!
//! - `max_connections`: a connection is accepted only while a permit is free; above
//!   the cap new connections wait in the kernel's listen backlog.
//! - `header_timeout_secs` and `idle_timeout_secs` (Go's `ReadHeaderTimeout` and
//!   `IdleTimeout`): a new connection must deliver its request head within the first;
//!   a keep-alive connection may sit idle for the second, and once the next request's
//!   first byte arrives its head must be complete within the first again. hyper's own
//!   `header_read_timeout` starts when a connection goes idle, so it cannot tell the
//!   two apart; [`Deadline`] does, on the socket's reads.
//! - `request_timeout_secs` is the router's timeout layer: a slow body is cut there.
//!
//! HTTP/2 is not served: hyper's HTTP/2 server has no idle or head timeout, and the
//! service sits behind a proxy that speaks HTTP/1.1 to it.

use std::{
    convert::Infallible,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use axum::{Router, extract::ConnectInfo};
use futures::task::AtomicWaker;
use hyper::body::Incoming;
use hyper_util::{rt::TokioIo, server::graceful::GracefulShutdown};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::Semaphore,
    time::{Instant, Sleep},
};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::config::HttpSettings;

/// Serves `router` on `listener` until `stop` is cancelled, then waits for the
/// requests in flight (each bounded by `request_timeout_secs`).
pub(crate) async fn serve(
    listener: TcpListener,
    router: Router,
    limits: &HttpSettings,
    stop: CancellationToken,
) -> io::Result<()> {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    let (header, idle) = (limits.header_timeout(), limits.idle_timeout());
    loop {
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => permit,
            () = stop.cancelled() => break,
        };
        let Ok(permit) = permit else { break };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: wait, as axum::serve does.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = stop.cancelled() => break,
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY on a client connection");
        }
        let busy = Arc::new(BusyFlag::default());
        let io = TokioIo::new(Deadline::new(stream, header, idle, busy.clone()));
        let service = connection_service(router.clone(), peer, busy);
        let conn = hyper::server::conn::http1::Builder::new()
            // The head and idle deadlines are [`Deadline`]'s.
            .header_read_timeout(None)
            // A head must fit in 64 KiB (hyper's default lets each connection buffer
            // ~400 KiB: 1,024 connections with unfinished heads held ~400 MB).
            .max_buf_size(64 * 1024)
            .serve_connection(io, service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// The router for one connection: each request carries the peer's address
/// (`ConnectInfo`), and the connection counts as busy from the moment its head is
/// parsed until the answer is ready.
fn connection_service(
    router: Router,
    peer: SocketAddr,
    busy: Arc<BusyFlag>,
) -> impl hyper::service::Service<
    hyper::Request<Incoming>,
    Response = axum::response::Response,
    Error = Infallible,
    Future = impl Future<Output = Result<axum::response::Response, Infallible>> + Send,
> + Clone {
    hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
        request.extensions_mut().insert(ConnectInfo(peer));
        let guard = Busy::start(busy.clone());
        let call = router.clone().oneshot(request.map(axum::body::Body::new));
        async move {
            let response = call.await;
            drop(guard);
            response
        }
    })
}

/// Whether a connection is answering a request, and who to wake when it stops: the
/// connection's reader, so that the idle deadline starts then, not at the next byte.
#[derive(Default)]
struct BusyFlag {
    busy: AtomicBool,
    reader: AtomicWaker,
}

/// Marks a connection busy while one of its requests is being answered.
struct Busy(Arc<BusyFlag>);

impl Busy {
    fn start(flag: Arc<BusyFlag>) -> Self {
        flag.busy.store(true, Ordering::Release);
        Busy(flag)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.busy.store(false, Ordering::Release);
        self.0.reader.wake();
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for a request head: from accept, or from the first byte after idle.
    Head,
    /// Between requests of a keep-alive connection, nothing received yet.
    Idle,
    /// A request is being answered: the router's timeout bounds it.
    Busy,
}

/// A client socket whose reads fail with `TimedOut` when a request head or an idle
/// keep-alive period outlasts its deadline; hyper then closes the connection.
struct Deadline {
    io: TcpStream,
    phase: Phase,
    sleep: Pin<Box<Sleep>>,
    header: Duration,
    idle: Duration,
    busy: Arc<BusyFlag>,
}

impl Deadline {
    fn new(io: TcpStream, header: Duration, idle: Duration, busy: Arc<BusyFlag>) -> Self {
        Self {
            io,
            phase: Phase::Head,
            sleep: Box::pin(tokio::time::sleep(header)),
            header,
            idle,
            busy,
        }
    }

    fn enter(&mut self, phase: Phase, within: Duration) {
        self.phase = phase;
        self.sleep.as_mut().reset(Instant::now() + within);
    }
}

impl AsyncRead for Deadline {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.busy.busy.load(Ordering::Acquire) {
            this.phase = Phase::Busy;
            this.busy.reader.register(cx.waker());
            return Pin::new(&mut this.io).poll_read(cx, buf);
        }
        if this.phase == Phase::Busy {
            let idle = this.idle;
            this.enter(Phase::Idle, idle);
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if this.phase == Phase::Idle && buf.filled().len() > before {
                    let header = this.header;
                    this.enter(Phase::Head, header);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => match this.sleep.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    match this.phase {
                        Phase::Idle => "keep-alive connection idle too long",
                        _ => "request head not received in time",
                    },
                ))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl AsyncWrite for Deadline {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}
