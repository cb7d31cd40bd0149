//! Socket drivers: UDP sockets (several on one port with SO_REUSEPORT, so
//! the kernel spreads clients over cores) and a TCP acceptor with one task
//! per connection. They read bytes, hand them to the protocol code and
//! write back what it answers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use floe_common::Shutdown;
use socket2::{Domain, Protocol, Socket, Type};
use stun::message::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::task::JoinHandle;

use crate::Config;
use crate::binding::{self, Outcome};
use crate::framing::{self, Frame, MAX_FRAME};
use crate::metrics::Metrics;

/// How long a TCP connection may stay silent before it is closed.
const TCP_IDLE: Duration = Duration::from_secs(300);
/// Attempts at finding a port free for both UDP and TCP when asked for 0.
const PORT_ATTEMPTS: usize = 20;

/// Scratch messages reused for every request a task handles.
struct Scratch {
    req: Message,
    out: Message,
}

impl Scratch {
    fn new() -> Self {
        Self {
            req: Message::new(),
            out: Message::new(),
        }
    }

    /// Handles one STUN message; returns the bytes to send back, if any.
    fn stun(
        &mut self,
        bytes: &[u8],
        from: SocketAddr,
        transport: &str,
        metrics: &Metrics,
    ) -> Option<&[u8]> {
        if !binding::looks_like_stun(bytes) {
            metrics.discarded.with_label_values(&["not_stun"]).inc();
            return None;
        }
        self.req.raw.clear();
        self.req.raw.extend_from_slice(bytes);
        if self.req.decode().is_err() {
            metrics.discarded.with_label_values(&["malformed"]).inc();
            return None;
        }
        match binding::handle(&self.req, from, &mut self.out) {
            Outcome::Respond => {
                let result = if self.out.typ.class == stun::message::CLASS_SUCCESS_RESPONSE {
                    "success"
                } else {
                    "error"
                };
                metrics
                    .stun_requests
                    .with_label_values(&["binding", transport, result])
                    .inc();
                Some(&self.out.raw)
            }
            Outcome::Discard => {
                metrics.discarded.with_label_values(&["unhandled"]).inc();
                None
            }
        }
    }
}

fn udp_socket(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    // Room for bursts: 4 MiB each way (the kernel caps it at rmem_max).
    let _ = socket.set_recv_buffer_size(4 << 20);
    let _ = socket.set_send_buffer_size(4 << 20);
    socket.bind(&addr.into())?;
    UdpSocket::from_std(socket.into())
}

fn tcp_listener(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

/// Binds UDP and TCP on one port (`config.listen`; a free one when its
/// port is 0).
fn bind_all(config: &Config) -> std::io::Result<(Vec<UdpSocket>, TcpListener)> {
    let sockets = match config.udp_sockets {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let mut last_err = None;
    for _ in 0..PORT_ATTEMPTS {
        let first = udp_socket(config.listen)?;
        let addr = first.local_addr()?;
        let tcp = match tcp_listener(addr) {
            Ok(l) => l,
            Err(e) if config.listen.port() == 0 => {
                last_err = Some(e);
                continue;
            }
            Err(e) => return Err(e),
        };
        let mut udp = vec![first];
        for _ in 1..sockets {
            udp.push(udp_socket(addr)?);
        }
        return Ok((udp, tcp));
    }
    Err(last_err.unwrap_or_else(|| std::io::Error::other("no free port")))
}

/// Binds the listeners and spawns their tasks.
pub(crate) fn bind_and_serve(
    config: &Config,
    metrics: Arc<Metrics>,
    shutdown: Shutdown,
) -> std::io::Result<(SocketAddr, Vec<JoinHandle<()>>)> {
    let (udp, tcp) = bind_all(config).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot bind STUN/TURN on {}: {e}", config.listen),
        )
    })?;
    let addr = tcp.local_addr()?;
    let mut tasks: Vec<JoinHandle<()>> = udp
        .into_iter()
        .map(|s| tokio::spawn(udp_loop(s, metrics.clone(), shutdown.clone())))
        .collect();
    tasks.push(tokio::spawn(tcp_accept(
        tcp,
        config.max_tcp_connections,
        metrics,
        shutdown,
    )));
    Ok((addr, tasks))
}

async fn udp_loop(socket: UdpSocket, metrics: Arc<Metrics>, shutdown: Shutdown) {
    let mut buf = vec![0u8; MAX_FRAME];
    let mut scratch = Scratch::new();
    loop {
        let (n, from) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = socket.recv_from(&mut buf) => match r {
                Ok(v) => v,
                Err(e) => {
                    // ICMP errors from earlier sends surface here; keep serving.
                    tracing::debug!(error = %e, "UDP receive error");
                    continue;
                }
            },
        };
        if let Some(resp) = scratch.stun(&buf[..n], from, "udp", &metrics)
            && let Err(e) = socket.send_to(resp, from).await
        {
            tracing::debug!(error = %e, %from, "UDP send failed");
        }
    }
}

async fn tcp_accept(
    listener: TcpListener,
    max_connections: usize,
    metrics: Arc<Metrics>,
    shutdown: Shutdown,
) {
    let open = Arc::new(AtomicUsize::new(0));
    loop {
        let (stream, from) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!(error = %e, "TCP accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        if open.fetch_add(1, Ordering::AcqRel) >= max_connections {
            open.fetch_sub(1, Ordering::AcqRel);
            metrics
                .discarded
                .with_label_values(&["tcp_connection_limit"])
                .inc();
            drop(stream);
            continue;
        }
        let _ = stream.set_nodelay(true);
        let (metrics, shutdown, open) = (metrics.clone(), shutdown.clone(), open.clone());
        tokio::spawn(async move {
            metrics.tcp_connections.inc();
            if let Err(e) = tcp_connection(stream, from, &metrics, &shutdown).await {
                tracing::debug!(error = %e, %from, "TCP connection closed");
            }
            metrics.tcp_connections.dec();
            open.fetch_sub(1, Ordering::AcqRel);
        });
    }
}

async fn tcp_connection(
    mut stream: TcpStream,
    from: SocketAddr,
    metrics: &Metrics,
    shutdown: &Shutdown,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; 2 * MAX_FRAME];
    let mut filled = 0;
    let mut scratch = Scratch::new();
    loop {
        let n = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            r = tokio::time::timeout(TCP_IDLE, stream.read(&mut buf[filled..])) => match r {
                Ok(r) => r?,
                Err(_) => return Ok(()),
            },
        };
        if n == 0 {
            return Ok(());
        }
        filled += n;
        let mut start = 0;
        loop {
            match framing::next_frame(&buf[start..filled], true) {
                Ok(Some(Frame::Stun { len })) => {
                    if let Some(resp) = scratch.stun(&buf[start..start + len], from, "tcp", metrics)
                    {
                        stream.write_all(resp).await?;
                    }
                    start += len;
                }
                Ok(Some(Frame::ChannelData { len, .. })) => {
                    // No allocation on this connection, so no channel.
                    metrics
                        .discarded
                        .with_label_values(&["no_allocation"])
                        .inc();
                    start += len;
                }
                Ok(None) => break,
                Err(e) => {
                    metrics.discarded.with_label_values(&["bad_framing"]).inc();
                    return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, e));
                }
            }
        }
        buf.copy_within(start..filled, 0);
        filled -= start;
    }
}
