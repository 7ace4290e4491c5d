//! One integration binary: every test starts the real daemon and uses real clients.

mod harness;
mod seaweed;

mod e2e_admin;
mod e2e_backends;
mod e2e_badinput;
mod e2e_cli;
mod e2e_console;
mod e2e_contract;
mod e2e_delivery;
mod e2e_delivery_restart;
mod e2e_docs;
mod e2e_endpoints;
mod e2e_faults;
mod e2e_http_edges;
mod e2e_ingest;
mod e2e_interop;
mod e2e_limits;
mod e2e_nodes;
mod e2e_nodes_identity;
mod e2e_pg_restart;
mod e2e_preauth;
mod e2e_reload;
mod e2e_rollups;
mod e2e_rollups_replay;
mod e2e_rules;
mod e2e_sftp;
mod e2e_sftp_badinput;
mod e2e_sftp_rules;
mod e2e_storage;
mod e2e_storage_jail;
mod pg;
mod webdriver;
