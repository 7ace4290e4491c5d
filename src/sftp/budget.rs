//! Open SFTP handles, capped per user and for the whole process.
//!
//! Each handle holds a descriptor (files) or memory (listings). Without caps one user
//! opening connections × channels × handles exhausts the process's descriptors, and
//! then HTTP ingest and other orgs' logins fail with "Too many open files". The cap per
//! channel lives in the dispatcher; the caps across channels and connections live here:
//! - per user (`sftp.max_handles_per_user`), whatever the number of connections;
//! - for the whole process: half of RLIMIT_NOFILE, so the other half stays for the
//!   listeners, HTTP connections, the spool and the database.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Why a new handle was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("too many open handles for this user (sftp.max_handles_per_user)")]
    User,
    #[error("the server is short of file descriptors; close some handles and retry")]
    Process,
}

#[derive(Debug)]
pub struct HandleBudget {
    per_user: usize,
    total: usize,
    used: Mutex<HashMap<String, usize>>,
    total_used: AtomicUsize,
}

/// One open handle, counted until dropped.
#[derive(Debug)]
pub struct HandleSlot {
    budget: Arc<HandleBudget>,
    user: String,
}

impl Refused {
    pub fn message(self) -> &'static str {
        match self {
            Refused::User => "too many open handles for this user (sftp.max_handles_per_user)",
            Refused::Process => {
                "the server is short of file descriptors; close some handles and retry"
            }
        }
    }
}

impl HandleBudget {
    pub fn new(per_user: usize, total: usize) -> Arc<Self> {
        Arc::new(Self {
            per_user,
            total,
            used: Mutex::new(HashMap::new()),
            total_used: AtomicUsize::new(0),
        })
    }

    /// The budget for this process: half of its descriptor limit (raised to the hard
    /// limit first), the rest kept for everything that is not an SFTP handle.
    pub fn for_process(per_user: usize) -> Arc<Self> {
        let limit = raise_nofile_limit();
        Self::new(per_user, (limit / 2).max(1) as usize)
    }

    pub fn acquire(self: &Arc<Self>, user: &str) -> Result<HandleSlot, Refused> {
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        let mine = used.get(user).copied().unwrap_or(0);
        if mine >= self.per_user {
            return Err(Refused::User);
        }
        if self.total_used.load(Ordering::Relaxed) >= self.total {
            return Err(Refused::Process);
        }
        self.total_used.fetch_add(1, Ordering::Relaxed);
        used.insert(user.to_owned(), mine + 1);
        Ok(HandleSlot {
            budget: self.clone(),
            user: user.to_owned(),
        })
    }

    pub fn total(&self) -> usize {
        self.total
    }
}

impl Drop for HandleSlot {
    fn drop(&mut self) {
        let mut used = self.budget.used.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = used.get_mut(&self.user) {
            *n -= 1;
            if *n == 0 {
                used.remove(&self.user);
            }
        }
        self.budget.total_used.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Raises the soft RLIMIT_NOFILE to the hard limit (as OpenSSH's sftp-server does) and
/// returns the soft limit now in force.
pub fn raise_nofile_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 1024;
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim.rlim_cur = lim.rlim_max;
        }
    }
    if lim.rlim_cur == libc::RLIM_INFINITY {
        return 1 << 20;
    }
    lim.rlim_cur
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_each_user_and_the_process() {
        let b = HandleBudget::new(2, 3);
        let a1 = b.acquire("a").unwrap();
        let _a2 = b.acquire("a").unwrap();
        assert_eq!(b.acquire("a").unwrap_err(), Refused::User);
        let _b1 = b.acquire("b").unwrap();
        assert_eq!(b.acquire("b").unwrap_err(), Refused::Process);
        drop(a1);
        let _b2 = b.acquire("b").unwrap();
        assert_eq!(b.acquire("a").unwrap_err(), Refused::Process);
    }

    #[test]
    fn released_slots_are_forgotten() {
        let b = HandleBudget::new(1, 10);
        drop(b.acquire("a").unwrap());
        assert!(b.used.lock().unwrap().is_empty());
        assert_eq!(b.total_used.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn the_soft_limit_is_raised_to_the_hard_one() {
        let now = raise_nofile_limit();
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
        assert_eq!(lim.rlim_cur, lim.rlim_max);
        assert!(now >= 1);
    }
}
