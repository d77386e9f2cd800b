//! An IMAP server that says anything: the greeting, CAPABILITY, STARTTLS, LOGIN or
//! AUTHENTICATE with its challenges, STATUS and LOGOUT, read through the metered stream and
//! async-imap's parser exactly as the probe reads them (literals included). Input: a mode
//! byte, then the server's bytes (see `mailroom_fuzz::session`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailroom::api::Protocol;

fuzz_target!(|data: &[u8]| {
    mailroom_fuzz::session(Protocol::Imap, data);
});
