//! The one place that turns a failed file-system call into an SFTP status code.
//!
//! Clients branch on these codes (a mirror treats NO_SUCH_FILE as "skip", FAILURE as
//! "retry or stop"), so they follow OpenSSH's `sftp-server` exactly: its
//! `errno_to_portable` for errors of a system call, and the codes it sends itself for
//! the rest (bad handles, EOF, an existing rename target). It works on `io::Error`
//! (raw errno first, then its kind), so any storage layer that reports `io::Error`
//! gets the same answers.

use std::io;

use russh_sftp::protocol::StatusCode;

/// OpenSSH `sftp-server.c` `errno_to_portable`.
pub fn errno_to_portable(errno: i32) -> StatusCode {
    match errno {
        0 => StatusCode::Ok,
        libc::ENOENT | libc::ENOTDIR | libc::EBADF | libc::ELOOP => StatusCode::NoSuchFile,
        libc::EPERM | libc::EACCES | libc::EFAULT => StatusCode::PermissionDenied,
        libc::ENAMETOOLONG | libc::EINVAL => StatusCode::BadMessage,
        libc::ENOSYS => StatusCode::OpUnsupported,
        _ => StatusCode::Failure,
    }
}

/// The status of an `io::Error`: its errno when it has one, else the errno its kind stands for.
pub fn io_status(e: &io::Error) -> StatusCode {
    if let Some(errno) = e.raw_os_error() {
        return errno_to_portable(errno);
    }
    match e.kind() {
        io::ErrorKind::NotFound => StatusCode::NoSuchFile,
        io::ErrorKind::PermissionDenied => StatusCode::PermissionDenied,
        io::ErrorKind::InvalidInput => StatusCode::BadMessage,
        io::ErrorKind::Unsupported => StatusCode::OpUnsupported,
        _ => StatusCode::Failure,
    }
}

/// A message for the client: the generic text of the code plus what the OS said,
/// which names no host path (io::Error messages carry none).
pub fn io_message(e: &io::Error) -> String {
    let code = io_status(e);
    match e.raw_os_error() {
        Some(errno) => format!(
            "{}: {}",
            code_text(code),
            io::Error::from_raw_os_error(errno)
        ),
        None => code_text(code).to_owned(),
    }
}

/// The fixed texts OpenSSH's sftp-server sends with each code.
pub fn code_text(code: StatusCode) -> &'static str {
    match code {
        StatusCode::Ok => "Success",
        StatusCode::Eof => "End of file",
        StatusCode::NoSuchFile => "No such file",
        StatusCode::PermissionDenied => "Permission denied",
        StatusCode::Failure => "Failure",
        StatusCode::BadMessage => "Bad message",
        StatusCode::NoConnection => "No connection",
        StatusCode::ConnectionLost => "Connection lost",
        StatusCode::OpUnsupported => "Operation unsupported",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follows_openssh_errno_to_portable() {
        use StatusCode::*;
        for (errno, want) in [
            (0, Ok),
            (libc::ENOENT, NoSuchFile),
            (libc::ENOTDIR, NoSuchFile),
            (libc::EBADF, NoSuchFile),
            (libc::ELOOP, NoSuchFile),
            (libc::EPERM, PermissionDenied),
            (libc::EACCES, PermissionDenied),
            (libc::EFAULT, PermissionDenied),
            (libc::ENAMETOOLONG, BadMessage),
            (libc::EINVAL, BadMessage),
            (libc::ENOSYS, OpUnsupported),
            (libc::EEXIST, Failure),
            (libc::ENOTEMPTY, Failure),
            (libc::EISDIR, Failure),
            (libc::ENOSPC, Failure),
            (libc::EMFILE, Failure),
            (libc::EBUSY, Failure),
            (libc::EXDEV, Failure),
        ] {
            assert_eq!(errno_to_portable(errno), want, "errno {errno}");
            assert_eq!(
                io_status(&io::Error::from_raw_os_error(errno)),
                want,
                "io errno {errno}"
            );
        }
    }

    #[test]
    fn kinds_without_errno_map_like_their_errno() {
        use StatusCode::*;
        for (kind, want) in [
            (io::ErrorKind::NotFound, NoSuchFile),
            (io::ErrorKind::PermissionDenied, PermissionDenied),
            (io::ErrorKind::InvalidInput, BadMessage),
            (io::ErrorKind::Unsupported, OpUnsupported),
            (io::ErrorKind::AlreadyExists, Failure),
            (io::ErrorKind::Other, Failure),
        ] {
            assert_eq!(io_status(&io::Error::from(kind)), want, "{kind:?}");
        }
    }

    #[test]
    fn messages_name_no_path() {
        let m = io_message(&io::Error::from_raw_os_error(libc::ENOTEMPTY));
        assert!(m.starts_with("Failure: "), "{m}");
    }
}
