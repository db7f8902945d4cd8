//! `understudy demo`: a local primary, a streaming hot standby and a gateway, ready for psql.

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::config::Config;
use crate::local_cluster::{ClusterOptions, LocalCluster, PgBinaries};
use crate::shutdown::Phase;
use crate::Gateway;

/// Options of `understudy demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Port the gateway listens on (127.0.0.1).
    #[arg(long, default_value_t = 6432)]
    pub port: u16,
    /// Port of the admin listener (/metrics, /status).
    #[arg(long, default_value_t = 9187)]
    pub admin_port: u16,
    /// Directory for the clusters' data (default: a new temporary directory); removed on exit.
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

/// Role and password the demo creates for the reader to log in with.
pub const DEMO_ROLE: &str = "app";

/// Runs the demo until Ctrl-C, then removes everything it created.
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let bins = PgBinaries::find()?;
    let opts = match args.dir.clone() {
        Some(dir) => ClusterOptions::new(dir),
        None => ClusterOptions::in_temp_dir(),
    };
    eprintln!(
        "Starting a PostgreSQL primary and a streaming hot standby ({}) in {} ...",
        bins.bindir.display(),
        opts.base_dir.display()
    );
    let mut cluster = LocalCluster::create(&bins, opts).await?;
    let result = serve(&mut cluster, &args).await;
    eprintln!(
        "Stopping PostgreSQL and removing {} ...",
        cluster.base_dir().display()
    );
    cluster.shutdown().await;
    result
}

async fn serve(cluster: &mut LocalCluster, args: &DemoArgs) -> anyhow::Result<()> {
    let admin = cluster.primary.client("postgres", "postgres").await?;
    admin
        .batch_execute(&format!(
            "CREATE ROLE {DEMO_ROLE} LOGIN PASSWORD '{DEMO_ROLE}'"
        ))
        .await?;
    admin
        .batch_execute(&format!("CREATE DATABASE {DEMO_ROLE} OWNER {DEMO_ROLE}"))
        .await?;
    cluster.wait_standby_caught_up().await?;

    // A socket in the cluster's folder, removed with it, unless the folder's path is too long
    // for a socket's (108 bytes on Linux).
    let socket_dir = (cluster.base_dir().as_os_str().len() + "/.s.PGSQL.65535".len() < 108)
        .then(|| cluster.base_dir().to_owned());
    let mut config = Config {
        listen: SocketAddr::from(([127, 0, 0, 1], args.port)),
        admin_listen: Some(SocketAddr::from(([127, 0, 0, 1], args.admin_port))),
        backends: cluster.nodes().map(|n| n.addr().to_string()).collect(),
        unix_socket_dir: socket_dir.clone(),
        ..Config::default()
    };
    // The control role (postgres, trusted on loopback) reads verifiers, so SCRAM sessions keep
    // the ClientKey they need to log in again after a failover.
    config.auth.auth_query = Some(crate::config::DEFAULT_AUTH_QUERY.to_owned());
    config.failover.promote = crate::config::Promote::Auto;
    let mut gateway = Gateway::bind(config).await?;
    let (crash_tx, mut crash_rx) = tokio::sync::mpsc::channel(1);
    gateway.enable_demo_crash(crash_tx);
    let topology = gateway.shared().topology.clone();
    let addr = gateway.local_addr();
    let by_socket = match &socket_dir {
        Some(dir) => format!(
            "or by its Unix-domain socket (password {DEMO_ROLE}):\n\n  \
             psql -h {} -p {} -U {DEMO_ROLE} {DEMO_ROLE}\n\n",
            dir.display(),
            addr.port()
        ),
        None => String::new(),
    };
    let admin_addr = gateway.admin_addr();
    let trigger = gateway.shutdown_trigger();
    let running = tokio::spawn(gateway.run());

    let standby = cluster
        .standby
        .as_ref()
        .map(|s| s.addr().to_string())
        .unwrap_or_else(|| "-".to_owned());
    println!(
        "\nUnderstudy is ready.\n\n  \
         primary  {primary}\n  standby  {standby}  (streaming, hot standby)\n  \
         gateway  {addr}\n\n\
         Connect through the gateway:\n\n  \
         psql \"postgresql://{DEMO_ROLE}:{DEMO_ROLE}@{addr}/{DEMO_ROLE}\"\n\n\
         {by_socket}\
         Status:   understudy ctl --admin {admin} status\n\
         Metrics:  curl http://{admin}/metrics\n\
         Failover: understudy ctl --admin {admin} crash-primary   (SIGKILLs the primary; sessions move)\n\n\
         Press Ctrl-C to stop and remove everything.",
        primary = cluster.primary.addr(),
        admin = admin_addr.map(|a| a.to_string()).unwrap_or_default(),
    );
    // A closed terminal ends the demo as Ctrl-C does, cleaning up.
    let mut signals = crate::shutdown::Signals::with_hangup()?;
    let result = loop {
        tokio::select! {
            _ = signals.recv() => break Ok(()),
            Some(done) = crash_rx.recv() => {
                if let Err(e) = crash_and_reseed(cluster, &topology, done).await {
                    break Err(e);
                }
            }
        }
    };
    trigger.advance(Phase::Force);
    let _ = running.await;
    result
}

/// SIGKILLs the primary, waits for the gateway to promote the standby, and seeds a new
/// standby from the new primary so the demo can crash again.
async fn crash_and_reseed(
    cluster: &mut LocalCluster,
    topology: &crate::topology::Topology,
    done: tokio::sync::oneshot::Sender<()>,
) -> anyhow::Result<()> {
    let old = crate::topology::Backend::parse(&cluster.primary.addr().to_string())
        .map_err(anyhow::Error::msg)?;
    eprintln!("Crashing the primary {old} (SIGKILL) ...");
    cluster.primary.kill_all().await;
    let _ = done.send(());
    match topology
        .primary_other_than(&old, std::time::Duration::from_secs(60))
        .await
    {
        Some(new) => eprintln!("The gateway promoted {new}; sessions moved there."),
        None => anyhow::bail!("no new primary within 60 s"),
    }
    cluster.reseed_standby().await?;
    if let Some(s) = &cluster.standby {
        eprintln!(
            "New standby {} streams from the new primary; crash again any time.",
            s.addr()
        );
    }
    Ok(())
}
