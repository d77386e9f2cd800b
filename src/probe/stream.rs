//! The byte stream under a mail session: TCP, then optionally TLS, with a meter that bounds
//! what the server may send.
//!
//! Neither async-imap nor our POP3 reader can be trusted to bound memory on their own
//! (async-imap grows its buffer to whatever size a literal announces, up to 512 MiB), so
//! every byte the protocol code reads passes through [`Meter`] first:
//!
//! * no line may be longer than [`Limits::max_line`] (an endless line);
//! * the whole test may not read more than [`Limits::max_total`] (an endless stream of short
//!   lines, a never-ending literal);
//! * for IMAP, a literal announced as `{N}` at the end of a line may not be larger than what
//!   is left of the budget, so the parser never allocates for it (its data, which may hold
//!   anything, is then counted as data, not lines);
//! * for IMAP, at most [`MAX_RESPONSE_LINES`] lines may go to the parser without it
//!   completing a response.
//!
//! For IMAP the wire hands the parser one whole line at a time. async-imap parses its whole
//! buffer again after every read that leaves a response incomplete, and its parser lets
//! some responses run on over line ends (an unknown FETCH item up to a `)` that never
//! comes), so a server sending small pieces could keep a test parsing the same bytes over
//! and over until its timeout. A response can only end at a line end, so holding back a
//! partial line never delays one; with whole lines, and at most [`MAX_RESPONSE_LINES`] of
//! them per response, the parser reads each response at most that many times.
//!
//! A breach is an `io::Error` whose inner error is a [`LimitExceeded`]; the bytes of the read
//! that breached are discarded. The meter also remembers the last few lines it saw, so that
//! failure messages can quote the server's exact words (async-imap only hands back a
//! `Debug` rendering of them).

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use secrecy::zeroize::{Zeroize, Zeroizing};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::redact::Redactor;

/// Longest line the server may send (bytes, including CRLF).
pub(crate) const MAX_LINE: usize = 64 * 1024;
/// Most bytes one test may read from the server (after TLS decryption).
pub(crate) const MAX_TOTAL: u64 = 1024 * 1024;
/// Most lines (literal data aside) the IMAP parser may get without completing a response
/// (see [`Wire::response_read`]). A response is one line, or a few with literals; each line
/// may make the parser read the response again.
pub(crate) const MAX_RESPONSE_LINES: usize = 256;

/// How many recent lines are remembered for quoting, and how much of each.
const TAIL_LINES: usize = 8;
const TAIL_WIDTH: usize = 1024;
/// How many of the raw bytes the server sends first are kept (to tell plaintext from TLS).
const SNIFF_BYTES: usize = 160;

/// The bounds applied to one test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Limits {
    pub max_line: usize,
    pub max_total: u64,
    /// IMAP: refuse literals (`{N}` at a line's end) larger than what is left of the budget,
    /// count their data as data, and hand the reader one whole line at a time.
    pub imap_literals: bool,
}

impl Limits {
    pub fn for_imap() -> Limits {
        Limits {
            max_line: MAX_LINE,
            max_total: MAX_TOTAL,
            imap_literals: true,
        }
    }

    pub fn for_pop3() -> Limits {
        Limits {
            max_line: MAX_LINE,
            max_total: MAX_TOTAL,
            imap_literals: false,
        }
    }
}

/// A bound the server broke.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum LimitExceeded {
    #[error("a line longer than {limit} bytes")]
    Line { limit: usize },
    #[error("more than {limit} bytes in one test")]
    Total { limit: u64 },
    #[error(
        "an IMAP literal of {size} bytes, more than the {left} bytes left of the test's budget"
    )]
    Literal { size: u64, left: u64 },
    #[error("more than {limit} lines without a complete IMAP response")]
    ResponseLines { limit: usize },
}

/// The [`LimitExceeded`] inside an `io::Error`, if that is what it is.
pub(crate) fn limit_exceeded(err: &io::Error) -> Option<&LimitExceeded> {
    err.get_ref()?.downcast_ref::<LimitExceeded>()
}

/// Counts and inspects the bytes read; pure, so it is tested without sockets.
#[derive(Debug)]
pub(crate) struct Meter {
    limits: Limits,
    total: u64,
    line_len: usize,
    tail: Tail,
    lines: VecDeque<Vec<u8>>,
    partial: Vec<u8>,
    /// IMAP: bytes of a literal's data still to come.
    literal_left: u64,
    /// Just after each line end in the chunk last admitted.
    ends: Vec<usize>,
    /// Takes the login's secret out of the lines it gives for quoting.
    redactor: Redactor,
}

impl Meter {
    pub fn new(limits: Limits) -> Meter {
        Meter {
            limits,
            total: 0,
            line_len: 0,
            tail: Tail::Other,
            lines: VecDeque::with_capacity(TAIL_LINES),
            partial: Vec::new(),
            literal_left: 0,
            ends: Vec::new(),
            redactor: Redactor::default(),
        }
    }

    /// The same, its recent lines without the secret `redactor` knows.
    pub fn redacting(self, redactor: Redactor) -> Meter {
        Meter { redactor, ..self }
    }

    /// What takes the login's secret out of the server's words.
    pub fn redactor(&self) -> &Redactor {
        &self.redactor
    }

    /// Accounts for `chunk`, just read; an error means the chunk must not be used.
    pub fn admit(&mut self, chunk: &[u8]) -> Result<(), LimitExceeded> {
        let total = self.total + chunk.len() as u64;
        if total > self.limits.max_total {
            self.total = total;
            return Err(LimitExceeded::Total {
                limit: self.limits.max_total,
            });
        }
        self.total = total;
        self.ends.clear();
        let mut i = 0;
        while i < chunk.len() {
            if self.literal_left > 0 {
                let n = self.literal_left.min((chunk.len() - i) as u64);
                self.literal_left -= n;
                i += n as usize;
                continue;
            }
            let byte = chunk[i];
            i += 1;
            self.line_len += 1;
            if self.line_len > self.limits.max_line {
                return Err(LimitExceeded::Line {
                    limit: self.limits.max_line,
                });
            }
            if byte == b'\n' {
                if self.limits.imap_literals
                    && let Tail::Closed { size, .. } = self.tail
                {
                    let left = self.limits.max_total - self.total;
                    if size > left {
                        return Err(LimitExceeded::Literal { size, left });
                    }
                    self.literal_left = size;
                }
                self.end_line();
                self.ends.push(i);
            } else {
                self.tail = self.tail.then(byte);
                // Kept past the width by the longest form of the secret, so that one
                // straddling the cut is found whole (and taken out) before the cut.
                if self.partial.len() < TAIL_WIDTH + self.redactor.longest() {
                    self.partial.push(byte);
                }
            }
        }
        Ok(())
    }

    fn end_line(&mut self) {
        self.line_len = 0;
        self.tail = Tail::Other;
        let mut line = std::mem::take(&mut self.partial);
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        if self.lines.len() == TAIL_LINES {
            self.lines.pop_front();
        }
        self.lines.push_back(line);
    }

    /// Forgets the remembered lines (called when a step begins).
    pub fn mark(&mut self) {
        self.lines.clear();
    }

    /// The lines seen since the last [`mark`](Self::mark), oldest first, then the line
    /// still being received (if any). Each is decoded lossily, the secret taken out, and
    /// cut to 1 KiB.
    pub fn recent(&self) -> Vec<String> {
        let shown = |line: &[u8]| {
            let mut text = self
                .redactor
                .apply(String::from_utf8_lossy(line).into_owned());
            if text.len() > TAIL_WIDTH {
                let mut at = TAIL_WIDTH;
                while !text.is_char_boundary(at) {
                    at -= 1;
                }
                text.truncate(at);
            }
            text
        };
        let mut out: Vec<String> = self.lines.iter().map(|l| shown(l)).collect();
        if !self.partial.is_empty() {
            out.push(shown(&self.partial));
        }
        out
    }

    /// Bytes read so far in this test.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Just after each line end in the chunk last admitted (for IMAP, a line break inside a
    /// literal's data is none).
    pub fn ends(&self) -> &[usize] {
        &self.ends
    }
}

/// How the line so far ends, as far as announcing an IMAP literal goes: `{123}` or
/// `{123+}`, then CRLF. Followed byte by byte, so that no number of digits (leading zeros
/// included) hides an announcement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tail {
    Other,
    /// `{`, then digits (their value so far, saturating) and maybe a `+`.
    Open {
        size: u64,
        digits: bool,
        plus: bool,
    },
    /// `{N}` or `{N+}`, maybe with a CR after it.
    Closed {
        size: u64,
        cr: bool,
    },
}

impl Tail {
    fn then(self, byte: u8) -> Tail {
        match (self, byte) {
            (_, b'{') => Tail::Open {
                size: 0,
                digits: false,
                plus: false,
            },
            (
                Tail::Open {
                    size, plus: false, ..
                },
                b'0'..=b'9',
            ) => Tail::Open {
                // More digits than fit in a u64 is still a literal, and a huge one.
                size: size
                    .saturating_mul(10)
                    .saturating_add(u64::from(byte - b'0')),
                digits: true,
                plus: false,
            },
            (
                Tail::Open {
                    size,
                    digits: true,
                    plus: false,
                },
                b'+',
            ) => Tail::Open {
                size,
                digits: true,
                plus: true,
            },
            (
                Tail::Open {
                    size, digits: true, ..
                },
                b'}',
            ) => Tail::Closed { size, cr: false },
            (Tail::Closed { size, cr: false }, b'\r') => Tail::Closed { size, cr: true },
            _ => Tail::Other,
        }
    }
}

/// The raw TCP connection, remembering the first bytes the server sent since the last
/// [`reset_sniff`](Self::reset_sniff): when a TLS handshake fails, these tell whether the
/// server answered in plaintext (a STARTTLS or plaintext port).
pub(crate) struct Tcp {
    stream: TcpStream,
    sniffed: Vec<u8>,
}

impl Tcp {
    pub fn new(stream: TcpStream) -> Tcp {
        Tcp {
            stream,
            sniffed: Vec::new(),
        }
    }

    pub fn reset_sniff(&mut self) {
        self.sniffed.clear();
    }

    pub fn sniffed(&self) -> &[u8] {
        &self.sniffed
    }
}

impl fmt::Debug for Tcp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tcp")
            .field("peer", &self.stream.peer_addr().ok())
            .finish()
    }
}

impl AsyncRead for Tcp {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let start = buf.filled().len();
        ready!(Pin::new(&mut self.stream).poll_read(cx, buf))?;
        let room = SNIFF_BYTES.saturating_sub(self.sniffed.len());
        let new = &buf.filled()[start..];
        let take = new.len().min(room);
        self.sniffed.extend_from_slice(&new[..take]);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Tcp {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    // rustls hands over several records at once (ChangeCipherSpec and Finished, say):
    // passed on whole, they leave in one system call and one segment.
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// A byte stream that stands in for a server: the fuzz targets' scripted server.
pub(crate) trait Duplex: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Duplex for T {}

enum Transport {
    Plain(Tcp),
    Tls(Box<TlsStream<Tcp>>),
    /// In memory, without TLS and without a STARTTLS upgrade (`into_plain` is `None`).
    Memory(Box<dyn Duplex>),
}

impl Transport {
    fn io(&mut self) -> Pin<&mut dyn Duplex> {
        match self {
            Transport::Plain(tcp) => Pin::new(tcp),
            Transport::Tls(tls) => Pin::new(tls.as_mut()),
            Transport::Memory(mem) => Pin::new(mem.as_mut()),
        }
    }
}

/// Most bytes written that wait for a flush.
const WRITE_BUFFER: usize = 8 * 1024;

/// What a mail session reads from and writes to: plaintext or TLS, always metered.
///
/// Writes wait in a buffer until a flush. async-imap writes a command in four pieces (tag,
/// space, command, CRLF); passed on one by one, each became a TLS record and a TCP segment
/// of its own, four system calls and four wake-ups of the server for one command.
pub(crate) struct Wire {
    transport: Transport,
    meter: Meter,
    /// IMAP: bytes read, from stream offset `held_from` on; those before `passed_on` are
    /// passed on (and dropped at the next read from the transport).
    held: Vec<u8>,
    held_from: usize,
    passed_on: usize,
    /// IMAP: the stream offsets just after the line ends in `held`.
    line_ends: VecDeque<usize>,
    /// IMAP: lines passed on since the parser last completed a response.
    unanswered: usize,
    /// IMAP: part of a line is passed on, the rest not yet.
    mid_line: bool,
    server_closed: bool,
    /// Written, not yet passed on; may hold credentials, so zeroed when passed on.
    out: Zeroizing<Vec<u8>>,
    /// How much of `out` is already passed on.
    out_sent: usize,
}

impl Wire {
    fn over(transport: Transport, meter: Meter) -> Wire {
        Wire {
            transport,
            meter,
            held: Vec::new(),
            held_from: 0,
            passed_on: 0,
            line_ends: VecDeque::new(),
            unanswered: 0,
            mid_line: false,
            server_closed: false,
            out: Zeroizing::new(Vec::new()),
            out_sent: 0,
        }
    }

    pub fn plain(tcp: Tcp, meter: Meter) -> Wire {
        Wire::over(Transport::Plain(tcp), meter)
    }

    pub fn tls(tls: TlsStream<Tcp>, meter: Meter) -> Wire {
        Wire::over(Transport::Tls(Box::new(tls)), meter)
    }

    /// A session over an in-memory stream, still metered (for the fuzz targets).
    pub fn memory(stream: impl Duplex + 'static, meter: Meter) -> Wire {
        Wire::over(Transport::Memory(Box::new(stream)), meter)
    }

    pub fn is_tls(&self) -> bool {
        matches!(self.transport, Transport::Tls(_))
    }

    pub fn meter(&self) -> &Meter {
        &self.meter
    }

    pub fn mark(&mut self) {
        self.meter.mark();
    }

    /// IMAP: the parser completed a response (see [`MAX_RESPONSE_LINES`]).
    pub fn response_read(&mut self) {
        self.unanswered = 0;
    }

    /// IMAP: bytes read from the server and not passed on yet. After the tagged OK to
    /// STARTTLS there must be none: bytes sent before the handshake but read as if
    /// after it would let a man in the middle inject responses (CVE-2011-0411).
    pub fn unread(&self) -> usize {
        self.held_from + self.held.len() - self.passed_on
    }

    /// Takes the plaintext connection apart for a STARTTLS upgrade. `None` if it is
    /// already TLS (or in memory).
    pub fn into_plain(self) -> Option<(Tcp, Meter)> {
        debug_assert!(self.out.is_empty(), "STARTTLS with unflushed writes");
        match self.transport {
            Transport::Plain(tcp) => Some((tcp, self.meter)),
            Transport::Tls(_) | Transport::Memory(_) => None,
        }
    }
}

impl fmt::Debug for Wire {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Wire")
            .field("tls", &self.is_tls())
            .field("bytes_read", &self.meter.total())
            .finish()
    }
}

impl Wire {
    /// Reads from the transport and meters what came.
    fn poll_metered(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let start = buf.filled().len();
        ready!(self.transport.io().poll_read(cx, buf))?;
        if let Err(limit) = self.meter.admit(&buf.filled()[start..]) {
            buf.set_filled(start);
            return Poll::Ready(Err(io::Error::other(limit)));
        }
        Poll::Ready(Ok(()))
    }

    /// Passes on one whole line at a time (and, once the server has closed, what is left).
    fn poll_lines(&mut self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        loop {
            let upto = match self.line_ends.front() {
                Some(&end) => end,
                None if self.server_closed => self.held_from + self.held.len(),
                None => {
                    let mut chunk = [0u8; 4096];
                    let mut read = ReadBuf::new(&mut chunk);
                    ready!(self.poll_metered(cx, &mut read))?;
                    self.held.drain(..self.passed_on - self.held_from);
                    self.held_from = self.passed_on;
                    let start = self.held_from + self.held.len();
                    self.line_ends
                        .extend(self.meter.ends().iter().map(|&end| start + end));
                    self.held.extend_from_slice(read.filled());
                    self.server_closed = read.filled().is_empty();
                    continue;
                }
            };
            if !self.mid_line && !self.line_ends.is_empty() && self.unanswered >= MAX_RESPONSE_LINES
            {
                return Poll::Ready(Err(io::Error::other(LimitExceeded::ResponseLines {
                    limit: MAX_RESPONSE_LINES,
                })));
            }
            let n = (upto - self.passed_on).min(buf.remaining());
            let from = self.passed_on - self.held_from;
            buf.put_slice(&self.held[from..from + n]);
            self.passed_on += n;
            self.mid_line = self.line_ends.front() != Some(&self.passed_on);
            if !self.mid_line {
                self.line_ends.pop_front();
                self.unanswered += 1;
            }
            return Poll::Ready(Ok(()));
        }
    }
}

impl AsyncRead for Wire {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.meter.limits.imap_literals {
            this.poll_lines(cx, buf)
        } else {
            this.poll_metered(cx, buf)
        }
    }
}

impl Wire {
    /// Passes the buffered writes on.
    fn poll_pass_on(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.out_sent < self.out.len() {
            let n = ready!(
                self.transport
                    .io()
                    .poll_write(cx, &self.out[self.out_sent..])
            )?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.out_sent += n;
        }
        self.out.zeroize();
        self.out_sent = 0;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Wire {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.out.len() + buf.len() > WRITE_BUFFER {
            ready!(this.poll_pass_on(cx))?;
            if buf.len() > WRITE_BUFFER {
                return this.transport.io().poll_write(cx, buf);
            }
        }
        this.out.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_pass_on(cx))?;
        self.transport.io().poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_pass_on(cx))?;
        self.transport.io().poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_line: usize, max_total: u64) -> Limits {
        Limits {
            max_line,
            max_total,
            imap_literals: true,
        }
    }

    #[test]
    fn counts_total_bytes() {
        let mut m = Meter::new(limits(100, 10));
        m.admit(b"12345\r\n").unwrap();
        assert_eq!(m.total(), 7);
        assert_eq!(
            m.admit(b"abcd\r\n"),
            Err(LimitExceeded::Total { limit: 10 })
        );
    }

    #[test]
    fn bounds_line_length_across_chunks() {
        let mut m = Meter::new(limits(8, 1000));
        m.admit(b"1234").unwrap();
        m.admit(b"567\n").unwrap(); // 8 bytes with the LF: allowed
        m.admit(b"12345").unwrap();
        assert_eq!(m.admit(b"6789"), Err(LimitExceeded::Line { limit: 8 }));
    }

    #[test]
    fn refuses_literals_larger_than_the_budget() {
        let mut m = Meter::new(limits(1000, 100));
        m.admit(b"* OK {10}\r\n").unwrap();
        let mut m = Meter::new(limits(1000, 100));
        assert_eq!(
            m.admit(b"* OK {99999999999999999999999}\r\n"),
            Err(LimitExceeded::Literal {
                size: u64::MAX,
                left: 100 - 32
            })
        );
        let mut m = Meter::new(limits(1000, 400));
        m.admit(b"* 1 FETCH (BODY {5").unwrap();
        assert_eq!(
            m.admit(b"00+}\r\n"),
            Err(LimitExceeded::Literal {
                size: 500,
                left: 400 - 24
            })
        );
        // POP3 has no literals.
        let mut m = Meter::new(Limits {
            imap_literals: false,
            ..limits(1000, 100)
        });
        m.admit(b"+OK {5000}\r\n").unwrap();
    }

    /// The size of a literal announced at the end of `line` (without its LF).
    fn literal_at_end(line: &[u8]) -> Option<u64> {
        match line.iter().fold(Tail::Other, |tail, &b| tail.then(b)) {
            Tail::Closed { size, .. } => Some(size),
            _ => None,
        }
    }

    #[test]
    fn literal_detection() {
        assert_eq!(literal_at_end(b"* OK {12}\r"), Some(12));
        assert_eq!(literal_at_end(b"* OK {12+}"), Some(12));
        assert_eq!(literal_at_end(b"* OK {}"), None);
        assert_eq!(literal_at_end(b"* OK {a1}"), None);
        assert_eq!(literal_at_end(b"* OK done"), None);
        assert_eq!(literal_at_end(b"* OK {1{2}"), Some(2));
        assert_eq!(literal_at_end(b"* OK {1+2}"), None);
        assert_eq!(literal_at_end(b"* OK {+}"), None);
        assert_eq!(literal_at_end(b"* OK {12}\r\r"), None);
        assert_eq!(literal_at_end(b"* OK {12} "), None);
        assert_eq!(literal_at_end(b"{99999999999999999999999}"), Some(u64::MAX));
        // Found while writing the line_reader fuzz target's oracle: only the last 32 bytes
        // of a line were looked at, so leading zeros hid the size from the meter, and
        // async-imap (which reads the number whole) allocated it: 500 MB for this line.
        let zeros = format!("* STATUS {{{}500000000}}\r", "0".repeat(40));
        assert_eq!(literal_at_end(zeros.as_bytes()), Some(500_000_000));
        let mut m = Meter::new(Limits::for_imap());
        assert_eq!(
            m.admit(format!("{zeros}\n").as_bytes()),
            Err(LimitExceeded::Literal {
                size: 500_000_000,
                left: MAX_TOTAL - zeros.len() as u64 - 1
            })
        );
    }

    #[test]
    fn remembers_recent_lines_since_mark() {
        let mut m = Meter::new(limits(10_000, 100_000));
        m.admit(b"* OK hello\r\n").unwrap();
        m.mark();
        m.admit(b"* CAPABILITY IMAP4rev1\r\nA1 OK done\r\nA2 N")
            .unwrap();
        assert_eq!(
            m.recent(),
            vec!["* CAPABILITY IMAP4rev1", "A1 OK done", "A2 N"]
        );
        for i in 0..20 {
            m.admit(format!("line {i}\r\n").as_bytes()).unwrap();
        }
        let recent = m.recent();
        assert_eq!(recent.len(), TAIL_LINES);
        assert_eq!(recent.last().unwrap(), "line 19");
        let long = vec![b'x'; 5000];
        m.admit(&long).unwrap();
        assert_eq!(m.recent().last().unwrap().len(), TAIL_WIDTH);
    }

    #[test]
    fn literal_data_is_not_lines() {
        let mut m = Meter::new(limits(1000, 100_000));
        m.admit(b"* 1 FETCH (BODY[] {12}\r\n").unwrap();
        assert_eq!(m.ends(), [24]);
        // A literal's data may hold anything, line breaks and long lines included.
        m.admit(b"\n\n\n\n\n").unwrap();
        assert_eq!(m.ends(), [0usize; 0]);
        m.admit(b"\n\n\n\n\n\n\n)\r\n* OK\r\n* B").unwrap();
        assert_eq!(m.ends(), [10, 16]);
        assert_eq!(m.recent(), ["* 1 FETCH (BODY[] {12}", ")", "* OK", "* B"]);
        let mut long = b"* 1 FETCH (BODY[] {2000}\r\n".to_vec();
        long.extend_from_slice(&[b'y'; 2000]);
        long.extend_from_slice(b")\r\n");
        m.admit(&long).unwrap();
        assert_eq!(m.ends(), [long.len() - 2000 - 3, long.len()]);
        // POP3 has no literals.
        let mut m = Meter::new(Limits::for_pop3());
        m.admit(b"+OK {3}\r\n\n\n").unwrap();
        assert_eq!(m.ends(), [9, 10, 11]);
    }

    /// IMAP's reader gets whole lines however small the pieces the server sends; POP3's
    /// (which finds line ends itself) gets the pieces.
    #[tokio::test]
    async fn imap_reads_whole_lines() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut buf = [0u8; 64];
        let (client, mut server) = tokio::io::duplex(1);
        tokio::spawn(async move { server.write_all(b"* OK ready\r\n* CAPA").await });
        let mut wire = Wire::memory(client, Meter::new(Limits::for_imap()));
        let n = wire.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"* OK ready\r\n");
        wire.response_read();
        // Once the server has closed, the rest, then the end.
        let n = wire.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"* CAPA");
        assert_eq!(wire.read(&mut buf).await.unwrap(), 0);
        assert_eq!(wire.meter().recent(), ["* OK ready", "* CAPA"]);

        let (client, mut server) = tokio::io::duplex(1);
        tokio::spawn(async move { server.write_all(b"+OK ready\r\n").await });
        let mut wire = Wire::memory(client, Meter::new(Limits::for_pop3()));
        assert_eq!(wire.read(&mut buf).await.unwrap(), 1);
    }

    /// One line at a time, and no more than MAX_RESPONSE_LINES of them unless the parser
    /// says it completed a response.
    #[tokio::test]
    async fn imap_lines_without_a_response_are_bounded() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut buf = [0u8; 64];
        let (client, mut server) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move { server.write_all(&b"* 1 FETCH (X (\r\n".repeat(600)).await });
        let mut wire = Wire::memory(client, Meter::new(Limits::for_imap()));
        for _ in 0..300 {
            assert_eq!(wire.read(&mut buf).await.unwrap(), 16);
            wire.response_read();
        }
        for _ in 0..MAX_RESPONSE_LINES {
            let n = wire.read(&mut buf).await.unwrap();
            assert_eq!(&buf[..n], b"* 1 FETCH (X (\r\n");
        }
        let err = wire.read(&mut buf).await.unwrap_err();
        assert_eq!(
            limit_exceeded(&err),
            Some(&LimitExceeded::ResponseLines {
                limit: MAX_RESPONSE_LINES
            })
        );
    }
}
