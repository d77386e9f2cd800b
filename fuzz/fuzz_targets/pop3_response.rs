//! A POP3 server that says anything: the greeting, CAPA's multi-line list, STLS, USER/PASS,
//! AUTH and its challenges, STAT and QUIT all read the fuzzer's bytes through the probe's
//! own line reader and reply parser. Input: a mode byte, then the server's bytes (see
//! `mailroom_fuzz::session`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailroom::api::Protocol;

fuzz_target!(|data: &[u8]| {
    mailroom_fuzz::session(Protocol::Pop3, data);
});
