//! A TCP proxy that injects network faults between a client under test and a real server.
//!
//! [`FaultProxy::start`] listens on `127.0.0.1:0` and forwards every accepted connection to the upstream
//! address. The test then breaks the path on command:
//! - [`FaultProxy::reset_all`]: every open connection is closed at once with a TCP reset (`SO_LINGER` 0);
//! - [`FaultProxy::refuse_new`]: new connections are reset as soon as they are accepted;
//! - [`FaultProxy::stall`]: no byte moves on any connection until [`FaultProxy::heal`] (the bytes wait in
//!   the kernel buffers and flow again afterwards);
//! - [`FaultProxy::freeze_open`]: every connection open now goes silent for ever: bytes are read and
//!   swallowed in both directions and the sockets stay open, while connections made afterwards work: a
//!   half-open link, as a failover or a NAT table drop leaves it;
//! - [`FaultProxy::delay`]: each chunk is held for that long before it is forwarded.
//!
//! [`FaultProxy::record_sent`] keeps every byte the client sends on connections opened afterwards, so
//! that a test can read what went on the wire ([`FaultProxy::sent`]).
//!
//! Dropping the proxy aborts its tasks, which closes every connection it holds.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};
use tokio::task::AbortHandle;

/// What applies to every connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Mode {
    stalled: bool,
    delay: Duration,
}

/// The handle of one proxied connection.
struct Link {
    /// Swallow every byte from now on.
    frozen: AtomicBool,
    /// What the client sent, when the proxy recorded as the connection opened.
    sent: Option<Mutex<Vec<u8>>>,
    /// Close both sockets with a reset.
    reset: Notify,
}

#[derive(Default)]
struct Links {
    next: u64,
    open: HashMap<u64, (Arc<Link>, AbortHandle)>,
}

struct Shared {
    upstream: SocketAddr,
    refuse: AtomicBool,
    record: AtomicBool,
    /// The recorded connections, open or closed, in the order they were accepted.
    recorded: Mutex<Vec<Arc<Link>>>,
    mode: watch::Sender<Mode>,
    links: Mutex<Links>,
    accepted: AtomicU64,
}

impl Shared {
    fn links(&self) -> std::sync::MutexGuard<'_, Links> {
        self.links.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A fault-injecting TCP proxy in front of one upstream server (see the module documentation).
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: AbortHandle,
}

impl std::fmt::Debug for FaultProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultProxy")
            .field("addr", &self.addr)
            .field("upstream", &self.shared.upstream)
            .finish_non_exhaustive()
    }
}

impl FaultProxy {
    /// Starts a proxy on `127.0.0.1:0` forwarding to `upstream` (`"127.0.0.1:6379"` or a `SocketAddr`).
    ///
    /// # Panics
    /// When `upstream` does not resolve or nothing can listen on 127.0.0.1 (a test set-up error).
    pub async fn start(upstream: impl tokio::net::ToSocketAddrs) -> FaultProxy {
        let upstream = tokio::net::lookup_host(upstream)
            .await
            .expect("resolve the upstream address")
            .next()
            .expect("the upstream address resolves");
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("listen on 127.0.0.1");
        let addr = listener.local_addr().expect("the proxy's address");
        let shared = Arc::new(Shared {
            upstream,
            refuse: AtomicBool::new(false),
            record: AtomicBool::new(false),
            recorded: Mutex::new(Vec::new()),
            mode: watch::Sender::new(Mode::default()),
            links: Mutex::new(Links::default()),
            accepted: AtomicU64::new(0),
        });
        let accept = tokio::spawn(accept_loop(listener, shared.clone())).abort_handle();
        FaultProxy {
            addr,
            shared,
            accept,
        }
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `redis://<proxy address>`.
    pub fn redis_url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    /// How many connections are open through the proxy now.
    pub fn open_connections(&self) -> usize {
        self.shared.links().open.len()
    }

    /// How many connections the proxy has accepted since it started (refused ones included).
    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Closes every open connection at once, with a TCP reset on both sides; returns how many.
    pub fn reset_all(&self) -> usize {
        let links = std::mem::take(&mut self.shared.links().open);
        for (link, _) in links.values() {
            link.reset.notify_one();
        }
        links.len()
    }

    /// Resets new connections as soon as they are accepted (`true`), or forwards them again (`false`).
    pub fn refuse_new(&self, refuse: bool) {
        self.shared.refuse.store(refuse, Ordering::SeqCst);
    }

    /// Stops forwarding bytes on every connection, old and new, until [`FaultProxy::heal`].
    pub fn stall(&self) {
        self.shared.mode.send_modify(|mode| mode.stalled = true);
    }

    /// Makes every connection open now silent for ever (bytes swallowed both ways, sockets left open);
    /// connections made afterwards work. Returns how many connections were frozen.
    pub fn freeze_open(&self) -> usize {
        let links = self.shared.links();
        for (link, _) in links.open.values() {
            link.frozen.store(true, Ordering::SeqCst);
        }
        links.open.len()
    }

    /// Holds every chunk for `delay` before forwarding it (`Duration::ZERO`: no delay).
    pub fn delay(&self, delay: Duration) {
        self.shared.mode.send_modify(|mode| mode.delay = delay);
    }

    /// Records every byte clients send on the connections opened from now on (from their first byte).
    pub fn record_sent(&self) {
        self.shared.record.store(true, Ordering::SeqCst);
    }

    /// What the client sent on each recorded connection, in the order they were opened.
    pub fn sent(&self) -> Vec<Vec<u8>> {
        let recorded = self
            .shared
            .recorded
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        recorded
            .iter()
            .filter_map(|link| link.sent.as_ref())
            .map(|sent| sent.lock().unwrap_or_else(|p| p.into_inner()).clone())
            .collect()
    }

    /// Ends a stall, a delay and refusing. Frozen connections stay frozen (they are gone for good, as
    /// after a failover); new connections work.
    pub fn heal(&self) {
        self.shared.refuse.store(false, Ordering::SeqCst);
        self.shared.mode.send_replace(Mode::default());
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
        for (_, task) in self.shared.links().open.values() {
            task.abort();
        }
    }
}

/// Closes `stream` with a reset instead of an orderly FIN.
fn reset(stream: &TcpStream) {
    // `SO_LINGER` 0 makes the close send RST at once; it never blocks (the deprecation is about non-zero
    // lingers).
    #[allow(deprecated)]
    let _ = stream.set_linger(Some(Duration::ZERO));
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        shared.accepted.fetch_add(1, Ordering::SeqCst);
        if shared.refuse.load(Ordering::SeqCst) {
            reset(&client);
            drop(client);
            continue;
        }
        let record = shared.record.load(Ordering::SeqCst);
        let link = Arc::new(Link {
            frozen: AtomicBool::new(false),
            sent: record.then(|| Mutex::new(Vec::new())),
            reset: Notify::new(),
        });
        if record {
            let mut recorded = shared.recorded.lock().unwrap_or_else(|p| p.into_inner());
            recorded.push(link.clone());
        }
        let mut links = shared.links();
        let id = links.next;
        links.next += 1;
        let task = tokio::spawn(forward(client, link.clone(), shared.clone(), id));
        links.open.insert(id, (link, task.abort_handle()));
    }
}

/// Carries one connection's bytes both ways, as the proxy's mode and the link's state say.
async fn forward(client: TcpStream, link: Arc<Link>, shared: Arc<Shared>, id: u64) {
    let Ok(upstream) = TcpStream::connect(shared.upstream).await else {
        reset(&client);
        shared.links().open.remove(&id);
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let mut mode = shared.mode.subscribe();
    let (mut from_client, mut buf_client) = (vec![0u8; 64 * 1024], 0usize);
    let (mut from_server, mut buf_server) = (vec![0u8; 64 * 1024], 0usize);
    let (mut client_r, mut client_w) = client.into_split();
    let (mut server_r, mut server_w) = upstream.into_split();
    loop {
        let current = *mode.borrow_and_update();
        if current.stalled {
            tokio::select! {
                _ = mode.changed() => continue,
                _ = link.reset.notified() => break,
            }
        }
        tokio::select! {
            _ = mode.changed() => continue,
            _ = link.reset.notified() => break,
            read = client_r.read(&mut from_client) => match read {
                Ok(n) if n > 0 => buf_client = n,
                _ => { shared.links().open.remove(&id); return; }
            },
            read = server_r.read(&mut from_server) => match read {
                Ok(n) if n > 0 => buf_server = n,
                _ => { shared.links().open.remove(&id); return; }
            },
        }
        if link.frozen.load(Ordering::SeqCst) {
            // Swallowed: the other side never hears of it.
            buf_client = 0;
            buf_server = 0;
            continue;
        }
        if !current.delay.is_zero() {
            tokio::time::sleep(current.delay).await;
        }
        if buf_client > 0 {
            if let Some(sent) = &link.sent {
                let mut sent = sent.lock().unwrap_or_else(|p| p.into_inner());
                sent.extend_from_slice(&from_client[..buf_client]);
            }
            if server_w
                .write_all(&from_client[..buf_client])
                .await
                .is_err()
            {
                break;
            }
            buf_client = 0;
        }
        if buf_server > 0 {
            if client_w
                .write_all(&from_server[..buf_server])
                .await
                .is_err()
            {
                break;
            }
            buf_server = 0;
        }
    }
    // Reset (or a write failed): close both sides with RST.
    shared.links().open.remove(&id);
    if let (Ok(client), Ok(server)) = (client_r.reunite(client_w), server_r.reunite(server_w)) {
        reset(&client);
        reset(&server);
    }
}
