//! The byte stream under a mail session: TCP, then optionally TLS, with a meter that bounds
//! what the server may send.
//!
//! Neither async-imap nor our POP3 reader can be trusted to bound memory on their own
//! (async-imap grows its buffer to whatever size a literal announces, up to 512 MiB), so
//! every byte the protocol code reads passes through [`Meter`] first:
//!
//! * no line may be longer than [`Limits::max_line`] (an endless line, or a literal's data
//!   without line breaks);
//! * the whole test may not read more than [`Limits::max_total`] (an endless stream of short
//!   lines, a never-ending literal);
//! * for IMAP, a literal announced as `{N}` at the end of a line may not be larger than what
//!   is left of the budget, so the parser never allocates for it.
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

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// Longest line the server may send (bytes, including CRLF).
pub(crate) const MAX_LINE: usize = 64 * 1024;
/// Most bytes one test may read from the server (after TLS decryption).
pub(crate) const MAX_TOTAL: u64 = 1024 * 1024;

/// How many recent lines are remembered for quoting, and how much of each.
const TAIL_LINES: usize = 8;
const TAIL_WIDTH: usize = 1024;
/// How many bytes at the end of the current line are kept to spot a literal's `{N}`.
const LINE_END_WINDOW: usize = 32;
/// How many of the raw bytes the server sends first are kept (to tell plaintext from TLS).
const SNIFF_BYTES: usize = 160;

/// The bounds applied to one test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Limits {
    pub max_line: usize,
    pub max_total: u64,
    /// Refuse IMAP literals (`{N}` at a line's end) larger than what is left of the budget.
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
    line_end: VecDeque<u8>,
    lines: VecDeque<Vec<u8>>,
    partial: Vec<u8>,
}

impl Meter {
    pub fn new(limits: Limits) -> Meter {
        Meter {
            limits,
            total: 0,
            line_len: 0,
            line_end: VecDeque::with_capacity(LINE_END_WINDOW),
            lines: VecDeque::with_capacity(TAIL_LINES),
            partial: Vec::new(),
        }
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
        for &byte in chunk {
            self.line_len += 1;
            if self.line_len > self.limits.max_line {
                return Err(LimitExceeded::Line {
                    limit: self.limits.max_line,
                });
            }
            if byte == b'\n' {
                if self.limits.imap_literals
                    && let Some(size) = literal_at_end(self.line_end.make_contiguous())
                {
                    let left = self.limits.max_total - self.total;
                    if size > left {
                        return Err(LimitExceeded::Literal { size, left });
                    }
                }
                self.end_line();
            } else {
                if self.line_end.len() == LINE_END_WINDOW {
                    self.line_end.pop_front();
                }
                self.line_end.push_back(byte);
                if self.partial.len() < TAIL_WIDTH {
                    self.partial.push(byte);
                }
            }
        }
        Ok(())
    }

    fn end_line(&mut self) {
        self.line_len = 0;
        self.line_end.clear();
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
    /// still being received (if any). Each is cut to 1 KiB and decoded lossily.
    pub fn recent(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .lines
            .iter()
            .map(|l| String::from_utf8_lossy(l).into_owned())
            .collect();
        if !self.partial.is_empty() {
            out.push(String::from_utf8_lossy(&self.partial).into_owned());
        }
        out
    }

    /// Bytes read so far in this test.
    pub fn total(&self) -> u64 {
        self.total
    }
}

/// The size of a literal announced at the end of a line (`{123}` or `{123+}` before CRLF).
fn literal_at_end(line: &[u8]) -> Option<u64> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let inner = line.strip_suffix(b"}")?;
    let open = inner.iter().rposition(|&b| b == b'{')?;
    let digits = &inner[open + 1..];
    let digits = digits.strip_suffix(b"+").unwrap_or(digits);
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    // More digits than fit in a u64 is still a literal, and a huge one.
    Some(
        std::str::from_utf8(digits)
            .ok()
            .and_then(|d| d.parse().ok())
            .unwrap_or(u64::MAX),
    )
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

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

enum Transport {
    Plain(Tcp),
    Tls(Box<TlsStream<Tcp>>),
}

/// What a mail session reads from and writes to: plaintext or TLS, always metered.
pub(crate) struct Wire {
    transport: Transport,
    meter: Meter,
}

impl Wire {
    pub fn plain(tcp: Tcp, meter: Meter) -> Wire {
        Wire {
            transport: Transport::Plain(tcp),
            meter,
        }
    }

    pub fn tls(tls: TlsStream<Tcp>, meter: Meter) -> Wire {
        Wire {
            transport: Transport::Tls(Box::new(tls)),
            meter,
        }
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

    /// Takes the plaintext connection apart for a STARTTLS upgrade. `None` if it is
    /// already TLS.
    pub fn into_plain(self) -> Option<(Tcp, Meter)> {
        match self.transport {
            Transport::Plain(tcp) => Some((tcp, self.meter)),
            Transport::Tls(_) => None,
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

impl AsyncRead for Wire {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let start = buf.filled().len();
        match &mut this.transport {
            Transport::Plain(tcp) => ready!(Pin::new(tcp).poll_read(cx, buf))?,
            Transport::Tls(tls) => ready!(Pin::new(tls.as_mut()).poll_read(cx, buf))?,
        }
        if let Err(limit) = this.meter.admit(&buf.filled()[start..]) {
            buf.set_filled(start);
            return Poll::Ready(Err(io::Error::other(limit)));
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Wire {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.transport {
            Transport::Plain(tcp) => Pin::new(tcp).poll_write(cx, buf),
            Transport::Tls(tls) => Pin::new(tls.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.transport {
            Transport::Plain(tcp) => Pin::new(tcp).poll_flush(cx),
            Transport::Tls(tls) => Pin::new(tls.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.transport {
            Transport::Plain(tcp) => Pin::new(tcp).poll_shutdown(cx),
            Transport::Tls(tls) => Pin::new(tls.as_mut()).poll_shutdown(cx),
        }
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

    #[test]
    fn literal_detection() {
        assert_eq!(literal_at_end(b"* OK {12}\r"), Some(12));
        assert_eq!(literal_at_end(b"* OK {12+}"), Some(12));
        assert_eq!(literal_at_end(b"* OK {}"), None);
        assert_eq!(literal_at_end(b"* OK {a1}"), None);
        assert_eq!(literal_at_end(b"* OK done"), None);
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
}
