//! The bounded line reader over the metered stream: every line comes back exactly as sent
//! (without its line ending), the reader never holds more than `MAX_LINE` bytes, and it
//! stops only when the server closes or breaks a bound it really broke.
//!
//! Input: a mode byte (bit 0: IMAP's bounds, which also refuse oversized literals), then
//! segments that build the server's stream, so that a few bytes can make a long one:
//! a header byte `h`; if `h < 0x80`, the next `h + 1` bytes as they are; else a byte `b`
//! and a little-endian u16 `k`, and `b` repeated `k` times, or `16 * k` times if
//! `h >= 0xf0` (long streams cost time, so most stay short).
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailroom::probe::fuzzing::{self, LineEnd, MAX_LINE, MAX_TOTAL};
use mailroom_fuzz::{MEMORY_BOUND, RUNTIME, Script, measured};

/// No point building more than the reader may read.
const CAP: usize = MAX_TOTAL as usize + MAX_LINE + 64;

fn build(mut input: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some((&h, rest)) = input.split_first() {
        input = rest;
        if h < 0x80 {
            let n = (usize::from(h) + 1).min(input.len());
            out.extend_from_slice(&input[..n]);
            input = &input[n..];
        } else {
            let [b, lo, hi, ..] = *input else { break };
            input = &input[3..];
            let k = usize::from(u16::from_le_bytes([lo, hi]));
            let k = if h >= 0xf0 { 16 * k } else { k };
            let n = k.min(CAP - out.len());
            out.resize(out.len() + n, b);
        }
        if out.len() >= CAP {
            out.truncate(CAP);
            break;
        }
    }
    out
}

/// The size of an IMAP literal announced at the end of `line` (`{N}` or `{N+}`, CR
/// removed), saturating.
fn literal(line: &[u8]) -> Option<u128> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let inner = line.strip_suffix(b"}")?;
    let open = inner.iter().rposition(|&b| b == b'{')?;
    let digits = &inner[open + 1..];
    let digits = digits.strip_suffix(b"+").unwrap_or(digits);
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(digits.iter().fold(0u128, |n, d| {
        n.saturating_mul(10).saturating_add(u128::from(d - b'0'))
    }))
}

/// For each LF in `stream`, in order: `None` if it lies in an IMAP literal's data, else the
/// size of the literal its line announces, if any (always `None` without `imap`).
fn line_ends(stream: &[u8], imap: bool) -> Vec<Option<Option<u128>>> {
    let mut out = Vec::new();
    let mut literal_left: u128 = 0;
    let mut line_start = 0;
    for (i, &b) in stream.iter().enumerate() {
        if literal_left > 0 {
            literal_left -= 1;
            if b == b'\n' {
                out.push(None);
            }
            if literal_left == 0 {
                line_start = i + 1;
            }
            continue;
        }
        if b == b'\n' {
            let announced = if imap {
                literal(&stream[line_start..i])
            } else {
                None
            };
            out.push(Some(announced));
            literal_left = announced.unwrap_or(0);
            line_start = i + 1;
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let imap = mode & 1 != 0;
    let stream = build(rest);
    // The model: the stream split at LF, one CR before it dropped. For IMAP, a literal's
    // data (which may hold LFs) is not lines to the meter.
    let mut model: Vec<&[u8]> = stream.split(|&b| b == b'\n').collect();
    let unterminated = model.pop().unwrap_or_default();
    let ends = line_ends(&stream, imap);

    let script = Script::new(stream.clone(), false, mode);
    let mut i = 0;
    let check = |got: Vec<u8>| {
        let want = model.get(i).copied().expect("a line beyond the stream's");
        assert_eq!(
            got,
            want.strip_suffix(b"\r").unwrap_or(want),
            "line {i} differs"
        );
        assert!(
            want.len() < MAX_LINE,
            "line {i} of {} bytes was let through",
            want.len()
        );
        if let Some(Some(n)) = ends[i] {
            assert!(
                n <= u128::from(MAX_TOTAL),
                "line {i} announces a literal of {n} bytes and was let through"
            );
        }
        i += 1;
    };
    let (read, peak) = measured(|| RUNTIME.block_on(fuzzing::read_lines(script, imap, check)));
    assert!(peak <= MEMORY_BOUND, "held {peak} bytes");
    assert!(
        read.most_buffered <= MAX_LINE,
        "held a {}-byte line",
        read.most_buffered
    );
    assert!(read.bytes_read <= MAX_TOTAL || read.end == LineEnd::OverBudget);
    let k = read.lines;

    // Where it stopped, and why, must be true of the stream. A read that breaks a bound is
    // discarded whole, so the line that broke it is the next one or a later one.
    let rest = || {
        model[k.min(model.len())..]
            .iter()
            .copied()
            .chain([unterminated])
    };
    match &read.end {
        LineEnd::Closed => {
            assert_eq!(k, model.len(), "closed after {k} of {} lines", model.len());
            assert!(stream.len() as u64 <= MAX_TOTAL);
        }
        LineEnd::LineTooLong => assert!(
            rest().any(|l| l.len() >= MAX_LINE),
            "refused as too long, but no line after the {k}th is"
        ),
        LineEnd::OverBudget => assert!(stream.len() as u64 > MAX_TOTAL),
        LineEnd::LiteralTooLarge => {
            assert!(imap, "a literal refused under POP3's bounds");
            let left = u128::from(MAX_TOTAL).saturating_sub(stream.len() as u128);
            assert!(
                ends[k.min(ends.len())..]
                    .iter()
                    .any(|end| end.flatten().is_some_and(|n| n > left)),
                "a literal refused, but none after the {k}th line needs more than the {left} \
                 bytes certainly left"
            );
        }
        LineEnd::Other(what) => panic!("an in-memory stream failed: {what}"),
    }
    assert!(!read.failure.message.is_empty());
    assert!(!read.failure.message.chars().any(char::is_control));
    assert!(read.recent.len() <= 9);
});
