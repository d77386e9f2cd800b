//! The unprivileged user Dovecot runs as, and handing files over to it.

use std::ffi::{CStr, CString};
use std::fs;
use std::path::Path;

use anyhow::{Context, Result, bail};

/// Who Dovecot's master and all its children run as.
#[derive(Clone, Debug)]
pub struct RunAs {
    pub user: String,
    pub group: String,
    pub uid: u32,
    pub gid: u32,
    /// Whether this process must switch to `uid`/`gid` when starting Dovecot.
    pub switch: bool,
}

impl RunAs {
    /// Root runs Dovecot as Debian's `dovecot` system user; anyone else as themselves.
    pub fn for_dovecot() -> Result<RunAs> {
        // SAFETY: geteuid cannot fail.
        let euid = unsafe { libc::geteuid() };
        if euid == 0 {
            let (uid, gid) = lookup_user("dovecot")?.with_context(|| {
                "the test bed is not prepared: the system user dovecot is missing; run \
                 tests/testbed/prepare (installs Dovecot with apt-get)"
            })?;
            Ok(RunAs {
                user: "dovecot".into(),
                group: group_name(gid)?,
                uid,
                gid,
                switch: true,
            })
        } else {
            // SAFETY: getegid cannot fail.
            let gid = unsafe { libc::getegid() };
            Ok(RunAs {
                user: user_name(euid)?,
                group: group_name(gid)?,
                uid: euid,
                gid,
                switch: false,
            })
        }
    }

    /// Gives `path` and everything below it to this user (a no-op when not root).
    pub fn own(&self, path: &Path) -> Result<()> {
        if !self.switch {
            return Ok(());
        }
        std::os::unix::fs::lchown(path, Some(self.uid), Some(self.gid))
            .with_context(|| format!("chown {} to {}", path.display(), self.user))?;
        if path.is_dir() && !path.is_symlink() {
            for entry in fs::read_dir(path)? {
                self.own(&entry?.path())?;
            }
        }
        Ok(())
    }
}

fn lookup_user(name: &str) -> Result<Option<(u32, u32)>> {
    let c_name = CString::new(name)?;
    // SAFETY: getpwnam returns a pointer into static storage or null; we copy out at once
    // and the bed does not call it from several threads at the same time.
    let pw = unsafe { libc::getpwnam(c_name.as_ptr()) };
    if pw.is_null() {
        return Ok(None);
    }
    // SAFETY: pw is non-null and points to a valid passwd entry.
    let (uid, gid) = unsafe { ((*pw).pw_uid, (*pw).pw_gid) };
    Ok(Some((uid, gid)))
}

fn user_name(uid: u32) -> Result<String> {
    // SAFETY: as in lookup_user.
    let pw = unsafe { libc::getpwuid(uid) };
    if pw.is_null() {
        bail!("uid {uid} has no name in /etc/passwd; Dovecot needs one for default_internal_user");
    }
    // SAFETY: pw_name is a valid C string while pw is.
    Ok(unsafe { CStr::from_ptr((*pw).pw_name) }
        .to_string_lossy()
        .into_owned())
}

fn group_name(gid: u32) -> Result<String> {
    // SAFETY: getgrgid returns a pointer into static storage or null.
    let gr = unsafe { libc::getgrgid(gid) };
    if gr.is_null() {
        bail!("gid {gid} has no name in /etc/group; Dovecot needs one for default_internal_group");
    }
    // SAFETY: gr_name is a valid C string while gr is.
    Ok(unsafe { CStr::from_ptr((*gr).gr_name) }
        .to_string_lossy()
        .into_owned())
}
