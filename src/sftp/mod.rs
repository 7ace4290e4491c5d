//! Embedded SFTP server: each org's SFTP users see the org folder as `/`.

mod hostkey;

pub use hostkey::{host_key_fingerprint, load_or_create_host_key};
