//! A real SMTP server over TCP on 127.0.0.1 that tests script per recipient.
//!
//! [`SmtpServer::start`] binds an ephemeral port on the loopback interface and serves
//! plain SMTP (no TLS, no AUTH) to any number of concurrent connections, each with any
//! number of transactions (as lettre's connection pool uses them). For every recipient a
//! test can queue [`Step`]s: each `RCPT TO` for that recipient consumes the next one, so a
//! test decides exactly which delivery attempt is refused, deferred, dropped or stalled.
//! Everything the server saw is recorded as [`Received`] values.
//!
//! Implemented commands: `EHLO` (advertising `8BITMIME` and `SMTPUTF8`), `HELO`,
//! `MAIL FROM`, `RCPT TO`, `DATA`, `RSET`, `NOOP`, `VRFY` (252), `QUIT`; anything else
//! gets 502. Commands are case-insensitive, lines may end in CRLF or a bare LF.
//! Limits: a command line is at most [`MAX_LINE_BYTES`] (else 500), a message at most
//! [`MAX_MESSAGE_BYTES`] after dot-unstuffing (else 552), a transaction at most
//! [`MAX_RECIPIENTS`] recipients (else 452).

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{Notify, watch};
use tokio::task::{JoinHandle, JoinSet};

/// Longest command line accepted, line ending included; longer lines get `500`.
pub const MAX_LINE_BYTES: usize = 4 * 1024;
/// Largest message accepted (dot-unstuffed bytes, line endings included); larger ones get
/// `552` after their final `.` line, and are recorded as not accepted with the data cut off
/// at this size.
pub const MAX_MESSAGE_BYTES: usize = 1024 * 1024;
/// Most recipients in one transaction; further `RCPT TO`s get `452` and consume no step.
pub const MAX_RECIPIENTS: usize = 1000;

/// Listen backlog: the benchmark opens many connections at once.
const BACKLOG: u32 = 1024;
/// How long the accept loop backs off after an accept error (e.g. out of file descriptors).
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(5);

/// What the server does with one delivery attempt (one `RCPT TO`) to a recipient.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// `250` at `RCPT TO`, `250` after `DATA`: the message is accepted.
    Accept,
    /// Answer `RCPT TO` with this code and text (e.g. `550`, `"5.1.1 user unknown"`). A
    /// 2xx code adds the recipient to the transaction; any other code leaves it out.
    /// The text may contain `\n` to make a multi-line reply.
    RcptReply(u16, String),
    /// `250` at `RCPT TO`, then this reply after the end of `DATA` (e.g. `451`,
    /// `"4.3.0 try later"`). The delivery counts as accepted only for a 2xx code.
    DataReply(u16, String),
    /// Close the TCP connection instead of answering `RCPT TO`.
    DropAtRcpt,
    /// `250` at `RCPT TO`, read the whole `DATA`, then close the connection without a reply.
    DropAfterData,
    /// `250` at `RCPT TO`, read the whole `DATA`, then say nothing for this long, then close
    /// the connection without a reply.
    StallAfterData(Duration),
}

/// One completed `DATA` transfer: its envelope, its content and whether it was accepted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Received {
    /// The reverse path of `MAIL FROM`, angle brackets stripped (`""` for the null sender).
    pub mail_from: String,
    /// The recipients added to the transaction, in order, as the client spelled them,
    /// angle brackets stripped.
    pub rcpt_to: Vec<String>,
    /// The raw message as transferred: dot-unstuffed, every line with its line ending as
    /// sent (CRLF, or bare LF if the client sent that), the final `.` line not included.
    /// (lettre always sends CRLF before the final `.`, so a message that does not end in
    /// CRLF arrives with one added, and one that does arrives with an empty last line.)
    /// Bytes that are not UTF-8 are replaced with U+FFFD. Empty when bodies are not
    /// stored ([`SmtpServer::set_store_bodies`]).
    pub data: String,
    /// Whether the server answered the transfer with a 2xx reply.
    pub accepted: bool,
}

impl Received {
    /// The first header with this name (compared ASCII case-insensitively), unfolded
    /// (continuation lines joined with one space), value trimmed. Only the header block
    /// (up to the first empty line) is searched.
    pub fn header(&self, name: &str) -> Option<String> {
        let (head, _) = split_header_body(&self.data);
        let mut value: Option<String> = None;
        for line in head.lines() {
            let folded = line.starts_with([' ', '\t']);
            match value.as_mut() {
                Some(v) if folded => {
                    let more = line.trim();
                    if !more.is_empty() {
                        if !v.is_empty() {
                            v.push(' ');
                        }
                        v.push_str(more);
                    }
                }
                Some(_) => break,
                None if folded => {}
                None => {
                    if let Some((n, v)) = line.split_once(':')
                        && n.trim_end().eq_ignore_ascii_case(name)
                    {
                        value = Some(v.trim().to_owned());
                    }
                }
            }
        }
        value
    }

    /// The text after the header block (after the first empty line), as transferred;
    /// empty if there is no empty line.
    pub fn body(&self) -> &str {
        split_header_body(&self.data).1
    }
}

/// Splits at the first empty line: (header block with its line endings, text after the
/// empty line).
fn split_header_body(data: &str) -> (&str, &str) {
    let mut pos = 0;
    while pos < data.len() {
        let (line, next) = match data[pos..].find('\n') {
            Some(i) => (&data[pos..pos + i], pos + i + 1),
            None => (&data[pos..], data.len()),
        };
        if line.is_empty() || line == "\r" {
            return (&data[..pos], &data[next..]);
        }
        pos = next;
    }
    (data, "")
}

/// A running SMTP test server. Cloning gives another handle to the same server; the server
/// stops when the last handle is dropped (or on [`SmtpServer::shutdown`]).
#[derive(Clone)]
pub struct SmtpServer {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    addr: SocketAddr,
    control: Mutex<Control>,
    /// Serialises `pause`/`resume` (held across awaits; never touched by connections).
    lifecycle: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct Control {
    running: Option<Run>,
    /// Accept loops told to stop whose end nobody awaited yet.
    stopping: Vec<JoinHandle<()>>,
}

struct Run {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        let control = self.control.get_mut().unwrap_or_else(|e| e.into_inner());
        if let Some(run) = control.running.take() {
            run.stop.send_replace(true);
            run.task.abort();
        }
        for task in control.stopping.drain(..) {
            task.abort();
        }
    }
}

/// State shared by the handle and every connection. The mutex is never held across an await.
struct Shared {
    state: Mutex<State>,
    accepted: AtomicUsize,
    store_bodies: AtomicBool,
    accepted_changed: Notify,
}

struct State {
    scripts: HashMap<String, VecDeque<Step>>,
    /// Recipient domains answered with a reply at `RCPT TO` until a time (throttling).
    throttled: HashMap<String, (std::time::Instant, u16, String)>,
    default_step: Step,
    attempts: HashMap<String, usize>,
    deliveries: Vec<Received>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .expect("smtp test server state mutex poisoned")
    }

    /// Counts one delivery attempt to `rcpt` and consumes its next step.
    fn next_step(&self, rcpt: &str) -> Step {
        let key = normalize(rcpt);
        let mut state = self.lock();
        match state.attempts.get_mut(key.as_ref()) {
            Some(n) => *n += 1,
            None => {
                state.attempts.insert(key.clone().into_owned(), 1);
            }
        }
        let domain = key.rsplit_once('@').map(|(_, d)| d.to_owned());
        if let Some((until, code, text)) = domain.and_then(|d| state.throttled.get(&d).cloned())
            && std::time::Instant::now() < until
        {
            return Step::RcptReply(code, text);
        }
        if let Some(queue) = state.scripts.get_mut(key.as_ref())
            && let Some(step) = queue.pop_front()
        {
            if queue.is_empty() {
                state.scripts.remove(key.as_ref());
            }
            return step;
        }
        state.default_step.clone()
    }

    /// Records a completed transfer; it is visible before the client gets any reply.
    fn record(&self, received: Received) {
        let accepted = received.accepted;
        self.lock().deliveries.push(received);
        if accepted {
            self.accepted.fetch_add(1, Ordering::SeqCst);
            self.accepted_changed.notify_waiters();
        }
    }
}

/// Trims, strips one pair of angle brackets and lowercases (only when needed).
fn normalize(addr: &str) -> Cow<'_, str> {
    let addr = addr.trim();
    let addr = addr.strip_prefix('<').unwrap_or(addr);
    let addr = addr.strip_suffix('>').unwrap_or(addr).trim();
    if addr.chars().any(char::is_uppercase) {
        Cow::Owned(addr.to_lowercase())
    } else {
        Cow::Borrowed(addr)
    }
}

impl fmt::Debug for SmtpServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SmtpServer")
            .field("addr", &self.inner.addr)
            .field("accepted", &self.accepted_count())
            .finish_non_exhaustive()
    }
}

impl SmtpServer {
    /// Binds 127.0.0.1 on a free port and starts serving. Every recipient gets
    /// [`Step::Accept`] until scripted otherwise; bodies are stored.
    pub async fn start() -> io::Result<SmtpServer> {
        let listener = bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                scripts: HashMap::new(),
                throttled: HashMap::new(),
                default_step: Step::Accept,
                attempts: HashMap::new(),
                deliveries: Vec::new(),
            }),
            accepted: AtomicUsize::new(0),
            store_bodies: AtomicBool::new(true),
            accepted_changed: Notify::new(),
        });
        let run = spawn_accept_loop(listener, shared.clone());
        Ok(SmtpServer {
            inner: Arc::new(Inner {
                shared,
                addr,
                control: Mutex::new(Control {
                    running: Some(run),
                    stopping: Vec::new(),
                }),
                lifecycle: tokio::sync::Mutex::new(()),
            }),
        })
    }

    /// The port the server listens on; the same for the server's whole life, also across
    /// [`SmtpServer::pause`] and [`SmtpServer::resume`].
    pub fn port(&self) -> u16 {
        self.inner.addr.port()
    }

    /// `127.0.0.1:port()`.
    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// Queues steps for one recipient (address compared case-insensitively, surrounding
    /// angle brackets and whitespace stripped), after any steps still queued for it.
    /// Each delivery attempt to that recipient (each `RCPT TO` for it) consumes the next
    /// step; once its steps run out, the default step applies.
    pub fn script(&self, rcpt: &str, steps: impl IntoIterator<Item = Step>) {
        let key = normalize(rcpt).into_owned();
        let mut state = self.inner.shared.lock();
        let queue = state.scripts.entry(key).or_default();
        queue.extend(steps);
        if queue.is_empty() {
            let key = normalize(rcpt);
            state.scripts.remove(key.as_ref());
        }
    }

    /// Answers every `RCPT TO` to a recipient of `domain` (case-insensitive) with `code`
    /// and `text` for the next `lasting`, as a server that throttles a domain does;
    /// scripted steps of those recipients wait until it lifts.
    pub fn throttle_domain(&self, domain: &str, lasting: Duration, code: u16, text: &str) {
        let until = std::time::Instant::now() + lasting;
        self.inner.shared.lock().throttled.insert(
            domain.trim().to_ascii_lowercase(),
            (until, code, text.to_owned()),
        );
    }

    /// Sets the step for recipients with no script left (initially [`Step::Accept`]).
    /// Applies from the next `RCPT TO` on.
    pub fn set_default(&self, step: Step) {
        self.inner.shared.lock().default_step = step;
    }

    /// Stops accepting TCP connections: when this returns, the listener is closed and every
    /// open connection has been dropped, so clients get "connection refused". Scripts,
    /// counters and records are kept. Does nothing if already paused.
    pub async fn pause(&self) {
        let _serial = self.inner.lifecycle.lock().await;
        let tasks = {
            let mut control = self.control();
            if let Some(run) = control.running.take() {
                run.stop.send_replace(true);
                control.stopping.push(run.task);
            }
            std::mem::take(&mut control.stopping)
        };
        for task in tasks {
            let _ = task.await;
        }
    }

    /// Binds the same port again and serves as before (also after [`SmtpServer::shutdown`]).
    /// Does nothing if the server is running. Fails if the port was taken meanwhile.
    pub async fn resume(&self) -> io::Result<()> {
        let _serial = self.inner.lifecycle.lock().await;
        let tasks = {
            let mut control = self.control();
            if control.running.is_some() {
                return Ok(());
            }
            std::mem::take(&mut control.stopping)
        };
        for task in tasks {
            let _ = task.await;
        }
        let listener = bind(self.inner.addr)?;
        let run = spawn_accept_loop(listener, self.inner.shared.clone());
        self.control().running = Some(run);
        Ok(())
    }

    /// Every message the server accepted (a 2xx reply after `DATA`), in order of
    /// acceptance. A message is in here before its client gets the reply.
    pub fn messages(&self) -> Vec<Received> {
        let state = self.inner.shared.lock();
        state
            .deliveries
            .iter()
            .filter(|r| r.accepted)
            .cloned()
            .collect()
    }

    /// Every `DATA` transfer that completed (its final `.` line was read), accepted or
    /// not, in order of completion. Transfers cut off by a disconnect are not included.
    pub fn deliveries(&self) -> Vec<Received> {
        self.inner.shared.lock().deliveries.clone()
    }

    /// `messages().len()` without copying: one atomic load.
    pub fn accepted_count(&self) -> usize {
        self.inner.shared.accepted.load(Ordering::SeqCst)
    }

    /// Number of `RCPT TO` commands seen for this recipient (compared like in
    /// [`SmtpServer::script`]); each is one delivery attempt, whatever its step.
    pub fn attempts(&self, rcpt: &str) -> usize {
        let key = normalize(rcpt);
        let state = self.inner.shared.lock();
        state.attempts.get(key.as_ref()).copied().unwrap_or(0)
    }

    /// Waits until at least `n` messages were accepted or `timeout` passes; returns
    /// [`SmtpServer::messages`] either way.
    pub async fn wait_for_messages(&self, n: usize, timeout: Duration) -> Vec<Received> {
        let deadline = tokio::time::Instant::now().checked_add(timeout);
        loop {
            let notified = self.inner.shared.accepted_changed.notified();
            let mut notified = std::pin::pin!(notified);
            // Register before checking so an acceptance in between is not missed.
            notified.as_mut().enable();
            if self.accepted_count() >= n {
                break;
            }
            match deadline {
                Some(deadline) => {
                    if tokio::time::timeout_at(deadline, notified).await.is_err() {
                        break;
                    }
                }
                None => notified.await,
            }
        }
        self.messages()
    }

    /// Whether to keep message data (default true). When off, transfers are still
    /// recorded and counted, envelope included, but with an empty `data`. Applies to
    /// `DATA` commands that start after the call.
    pub fn set_store_bodies(&self, on: bool) {
        self.inner.shared.store_bodies.store(on, Ordering::SeqCst);
    }

    /// Stops the listener task and all connections, without waiting for them to end (use
    /// [`SmtpServer::pause`] to wait). Records stay readable.
    pub fn shutdown(&self) {
        let mut control = self.control();
        if let Some(run) = control.running.take() {
            run.stop.send_replace(true);
            control.stopping.push(run.task);
        }
    }

    fn control(&self) -> MutexGuard<'_, Control> {
        self.inner
            .control
            .lock()
            .expect("smtp test server control mutex poisoned")
    }
}

/// A listener with SO_REUSEADDR, so `resume` can bind the port again although connections
/// the server closed are still in TIME_WAIT.
fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

fn spawn_accept_loop(listener: TcpListener, shared: Arc<Shared>) -> Run {
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(accept_loop(listener, shared, stopped));
    Run { stop, task }
}

/// Accepts until told to stop, then closes the listener and aborts every connection task
/// and waits for them, so no socket of this server stays open.
async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let shared = shared.clone();
                    connections.spawn(async move {
                        // A network error only ends this connection.
                        let _ = serve(stream, shared).await;
                    });
                }
                Err(_) => tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await,
            },
            // Reap finished connections (a panic in one is ignored here too).
            Some(_) = connections.join_next() => {}
        }
    }
    drop(listener);
    connections.shutdown().await;
}

/// One connection, with the socket options an ordinary server uses (`TCP_NODELAY`, as
/// asyncio and most servers set it) and nothing chosen to hide a client's behaviour: no
/// `TCP_QUICKACK`, so a client that leaves Nagle's algorithm on waits for the delayed
/// ACK here as it would anywhere.
async fn serve(stream: TcpStream, shared: Arc<Shared>) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let (read, write) = stream.into_split();
    let mut conn = Connection {
        reader: BufReader::with_capacity(16 * 1024, read),
        writer: BufWriter::with_capacity(1024, write),
        shared,
        line: Vec::with_capacity(256),
        greeted: false,
        txn: Transaction::default(),
    };
    conn.run().await
}

/// What a step asks for once the transaction's `DATA` has been read.
enum AfterData {
    Reply(u16, String),
    Drop,
    Stall(Duration),
}

#[derive(Default)]
struct Transaction {
    mail_from: Option<String>,
    rcpt_to: Vec<String>,
    after_data: Option<AfterData>,
}

#[derive(Clone, Copy)]
enum Verb {
    Ehlo,
    Helo,
    Mail,
    Rcpt,
    Data,
    Rset,
    Noop,
    Vrfy,
    Quit,
    Empty,
    Other,
}

impl Verb {
    fn parse(verb: &str) -> Verb {
        const VERBS: [(&str, Verb); 9] = [
            ("EHLO", Verb::Ehlo),
            ("HELO", Verb::Helo),
            ("MAIL", Verb::Mail),
            ("RCPT", Verb::Rcpt),
            ("DATA", Verb::Data),
            ("RSET", Verb::Rset),
            ("NOOP", Verb::Noop),
            ("VRFY", Verb::Vrfy),
            ("QUIT", Verb::Quit),
        ];
        if verb.is_empty() {
            return Verb::Empty;
        }
        for (name, parsed) in VERBS {
            if verb.eq_ignore_ascii_case(name) {
                return parsed;
            }
        }
        Verb::Other
    }
}

enum Flow {
    Continue,
    Close,
}

enum Line {
    Complete,
    TooLong,
    Eof,
}

struct Connection {
    reader: BufReader<OwnedReadHalf>,
    writer: BufWriter<OwnedWriteHalf>,
    shared: Arc<Shared>,
    /// Reused for every line read on this connection.
    line: Vec<u8>,
    greeted: bool,
    txn: Transaction,
}

impl Connection {
    async fn run(&mut self) -> io::Result<()> {
        self.reply("220 localhost ESMTP test").await?;
        loop {
            match read_line_capped(&mut self.reader, &mut self.line, MAX_LINE_BYTES).await? {
                Line::Eof => return Ok(()),
                Line::TooLong => self.reply("500 5.5.2 line too long").await?,
                Line::Complete => {
                    let line = std::mem::take(&mut self.line);
                    let flow = self.command(&line).await;
                    self.line = line;
                    if let Flow::Close = flow? {
                        return Ok(());
                    }
                }
            }
        }
    }

    async fn command(&mut self, line: &[u8]) -> io::Result<Flow> {
        let Ok(line) = std::str::from_utf8(trim_line_end(line)) else {
            self.reply("500 5.5.2 command is not UTF-8").await?;
            return Ok(Flow::Continue);
        };
        let (verb, arg) = line.split_once(' ').unwrap_or((line, ""));
        match Verb::parse(verb) {
            Verb::Ehlo => {
                self.greeted = true;
                self.txn = Transaction::default();
                self.reply("250-localhost\r\n250-8BITMIME\r\n250 SMTPUTF8")
                    .await?;
            }
            Verb::Helo => {
                self.greeted = true;
                self.txn = Transaction::default();
                self.reply("250 localhost").await?;
            }
            Verb::Mail => self.mail(arg).await?,
            Verb::Rcpt => return self.rcpt(arg).await,
            Verb::Data => return self.data().await,
            Verb::Rset => {
                self.txn = Transaction::default();
                self.reply("250 2.0.0 OK").await?;
            }
            Verb::Noop => self.reply("250 2.0.0 OK").await?,
            Verb::Vrfy => {
                self.reply("252 2.5.2 cannot VRFY user, but will accept message")
                    .await?;
            }
            Verb::Quit => {
                self.reply("221 2.0.0 localhost closing connection").await?;
                return Ok(Flow::Close);
            }
            Verb::Empty => self.reply("500 5.5.2 syntax error").await?,
            Verb::Other => self.reply("502 5.5.1 command not implemented").await?,
        }
        Ok(Flow::Continue)
    }

    async fn mail(&mut self, arg: &str) -> io::Result<()> {
        if !self.greeted {
            return self.reply("503 5.5.1 send EHLO or HELO first").await;
        }
        if self.txn.mail_from.is_some() {
            return self.reply("503 5.5.1 nested MAIL command").await;
        }
        match strip_prefix_ci(arg.trim_start(), "FROM:").and_then(parse_path) {
            Some(from) => {
                self.txn.mail_from = Some(from.to_owned());
                self.reply("250 2.1.0 OK").await
            }
            None => self.reply("501 5.5.4 syntax: MAIL FROM:<address>").await,
        }
    }

    async fn rcpt(&mut self, arg: &str) -> io::Result<Flow> {
        if self.txn.mail_from.is_none() {
            self.reply("503 5.5.1 need MAIL before RCPT").await?;
            return Ok(Flow::Continue);
        }
        let Some(rcpt) = strip_prefix_ci(arg.trim_start(), "TO:").and_then(parse_path) else {
            self.reply("501 5.5.4 syntax: RCPT TO:<address>").await?;
            return Ok(Flow::Continue);
        };
        if rcpt.is_empty() {
            self.reply("501 5.1.3 empty recipient").await?;
            return Ok(Flow::Continue);
        }
        if self.txn.rcpt_to.len() >= MAX_RECIPIENTS {
            self.reply("452 4.5.3 too many recipients").await?;
            return Ok(Flow::Continue);
        }
        let after_data = match self.shared.next_step(rcpt) {
            Step::Accept => None,
            Step::RcptReply(code, text) => {
                if (200..300).contains(&code) {
                    self.txn.rcpt_to.push(rcpt.to_owned());
                }
                self.reply_code(code, &text).await?;
                return Ok(Flow::Continue);
            }
            Step::DropAtRcpt => return Ok(Flow::Close),
            Step::DataReply(code, text) => Some(AfterData::Reply(code, text)),
            Step::DropAfterData => Some(AfterData::Drop),
            Step::StallAfterData(d) => Some(AfterData::Stall(d)),
        };
        if self.txn.after_data.is_none() {
            self.txn.after_data = after_data;
        }
        self.txn.rcpt_to.push(rcpt.to_owned());
        self.reply("250 2.1.5 OK").await?;
        Ok(Flow::Continue)
    }

    async fn data(&mut self) -> io::Result<Flow> {
        if self.txn.mail_from.is_none() {
            self.reply("503 5.5.1 need MAIL before DATA").await?;
            return Ok(Flow::Continue);
        }
        if self.txn.rcpt_to.is_empty() {
            self.reply("554 5.5.1 no valid recipients").await?;
            return Ok(Flow::Continue);
        }
        self.reply("354 End data with <CR><LF>.<CR><LF>").await?;
        let outcome = self.read_data().await;
        let Some((body, too_big)) = outcome? else {
            // Client gone mid-transfer: nothing completed, nothing recorded.
            return Ok(Flow::Close);
        };

        let txn = std::mem::take(&mut self.txn);
        let data = match String::from_utf8(body) {
            Ok(data) => data,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        };
        let mut received = Received {
            mail_from: txn.mail_from.unwrap_or_default(),
            rcpt_to: txn.rcpt_to,
            data,
            accepted: false,
        };
        if too_big {
            self.shared.record(received);
            self.reply("552 5.3.4 message exceeds fixed maximum message size")
                .await?;
            return Ok(Flow::Continue);
        }
        match txn.after_data {
            None => {
                received.accepted = true;
                self.shared.record(received);
                self.reply("250 2.0.0 OK queued").await?;
                Ok(Flow::Continue)
            }
            Some(AfterData::Reply(code, text)) => {
                received.accepted = (200..300).contains(&code);
                self.shared.record(received);
                self.reply_code(code, &text).await?;
                Ok(Flow::Continue)
            }
            Some(AfterData::Drop) => {
                self.shared.record(received);
                Ok(Flow::Close)
            }
            Some(AfterData::Stall(duration)) => {
                self.shared.record(received);
                tokio::time::sleep(duration).await;
                Ok(Flow::Close)
            }
        }
    }

    /// Reads message data up to the final `.` line, undoing dot-stuffing. Returns the
    /// kept bytes (none when bodies are not stored) and whether the message was too big,
    /// or `None` if the client went away first.
    async fn read_data(&mut self) -> io::Result<Option<(Vec<u8>, bool)>> {
        let store = self.shared.store_bodies.load(Ordering::SeqCst);
        let mut body = Vec::new();
        let mut size = 0usize;
        let mut too_big = false;
        loop {
            match read_line_capped(&mut self.reader, &mut self.line, MAX_MESSAGE_BYTES + 3).await? {
                Line::Eof => return Ok(None),
                Line::TooLong => {
                    too_big = true;
                    continue;
                }
                Line::Complete => {}
            }
            if trim_line_end(&self.line) == b"." {
                break;
            }
            let unstuffed = self.line.strip_prefix(b".").unwrap_or(&self.line);
            size = size.saturating_add(unstuffed.len());
            if size > MAX_MESSAGE_BYTES {
                too_big = true;
            }
            if store && !too_big {
                body.extend_from_slice(unstuffed);
            }
        }
        if self.line.capacity() > 64 * 1024 {
            self.line = Vec::with_capacity(256);
        }
        Ok(Some((body, too_big)))
    }

    /// Writes one reply (its lines already separated by CRLF) and flushes once.
    async fn reply(&mut self, reply: &str) -> io::Result<()> {
        self.writer.write_all(reply.as_bytes()).await?;
        self.writer.write_all(b"\r\n").await?;
        self.writer.flush().await
    }

    /// Writes a scripted reply; `\n` in the text makes a multi-line reply.
    async fn reply_code(&mut self, code: u16, text: &str) -> io::Result<()> {
        let mut out = String::with_capacity(text.len() + 8);
        let mut rest = text;
        loop {
            let (line, more) = match rest.split_once('\n') {
                Some((line, more)) => (line, Some(more)),
                None => (rest, None),
            };
            let sep = if more.is_some() { '-' } else { ' ' };
            let line = line.strip_suffix('\r').unwrap_or(line);
            out.push_str(&format!("{code:03}{sep}{line}\r\n"));
            match more {
                Some(more) => rest = more,
                None => break,
            }
        }
        self.writer.write_all(out.as_bytes()).await?;
        self.writer.flush().await
    }
}

/// Reads one line (through its `\n`) into `line`. A line longer than `cap` bytes is
/// consumed but not kept (`TooLong`); a partial line at end of stream counts as `Eof`.
async fn read_line_capped<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    line: &mut Vec<u8>,
    cap: usize,
) -> io::Result<Line> {
    line.clear();
    let mut too_long = false;
    loop {
        let buf = reader.fill_buf().await?;
        if buf.is_empty() {
            return Ok(Line::Eof);
        }
        let (len, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (buf.len(), false),
        };
        if !too_long {
            if line.len() + len > cap {
                too_long = true;
                line.clear();
            } else {
                line.extend_from_slice(&buf[..len]);
            }
        }
        reader.consume(len);
        if done {
            return Ok(if too_long {
                Line::TooLong
            } else {
                Line::Complete
            });
        }
    }
}

fn trim_line_end(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

fn strip_prefix_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
}

/// `<addr> [params]` or `addr [params]` → `addr`; `None` on an unclosed bracket.
fn parse_path(s: &str) -> Option<&str> {
    let s = s.trim_start();
    match s.strip_prefix('<') {
        Some(rest) => rest.find('>').map(|end| rest[..end].trim()),
        None => Some(s.split_whitespace().next().unwrap_or("")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lettre::message::header::{ContentTransferEncoding, ContentType};
    use lettre::message::{Mailbox, Message};
    use lettre::transport::smtp::PoolConfig;
    use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};
    use tokio::io::AsyncReadExt;

    fn transport(server: &SmtpServer) -> AsyncSmtpTransport<Tokio1Executor> {
        AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous("127.0.0.1")
            .port(server.port())
            .timeout(Some(Duration::from_secs(10)))
            .build()
    }

    fn mailbox(addr: &str) -> Mailbox {
        addr.parse().expect("test address parses")
    }

    fn invite(to: &str, body: &str) -> Message {
        Message::builder()
            .from(mailbox("Invites <invites@example.com>"))
            .to(mailbox(to))
            .subject("Your interview invitation")
            .message_id(Some("<invite-1@example.com>".to_owned()))
            .header(ContentType::TEXT_PLAIN)
            .header(ContentTransferEncoding::SevenBit)
            .body(body.to_owned())
            .expect("test message builds")
    }

    /// A minimal raw SMTP client for protocol-level checks.
    struct Raw {
        reader: BufReader<OwnedReadHalf>,
        writer: OwnedWriteHalf,
    }

    impl Raw {
        async fn connect(server: &SmtpServer) -> Raw {
            let stream = TcpStream::connect(server.addr()).await.expect("connects");
            let (read, writer) = stream.into_split();
            let mut raw = Raw {
                reader: BufReader::new(read),
                writer,
            };
            assert!(raw.reply().await.starts_with("220 "));
            raw
        }

        async fn send(&mut self, bytes: &[u8]) {
            self.writer.write_all(bytes).await.expect("writes");
        }

        /// Sends one line with CRLF and returns the full reply.
        async fn cmd(&mut self, line: &str) -> String {
            self.send(format!("{line}\r\n").as_bytes()).await;
            self.reply().await
        }

        /// Reads a full (possibly multi-line) reply; "" at end of stream.
        async fn reply(&mut self) -> String {
            let mut all = String::new();
            loop {
                let mut line = String::new();
                let n = self.reader.read_line(&mut line).await.expect("reads");
                if n == 0 {
                    return all;
                }
                all.push_str(&line);
                if line.as_bytes().get(3) != Some(&b'-') {
                    return all;
                }
            }
        }
    }

    #[tokio::test]
    async fn an_accepted_message_is_recorded_with_its_envelope_headers_and_body() {
        let server = SmtpServer::start().await.expect("starts");
        let mailer = transport(&server);
        let response = mailer
            .send(invite(
                "Ada <ada@example.org>",
                "Hello Ada,\r\nplease pick a slot.\r\n",
            ))
            .await
            .expect("send succeeds");
        assert!(response.is_positive());

        let messages = server.messages();
        assert_eq!(messages.len(), 1);
        let m = &messages[0];
        assert!(m.accepted);
        assert_eq!(m.mail_from, "invites@example.com");
        assert_eq!(m.rcpt_to, vec!["ada@example.org".to_owned()]);
        assert_eq!(
            m.header("subject").as_deref(),
            Some("Your interview invitation")
        );
        assert_eq!(
            m.header("Message-ID").as_deref(),
            Some("<invite-1@example.com>")
        );
        assert_eq!(m.header("To").as_deref(), Some("Ada <ada@example.org>"));
        assert_eq!(m.header("X-Missing"), None);
        assert!(
            m.body()
                .starts_with("Hello Ada,\r\nplease pick a slot.\r\n")
        );
        assert_eq!(server.accepted_count(), 1);
        assert_eq!(server.deliveries().len(), 1);
        assert_eq!(server.attempts("ADA@example.org"), 1);
    }

    #[tokio::test]
    async fn a_rcpt_reply_550_gives_a_permanent_error_naming_5_1_1() {
        let server = SmtpServer::start().await.expect("starts");
        server.script(
            "<Gone@Example.org>",
            [Step::RcptReply(550, "5.1.1 user unknown".to_owned())],
        );
        let err = transport(&server)
            .send(invite("gone@example.org", "hi"))
            .await
            .expect_err("recipient is refused");
        assert!(err.is_permanent(), "{err}");
        assert!(err.to_string().contains("5.1.1"), "{err}");
        assert!(server.messages().is_empty());
        assert!(server.deliveries().is_empty());
        assert_eq!(server.attempts("gone@example.org"), 1);
    }

    #[tokio::test]
    async fn a_data_reply_451_twice_then_accept_lets_the_third_send_through() {
        let server = SmtpServer::start().await.expect("starts");
        let deferred = Step::DataReply(451, "4.3.0 try later".to_owned());
        server.script("bob@example.org", [deferred.clone(), deferred]);
        let mailer = transport(&server);
        let message = invite("bob@example.org", "retry me");

        for _ in 0..2 {
            let err = mailer.send(message.clone()).await.expect_err("deferred");
            assert!(err.is_transient(), "{err}");
            assert!(err.to_string().contains("4.3.0"), "{err}");
        }
        mailer.send(message).await.expect("third send succeeds");

        let deliveries = server.deliveries();
        assert_eq!(deliveries.len(), 3);
        assert_eq!(
            deliveries.iter().map(|d| d.accepted).collect::<Vec<_>>(),
            vec![false, false, true]
        );
        for d in &deliveries {
            assert_eq!(
                d.header("message-id").as_deref(),
                Some("<invite-1@example.com>")
            );
        }
        assert_eq!(server.messages().len(), 1);
        assert_eq!(server.attempts("bob@example.org"), 3);
    }

    #[tokio::test]
    async fn a_drop_at_rcpt_gives_an_error_that_is_neither_transient_nor_permanent() {
        let server = SmtpServer::start().await.expect("starts");
        server.script("carl@example.org", [Step::DropAtRcpt]);
        let mailer = transport(&server);
        let err = mailer
            .send(invite("carl@example.org", "hi"))
            .await
            .expect_err("connection dropped");
        assert!(!err.is_transient() && !err.is_permanent(), "{err}");
        assert!(server.deliveries().is_empty());
        // The script is used up: the next attempt is accepted.
        mailer
            .send(invite("carl@example.org", "hi"))
            .await
            .expect("second send succeeds");
        assert_eq!(server.attempts("carl@example.org"), 2);
    }

    #[tokio::test]
    async fn a_drop_after_data_records_the_delivery_but_does_not_accept_it() {
        let server = SmtpServer::start().await.expect("starts");
        server.script("dora@example.org", [Step::DropAfterData]);
        let err = transport(&server)
            .send(invite("dora@example.org", "hi"))
            .await
            .expect_err("no reply after data");
        assert!(!err.is_transient() && !err.is_permanent(), "{err}");
        let deliveries = server.deliveries();
        assert_eq!(deliveries.len(), 1);
        assert!(!deliveries[0].accepted);
        assert_eq!(server.accepted_count(), 0);
    }

    #[tokio::test]
    async fn a_stall_after_data_makes_a_send_with_a_timeout_time_out() {
        let server = SmtpServer::start().await.expect("starts");
        server.script(
            "eve@example.org",
            [Step::StallAfterData(Duration::from_secs(30))],
        );
        let mailer = transport(&server);
        let outcome = tokio::time::timeout(
            Duration::from_millis(300),
            mailer.send(invite("eve@example.org", "hi")),
        )
        .await;
        assert!(outcome.is_err(), "send should still be waiting");
        assert_eq!(server.deliveries().len(), 1);
        assert_eq!(server.accepted_count(), 0);
    }

    #[tokio::test]
    async fn pause_refuses_connections_and_resume_serves_again_on_the_same_port() {
        let server = SmtpServer::start().await.expect("starts");
        let port = server.port();
        let mailer = transport(&server);
        mailer
            .send(invite("fay@example.org", "before"))
            .await
            .expect("send before pause");

        server.pause().await;
        let err = mailer
            .send(invite("fay@example.org", "during"))
            .await
            .expect_err("paused server refuses");
        assert!(!err.is_transient() && !err.is_permanent(), "{err}");
        let refused = TcpStream::connect(server.addr())
            .await
            .expect_err("connect is refused");
        assert_eq!(refused.kind(), io::ErrorKind::ConnectionRefused);
        server.pause().await; // pausing twice is harmless

        server.resume().await.expect("resumes");
        server
            .resume()
            .await
            .expect("resuming a running server is a no-op");
        assert_eq!(server.port(), port);
        mailer
            .send(invite("fay@example.org", "after"))
            .await
            .expect("send after resume");
        assert_eq!(server.messages().len(), 2);
        assert_eq!(server.attempts("fay@example.org"), 2);
    }

    #[tokio::test]
    async fn pause_drops_connections_that_are_already_open() {
        let server = SmtpServer::start().await.expect("starts");
        let mut raw = Raw::connect(&server).await;
        assert!(raw.cmd("NOOP").await.starts_with("250"));
        server.pause().await;
        let mut buf = [0u8; 16];
        let n = raw.reader.read(&mut buf).await.unwrap_or(0);
        assert_eq!(n, 0, "the open connection is closed");
    }

    #[tokio::test]
    async fn a_pooled_transport_sends_200_messages_in_a_row() {
        let server = SmtpServer::start().await.expect("starts");
        let mailer = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous("127.0.0.1")
            .port(server.port())
            .pool_config(PoolConfig::new().max_size(4))
            .build();
        for i in 0..200 {
            mailer
                .send(invite(&format!("cand{i}@example.org"), "hello"))
                .await
                .expect("send succeeds");
        }
        assert_eq!(server.messages().len(), 200);
        assert_eq!(
            server
                .wait_for_messages(200, Duration::from_secs(1))
                .await
                .len(),
            200
        );
        assert_eq!(server.accepted_count(), 200);
        assert_eq!(server.messages()[199].rcpt_to, vec!["cand199@example.org"]);
    }

    #[tokio::test]
    async fn a_body_line_starting_with_a_dot_arrives_intact() {
        let server = SmtpServer::start().await.expect("starts");
        let body = "line one\r\n.hidden\r\n..two dots\r\n.\r\nlast";
        transport(&server)
            .send(invite("gil@example.org", body))
            .await
            .expect("send succeeds");
        let messages = server.messages();
        // lettre ends the data with CRLF before the final ".", which ends the last line.
        assert_eq!(messages[0].body(), format!("{body}\r\n"));
    }

    #[tokio::test]
    async fn a_utf8_body_sent_as_8bit_arrives_intact() {
        let server = SmtpServer::start().await.expect("starts");
        let body = "Grüße, Zoë — 面接の案内";
        let message = Message::builder()
            .from(mailbox("invites@example.com"))
            .to(mailbox("zoe@example.org"))
            .subject("Einladung")
            .header(ContentType::TEXT_PLAIN)
            .header(ContentTransferEncoding::EightBit)
            .body(body.to_owned())
            .expect("builds");
        transport(&server).send(message).await.expect("sent");
        assert_eq!(server.messages()[0].body(), format!("{body}\r\n"));
    }

    #[tokio::test]
    async fn the_first_non_accept_step_of_a_transaction_decides_after_data() {
        let server = SmtpServer::start().await.expect("starts");
        server.script("b@example.org", [Step::DataReply(452, "4.2.2 full".into())]);
        server.script("c@example.org", [Step::DataReply(554, "5.0.0 no".into())]);
        let message = Message::builder()
            .from(mailbox("invites@example.com"))
            .to(mailbox("a@example.org"))
            .to(mailbox("b@example.org"))
            .to(mailbox("c@example.org"))
            .subject("x")
            .body("x".to_owned())
            .expect("builds");
        let err = transport(&server)
            .send(message)
            .await
            .expect_err("deferred");
        assert!(err.is_transient(), "{err}");
        assert!(err.to_string().contains("4.2.2"), "{err}");
        let d = server.deliveries();
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].rcpt_to.len(), 3);
    }

    #[tokio::test]
    async fn set_default_applies_once_a_recipients_script_is_used_up() {
        let server = SmtpServer::start().await.expect("starts");
        server.set_default(Step::RcptReply(550, "5.7.1 default no".into()));
        server.script("hal@example.org", [Step::Accept]);
        let mailer = transport(&server);
        mailer
            .send(invite("hal@example.org", "1"))
            .await
            .expect("scripted accept");
        let err = mailer
            .send(invite("hal@example.org", "2"))
            .await
            .expect_err("default refuses");
        assert!(
            err.is_permanent() && err.to_string().contains("5.7.1"),
            "{err}"
        );
        assert_eq!(server.attempts("hal@example.org"), 2);
    }

    #[tokio::test]
    async fn commands_are_case_insensitive_and_bare_lf_lines_work() {
        let server = SmtpServer::start().await.expect("starts");
        let mut raw = Raw::connect(&server).await;
        let ehlo = raw.cmd("ehlo client").await;
        assert_eq!(ehlo, "250-localhost\r\n250-8BITMIME\r\n250 SMTPUTF8\r\n");
        raw.send(b"mail from:<x@example.com> BODY=8BITMIME\n").await;
        assert!(raw.reply().await.starts_with("250"));
        raw.send(b"Rcpt To: <Y@Example.org>\n").await;
        assert!(raw.reply().await.starts_with("250"));
        raw.send(b"data\n").await;
        assert!(raw.reply().await.starts_with("354"));
        raw.send(b"Subject: hi\n\n..dot\nbody\n.\n").await;
        assert!(raw.reply().await.starts_with("250"));
        assert!(raw.cmd("vrfy someone").await.starts_with("252"));
        assert!(raw.cmd("noop").await.starts_with("250"));
        assert!(raw.cmd("rset").await.starts_with("250"));
        assert!(raw.cmd("STARTTLS").await.starts_with("502"));
        assert!(raw.cmd("").await.starts_with("500"));
        assert!(raw.cmd("quit").await.starts_with("221"));
        assert_eq!(raw.reply().await, "", "closed after QUIT");

        let m = &server.messages()[0];
        assert_eq!(m.data, "Subject: hi\n\n.dot\nbody\n");
        assert_eq!(m.header("SUBJECT").as_deref(), Some("hi"));
        assert_eq!(m.body(), ".dot\nbody\n");
        assert_eq!(m.rcpt_to, vec!["Y@Example.org"]);
        assert_eq!(server.attempts("y@example.org"), 1);
    }

    #[tokio::test]
    async fn one_connection_carries_several_transactions_and_enforces_command_order() {
        let server = SmtpServer::start().await.expect("starts");
        let mut raw = Raw::connect(&server).await;
        assert!(raw.cmd("MAIL FROM:<a@x>").await.starts_with("503"));
        assert!(raw.cmd("HELO me").await.starts_with("250"));
        assert!(raw.cmd("RCPT TO:<b@x>").await.starts_with("503"));
        assert!(raw.cmd("MAIL FROM:<a@x>").await.starts_with("250"));
        assert!(raw.cmd("MAIL FROM:<a@x>").await.starts_with("503"));
        assert!(raw.cmd("DATA").await.starts_with("554"));
        assert!(raw.cmd("RCPT TO:b@x").await.starts_with("250"));
        assert!(raw.cmd("RCPT TO:<unclosed").await.starts_with("501"));
        for i in 0..3 {
            if i > 0 {
                assert!(raw.cmd("MAIL FROM:<>").await.starts_with("250"));
                assert!(
                    raw.cmd(&format!("RCPT TO:<r{i}@x>"))
                        .await
                        .starts_with("250")
                );
            }
            assert!(raw.cmd("DATA").await.starts_with("354"));
            assert!(
                raw.cmd(&format!("n: {i}\r\n\r\nbody\r\n."))
                    .await
                    .starts_with("250")
            );
        }
        let m = server.messages();
        assert_eq!(m.len(), 3);
        assert_eq!(m[0].mail_from, "a@x");
        assert_eq!(m[1].mail_from, "");
        assert_eq!(m[2].rcpt_to, vec!["r2@x"]);
        assert_eq!(m[2].header("n").as_deref(), Some("2"));
    }

    #[test]
    fn headers_are_unfolded_and_only_the_header_block_is_searched() {
        let r = Received {
            mail_from: String::new(),
            rcpt_to: Vec::new(),
            data: concat!(
                "Subject: a long\r\n  folded\r\n\tsubject \r\n",
                "X-A: 1\r\nx-a: 2\r\nX-E:\r\n e\r\n",
                "\r\nX-B: body\r\n",
            )
            .to_owned(),
            accepted: true,
        };
        assert_eq!(
            r.header("subject").as_deref(),
            Some("a long folded subject")
        );
        assert_eq!(r.header("X-A").as_deref(), Some("1"));
        assert_eq!(r.header("x-e").as_deref(), Some("e"));
        assert_eq!(r.header("X-B"), None);
        assert_eq!(r.body(), "X-B: body\r\n");
    }

    #[tokio::test]
    async fn a_too_long_command_line_gets_500_and_the_connection_keeps_working() {
        let server = SmtpServer::start().await.expect("starts");
        let mut raw = Raw::connect(&server).await;
        let long = format!("NOOP {}", "x".repeat(MAX_LINE_BYTES * 4));
        assert!(raw.cmd(&long).await.starts_with("500"));
        assert!(raw.cmd("NOOP").await.starts_with("250"));
    }

    #[tokio::test]
    async fn a_message_over_the_size_cap_gets_552_and_is_not_accepted() {
        let server = SmtpServer::start().await.expect("starts");
        let mut raw = Raw::connect(&server).await;
        raw.cmd("EHLO me").await;
        raw.cmd("MAIL FROM:<a@x>").await;
        raw.cmd("RCPT TO:<b@x>").await;
        assert!(raw.cmd("DATA").await.starts_with("354"));
        let line = format!("{}\r\n", "y".repeat(998));
        for _ in 0..(MAX_MESSAGE_BYTES / line.len() + 10) {
            raw.send(line.as_bytes()).await;
        }
        assert!(raw.cmd(".").await.starts_with("552"));
        let d = server.deliveries();
        assert_eq!(d.len(), 1);
        assert!(!d[0].accepted);
        assert!(d[0].data.len() <= MAX_MESSAGE_BYTES);
        assert_eq!(server.accepted_count(), 0);
        // The connection is still usable.
        assert!(raw.cmd("NOOP").await.starts_with("250"));
    }

    #[tokio::test]
    async fn a_client_vanishing_mid_data_records_nothing_and_the_server_keeps_serving() {
        let server = SmtpServer::start().await.expect("starts");
        {
            let mut raw = Raw::connect(&server).await;
            raw.cmd("HELO me").await;
            raw.cmd("MAIL FROM:<a@x>").await;
            raw.cmd("RCPT TO:<b@x>").await;
            raw.cmd("DATA").await;
            raw.send(b"Subject: cut\r\npartial").await;
        }
        transport(&server)
            .send(invite("b@x.org", "fine"))
            .await
            .expect("server still serves");
        assert_eq!(server.deliveries().len(), 1);
    }

    #[tokio::test]
    async fn with_bodies_off_transfers_are_counted_with_envelope_but_no_data() {
        let server = SmtpServer::start().await.expect("starts");
        server.set_store_bodies(false);
        transport(&server)
            .send(invite("ivy@example.org", "secret"))
            .await
            .expect("sent");
        let m = server.wait_for_messages(1, Duration::from_secs(5)).await;
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].data, "");
        assert_eq!(m[0].rcpt_to, vec!["ivy@example.org"]);
    }

    #[tokio::test]
    async fn wait_for_messages_wakes_on_acceptance_and_gives_up_at_the_timeout() {
        let server = SmtpServer::start().await.expect("starts");
        let waiting = tokio::spawn({
            let server = server.clone();
            async move { server.wait_for_messages(2, Duration::from_secs(10)).await }
        });
        let mailer = transport(&server);
        mailer
            .send(invite("j1@example.org", "1"))
            .await
            .expect("sent");
        mailer
            .send(invite("j2@example.org", "2"))
            .await
            .expect("sent");
        let got = waiting.await.expect("waiter ends");
        assert_eq!(got.len(), 2);

        let started = std::time::Instant::now();
        let got = server
            .wait_for_messages(3, Duration::from_millis(100))
            .await;
        assert_eq!(got.len(), 2);
        assert!(started.elapsed() >= Duration::from_millis(100));
    }

    #[tokio::test]
    async fn shutdown_stops_the_listener_and_records_stay_readable() {
        let server = SmtpServer::start().await.expect("starts");
        transport(&server)
            .send(invite("kim@example.org", "x"))
            .await
            .expect("sent");
        server.shutdown();
        server.pause().await; // waits for the shutdown to finish
        assert!(TcpStream::connect(server.addr()).await.is_err());
        assert_eq!(server.messages().len(), 1);
    }
}
