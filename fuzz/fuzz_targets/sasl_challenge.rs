//! Server challenges in a SASL exchange: base64 decoding, the client's answers, and the
//! OAuth2 error JSON decoded for the failure message.
//!
//! Input: a mode byte (bits 0–1 the mechanism: PLAIN, LOGIN, XOAUTH2, OAUTHBEARER; bit 2
//! the initial response goes with the command), then the challenges, one per line, each
//! the base64 text after `+ `.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailroom::probe::fuzzing::{self, MECHANISMS};
use mailroom_fuzz::{SECRET, USERNAME, contains};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mechanism = MECHANISMS[usize::from(mode & 3)];
    let challenges: Vec<String> = rest
        .split(|&b| b == b'\n')
        .map(|line| String::from_utf8_lossy(line).into_owned())
        .collect();
    let run = fuzzing::sasl_exchange(mechanism, USERNAME, SECRET, mode & 4 != 0, &challenges);

    // The secret goes out once, whatever the server asks afterwards.
    let sent = run
        .responses
        .iter()
        .filter(|r| contains(r, SECRET.as_bytes()))
        .count();
    assert!(sent <= 1, "{mechanism} sent the secret {sent} times");
    // An answer per challenge until one is not base64.
    let answered = run.not_base64.unwrap_or(challenges.len());
    assert!(run.responses.len() <= answered + 1);
    // What is kept for the message is bounded, and never shows the secret unless the
    // server sent it.
    assert!(run.later.len() <= 4, "{} challenges kept", run.later.len());
    for kept in &run.later {
        assert!(kept.chars().count() <= 512);
    }
    for described in &run.described {
        assert!(described.len() <= 16 * 1024, "{} bytes", described.len());
        assert!(
            !described.chars().any(char::is_control),
            "raw control characters in {described:?}"
        );
        if !run.later.iter().any(|c| c.contains(SECRET)) {
            assert!(!described.contains(SECRET));
        }
    }
});
