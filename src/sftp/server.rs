//! The SSH side: our own accept loop with session limits and a login grace time, the
//! russh handler (authentication against the store, channels), and a draining shutdown.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use russh::keys::{Algorithm, HashAlg};
use russh::server::{Auth, Msg, PublicKeyOffer, Session, VerifiedPublicKey};
use russh::{Channel, ChannelId, Disconnect, MethodKind, MethodSet, SshId};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::ops::SessionCtx;
use super::per_ip::{IpSlot, PerIp};
use crate::defender::Offence;
use crate::store::SftpUser;
use crate::App;

/// How long shutdown lets open transfers finish before disconnecting their sessions.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

struct Shared {
    app: App,
    ssh: Arc<russh::server::Config>,
    sessions: Arc<Semaphore>,
    per_ip: PerIp,
    tracker: TaskTracker,
    cancel: CancellationToken,
    /// Verified when the user is unknown, so both cases cost the same time.
    dummy_hash: String,
    defender: Arc<crate::defender::Defender>,
    /// Connections that have not authenticated yet (MaxStartups)...
    unauthenticated: Arc<Semaphore>,
    /// ...and their share per source IP (PerSourceMaxStartups).
    unauthenticated_per_ip: PerIp,
    /// Password checks, one per core at a time, each in memory kept for the next.
    verifier: crate::auth::Verifier,
    /// Open SFTP handles per user and for the process.
    handles: Arc<super::budget::HandleBudget>,
}

/// The place of a connection among the unauthenticated ones; given back at login.
struct Unauth {
    _total: OwnedSemaphorePermit,
    _source: IpSlot,
}

pub async fn serve(
    app: App,
    listener: TcpListener,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    let key = crate::identity::host_key(&app.identity)
        .await
        .map_err(std::io::Error::other)?;
    let fingerprint = key.public_key().fingerprint(HashAlg::Sha256).to_string();
    let cfg = &app.config.sftp;
    let mut methods = MethodSet::empty();
    methods.push(MethodKind::PublicKey);
    methods.push(MethodKind::Password);
    let ssh = russh::server::Config {
        server_id: SshId::Standard(Cow::Owned(format!(
            "SSH-2.0-hookbridge_{}",
            env!("CARGO_PKG_VERSION")
        ))),
        methods,
        auth_rejection_time: cfg.auth_rejection_time.0,
        // OpenSSH probes with "none" first; answering that at once is not a leak.
        auth_rejection_time_initial: Some(Duration::ZERO),
        keys: vec![key],
        max_auth_attempts: cfg.max_auth_attempts,
        inactivity_timeout: Some(cfg.idle_timeout.0),
        keepalive_interval: Some(Duration::from_secs(30)),
        keepalive_max: 3,
        nodelay: true,
        window_size: 4 * 1024 * 1024,
        maximum_packet_size: 65536,
        ..Default::default()
    };
    let dummy_hash = tokio::task::spawn_blocking(|| {
        crate::auth::hash_password("no such user, no such password")
    })
    .await
    .map_err(std::io::Error::other)?
    .map_err(std::io::Error::other)?;
    let defender = Arc::new(crate::defender::Defender::for_node(
        &app.config.defender,
        &app.config.node_id,
    ));
    tokio::spawn(crate::defender::sync(
        defender.clone(),
        app.store.clone(),
        cancel.clone(),
    ));
    let shared = Arc::new(Shared {
        ssh: Arc::new(ssh),
        sessions: Arc::new(Semaphore::new(cfg.max_sessions)),
        per_ip: PerIp::default(),
        tracker: TaskTracker::new(),
        cancel: cancel.clone(),
        dummy_hash,
        defender: defender.clone(),
        unauthenticated: Arc::new(Semaphore::new(app.config.defender.max_unauthenticated)),
        unauthenticated_per_ip: PerIp::default(),
        verifier: crate::auth::Verifier::new(
            std::thread::available_parallelism().map_or(2, |n| n.get()),
        ),
        handles: super::budget::HandleBudget::for_process(cfg.max_handles_per_user),
        app: app.clone(),
    });
    tracing::info!(
        addr = ?listener.local_addr().ok(),
        host_key = %fingerprint,
        handle_budget = shared.handles.total(),
        "SFTP server listening"
    );

    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => admit(&shared, stream, peer),
                Err(e) => {
                    // EMFILE and friends pass; never let one failed accept end the server.
                    tracing::warn!(error = %e, "SFTP accept failed");
                    tokio::select! {
                        _ = cancel.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    }
                }
            }
        }
    }
    drop(listener);
    shared.tracker.close();
    tracing::info!(sessions = shared.tracker.len(), "SFTP server draining");
    shared.tracker.wait().await;
    Ok(())
}

fn admit(shared: &Arc<Shared>, stream: TcpStream, peer: SocketAddr) {
    if shared.defender.is_banned(peer.ip()) {
        // Dropping the stream closes it: a banned address gets no banner to work with.
        metrics::counter!("hookbridge_sftp_refused_total", "reason" => "banned").increment(1);
        tracing::debug!(ip = %peer.ip(), "connection from a banned address closed");
        return;
    }
    let Some(source) = shared
        .unauthenticated_per_ip
        .take(peer.ip(), shared.app.config.sftp.max_startups_per_source)
    else {
        // Like OpenSSH's PerSourceMaxStartups: the source's share is full, others still get in.
        metrics::counter!("hookbridge_sftp_refused_total", "reason" => "unauthenticated_per_source")
            .increment(1);
        tracing::warn!(ip = %peer.ip(), "too many unauthenticated SFTP connections from this address; connection refused");
        return;
    };
    let Ok(total) = shared.unauthenticated.clone().try_acquire_owned() else {
        metrics::counter!("hookbridge_sftp_refused_total", "reason" => "unauthenticated")
            .increment(1);
        tracing::warn!(ip = %peer.ip(), "too many unauthenticated SFTP connections; connection refused");
        return;
    };
    let unauth = Unauth {
        _total: total,
        _source: source,
    };
    let cfg = &shared.app.config.sftp;
    let permit = shared.sessions.clone().try_acquire_owned().ok();
    let slot = permit
        .as_ref()
        .and_then(|_| shared.per_ip.take(peer.ip(), cfg.max_sessions_per_ip));
    match (permit, slot) {
        (Some(permit), Some(slot)) => {
            let shared2 = shared.clone();
            shared
                .tracker
                .spawn(connection(shared2, stream, peer, permit, slot, unauth));
        }
        _ => {
            metrics::counter!("hookbridge_sftp_refused_total", "reason" => "session_limit")
                .increment(1);
            tracing::warn!(ip = %peer.ip(), "SFTP session limit reached; connection refused");
            // A line before the version string is shown by clients; then close.
            shared.tracker.spawn(async move {
                let mut stream = stream;
                let _ = tokio::time::timeout(Duration::from_secs(1), async {
                    let _ = stream
                        .write_all(b"hookbridge: too many sessions, try again later\r\n")
                        .await;
                    let _ = stream.shutdown().await;
                })
                .await;
            });
        }
    }
}

struct GaugeGuard;

impl GaugeGuard {
    fn new() -> Self {
        metrics::gauge!("hookbridge_sftp_sessions").increment(1.0);
        GaugeGuard
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        metrics::gauge!("hookbridge_sftp_sessions").decrement(1.0);
    }
}

async fn connection(
    shared: Arc<Shared>,
    stream: TcpStream,
    peer: SocketAddr,
    _permit: OwnedSemaphorePermit,
    _slot: IpSlot,
    unauth: Unauth,
) {
    let _gauge = GaugeGuard::new();
    let _ = stream.set_nodelay(true);
    let deadline = Instant::now() + shared.app.config.sftp.login_grace_time.0;
    let authed = Arc::new(AtomicBool::new(false));
    let (busy_tx, busy_rx) = watch::channel(0usize);
    let conn = Conn {
        shared: shared.clone(),
        peer,
        authed: authed.clone(),
        busy: Arc::new(busy_tx),
        user: None,
        method: "",
        channels: HashMap::new(),
        sftp: HashSet::new(),
        unauth: Some(unauth),
    };
    let cancel = shared.cancel.clone();
    let started = tokio::select! {
        r = russh::server::run_stream(shared.ssh.clone(), stream, conn) => r,
        _ = tokio::time::sleep_until(deadline) => {
            tracing::info!(ip = %peer.ip(), "no SSH identification within the login grace time; disconnecting");
            shared.defender.record(peer.ip(), Offence::LoginTimeout);
            return;
        }
        _ = cancel.cancelled() => return,
    };
    let running = match started {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(ip = %peer.ip(), error = %e, "SSH handshake failed");
            if hostile(&e) {
                shared.defender.record(peer.ip(), Offence::ProtocolError);
            }
            return;
        }
    };
    let handle = running.handle();
    tokio::pin!(running);
    let grace = tokio::time::sleep_until(deadline);
    tokio::pin!(grace);
    let mut grace_checked = false;
    loop {
        tokio::select! {
            r = &mut running => {
                if let Err(e) = r {
                    tracing::debug!(ip = %peer.ip(), error = %e, "SSH session ended with an error");
                    if !authed.load(Ordering::Acquire) && hostile(&e) {
                        shared.defender.record(peer.ip(), Offence::ProtocolError);
                    }
                }
                break;
            }
            _ = &mut grace, if !grace_checked => {
                grace_checked = true;
                if !authed.load(Ordering::Acquire) {
                    tracing::info!(ip = %peer.ip(), "login grace time over; disconnecting");
                    shared.defender.record(peer.ip(), Offence::LoginTimeout);
                    let _ = handle
                        .disconnect(Disconnect::ByApplication, "login grace time over".into(), "en".into())
                        .await;
                }
            }
            _ = cancel.cancelled() => {
                // Let transfers in progress end (bounded), then say goodbye.
                let mut busy = busy_rx.clone();
                let _ = tokio::time::timeout(DRAIN_TIMEOUT, busy.wait_for(|n| *n == 0)).await;
                let _ = handle
                    .disconnect(Disconnect::ByApplication, "server shutting down".into(), "en".into())
                    .await;
                let _ = tokio::time::timeout(Duration::from_secs(5), &mut running).await;
                break;
            }
        }
    }
}

/// Whether an error that ended an unauthenticated connection is worth a penalty. A client
/// that just closes (a load balancer's TCP check, a banner read, `ssh-keyscan`, a user who
/// gives up) is not hostile; garbage instead of SSH and broken packets are.
fn hostile(e: &russh::Error) -> bool {
    use std::io::ErrorKind;
    match e {
        russh::Error::Disconnect | russh::Error::HUP => false,
        russh::Error::IO(io) => !matches!(
            io.kind(),
            ErrorKind::UnexpectedEof
                | ErrorKind::ConnectionReset
                | ErrorKind::ConnectionAborted
                | ErrorKind::BrokenPipe
        ),
        // Idle connections are scored at the login grace time instead.
        russh::Error::InactivityTimeout
        | russh::Error::KeepaliveTimeout
        | russh::Error::ConnectionTimeout => false,
        _ => true,
    }
}

/// One SSH connection.
struct Conn {
    shared: Arc<Shared>,
    peer: SocketAddr,
    authed: Arc<AtomicBool>,
    busy: Arc<watch::Sender<usize>>,
    user: Option<SftpUser>,
    method: &'static str,
    channels: HashMap<ChannelId, Channel<Msg>>,
    sftp: HashSet<ChannelId>,
    /// Held until authentication succeeds.
    unauth: Option<Unauth>,
}

fn reject() -> Auth {
    Auth::Reject {
        proceed_with_methods: None,
        partial_success: false,
    }
}

impl Conn {
    /// Looked up at every attempt, so admin API changes apply to the next login.
    async fn lookup(&self, name: &str) -> Option<SftpUser> {
        match self.shared.app.store.get_sftp_user(name).await {
            Ok(u) => u,
            Err(e) => {
                tracing::error!(error = %e, "cannot look up SFTP user");
                None
            }
        }
    }

    fn failed(&self, user: &str, method: &str) -> Auth {
        metrics::counter!("hookbridge_sftp_auth_failures_total").increment(1);
        tracing::info!(target: "audit", event = "login_failed", user, method, ip = %self.peer.ip(), "sftp login failed");
        reject()
    }

    /// Checked at each attempt: a ban imposed while this connection was open applies to it.
    fn banned(&self) -> bool {
        self.shared.defender.is_banned(self.peer.ip())
    }

    fn key_allowed(&self, alg: &Algorithm) -> bool {
        // ssh-rsa signs with SHA-1: only for old devices, behind a switch.
        *alg != (Algorithm::Rsa { hash: None }) || self.shared.app.config.sftp.allow_ssh_rsa_sha1
    }
}

impl russh::server::Handler for Conn {
    type Error = russh::Error;

    async fn auth_password(&mut self, user: &str, password: &str) -> Result<Auth, Self::Error> {
        if self.banned() {
            return Ok(self.failed(user, "password"));
        }
        let found = self.lookup(user).await;
        let hash = found.as_ref().and_then(|u| u.password_hash.clone());
        let known = hash.is_some();
        let hash = hash.unwrap_or_else(|| self.shared.dummy_hash.clone());
        // Parallel attempts queue for a turn (bounded memory); by the time this one's turn
        // comes the earlier ones may have got the source banned: then it is not hashed.
        let verdict = self
            .shared
            .verifier
            .verify(password.to_owned(), hash, || !self.banned())
            .await;
        let Some(verified) = verdict else {
            return Ok(self.failed(user, "password"));
        };
        if known && verified {
            self.user = found;
            self.method = "password";
            Ok(Auth::Accept)
        } else {
            self.shared
                .defender
                .record(self.peer.ip(), Offence::LoginFailure);
            Ok(self.failed(user, "password"))
        }
    }

    async fn auth_publickey_offered(
        &mut self,
        user: &str,
        offer: PublicKeyOffer<'_>,
    ) -> Result<Auth, Self::Error> {
        if !self.key_allowed(offer.algorithm) {
            return Ok(reject());
        }
        if self.banned() {
            return Ok(self.failed(user, "publickey"));
        }
        match self.lookup(user).await {
            Some(u) if crate::auth::key_matches(&u.public_keys, offer.public_key) => {
                Ok(Auth::Accept)
            }
            _ => Ok(self.failed(user, "publickey")),
        }
    }

    async fn auth_publickey(
        &mut self,
        user: &str,
        key: VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        if !self.key_allowed(key.algorithm) || self.banned() {
            return Ok(self.failed(user, "publickey"));
        }
        match self.lookup(user).await {
            Some(u) if crate::auth::key_matches(&u.public_keys, key.public_key) => {
                self.user = Some(u);
                self.method = "publickey";
                Ok(Auth::Accept)
            }
            _ => Ok(self.failed(user, "publickey")),
        }
    }

    async fn auth_succeeded(&mut self, _session: &mut Session) -> Result<(), Self::Error> {
        self.authed.store(true, Ordering::Release);
        self.unauth = None;
        if let Some(u) = &self.user {
            tracing::info!(
                target: "audit",
                event = "login",
                user = %u.name,
                org = %u.org,
                method = self.method,
                ip = %self.peer.ip(),
                "sftp login"
            );
        }
        Ok(())
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: russh::server::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        // SFTP clients use one channel; OpenSSH's MaxSessions caps them the same way.
        if self.channels.len() + self.sftp.len()
            >= self.shared.app.config.sftp.max_channels_per_connection
        {
            tracing::info!(ip = %self.peer.ip(), "session channel refused: sftp.max_channels_per_connection reached");
            reply
                .reject(russh::ChannelOpenFailure::ResourceShortage)
                .await;
            return Ok(());
        }
        self.channels.insert(channel.id(), channel);
        reply.accept().await;
        Ok(())
    }

    async fn subsystem_request(
        &mut self,
        channel_id: ChannelId,
        name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let user = match (&self.user, name) {
            (Some(u), "sftp") => u.clone(),
            _ => {
                session.channel_failure(channel_id)?;
                return Ok(());
            }
        };
        let Some(channel) = self.channels.remove(&channel_id) else {
            session.channel_failure(channel_id)?;
            return Ok(());
        };
        let ctx = match self.sftp_ctx(&user).await {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(org = %user.org, error = %e, "cannot open the org folder for SFTP");
                session.channel_failure(channel_id)?;
                return Ok(());
            }
        };
        session.channel_success(channel_id)?;
        self.sftp.insert(channel_id);
        self.shared
            .tracker
            .spawn(super::handler::run(channel, ctx, self.busy.clone()));
        Ok(())
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        // rclone probes md5sum/df this way; refusing is fine, dropping the connection is not.
        tracing::debug!(command = %String::from_utf8_lossy(data), "exec refused");
        session.channel_failure(channel)?;
        Ok(())
    }

    async fn shell_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_failure(channel)?;
        Ok(())
    }

    async fn pty_request(
        &mut self,
        channel: ChannelId,
        _term: &str,
        _col_width: u32,
        _row_height: u32,
        _pix_width: u32,
        _pix_height: u32,
        _modes: &[(russh::Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_failure(channel)?;
        Ok(())
    }

    async fn channel_eof(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        // The SFTP dispatcher answers EOF itself once its replies are out.
        if !self.sftp.contains(&channel) {
            session.exit_status_request(channel, 0)?;
            session.eof(channel)?;
            session.close(channel)?;
        }
        Ok(())
    }

    async fn channel_close(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.channels.remove(&channel);
        self.sftp.remove(&channel);
        Ok(())
    }
}

impl Conn {
    async fn sftp_ctx(&self, user: &SftpUser) -> std::io::Result<SessionCtx> {
        let org = crate::storage::OrgName::new(&user.org).map_err(std::io::Error::other)?;
        let storage = self.shared.app.storage.clone();
        // An org without events yet has no folder: give it an empty one.
        storage
            .create_org(&org)
            .await
            .map_err(std::io::Error::other)?;
        Ok(SessionCtx {
            user: user.name.clone(),
            org,
            upload: user.upload,
            ip: self.peer.ip(),
            // Roll-up partitions show only once complete (see `complete_view`).
            storage: Arc::new(crate::storage::complete_view::CompleteView::new(storage)),
            max_upload: self.shared.app.config.sftp.max_upload_bytes,
            max_handles: self.shared.app.config.sftp.max_handles_per_session,
            budget: self.shared.handles.clone(),
            downloads: Some(self.shared.app.downloads.clone()),
            store: Some(self.shared.app.store.clone()),
        })
    }
}
