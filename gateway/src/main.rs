//! The `understudy` command line.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use understudy::config::{BackendSslMode, ClientAuth, Config, LogFormat, Promote};
use understudy::shutdown::Phase;
use understudy::Gateway;

/// Understudy: a PostgreSQL failover gateway.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Run(RunArgs),
    /// Start a local primary, a streaming standby and a gateway in front, ready for psql.
    Demo(understudy::demo::DemoArgs),
    /// Talk to a running gateway.
    Ctl {
        /// Admin address of the gateway.
        #[arg(long, default_value = "127.0.0.1:9187", global = true)]
        admin: SocketAddr,
        /// The admin listener's token (`admin_token`), if it wants one.
        #[arg(
            long,
            env = "UNDERSTUDY_ADMIN_TOKEN",
            hide_env_values = true,
            global = true
        )]
        admin_token: Option<String>,
        #[command(subcommand)]
        command: CtlCommand,
    },
}

#[derive(Subcommand)]
enum CtlCommand {
    /// Show backends and sessions.
    Status {
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Hold every session at its next transaction boundary (for a primary restart or
    /// switchover); fails, and resumes, if some transaction does not end in time.
    Pause {
        /// How long to wait for open transactions to end.
        #[arg(long, default_value_t = 10_000)]
        timeout_ms: u64,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Let the sessions a pause holds go on.
    Resume,
    /// Read the auth file and TLS certificates again (as SIGHUP does).
    Reload {
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Crash the primary with SIGKILL (only against `understudy demo`).
    CrashPrimary,
}

#[derive(clap::Args, Clone)]
struct RunArgs {
    /// TOML configuration file; flags below override it.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Address clients connect to.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Directory for a Unix-domain socket clients may connect to as well (.s.PGSQL.<port>).
    #[arg(long)]
    unix_socket_dir: Option<PathBuf>,
    /// A PostgreSQL server, HOST:PORT (HOST a directory: its Unix-domain socket); repeat for
    /// several (the primary is found by role).
    #[arg(long = "backend")]
    backends: Vec<String>,
    /// Admin HTTP address for /metrics and /status.
    #[arg(long)]
    admin_listen: Option<SocketAddr>,
    /// Who authenticates clients.
    #[arg(long, value_enum)]
    client_auth: Option<ClientAuth>,
    /// Who authenticates clients on the Unix-domain socket (peer: their OS user).
    #[arg(long, value_enum)]
    unix_socket_auth: Option<ClientAuth>,
    /// TLS towards the backends.
    #[arg(long, value_enum)]
    backend_sslmode: Option<BackendSslMode>,
    /// Who promotes a standby when the primary fails.
    #[arg(long, value_enum)]
    promote: Option<Promote>,
    /// How log lines are written.
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
}

impl RunArgs {
    fn into_config(self) -> anyhow::Result<Config> {
        let mut config = match &self.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        if let Some(listen) = self.listen {
            config.listen = listen;
        }
        if self.unix_socket_dir.is_some() {
            config.unix_socket_dir = self.unix_socket_dir;
        }
        if !self.backends.is_empty() {
            config.backends = self.backends;
        }
        if self.admin_listen.is_some() {
            config.admin_listen = self.admin_listen;
        }
        if let Some(mode) = self.client_auth {
            config.auth.client_auth = mode;
        }
        if let Some(mode) = self.unix_socket_auth {
            config.auth.unix_socket_auth = Some(mode);
        }
        if let Some(mode) = self.backend_sslmode {
            config.backend_tls.sslmode = mode;
        }
        if let Some(promote) = self.promote {
            config.failover.promote = promote;
        }
        if let Some(format) = self.log_format {
            config.log_format = format;
        }
        config.validate()?;
        Ok(config)
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => args.clone().into_config().and_then(|config| {
            understudy::telemetry::init_logging(&config.log_level, config.log_format);
            understudy::runtime(config.worker_threads)?.block_on(run(config, args))
        }),
        Command::Demo(args) => {
            understudy::telemetry::init_logging("info", LogFormat::Text);
            understudy::runtime(1)
                .map_err(anyhow::Error::from)
                .and_then(|rt| rt.block_on(understudy::demo::run(args)))
        }
        Command::Ctl {
            admin,
            admin_token,
            command,
        } => {
            let admin = understudy::ctl::Admin {
                addr: admin,
                token: admin_token,
            };
            understudy::telemetry::init_logging("info", LogFormat::Text);
            understudy::runtime(1)
                .map_err(anyhow::Error::from)
                .and_then(|rt| rt.block_on(ctl(admin, command)))
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("understudy: {}", said_once(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// The error and its causes, each said once: many messages already end with their cause's
/// text (so that a log line carries it), which the chain would repeat.
fn said_once(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    for cause in e.chain().skip(1) {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
    }
    out
}

async fn run(config: Config, args: RunArgs) -> anyhow::Result<()> {
    understudy::gateway::raise_open_file_limit(&config);
    let activated = understudy::gateway::Activated::from_systemd()?;
    let mut gateway = Gateway::bind_with(config, activated).await?;
    gateway.reload_from(Box::new(move || {
        args.clone().into_config().map_err(|e| said_once(&e))
    }));
    if let Some(admin) = gateway.admin_addr() {
        tracing::info!(%admin, "admin listener (/metrics, /status)");
    }
    let trigger = gateway.shutdown_trigger();
    let mut signals = understudy::shutdown::Signals::new()?;
    understudy::reload::on_hangup(gateway.shared().clone())?;
    tokio::spawn(async move {
        // First signal: drain; second: close everything now.
        for phase in [Phase::Draining, Phase::Force] {
            signals.recv().await;
            tracing::info!(?phase, "signal received");
            if phase == Phase::Draining {
                understudy::systemd::stopping();
            }
            trigger.advance(phase);
        }
    });
    let mut status = format!("accepting connections on {}", gateway.local_addr());
    if let Some(socket) = &gateway.shared().unix_socket {
        status.push_str(&format!(" and {}", socket.display()));
    }
    tokio::spawn(understudy::systemd::feed_watchdog());
    understudy::systemd::ready(&status);
    gateway.run().await;
    Ok(())
}

async fn ctl(admin: understudy::ctl::Admin, command: CtlCommand) -> anyhow::Result<()> {
    match command {
        CtlCommand::Status { json } => {
            let body = understudy::ctl::get(admin, "/status").await?;
            if json {
                println!("{body}");
            } else {
                let value: serde_json::Value =
                    serde_json::from_str(&body).context("the admin listener sent invalid JSON")?;
                print!("{}", understudy::ctl::render_status(&value));
            }
        }
        CtlCommand::Pause { timeout_ms, json } => {
            let path = format!("/pause?timeout_ms={timeout_ms}");
            post_and_print(admin, &path, json, understudy::ctl::render_pause)
                .await
                .context("not paused")?;
        }
        CtlCommand::Resume => {
            let body = understudy::ctl::request(admin, hyper::Method::POST, "/resume").await?;
            let value: serde_json::Value =
                serde_json::from_str(&body).context("the admin listener sent invalid JSON")?;
            if value["was_paused"] == true {
                println!("resumed");
            } else {
                println!("resumed (it was not paused)");
            }
        }
        CtlCommand::Reload { json } => {
            post_and_print(admin, "/reload", json, understudy::ctl::render_reload)
                .await
                .context("the reload failed")?;
        }
        CtlCommand::CrashPrimary => {
            let body =
                understudy::ctl::request(admin, hyper::Method::POST, "/demo/crash-primary").await?;
            print!("{body}");
        }
    }
    Ok(())
}

/// POSTs to `path` on the admin listener and prints its JSON answer, raw or through `render`;
/// an answer other than 200 is an error (after it is printed).
async fn post_and_print(
    admin: understudy::ctl::Admin,
    path: &str,
    json: bool,
    render: fn(&serde_json::Value) -> String,
) -> anyhow::Result<()> {
    let (status, body) = understudy::ctl::post(admin, path).await?;
    let value: serde_json::Value =
        serde_json::from_str(&body).with_context(|| format!("HTTP {status}: {body}"))?;
    if json {
        println!("{body}");
    } else {
        print!("{}", render(&value));
    }
    anyhow::ensure!(status == 200, "HTTP {status}");
    Ok(())
}
