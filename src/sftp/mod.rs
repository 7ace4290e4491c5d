//! Embedded SFTP server: each org's SFTP users see the org folder as `/`.
//!
//! - `server`: accept loop, session limits, SSH handler and authentication;
//! - `handler`: the SFTP dispatcher of a channel (concurrent reads, ordered control);
//! - `ops`: the operations, through the storage seam (`crate::storage`);
//! - `jail`: the one place a client path becomes a path in the org folder.

mod budget;
mod handler;
mod hostkey;
pub mod jail;
mod ops;
mod per_ip;
mod replies;
mod server;
mod status;

pub use hostkey::host_key_fingerprint;
pub use server::serve;
