use std::io::Read;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{CommandFactory, Parser, Subcommand};
use hookbridge::config::Config;
use tokio_util::sync::CancellationToken;

/// jemalloc instead of glibc malloc: on the delivery path many buffers are freed on another
/// thread than the one that made them (SQLite threads, tokio workers); in a native profile
/// of `bench/delivery/run`'s drain glibc's malloc/free took 16.5% of the daemon's CPU,
/// jemalloc 6.5%. (mimalloc 3 was tried too: it re-faulted fresh pages, costing more.)
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// `--version`: what was built, from build.rs (`-V` prints the first line only).
const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    "\ncommit:   ",
    env!("HOOKBRIDGE_GIT_COMMIT"),
    "\nfeatures: ",
    env!("HOOKBRIDGE_FEATURES"),
    "\nprofile:  ",
    env!("HOOKBRIDGE_PROFILE"),
);

#[derive(Parser)]
#[command(
    name = "hookbridge",
    version,
    long_version = LONG_VERSION,
    about = "Platform webhook events → durable SFTP files and signed HTTP webhooks",
    long_about = "Platform webhook events → durable SFTP files and signed HTTP webhooks.\n\n\
        hookbridge writes every event the platform posts for an organization as a timestamped \
        JSON file into the org's folder, durably, before it answers; its embedded SFTP server \
        serves that folder to the org's ETL jobs. It also delivers each event as a signed HTTP \
        webhook with retries, dead letters and replay. Environment overrides: \
        HOOKBRIDGE_DATA_DIR, HOOKBRIDGE_HTTP_LISTEN, HOOKBRIDGE_SFTP_LISTEN, \
        HOOKBRIDGE_INGRESS_JWT_SECRET, HOOKBRIDGE_ADMIN_TOKEN, HOOKBRIDGE_STORE_URL, \
        HOOKBRIDGE_SECRETS_KEY, HOOKBRIDGE_LOG_FORMAT, RUST_LOG."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon (embedded defaults without --config).
    Serve {
        /// Config file (TOML); embedded defaults without it.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Create the demo org `acme` and print how to use it.
        #[arg(long)]
        demo: bool,
    },
    /// Validate a config file and print what hookbridge would do with it.
    CheckConfig {
        /// Config file (TOML); the embedded defaults without it.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Read a password on stdin, print its argon2id hash for `password_hash`.
    HashPassword,
    /// Mint an ingress JWT (HS256) for an org, as the platform would.
    Token {
        /// Config file of a node (the same as `serve`'s): the ingress secret is its
        /// configured one, or the generated one in its data_dir or, in scale-out, its store.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// The org the token is for (its `org` claim).
        #[arg(long)]
        org: String,
        /// Lifetime, e.g. "1h".
        #[arg(long, default_value = "1h")]
        ttl: String,
    },
    /// Print the admin API token: the configured one, or the generated one (in the
    /// data_dir on one node; in the store, the same for every node, in scale-out).
    AdminToken {
        /// Config file of a node (the same as `serve`'s).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Print a shell completion script, e.g. `hookbridge completions bash`.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write the man pages (hookbridge.1 and one per subcommand) into DIR (package build).
    #[command(hide = true)]
    GenerateMan {
        /// Output directory, made when missing.
        dir: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { config, demo } => serve(config, demo),
        Command::CheckConfig { config } => check_config(config),
        Command::HashPassword => {
            let mut pw = String::new();
            std::io::stdin()
                .read_to_string(&mut pw)
                .context("reading the password from stdin")?;
            let pw = pw.trim_end_matches(['\n', '\r']);
            if pw.is_empty() {
                bail!("no password on stdin");
            }
            println!(
                "{}",
                hookbridge::auth::hash_password(pw).map_err(anyhow::Error::msg)?
            );
            Ok(())
        }
        Command::Token { config, org, ttl } => {
            let cfg = Config::load(config.as_deref())?;
            let ttl = humantime::parse_duration(&ttl).context("--ttl")?;
            let secrets = node_secrets(&cfg)?;
            println!("{}", mint(&secrets.ingress_jwt, &org, ttl)?);
            Ok(())
        }
        Command::AdminToken { config } => {
            let cfg = Config::load(config.as_deref())?;
            println!("{}", node_secrets(&cfg)?.admin_token);
            Ok(())
        }
        Command::Completions { shell } => {
            // Rendered in memory first: clap_complete panics when its writer fails (a
            // closed pipe); writing ourselves turns that into an error exit.
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut completion_command(), "hookbridge", &mut script);
            std::io::Write::write_all(&mut std::io::stdout().lock(), &script)
                .context("writing the completion script")
        }
        Command::GenerateMan { dir } => generate_man(&dir),
    }
}

/// The ingress secret and admin token a node with `cfg` uses (generated where the node
/// would generate them, if no node has yet).
fn node_secrets(cfg: &Config) -> anyhow::Result<hookbridge::secrets::Secrets> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let keeper = hookbridge::identity::Keeper::open_for_cli(cfg)
            .await
            .map_err(anyhow::Error::msg)?;
        hookbridge::secrets::Secrets::load(cfg, &keeper)
            .await
            .map_err(anyhow::Error::msg)
    })
}

/// The CLI as completions offer it: without the hidden subcommands, which clap_complete's
/// zsh script would list otherwise.
fn completion_command() -> clap::Command {
    let full = Cli::command();
    let visible: Vec<clap::Command> = full
        .get_subcommands()
        .filter(|s| !s.is_hide_set())
        .cloned()
        .collect();
    clap::Command::new("hookbridge")
        .version(env!("CARGO_PKG_VERSION"))
        .subcommands(visible)
}

/// The FILES section of hookbridge(1): where the package puts things.
const MAN_FILES: &str = r#".SH FILES
.TP
\fI/etc/hookbridge/hookbridge.toml\fR
Configuration read by the systemd unit; every key is documented in
\fI/usr/share/doc/hookbridge/examples/hookbridge.example.toml\fR.
Check it with \fBhookbridge check\-config \-\-config /etc/hookbridge/hookbridge.toml\fR.
.TP
\fI/var/lib/hookbridge\fR
State: state.db, secrets/ (ingress JWT secret, admin token, webhook signing keys),
the SFTP host key and the org folders (orgs/). Owned by the \fBhookbridge\fR user.
With a PostgreSQL store (scale\-out) the keys and generated secrets are kept in the
store instead, shared by every node.
.TP
\fIhookbridge.service\fR
The systemd unit; \fBsystemctl reload hookbridge\fR re\-reads the configuration.
.SH SEE ALSO
\fBsystemctl\fR(1), \fBjournalctl\fR(1), \fI/usr/share/doc/hookbridge/README.md\fR
"#;

fn generate_man(dir: &std::path::Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    // One page per visible subcommand (hookbridge-serve.1, …), then the top page with FILES.
    // The pages show the plain version: the long one is several lines.
    let cmd = || {
        Cli::command()
            .disable_help_subcommand(true)
            .long_version(None::<&'static str>)
    };
    clap_mangen::generate_to(cmd(), dir)
        .with_context(|| format!("writing man pages into {}", dir.display()))?;
    let top = clap_mangen::Man::new(cmd());
    let mut page = Vec::new();
    top.render(&mut page)?;
    page.extend_from_slice(MAN_FILES.as_bytes());
    let path = dir.join(top.get_filename());
    std::fs::write(&path, page).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn mint(secret: &str, org: &str, ttl: std::time::Duration) -> anyhow::Result<String> {
    let exp = chrono::Utc::now().timestamp() + ttl.as_secs() as i64;
    let claims =
        serde_json::json!({ "org": org, "exp": exp, "iat": chrono::Utc::now().timestamp() });
    Ok(jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )?)
}

fn check_config(path: Option<PathBuf>) -> anyhow::Result<()> {
    let cfg = Config::load(path.as_deref())?;
    println!("config OK");
    println!("data_dir      {}", cfg.data_dir.display());
    println!("http          {}", cfg.http.listen);
    let shared = cfg.store.url.is_some();
    if cfg.sftp.enabled {
        println!("sftp          {}", cfg.sftp.listen);
        let key = cfg.host_key_path();
        match hookbridge::sftp::host_key_fingerprint(&key) {
            _ if shared => println!(
                "host key      shared by the nodes in the store (the first node makes it, or imports {})",
                key.display()
            ),
            Some(fp) => println!("host key      {} ({fp})", key.display()),
            None => println!("host key      {} (made on first start)", key.display()),
        }
    } else {
        println!("sftp          disabled");
    }
    println!(
        "ingress JWT   {}",
        if cfg.ingress.jwt_hs256_secret.is_some() {
            "secret from config/env"
        } else if shared {
            "generated secret in the store, shared by the nodes"
        } else {
            "generated secret in data_dir/secrets"
        }
    );
    println!(
        "admin token   {}",
        if cfg.admin.token.is_some() {
            "from config/env"
        } else if shared {
            "generated in the store, shared by the nodes (`hookbridge admin-token` prints it)"
        } else {
            "generated in data_dir/secrets (`hookbridge admin-token` prints it)"
        }
    );
    println!(
        "private webhook destinations {}",
        if cfg.delivery.allow_private_destinations {
            "allowed"
        } else {
            "refused"
        }
    );
    check_store(&cfg)?;
    check_storage(&cfg)?;
    for o in &cfg.orgs {
        println!(
            "org {:<20} users {}  webhooks {}",
            o.name,
            o.sftp_users.len(),
            o.webhooks.len()
        );
    }
    Ok(())
}

/// SQLite is made at start; PostgreSQL is reached now (its server and schema version
/// are shown), so a wrong host, password or database shows up here.
fn check_store(cfg: &Config) -> anyhow::Result<()> {
    let Some(url) = &cfg.store.url else {
        println!(
            "store         SQLite {}",
            cfg.data_dir.join("state.db").display()
        );
        return Ok(());
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let found = rt
        .block_on(hookbridge::store::PostgresStore::check(url))
        .map_err(|e| anyhow::anyhow!("store: PostgreSQL at store.url is not usable: {e}"))?;
    println!("store         PostgreSQL (reached: {found})");
    Ok(())
}

/// Local storage is made at start; S3 is reached now: a probe object is written, read
/// back and removed, so a wrong bucket, endpoint or key shows up here and not at the first post.
fn check_storage(cfg: &Config) -> anyhow::Result<()> {
    use hookbridge::storage::{s3::S3Storage, Storage, StorageKind};
    match cfg.storage.kind {
        StorageKind::Local => {
            println!(
                "storage       local {}",
                cfg.data_dir.join("orgs").display()
            );
            Ok(())
        }
        StorageKind::S3 => {
            if std::env::var_os("AWS_ACCESS_KEY_ID").is_none()
                || std::env::var_os("AWS_SECRET_ACCESS_KEY").is_none()
            {
                println!(
                    "storage       warning: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY not set"
                );
            }
            let s3 = S3Storage::new(&cfg.storage).map_err(|e| anyhow::anyhow!("storage: {e}"))?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(s3.check())
                .map_err(|e| anyhow::anyhow!("storage: {} is not usable: {e}", s3.describe()))?;
            println!(
                "storage       {} (reached: probe written, read back, removed)",
                s3.describe()
            );
            Ok(())
        }
    }
}

fn serve(path: Option<PathBuf>, demo: bool) -> anyhow::Result<()> {
    let cfg = Config::load(path.as_deref())?;
    hookbridge::telemetry::init_tracing(&cfg.log, &cfg.node_id);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let metrics = hookbridge::telemetry::Metrics::install();
        let listeners = hookbridge::Listeners::bind(&cfg)
            .await
            .with_context(|| format!("binding {} / {}", cfg.http.listen, cfg.sftp.listen))?;
        let cancel = CancellationToken::new();
        tokio::spawn(shutdown_on_signal(cancel.clone()));
        if demo {
            let http = listeners.http.local_addr()?;
            let sftp = listeners.sftp.as_ref().and_then(|l| l.local_addr().ok());
            hookbridge::run_with_hook(cfg, listeners, metrics, cancel, move |app| {
                Box::pin(async move {
                    let pw = hookbridge::demo::setup(&app)
                        .await
                        .map_err(anyhow::Error::msg)?;
                    let token = mint(
                        &app.secrets.ingress_jwt,
                        hookbridge::demo::DEMO_ORG,
                        std::time::Duration::from_secs(86400),
                    )?;
                    print_demo(http, sftp, &pw, &token, &app.secrets.admin_token);
                    Ok(())
                })
            })
            .await?;
        } else {
            hookbridge::run(cfg, listeners, metrics, cancel).await?;
        }
        Ok(())
    })
}

fn print_demo(
    http: std::net::SocketAddr,
    sftp: Option<std::net::SocketAddr>,
    pw: &str,
    token: &str,
    admin: &str,
) {
    let sftp_port = sftp.map(|a| a.port()).unwrap_or(2222);
    println!(
        "\n=== hookbridge demo ===\n\
         org:           acme\n\
         SFTP:          sftp -P {sftp_port} acme@127.0.0.1   (password: {pw})\n\
         admin token:   {admin}\n\
         ingress token: {token}\n\n\
         Post an event:\n  curl -sS -X POST http://{http}/v1/orgs/acme/events \\\n    \
         -H 'Authorization: Bearer {token}' -H 'Content-Type: application/json' \\\n    \
         -d '{{\"type\":\"inboundMessage\",\"data\":{{\"channel_id\":\"+15550100\",\"text\":\"hello\"}}}}'\n\
         ======================\n"
    );
}

async fn shutdown_on_signal(cancel: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: draining"),
        _ = int.recv() => tracing::info!("SIGINT: draining"),
    }
    cancel.cancel();
}
