//! Batched UDP I/O: `recvmmsg` takes up to [`BATCH`] datagrams per system
//! call and `sendmmsg` sends what was gathered the same way. Under load
//! that turns two system calls and often a sleep and a wake-up per
//! datagram into two per batch; when idle a batch is one datagram and
//! nothing changes. Used by TURN's shard drivers (on any socket, without
//! an async runtime: [`RecvBatch::try_recv`], [`send_each`]) and by the
//! load tester's Binding flood, which must cost less than the server it
//! measures.

use std::cell::RefCell;
use std::io::{IoSlice, IoSliceMut};
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{
    ControlMessage, MsgFlags, MultiHeaders, SockaddrStorage, recvmmsg, sendmmsg, sendmsg, sendto,
};
use tokio::io::Interest;
use tokio::net::UdpSocket;

/// Datagrams per system call.
pub const BATCH: usize = 32;

thread_local! {
    // The kernel's message headers hold raw pointers, so they are not
    // `Send` and cannot live in a task; they are only borrowed inside one
    // system call, so one set per thread serves many sockets. Never one
    // set for both directions: a send points the headers' address fields
    // at its own (then freed) destinations, and a receive writes through
    // them. Receives keep one set per address family, because the kernel
    // leaves the last source's length as the room for the next.
    static RECV: [RefCell<MultiHeaders<SockaddrStorage>>; 2] = [(); 2].map(|()| {
        RefCell::new(MultiHeaders::preallocate(BATCH, None))
    });
    static SEND: RefCell<MultiHeaders<SockaddrStorage>> =
        RefCell::new(MultiHeaders::preallocate(BATCH, None));
}

fn socket_addr(s: &SockaddrStorage) -> Option<SocketAddr> {
    s.as_sockaddr_in()
        .map(|a| SocketAddr::from(*a))
        .or_else(|| s.as_sockaddr_in6().map(|a| SocketAddr::from(*a)))
}

fn io_error(e: nix::errno::Errno) -> std::io::Error {
    std::io::Error::from_raw_os_error(e as i32)
}

/// Room for [`BATCH`] datagrams and where each came from.
pub struct RecvBatch {
    bufs: Vec<u8>,
    slot: usize,
    /// Bytes left free at the start of each slot.
    headroom: usize,
    /// Index into `RECV`: 0 for IPv4 sockets, 1 for IPv6.
    family: usize,
    got: Vec<(usize, Option<SocketAddr>)>,
}

impl RecvBatch {
    /// For a socket bound to an address of `local`'s family, taking
    /// datagrams of up to `slot` bytes (longer ones are cut; with slots
    /// of 64 KiB the memory is only touched where datagrams land).
    pub fn new(local: SocketAddr, slot: usize) -> Self {
        Self {
            bufs: vec![0; BATCH * slot],
            slot,
            headroom: 0,
            family: usize::from(local.is_ipv6()),
            got: Vec::with_capacity(BATCH),
        }
    }

    /// Leaves `bytes` free at the start of every slot (room to put a header
    /// in front of a datagram without copying it).
    pub fn with_headroom(mut self, bytes: usize) -> Self {
        self.headroom = bytes.min(self.slot);
        self
    }

    /// Waits until the socket is readable, then takes what is queued (up
    /// to [`BATCH`] datagrams); returns how many.
    pub async fn recv(&mut self, socket: &UdpSocket) -> std::io::Result<usize> {
        socket
            .async_io(Interest::READABLE, || self.try_recv(socket))
            .await
    }

    /// Takes what is queued without waiting (WouldBlock when nothing is);
    /// inside a tokio socket's `async_io`, or on a socket of any other
    /// event loop.
    pub fn try_recv(&mut self, socket: &impl AsRawFd) -> std::io::Result<usize> {
        let headroom = self.headroom;
        self.got.clear();
        RECV.with(|recv| {
            let headers = &mut *recv[self.family].borrow_mut();
            // On the stack: a receive is made per readiness event, often
            // for one datagram, and should not cost an allocation.
            let mut chunks = self.bufs.chunks_mut(self.slot);
            let mut slices: [[IoSliceMut<'_>; 1]; BATCH] = std::array::from_fn(|_| {
                let b = chunks.next().unwrap_or_default();
                let skip = headroom.min(b.len());
                [IoSliceMut::new(&mut b[skip..])]
            });
            let results = recvmmsg(
                socket.as_raw_fd(),
                headers,
                slices.iter_mut(),
                MsgFlags::MSG_DONTWAIT,
                None,
            )
            .map_err(io_error)?;
            for r in results {
                self.got
                    .push((r.bytes, r.address.as_ref().and_then(socket_addr)));
            }
            Ok(self.got.len())
        })
    }

    /// Datagram `i` of the last receive: its buffer slot (the datagram
    /// follows the headroom, `len` bytes), its length and its source
    /// (`None` only if the kernel gave none, which UDP does not).
    pub fn get_mut(&mut self, i: usize) -> (&mut [u8], usize, Option<SocketAddr>) {
        let (len, from) = self.got[i];
        (
            &mut self.bufs[i * self.slot..(i + 1) * self.slot],
            len,
            from,
        )
    }
}

/// Answers gathered while a received batch is handled, sent together.
#[derive(Default)]
pub struct SendBatch {
    bytes: Vec<u8>,
    spans: Vec<(usize, usize, SocketAddr)>,
}

impl SendBatch {
    pub fn push(&mut self, bytes: &[u8], to: SocketAddr) {
        let start = self.bytes.len();
        self.bytes.extend_from_slice(bytes);
        self.spans.push((start, self.bytes.len(), to));
    }

    /// Sends everything gathered: whole batches while the kernel takes
    /// them, one at a time (waiting for room) when it does not. A
    /// datagram the kernel refuses outright is skipped and counted.
    pub async fn flush(&mut self, socket: &UdpSocket) -> usize {
        let mut refused = 0;
        let mut at = 0;
        while at < self.spans.len() {
            let end = (at + BATCH).min(self.spans.len());
            match self.try_send(socket, at, end) {
                Ok(n) => at += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    let (start, stop, to) = self.spans[at];
                    if socket.send_to(&self.bytes[start..stop], to).await.is_err() {
                        refused += 1;
                    }
                    at += 1;
                }
                Err(_) => {
                    // The first datagram of the batch was refused
                    // (sendmmsg reports an error only when none went).
                    refused += 1;
                    at += 1;
                }
            }
        }
        self.bytes.clear();
        self.spans.clear();
        refused
    }

    fn try_send(&self, socket: &UdpSocket, from: usize, to: usize) -> std::io::Result<usize> {
        send_some(
            socket,
            self.spans[from..to]
                .iter()
                .map(|(s, e, a)| (&self.bytes[*s..*e], *a)),
        )
    }
}

/// One `sendmmsg` of at most [`BATCH`] datagrams, without waiting; how
/// many the kernel took (an error only when it took none).
fn send_some<'a>(
    socket: &impl AsRawFd,
    datagrams: impl Iterator<Item = (&'a [u8], SocketAddr)>,
) -> std::io::Result<usize> {
    let mut datagrams = datagrams.take(BATCH).peekable();
    let Some((first, to)) = datagrams.next() else {
        return Ok(0);
    };
    if datagrams.peek().is_none() {
        // One datagram (a relay socket's usual lot): sendto does less.
        let to = SockaddrStorage::from(to);
        return sendto(socket.as_raw_fd(), first, &to, MsgFlags::MSG_DONTWAIT)
            .map(|_| 1)
            .map_err(io_error);
    }
    let (slices, addrs): (Vec<[IoSlice<'_>; 1]>, Vec<Option<SockaddrStorage>>) =
        std::iter::once((first, to))
            .chain(datagrams)
            .map(|(b, a)| ([IoSlice::new(b)], Some(SockaddrStorage::from(a))))
            .unzip();
    SEND.with_borrow_mut(|headers| {
        let sent = sendmmsg(
            socket.as_raw_fd(),
            headers,
            &slices,
            addrs,
            [],
            MsgFlags::MSG_DONTWAIT,
        )
        .map_err(io_error)?
        .count();
        Ok(sent)
    })
}

/// Longest wait for room when a socket's send buffer is full.
const SEND_WAIT_MS: u16 = 10;

/// Sends `datagrams` (`(bytes, destination)`) from `socket`, a batch per
/// system call, outside any async runtime; `sent(i, ok)` learns the fate
/// of each, in order. A full send buffer is waited on once, up to 10 ms;
/// if it stays full the rest are refused, and a datagram the kernel
/// refuses outright is skipped.
pub fn send_each<S: AsRawFd + AsFd>(
    socket: &S,
    datagrams: &[(&[u8], SocketAddr)],
    mut sent: impl FnMut(usize, bool),
) {
    let (mut at, mut waited) = (0, false);
    while at < datagrams.len() {
        match send_some(socket, datagrams[at..].iter().copied()) {
            Ok(n) => {
                (at..at + n).for_each(|i| sent(i, true));
                at += n;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && !waited => {
                waited = true;
                let mut fds = [PollFd::new(socket.as_fd(), PollFlags::POLLOUT)];
                let _ = poll(&mut fds, PollTimeout::from(SEND_WAIT_MS));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                (at..datagrams.len()).for_each(|i| sent(i, false));
                return;
            }
            Err(_) => {
                sent(at, false);
                at += 1;
            }
        }
    }
}

/// Most segments the kernel takes in one segmented send.
pub const MAX_SEGMENTS: usize = 64;

/// Sends `data` to the connected peer of `socket` as datagrams of
/// `segment` bytes each (the last may be shorter) in one system call,
/// with UDP segmentation offload (Linux 4.18+); waits for room. Errors
/// when the kernel cannot segment, so callers can fall back to
/// [`SendBatch`].
pub async fn send_segmented(socket: &UdpSocket, data: &[u8], segment: u16) -> std::io::Result<()> {
    if data.len().div_ceil(usize::from(segment.max(1))) > MAX_SEGMENTS {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "more segments than one send may carry",
        ));
    }
    socket
        .async_io(Interest::WRITABLE, || {
            sendmsg_segmented(socket, &[IoSlice::new(data)], segment, None)
        })
        .await
}

/// One `sendmsg` of `iov` cut into datagrams of `segment` bytes
/// (`UDP_SEGMENT`), to `to` or the connected peer, without waiting.
fn sendmsg_segmented(
    socket: &impl AsRawFd,
    iov: &[IoSlice<'_>],
    segment: u16,
    to: Option<SocketAddr>,
) -> std::io::Result<()> {
    sendmsg(
        socket.as_raw_fd(),
        iov,
        &[ControlMessage::UdpGsoSegments(&segment)],
        MsgFlags::MSG_DONTWAIT,
        to.map(SockaddrStorage::from).as_ref(),
    )
    .map(|_| ())
    .map_err(io_error)
}

/// Sends `parts` (each `segment` bytes but the last, which may be
/// shorter) to `to` as that many datagrams in one system call, with UDP
/// segmentation offload, without waiting: the kernel builds and routes
/// one packet and splits it at the end. Errors (`InvalidInput` for more
/// than [`MAX_SEGMENTS`] parts) leave the caller to send them one by one.
pub fn send_segments(
    socket: &impl AsRawFd,
    parts: &[&[u8]],
    segment: u16,
    to: SocketAddr,
) -> std::io::Result<()> {
    if parts.len() > MAX_SEGMENTS {
        return Err(std::io::ErrorKind::InvalidInput.into());
    }
    let iov: Vec<IoSlice<'_>> = parts.iter().map(|p| IoSlice::new(p)).collect();
    sendmsg_segmented(socket, &iov, segment, Some(to))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn batches_go_out_and_come_back_whole() {
        // IPv4 then IPv6 on one thread: sends and receives of both
        // families share this thread's headers.
        round_trip("127.0.0.1:0").await;
        round_trip("[::1]:0").await;
        round_trip("127.0.0.1:0").await;
    }

    #[tokio::test]
    async fn a_segmented_send_arrives_as_separate_datagrams() {
        let server = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let client = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        client
            .connect(server.local_addr().expect("addr"))
            .await
            .expect("connect");
        let data: Vec<u8> = (0..(20 * 10 + 7)).map(|i| (i / 20) as u8).collect();
        send_segmented(&client, &data, 20)
            .await
            .expect("segmented send");
        // With headroom: each datagram lands after four free bytes.
        let mut batch = RecvBatch::new(server.local_addr().expect("addr"), 64).with_headroom(4);
        let mut seen = Vec::new();
        while seen.len() < 11 {
            let n = tokio::time::timeout(std::time::Duration::from_secs(5), batch.recv(&server))
                .await
                .expect("datagrams arrive")
                .expect("recv");
            for i in 0..n {
                let (buf, len, _) = batch.get_mut(i);
                seen.push(buf[4..4 + len].to_vec());
            }
        }
        assert_eq!(seen.concat(), data);
        assert!(seen[..10].iter().all(|d| d.len() == 20));
        assert_eq!(seen[10].len(), 7);
        assert!(
            send_segmented(&client, &vec![0; 20 * (MAX_SEGMENTS + 1)], 20)
                .await
                .is_err()
        );
    }

    /// A receiving and a sending plain socket on loopback; receives wait
    /// at most 5 s.
    fn std_pair() -> (std::net::UdpSocket, std::net::UdpSocket) {
        let server = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let client = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        server
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .expect("timeout");
        (server, client)
    }

    /// The synchronous sender: more than a batch, each one's fate told in
    /// order, all received.
    #[test]
    fn send_each_reports_every_datagram() {
        let (server, client) = std_pair();
        let to = server.local_addr().expect("addr");
        let payloads: Vec<Vec<u8>> = (0..BATCH * 2 + 3).map(|i| vec![i as u8; 1 + i]).collect();
        let datagrams: Vec<(&[u8], SocketAddr)> =
            payloads.iter().map(|p| (p.as_slice(), to)).collect();
        let mut fates = Vec::new();
        send_each(&client, &datagrams, |i, ok| fates.push((i, ok)));
        let expected: Vec<(usize, bool)> = (0..payloads.len()).map(|i| (i, true)).collect();
        assert_eq!(fates, expected);
        let mut buf = [0u8; 256];
        for p in &payloads {
            let n = server.recv(&mut buf).expect("recv");
            assert_eq!(&buf[..n], p.as_slice());
        }
    }

    /// Parts sent as one segmented send arrive as separate datagrams.
    #[test]
    fn segments_to_an_address_arrive_apart() {
        let (server, client) = std_pair();
        let parts: Vec<Vec<u8>> = (0..5u8)
            .map(|i| vec![i; if i == 4 { 3 } else { 10 }])
            .collect();
        let slices: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
        send_segments(&client, &slices, 10, server.local_addr().expect("addr"))
            .expect("segmented send");
        let mut buf = [0u8; 64];
        for p in &parts {
            let n = server.recv(&mut buf).expect("recv");
            assert_eq!(&buf[..n], p.as_slice());
        }
    }

    async fn round_trip(bind: &str) {
        let server = UdpSocket::bind(bind).await.expect("bind");
        let client = UdpSocket::bind(bind).await.expect("bind");
        let (saddr, caddr) = (
            server.local_addr().expect("addr"),
            client.local_addr().expect("addr"),
        );
        // More than a batch, of different sizes, one of them large.
        let sizes: Vec<usize> = (0..BATCH + 5)
            .map(|i| if i == 3 { 60_000 } else { 1 + i * 37 })
            .collect();
        let mut out = SendBatch::default();
        for (i, n) in sizes.iter().enumerate() {
            out.push(&vec![i as u8; *n], saddr);
        }
        assert_eq!(out.flush(&client).await, 0);
        let mut batch = RecvBatch::new(saddr, 65_536);
        let mut seen = 0;
        while seen < sizes.len() {
            let n = tokio::time::timeout(std::time::Duration::from_secs(5), batch.recv(&server))
                .await
                .expect("datagrams arrive")
                .expect("recv");
            assert!(n <= BATCH);
            for i in 0..n {
                let (buf, len, from) = batch.get_mut(i);
                assert_eq!((len, from), (sizes[seen], Some(caddr)), "datagram {seen}");
                assert!(buf[..len].iter().all(|b| *b == seen as u8));
                seen += 1;
            }
        }
    }
}
