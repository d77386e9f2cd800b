//! The mailboxes the bed starts with: a few messages in Maildir++ folders.

use std::fs;
use std::path::Path;

use anyhow::Result;

/// A message to place in a folder, seen or not.
pub struct Seed {
    pub folder: &'static str,
    pub subject: &'static str,
    pub seen: bool,
}

/// What each seeded account holds. Tests count on these numbers.
pub fn seeds_for(user: &str) -> Vec<Seed> {
    let msg = |folder, subject, seen| Seed {
        folder,
        subject,
        seen,
    };
    match user {
        "alice" => vec![
            msg("INBOX", "Quarterly report", true),
            msg("INBOX", "Job 4711 finished", false),
            msg("INBOX", "Job 4712 failed", false),
            msg("Archive", "Old invoice", true),
        ],
        "bob" => vec![msg("INBOX", "Hello Bob", false)],
        _ => Vec::new(),
    }
}

/// Writes `seeds` into the Maildir at `maildir` (INBOX at the top, other folders as
/// `.Name` with a `subscriptions` file, as Dovecot's Maildir++ layout expects).
pub fn write(maildir: &Path, user: &str, seeds: &[Seed]) -> Result<()> {
    make_folder(maildir)?;
    let mut subscribed: Vec<&str> = Vec::new();
    for (n, seed) in seeds.iter().enumerate() {
        let folder = if seed.folder == "INBOX" {
            maildir.to_path_buf()
        } else {
            if !subscribed.contains(&seed.folder) {
                subscribed.push(seed.folder);
            }
            maildir.join(format!(".{}", seed.folder))
        };
        make_folder(&folder)?;
        let time = 1_704_103_200 + n as u64 * 60;
        let body = message(user, seed.subject, n, time);
        let flags = if seed.seen { "S" } else { "" };
        let name = format!("{time}.M{n}P1.mailroom,S={}:2,{flags}", body.len());
        fs::write(folder.join("cur").join(name), body)?;
    }
    if !subscribed.is_empty() {
        let mut list = subscribed.join("\n");
        list.push('\n');
        fs::write(maildir.join("subscriptions"), list)?;
    }
    Ok(())
}

fn make_folder(folder: &Path) -> Result<()> {
    for sub in ["cur", "new", "tmp"] {
        fs::create_dir_all(folder.join(sub))?;
    }
    Ok(())
}

fn message(user: &str, subject: &str, n: usize, time: u64) -> String {
    // A fixed date keeps the mailbox the same on every run.
    let minute = (time / 60) % 60;
    format!(
        "From: mailroom test bed <bed@mailroom.test>\r\n\
         To: {user}@mailroom.test\r\n\
         Subject: {subject}\r\n\
         Date: Mon, 01 Jan 2024 10:{minute:02}:00 +0000\r\n\
         Message-ID: <{n}.{user}@mailroom.test>\r\n\
         \r\n\
         Message {n} for {user}.\r\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alice_has_three_in_inbox_one_seen_and_an_archive() {
        let dir = tempfile::tempdir().unwrap();
        let maildir = dir.path().join("Maildir");
        write(&maildir, "alice", &seeds_for("alice")).unwrap();
        let inbox: Vec<String> = fs::read_dir(maildir.join("cur"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(inbox.len(), 3, "{inbox:?}");
        assert_eq!(inbox.iter().filter(|n| n.ends_with(":2,S")).count(), 1);
        assert_eq!(
            fs::read_dir(maildir.join(".Archive/cur")).unwrap().count(),
            1
        );
        assert_eq!(
            fs::read_to_string(maildir.join("subscriptions")).unwrap(),
            "Archive\n"
        );
    }
}
