//! The bed's special accounts answer as the tests that use them expect: a POP3 session of
//! `LOCKING_ACCOUNT` keeps a second one out with `[IN-USE]`, and `UNAVAILABLE_USER`'s
//! logins fail on the server's side whatever the password.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::Duration;

use mailroom_testbed::{Bed, LOCKING_ACCOUNT, MAIL_HOST, UNAVAILABLE_USER};

/// A plaintext session: its greeting read.
fn session(port: u16) -> BufReader<TcpStream> {
    let stream = TcpStream::connect((MAIL_HOST, port)).unwrap();
    // Dovecot waits some 10 s for a held POP3 lock before it answers.
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut conn = BufReader::new(stream);
    let mut greeting = String::new();
    conn.read_line(&mut greeting).unwrap();
    conn
}

/// Sends a line; returns the next line the server sends that `last` accepts, with what
/// came before it.
fn say(conn: &mut BufReader<TcpStream>, line: &str, last: impl Fn(&str) -> bool) -> String {
    conn.get_mut()
        .write_all(format!("{line}\r\n").as_bytes())
        .unwrap();
    let mut seen = String::new();
    loop {
        let mut reply = String::new();
        assert!(conn.read_line(&mut reply).unwrap() > 0, "closed:\n{seen}");
        seen.push_str(&reply);
        if last(&reply) {
            return seen;
        }
    }
}

#[test]
fn the_locking_account_keeps_a_second_pop3_session_out_and_the_unavailable_user_fails_on_the_servers_side()
 {
    let bed = Bed::start().unwrap_or_else(|e| panic!("{e:#}"));
    let d = bed.plaintext_dovecot();
    let (user, password) = LOCKING_ACCOUNT;

    let mut first = session(d.pop3_port());
    say(&mut first, &format!("USER {user}"), |_| true);
    let said = say(&mut first, &format!("PASS {password}"), |_| true);
    assert!(said.starts_with("+OK"), "{said}");
    let mut second = session(d.pop3_port());
    say(&mut second, &format!("USER {user}"), |_| true);
    let said = say(&mut second, &format!("PASS {password}"), |_| true);
    assert!(said.starts_with("-ERR [IN-USE]"), "{said}");
    // Once the first is gone, a session gets in.
    say(&mut first, "QUIT", |_| true);
    let mut third = session(d.pop3_port());
    say(&mut third, &format!("USER {user}"), |_| true);
    let said = say(&mut third, &format!("PASS {password}"), |_| true);
    assert!(said.starts_with("+OK"), "{said}");

    let mut pop3 = session(d.pop3_port());
    say(&mut pop3, &format!("USER {UNAVAILABLE_USER}"), |_| true);
    let said = say(&mut pop3, "PASS anything", |_| true);
    assert!(said.starts_with("-ERR [SYS/TEMP]"), "{said}");
    let mut imap = session(d.imap_port());
    let said = say(
        &mut imap,
        &format!("a LOGIN {UNAVAILABLE_USER} anything"),
        |l| l.starts_with("a "),
    );
    assert!(said.contains("a NO [UNAVAILABLE]"), "{said}");
    // Everyone else logs in as before.
    let (alice, alice_password) = d.account("alice");
    let said = say(
        &mut imap,
        &format!("b LOGIN {alice} {alice_password}"),
        |l| l.starts_with("b "),
    );
    assert!(said.contains("b OK"), "{said}");
}
