//! Wires the parts into a running node and owns its lifecycle: start, serve, drain, exit.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

use crate::auth::Authorizer;
use crate::auth::cache::{CacheSettings, DecisionCache};
use crate::auth::introspection::IntrospectionClient;
use crate::auth::static_tokens::{Reloaded, StaticTokens};
use crate::config::{AuthMode, Capacity, Config};
use crate::context::NodeContext;
use crate::http::{self, AppState};
use crate::lifecycle::Lifecycle;
use crate::listener::{self, ListenerLimits, Phase};
use crate::replication::{Mesh, PeerTls};
use crate::storage::{Store, StoreOptions};

/// How often background maintenance (access flush, eviction) runs.
const MAINTENANCE_INTERVAL: Duration = Duration::from_secs(1);
/// How often files no record references are looked for (also once at start).
const ORPHAN_SWEEP_INTERVAL: Duration = Duration::from_secs(3600);
/// How often the static tokens file is checked for changes.
const TOKENS_POLL_INTERVAL: Duration = Duration::from_secs(2);

/// Runs a node until it has drained after SIGTERM/SIGINT.
pub async fn serve(config: Config, allow_insecure: bool) -> anyhow::Result<()> {
    refuse_open_auth_off_loopback(&config, allow_insecure)?;
    let metrics =
        crate::metrics::install().map_err(|e| anyhow::anyhow!("cannot install metrics: {e}"))?;
    crate::metrics::spawn_upkeep(metrics.clone());
    let store = open_store(&config)?;
    let (auth, static_tokens) = build_authorizer(&config)?;
    let lifecycle = Lifecycle::default();
    let listener = TcpListener::bind(config.server.http)
        .await
        .with_context(|| format!("cannot listen on {} (server.http)", config.server.http))?;
    let address = listener.local_addr()?;
    let grpc_listener = TcpListener::bind(config.server.grpc)
        .await
        .with_context(|| format!("cannot listen on {} (server.grpc)", config.server.grpc))?;
    let grpc_address = grpc_listener.local_addr()?;
    let peer_tls = PeerTls::load(&config.replication.tls)
        .map_err(|e| anyhow::anyhow!("replication.tls: {e}"))?;
    let mesh = Mesh::new(
        store.clone(),
        &config.node.account.to_ascii_lowercase(),
        &config.node.region,
        &config.replication,
        peer_tls.clone(),
        config.server.internal.port(),
    )?;
    let internal_listener = match &mesh {
        Some(_) => Some(bind_internal(&config).await?),
        None => None,
    };

    let context = NodeContext::new(
        config.clone(),
        store.clone(),
        auth,
        lifecycle.clone(),
        Some(metrics),
        mesh.clone(),
    );
    spawn_maintenance(store.clone(), &config);
    spawn_orphan_sweep(store.clone(), config.storage.orphan_grace.0);
    if let Some(tokens) = &static_tokens {
        spawn_tokens_watch(tokens.clone());
    }
    let shutdown = spawn_signal_handling(
        lifecycle.clone(),
        static_tokens,
        config.shutdown.drain_timeout.0,
    )?;

    if let Some(mesh) = &mesh {
        mesh.start();
    }
    if let Some(tls) = &peer_tls {
        tls.spawn_reloader();
    }
    lifecycle.set_serving();
    let stats = store.stats();
    let internal_address = match &internal_listener {
        Some(listener) => Some(listener.local_addr()?),
        None => None,
    };
    tracing::info!(
        %address, %grpc_address, internal_address = internal_address.map(tracing::field::display),
        node_id = store.node_id(), account = %config.node.account,
        artifacts = stats.artifacts, used_bytes = stats.used_bytes, capacity_bytes = stats.capacity,
        "kura is serving"
    );
    // Up to three listeners, each with up to `server.max_connections`.
    warn_if_descriptors_run_short(3 * config.server.max_connections);
    let phase = spawn_phase_updates(lifecycle.clone(), shutdown.clone());
    // Every listener in one task set, under one phase: they drain and stop together.
    let http = listener::serve(
        listener,
        http::router(AppState(context.clone())),
        limits("http", &config),
        None,
        phase.clone(),
        lifecycle.clone(),
    );
    let grpc = listener::serve(
        grpc_listener,
        crate::grpc::router(context.clone()),
        limits("grpc", &config),
        None,
        phase.clone(),
        lifecycle.clone(),
    );
    let internal = async {
        if let (Some(listener), Some(mesh)) = (internal_listener, mesh) {
            let router = crate::replication::router(context, mesh);
            let tls =
                peer_tls.map(|tls| Arc::new(move || tls.server_config()) as listener::TlsSource);
            let limits = limits("internal", &config);
            listener::serve(listener, router, limits, tls, phase, lifecycle).await;
        }
    };
    let server = async {
        tokio::join!(http, grpc, internal);
    };
    // Drained: give open connections a moment to close, then exit regardless.
    tokio::select! {
        () = server => {}
        _ = async { shutdown.notified().await; tokio::time::sleep(Duration::from_secs(5)).await } => {
            tracing::warn!("connections still open 5s after the drain; closing them");
        }
    }
    tracing::info!("drained; exiting");
    Ok(())
}

/// The peer plane's listener (only when the node has peers). Without TLS files it is plain
/// HTTP, which validation allowed only with `replication.insecure`.
async fn bind_internal(config: &Config) -> anyhow::Result<TcpListener> {
    if config.replication.tls.ca.is_none() {
        tracing::warn!(
            "replication.insecure = true: the peer plane is plain HTTP without authentication (development only)"
        );
    }
    TcpListener::bind(config.server.internal)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} (server.internal)",
                config.server.internal
            )
        })
}

/// A one-shot "the drain is over" signal that several futures can wait on.
#[derive(Clone, Default)]
pub struct Shutdown(Arc<tokio::sync::watch::Sender<bool>>);

impl Shutdown {
    fn trigger(&self) {
        self.0.send_replace(true);
    }

    async fn notified(&self) {
        let mut receiver = self.0.subscribe();
        let _ = receiver.wait_for(|done| *done).await;
    }
}

/// Tells the listeners the node's phase: draining once a drain starts (SIGTERM, SIGINT,
/// SIGUSR1), stopped once it is over.
fn spawn_phase_updates(lifecycle: Lifecycle, shutdown: Shutdown) -> watch::Receiver<Phase> {
    let (phase, receiver) = watch::channel(Phase::Serving);
    tokio::spawn(async move {
        lifecycle.draining().await;
        phase.send_replace(Phase::Draining);
        shutdown.notified().await;
        phase.send_replace(Phase::Stopped);
    });
    receiver
}

/// The connection limits of a public listener (`server.*` applies to each).
fn limits(name: &'static str, config: &Config) -> ListenerLimits {
    ListenerLimits {
        name,
        header_timeout: config.server.header_timeout.0,
        idle_timeout: config.server.idle_timeout.0,
        max_connections: config.server.max_connections,
    }
}

/// Descriptors the process needs besides client connections (RocksDB, bodies being written or
/// read, the runtime), roughly.
const DESCRIPTOR_RESERVE: u64 = 1024;

/// Past the process's descriptor limit `accept()` fails (EMFILE) before `max_connections` is
/// reached. The listener copes (it closes idle connections to make room), but the operator
/// should know that the limit in force is not the configured one.
fn warn_if_descriptors_run_short(max_connections: usize) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit(2) with a valid out-pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return;
    }
    let wanted = max_connections as u64 + DESCRIPTOR_RESERVE;
    if limit.rlim_cur < wanted {
        tracing::warn!(
            nofile = limit.rlim_cur,
            max_connections,
            "the file descriptor limit is below 3 x server.max_connections (one per listener) plus {DESCRIPTOR_RESERVE}; raise it (ulimit -n, LimitNOFILE) or lower server.max_connections"
        );
    }
}

fn refuse_open_auth_off_loopback(config: &Config, allow_insecure: bool) -> anyhow::Result<()> {
    if config.auth.mode != AuthMode::None {
        return Ok(());
    }
    let exposed: Vec<SocketAddr> = [config.server.http, config.server.grpc]
        .into_iter()
        .filter(|a| !a.ip().is_loopback())
        .collect();
    if !exposed.is_empty() && !allow_insecure {
        bail!(
            "auth.mode = \"none\" would serve {} without authentication; bind to 127.0.0.1, configure auth, or pass --allow-insecure",
            exposed[0]
        );
    }
    tracing::warn!("auth.mode = \"none\": every request is allowed (development only)");
    Ok(())
}

fn open_store(config: &Config) -> anyhow::Result<Store> {
    let data_dir = &config.storage.data_dir;
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("cannot create storage.data_dir {}", data_dir.display()))?;
    let filesystem = crate::storage::filesystem_space(data_dir)
        .with_context(|| format!("cannot size the filesystem of {}", data_dir.display()))?;
    let in_bytes = |amount: Capacity| match amount {
        Capacity::Bytes(bytes) => bytes.0,
        Capacity::Percent(percent) => (filesystem.total as f64 * percent / 100.0) as u64,
    };
    let capacity = in_bytes(config.storage.capacity);
    let low_watermark = (capacity as f64 * config.storage.low_watermark / 100.0) as u64;
    Store::open(StoreOptions {
        data_dir: data_dir.clone(),
        durability: config.storage.durability,
        capacity,
        low_watermark,
        inline_max: config.storage.inline_max.0 as usize,
        min_free: in_bytes(config.storage.min_free),
        access_time_resolution: config.storage.access_time_resolution.0,
        block_cache: config.storage.block_cache.0 as usize,
        read_cache: config.storage.read_cache.0 as usize,
        wal_limit: crate::storage::DEFAULT_WAL_LIMIT,
        node_id: config.node.id.clone(),
        replication_log: config.replication.enabled(),
        presence_in_memory: config.storage.presence_in_memory,
    })
    .with_context(|| format!("cannot open storage.data_dir {}", data_dir.display()))
}

fn build_authorizer(config: &Config) -> anyhow::Result<(Authorizer, Option<Arc<StaticTokens>>)> {
    match config.auth.mode {
        AuthMode::None => Ok((Authorizer::Open, None)),
        AuthMode::Static => {
            let path = config
                .auth
                .static_tokens_file
                .as_ref()
                .context("auth.static_tokens_file is required")?;
            let tokens = Arc::new(StaticTokens::load(path).map_err(anyhow::Error::msg)?);
            Ok((Authorizer::Static(tokens.clone()), Some(tokens)))
        }
        AuthMode::Introspection => {
            let client = IntrospectionClient::new(&config.auth).map_err(anyhow::Error::msg)?;
            let settings = CacheSettings {
                fresh: config.auth.cache_fresh.0,
                max_age: config.auth.cache_max_age.0,
                negative_ttl: config.auth.negative_ttl.0,
                capacity: config.auth.cache_size,
            };
            let cache = DecisionCache::new(client, settings);
            Ok((Authorizer::Introspection(Arc::new(cache)), None))
        }
    }
}

fn spawn_maintenance(store: Store, config: &Config) {
    let expiry = config.uploads.expiry.0;
    let upload_expiry = expiry.as_millis() as u64;
    // Its own task: on a large data dir from an older release it takes a while, and eviction
    // and expiry must not wait for it.
    let backfill = store.clone();
    tokio::spawn(async move {
        match tokio::task::spawn_blocking(move || backfill.backfill_presence()).await {
            Ok(Ok(0)) => {}
            Ok(Ok(written)) => {
                tracing::info!(
                    written,
                    "indexed the presence of the artifacts stored before"
                )
            }
            Ok(Err(error)) => tracing::error!(
                %error,
                "could not index the presence of stored artifacts; existence checks read the records"
            ),
            Err(error) => tracing::error!(%error, "the presence backfill panicked"),
        }
    });
    tokio::spawn(async move {
        match store.finish_unfinished_cleans().await {
            Ok(0) => {}
            Ok(removed) => tracing::info!(removed, "finished the project cleans a stop cut short"),
            Err(error) => {
                tracing::error!(%error, "could not finish the project cleans a stop cut short")
            }
        }
        let mut ticker = tokio::time::interval(MAINTENANCE_INTERVAL);
        for tick in 0u64.. {
            ticker.tick().await;
            if let Err(error) = store.maintain().await {
                tracing::error!(%error, "storage maintenance failed");
            }
            // At most `uploads.max_in_flight` records to look at, but deleting one is file and
            // metadata work: off the async workers.
            let uploads = store.clone();
            expire("module uploads", move || {
                uploads.expire_uploads(upload_expiry)
            })
            .await;
            // A directory scan of the resumable uploads in flight: once a minute is plenty.
            if tick % 60 == 0 {
                let staging = store.clone();
                expire("resumable uploads", move || {
                    staging.expire_resumable(expiry)
                })
                .await;
            }
        }
    });
}

/// Runs an expiry pass on a blocking thread and logs what it deleted.
async fn expire(
    what: &'static str,
    pass: impl FnOnce() -> Result<usize, crate::storage::StoreError> + Send + 'static,
) {
    match tokio::task::spawn_blocking(pass).await {
        Ok(Ok(0)) => {}
        Ok(Ok(n)) => tracing::info!(expired = n, "expired unfinished {what}"),
        Ok(Err(error)) => tracing::error!(%error, "could not expire {what}"),
        Err(error) => tracing::error!(%error, "the expiry of {what} panicked"),
    }
}

/// Sweeps at start, in the background (start-up and `/ready` do not wait for it), then hourly.
fn spawn_orphan_sweep(store: Store, grace: Duration) {
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(ORPHAN_SWEEP_INTERVAL);
        loop {
            ticker.tick().await;
            let sweeper = store.clone();
            match tokio::task::spawn_blocking(move || sweeper.sweep_orphans(grace)).await {
                Ok(Ok(report)) => tracing::info!(
                    bodies = report.bodies,
                    temps = report.temps,
                    uploads = report.uploads,
                    "orphan sweep finished"
                ),
                Ok(Err(error)) => tracing::error!(%error, "orphan sweep failed"),
                Err(error) => tracing::error!(%error, "orphan sweep panicked"),
            }
        }
    });
}

fn spawn_tokens_watch(tokens: Arc<StaticTokens>) {
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(TOKENS_POLL_INTERVAL);
        loop {
            ticker.tick().await;
            log_reload(&tokens, tokens.reload_if_changed());
        }
    });
}

fn log_reload(tokens: &StaticTokens, outcome: Option<Reloaded>) {
    let file = tokens.path().display();
    match outcome {
        Some(Reloaded::Loaded(count)) => {
            tracing::info!(file = %file, tokens = count, "static tokens reloaded")
        }
        // Both degraded states are errors: one locks every static token out, the other leaves
        // tokens in force that the file on disk no longer says.
        Some(Reloaded::Revoked) => tracing::error!(
            file = %file,
            "static tokens file is missing: every static token is revoked until it is back"
        ),
        Some(Reloaded::Kept { error, tokens }) => tracing::error!(
            %error, tokens,
            "static tokens not reloaded; the previous ones stay in force"
        ),
        None => {}
    }
}

/// SIGTERM/SIGINT drain then exit (a second one exits at once), SIGUSR1 drains without exiting,
/// SIGHUP reloads static tokens. Returns the signal that the drain is over.
fn spawn_signal_handling(
    lifecycle: Lifecycle,
    tokens: Option<Arc<StaticTokens>>,
    drain_timeout: Duration,
) -> anyhow::Result<Shutdown> {
    let shutdown = Shutdown::default();
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut user1 = signal(SignalKind::user_defined1())?;
    let mut hangup = signal(SignalKind::hangup())?;
    let done = shutdown.clone();
    tokio::spawn(async move {
        let mut exiting = false;
        loop {
            tokio::select! {
                _ = terminate.recv() => {}
                _ = interrupt.recv() => {}
                _ = user1.recv() => {
                    if lifecycle.start_draining() {
                        tracing::info!("SIGUSR1: draining (the process keeps running)");
                    }
                    continue;
                }
                _ = hangup.recv() => {
                    if let Some(tokens) = &tokens {
                        log_reload(tokens, Some(tokens.reload()));
                    }
                    continue;
                }
            }
            if exiting {
                tracing::warn!("second termination signal: exiting now");
                std::process::exit(1);
            }
            exiting = true;
            lifecycle.start_draining();
            tracing::info!(
                in_flight = lifecycle.in_flight(),
                sending = lifecycle.sending(),
                "draining before exit"
            );
            let lifecycle = lifecycle.clone();
            let done = done.clone();
            tokio::spawn(async move {
                if tokio::time::timeout(drain_timeout, lifecycle.idle())
                    .await
                    .is_err()
                {
                    tracing::warn!(
                        in_flight = lifecycle.in_flight(),
                        sending = lifecycle.sending(),
                        "drain timeout reached"
                    );
                }
                done.trigger();
            });
        }
    });
    Ok(shutdown)
}
