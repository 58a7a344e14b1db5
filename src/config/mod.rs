//! Typed configuration: one TOML file, every key overridable by a `KURA_<SECTION>_<KEY>`
//! environment variable, validated at start with errors that name the key.
//!
//! With no file and no variables the result is the dev node of `operations.md`: data in
//! `./kura-data`, HTTP on `127.0.0.1:4000`, auth `none`.

pub(crate) mod file_errors;
pub mod units;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::storage::Durability;
pub use units::{ByteSize, Capacity, HumanDuration};

/// The whole configuration. Field docs are the reference; `config/kura.toml` mirrors them.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub node: NodeConfig,
    pub storage: StorageConfig,
    pub auth: AuthConfig,
    pub limits: LimitsConfig,
    pub grpc: GrpcConfig,
    pub uploads: UploadsConfig,
    pub replication: ReplicationConfig,
    pub shutdown: ShutdownConfig,
    pub log: LogConfig,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Public HTTP listener.
    pub http: SocketAddr,
    /// Public gRPC listener (REAPI v2 cache services, ByteStream, health).
    pub grpc: SocketAddr,
    /// Peer plane listener (replication over mTLS), served when the node has peers.
    pub internal: SocketAddr,
    /// An HTTP/1 request's line and headers must arrive within this of its first byte.
    pub header_timeout: HumanDuration,
    /// Connections with no request in flight for this long are closed, and one whose reader
    /// took nothing of a response for this long is cut.
    pub idle_timeout: HumanDuration,
    /// Connections open at once on each listener; at the limit the longest-idle one is closed
    /// to make room.
    pub max_connections: usize,
}

/// Upper bound of `server.max_connections`: more on one listener is a typo.
const MAX_CONNECTIONS_CEILING: usize = 1_000_000;

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            http: SocketAddr::from(([127, 0, 0, 1], 4000)),
            grpc: SocketAddr::from(([127, 0, 0, 1], 50051)),
            internal: SocketAddr::from(([127, 0, 0, 1], 7443)),
            header_timeout: HumanDuration(std::time::Duration::from_secs(10)),
            idle_timeout: HumanDuration(std::time::Duration::from_secs(60)),
            max_connections: 10_000,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    /// The one account this node serves.
    pub account: String,
    pub region: String,
    /// Stable node identity; generated once and kept in the data dir when unset.
    pub id: Option<String>,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            account: "dev".into(),
            region: "local".into(),
            id: None,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    pub data_dir: PathBuf,
    /// Bytes of artifact bodies kept, or a percentage of the data dir's filesystem.
    pub capacity: Capacity,
    /// Eviction frees space down to this percentage of capacity.
    pub low_watermark: f64,
    pub durability: Durability,
    /// Bodies up to this size live inside their metadata record.
    pub inline_max: ByteSize,
    /// Writes get 507 while the filesystem has less free space than this (bytes or a
    /// percentage of the filesystem), so the metadata store never runs out of space.
    pub min_free: Capacity,
    /// The orphan sweep leaves files younger than this alone (a second guard: files of writes
    /// in flight are known to the process and never swept).
    pub orphan_grace: HumanDuration,
    /// An artifact's access time moves at most once per this interval: reads of a hot key cost
    /// one small write per interval, and eviction order is exact to within it.
    pub access_time_resolution: HumanDuration,
    /// Memory for RocksDB's cache of metadata blocks (records and inline bodies).
    pub block_cache: ByteSize,
    /// Memory for recently read small artifacts (inline bodies with their records), served
    /// without a RocksDB read; 0 turns it off.
    pub read_cache: ByteSize,
    /// Hold the existence of content-addressed artifacts in memory (75–150 bytes each), so
    /// that `FindMissingBlobs` needs no metadata lookup.
    pub presence_in_memory: bool,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            data_dir: PathBuf::from("./kura-data"),
            capacity: Capacity::Percent(80.0),
            low_watermark: 90.0,
            durability: Durability::Process,
            inline_max: ByteSize(crate::storage::DEFAULT_INLINE_MAX as u64),
            min_free: Capacity::Percent(1.0),
            orphan_grace: HumanDuration(std::time::Duration::from_secs(600)),
            access_time_resolution: HumanDuration(crate::storage::DEFAULT_ACCESS_TIME_RESOLUTION),
            block_cache: ByteSize(crate::storage::DEFAULT_BLOCK_CACHE as u64),
            read_cache: ByteSize(crate::storage::DEFAULT_READ_CACHE as u64),
            presence_in_memory: true,
        }
    }
}

/// Which authorizer checks tokens (auth.md).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// No checks (local development only).
    #[default]
    None,
    /// Token hashes and grants from a file.
    Static,
    /// OAuth 2.0 token introspection against the control plane.
    Introspection,
}

/// How client credentials are sent to the introspection endpoint.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    #[default]
    Body,
    Basic,
}

/// A secret value: never printed, logged or serialized back out.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str("<redacted>")
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    pub mode: AuthMode,
    pub static_tokens_file: Option<PathBuf>,
    pub control_plane_url: Option<String>,
    pub client_id: Option<String>,
    pub client_secret: Option<Secret>,
    pub client_auth: ClientAuth,
    pub connect_timeout: HumanDuration,
    pub timeout: HumanDuration,
    /// Introspection answers are served without asking again for this long...
    pub cache_fresh: HumanDuration,
    /// ...then revalidated in the background, and never used past this age.
    pub cache_max_age: HumanDuration,
    /// Inactive tokens and tokens without grants are remembered this long.
    pub negative_ttl: HumanDuration,
    /// Tokens kept in the decision cache (least recently used go first).
    pub cache_size: u64,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            mode: AuthMode::None,
            static_tokens_file: None,
            control_plane_url: None,
            client_id: None,
            client_secret: None,
            client_auth: ClientAuth::Body,
            connect_timeout: HumanDuration(std::time::Duration::from_secs(1)),
            timeout: HumanDuration(std::time::Duration::from_secs(3)),
            cache_fresh: HumanDuration(std::time::Duration::from_secs(600)),
            cache_max_age: HumanDuration(std::time::Duration::from_secs(1500)),
            negative_ttl: HumanDuration(std::time::Duration::from_secs(5)),
            cache_size: 100_000,
        }
    }
}

/// Upload size limits per surface (http-api.md); over → 413.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    pub gradle: ByteSize,
    pub xcode_cas: ByteSize,
    pub keyvalue: ByteSize,
    pub module_part: ByteSize,
    pub module_assembled: ByteSize,
    /// Nx, Metro and the Bazel HTTP cache.
    pub blob: ByteSize,
    /// Cache requests served at once (bodies included); more are answered 429.
    pub max_in_flight_requests: usize,
    /// Body bytes all transfers together may hold in memory.
    pub body_memory: ByteSize,
    /// How long a transfer waits for room in `body_memory` before it is answered 429.
    pub body_memory_wait: HumanDuration,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            gradle: ByteSize(100 << 20),
            xcode_cas: ByteSize(256 << 20),
            keyvalue: ByteSize(1 << 20),
            module_part: ByteSize(10 << 20),
            module_assembled: ByteSize(2 << 30),
            blob: ByteSize(2 << 30),
            max_in_flight_requests: 4096,
            body_memory: ByteSize(256 << 20),
            body_memory_wait: HumanDuration(std::time::Duration::from_secs(10)),
        }
    }
}

/// Limits of the gRPC (REAPI) surface. Blob sizes share `limits.blob` with the Bazel HTTP cache.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GrpcConfig {
    /// Largest gRPC message the node accepts or sends (each ByteStream chunk, each batch call).
    pub max_message_size: ByteSize,
    /// `max_batch_total_size_bytes` advertised in the capabilities: the blob bytes one
    /// BatchUpdateBlobs or BatchReadBlobs call may carry. Below `max_message_size`, leaving room
    /// for the message's own framing.
    pub max_batch_total_size: ByteSize,
    /// Bytes GetActionResult inlines (stdout, stderr, output files) in one answer, together.
    pub inline_max: ByteSize,
}

impl Default for GrpcConfig {
    fn default() -> Self {
        GrpcConfig {
            max_message_size: ByteSize(4 << 20),
            max_batch_total_size: ByteSize((4 << 20) - (64 << 10)),
            inline_max: ByteSize(1 << 20),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UploadsConfig {
    /// Module multipart uploads in flight at once; more → 429.
    pub max_in_flight: usize,
    /// Highest part number of an upload; more → 400.
    pub max_parts: u32,
    /// Unfinished uploads are deleted after this long.
    pub expiry: HumanDuration,
}

impl Default for UploadsConfig {
    fn default() -> Self {
        UploadsConfig {
            max_in_flight: 128,
            max_parts: 10_000,
            expiry: HumanDuration(std::time::Duration::from_secs(24 * 3600)),
        }
    }
}

/// The account mesh (replication.md).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReplicationConfig {
    /// Static peers: `https://host:port` (or `http://` with `insecure`).
    pub peers: Vec<String>,
    /// Allows the peer plane without TLS (development and tests only).
    pub insecure: bool,
    /// Replication and bootstrap bytes sent per second, node-wide; 0 = unlimited.
    pub bandwidth_limit: ByteSize,
    /// Bytes per second to any one peer; 0 = only the node-wide limit.
    pub per_peer_limit: ByteSize,
    /// A peer missing from every source for this long is dropped with its pending entries.
    pub peer_expiry: HumanDuration,
    pub discovery: DiscoveryConfig,
    pub tls: PeerTlsConfig,
    pub outbox: OutboxConfig,
    pub bootstrap: BootstrapConfig,
}

impl ReplicationConfig {
    /// Whether this node is part of a mesh (it then logs its writes and serves the peer plane).
    pub fn enabled(&self) -> bool {
        !self.peers.is_empty() || self.discovery.dns_name.is_some()
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OutboxConfig {
    /// Records the replication log keeps at most; past it the oldest are dropped and the peers
    /// that had not received them catch up from an index. Writes are never refused for it.
    pub max_entries: u64,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        OutboxConfig {
            max_entries: 1_000_000,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BootstrapConfig {
    /// `/ready` reports `bootstrapping` at most this long.
    pub timeout: HumanDuration,
}

impl Default for BootstrapConfig {
    fn default() -> Self {
        BootstrapConfig {
            timeout: HumanDuration(std::time::Duration::from_secs(600)),
        }
    }
}

impl Default for ReplicationConfig {
    fn default() -> Self {
        ReplicationConfig {
            peers: Vec::new(),
            insecure: false,
            bandwidth_limit: ByteSize(100 << 20),
            per_peer_limit: ByteSize(0),
            peer_expiry: HumanDuration(std::time::Duration::from_secs(600)),
            discovery: DiscoveryConfig::default(),
            tls: PeerTlsConfig::default(),
            outbox: OutboxConfig::default(),
            bootstrap: BootstrapConfig::default(),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DiscoveryConfig {
    pub dns_name: Option<String>,
    pub interval: HumanDuration,
    pub nameservers: Vec<String>,
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        DiscoveryConfig {
            dns_name: None,
            interval: HumanDuration(std::time::Duration::from_secs(5)),
            nameservers: Vec::new(),
        }
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PeerTlsConfig {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub server_name: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShutdownConfig {
    /// How long in-flight requests may run after a drain starts.
    pub drain_timeout: HumanDuration,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig {
            drain_timeout: HumanDuration(std::time::Duration::from_secs(60)),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Pretty,
    Json,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `pretty` on a terminal, `json` otherwise, when unset.
    pub format: Option<LogFormat>,
    /// A `tracing` filter such as `info` or `kura=debug,info`.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: None,
            level: "info".into(),
        }
    }
}

/// A configuration problem, worded for the operator: names the key (or variable) and the fault.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(String);

/// Sections, in the order env names are matched (longest first, so nested sections win).
const SECTIONS: [&str; 14] = [
    "replication.discovery",
    "replication.tls",
    "replication.outbox",
    "replication.bootstrap",
    "replication",
    "shutdown",
    "storage",
    "uploads",
    "limits",
    "grpc",
    "server",
    "node",
    "auth",
    "log",
];

/// Variables auth.md names outside the `KURA_<SECTION>_<KEY>` scheme.
const ENV_ALIASES: [(&str, &str); 2] = [
    ("KURA_CONTROL_PLANE_CLIENT_ID", "auth.client_id"),
    ("KURA_CONTROL_PLANE_CLIENT_SECRET", "auth.client_secret"),
];

impl Config {
    /// Loads `file` (or the embedded defaults when `None`), applies `KURA_*` overrides from
    /// `env`, and validates.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut table = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    ConfigError(format!("cannot read config file {}: {e}", path.display()))
                })?;
                text.parse::<toml::Table>().map_err(|e| {
                    ConfigError(format!(
                        "config file {} is not valid TOML: {}",
                        path.display(),
                        file_errors::toml(&text, &e)
                    ))
                })?
            }
            None => toml::Table::new(),
        };
        apply_env(&mut table, env)?;
        let config: Config =
            serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
                let message = file_errors::without_quoted_values(&e.inner().to_string());
                ConfigError(format!("invalid config: {}: {message}", e.path()))
            })?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let fail =
            |key: &str, what: &str| Err(ConfigError(format!("invalid config: {key}: {what}")));
        if self.server.header_timeout.0.is_zero() {
            return fail("server.header_timeout", "must be longer than 0s");
        }
        if self.server.idle_timeout.0.is_zero() {
            return fail("server.idle_timeout", "must be longer than 0s");
        }
        if !(1..=MAX_CONNECTIONS_CEILING).contains(&self.server.max_connections) {
            return fail("server.max_connections", "must be between 1 and 1000000");
        }
        if crate::names::normalize_handle(&self.node.account).is_none() {
            return fail(
                "node.account",
                "must be 1-128 characters of a-z, 0-9, '.', '_' or '-'",
            );
        }
        // The id names this node to its peers (the origin of what it writes, the cursor they
        // keep): an empty one would have every push refused, and control characters garble
        // the logs and `/status` it appears in.
        if let Some(id) = &self.node.id
            && (id.trim().is_empty() || id.chars().any(char::is_control))
        {
            return fail(
                "node.id",
                "must not be empty or hold control characters (or leave it out: one is generated and kept in the data dir)",
            );
        }
        if self.storage.capacity == Capacity::Bytes(ByteSize(0)) {
            return fail(
                "storage.capacity",
                "must be more than 0 (a size such as \"200GiB\" or a share of the disk such as \"80%\")",
            );
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            return fail(
                "log.level",
                "must be a tracing filter such as \"info\" or \"kura=debug,info\"",
            );
        }
        if !(self.storage.low_watermark > 0.0 && self.storage.low_watermark <= 100.0) {
            return fail("storage.low_watermark", "must be a percentage in (0, 100]");
        }
        if !(64 << 10..=1 << 30).contains(&self.grpc.max_message_size.0) {
            return fail("grpc.max_message_size", "must be between 64KiB and 1GiB");
        }
        if self.grpc.max_batch_total_size.0 + (16 << 10) > self.grpc.max_message_size.0 {
            return fail(
                "grpc.max_batch_total_size",
                "must be at least 16KiB below grpc.max_message_size (room for the message framing)",
            );
        }
        if self.grpc.inline_max.0 > self.grpc.max_batch_total_size.0 {
            return fail(
                "grpc.inline_max",
                "must not exceed grpc.max_batch_total_size (inlined bytes travel in one message)",
            );
        }
        if self.storage.inline_max.0 > 1 << 20 {
            return fail("storage.inline_max", "must be at most 1MiB");
        }
        match self.auth.mode {
            AuthMode::None => {}
            AuthMode::Static if self.auth.static_tokens_file.is_none() => {
                return fail(
                    "auth.static_tokens_file",
                    "is required when auth.mode = \"static\"",
                );
            }
            AuthMode::Static => {}
            AuthMode::Introspection => {
                let url = self.auth.control_plane_url.as_deref().unwrap_or_default();
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    return fail(
                        "auth.control_plane_url",
                        "an http:// or https:// URL is required when auth.mode = \"introspection\"",
                    );
                }
                if self
                    .auth
                    .client_id
                    .as_deref()
                    .unwrap_or_default()
                    .is_empty()
                {
                    return fail(
                        "auth.client_id",
                        "is required when auth.mode = \"introspection\" (or KURA_CONTROL_PLANE_CLIENT_ID)",
                    );
                }
                if self
                    .auth
                    .client_secret
                    .as_ref()
                    .is_none_or(|s| s.expose().is_empty())
                {
                    return fail(
                        "auth.client_secret",
                        "is required when auth.mode = \"introspection\" (or KURA_CONTROL_PLANE_CLIENT_SECRET)",
                    );
                }
                if self.auth.cache_fresh.0 > self.auth.cache_max_age.0 {
                    return fail(
                        "auth.cache_fresh",
                        "must not be longer than auth.cache_max_age",
                    );
                }
            }
        }
        if self.uploads.max_in_flight == 0 {
            return fail("uploads.max_in_flight", "must be at least 1");
        }
        if self.limits.body_memory.0 < 1 << 20 {
            return fail("limits.body_memory", "must be at least 1MiB");
        }
        if self.uploads.max_parts == 0 {
            return fail("uploads.max_parts", "must be at least 1");
        }
        self.validate_replication()
    }

    fn validate_replication(&self) -> Result<(), ConfigError> {
        let fail =
            |key: &str, what: &str| Err(ConfigError(format!("invalid config: {key}: {what}")));
        let replication = &self.replication;
        let tls = &replication.tls;
        let files = [&tls.ca, &tls.cert, &tls.key];
        let given = files.iter().filter(|file| file.is_some()).count();
        if given != 0 && given != files.len() {
            return fail(
                "replication.tls",
                "ca, cert and key go together: set all three or none",
            );
        }
        let secure = given == files.len();
        for (index, peer) in replication.peers.iter().enumerate() {
            let scheme_ok = match peer.split_once("://") {
                Some(("https", rest)) => !rest.is_empty() && secure,
                Some(("http", rest)) => !rest.is_empty() && !secure && replication.insecure,
                _ => false,
            };
            if !scheme_ok {
                let key = format!("replication.peers[{index}]");
                return fail(
                    &key,
                    "must be an https://host:port URL with replication.tls, or http://host:port with replication.insecure = true and no replication.tls",
                );
            }
        }
        if replication.enabled() && !secure && !replication.insecure {
            return fail(
                "replication.tls",
                "peers need ca, cert and key (mTLS), or replication.insecure = true for a plain-HTTP peer plane",
            );
        }
        for (index, server) in replication.discovery.nameservers.iter().enumerate() {
            let parses = server.parse::<std::net::SocketAddr>().is_ok()
                || server.parse::<std::net::IpAddr>().is_ok();
            if !parses {
                let key = format!("replication.discovery.nameservers[{index}]");
                return fail(&key, "must be an IP address, with or without :port");
            }
        }
        if replication.discovery.interval.0.is_zero() {
            return fail("replication.discovery.interval", "must be longer than 0s");
        }
        if replication.outbox.max_entries < 1000 {
            return fail("replication.outbox.max_entries", "must be at least 1000");
        }
        if replication.peer_expiry.0.is_zero() {
            return fail("replication.peer_expiry", "must be longer than 0s");
        }
        Ok(())
    }

    /// The effective configuration as TOML, secrets redacted (for `kura config check`).
    pub fn to_redacted_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }
}

/// Folds `KURA_*` variables into the parsed file. Values take the type of the key's default:
/// booleans and numbers are parsed, lists are comma-separated, everything else is a string
/// that the key's own parser (sizes, durations, addresses) checks.
fn apply_env(
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<(), ConfigError> {
    let defaults = toml::Value::try_from(Config::default())
        .map_err(|e| ConfigError(format!("cannot render defaults: {e}")))?;
    for (name, value) in env {
        let Some(path) = env_key_path(&name) else {
            continue;
        };
        let typed = typed_env_value(&defaults, &path, &name, &value)?;
        insert_path(table, &path, typed, &name)?;
    }
    Ok(())
}

/// `KURA_REPLICATION_DISCOVERY_DNS_NAME` → `["replication", "discovery", "dns_name"]`.
fn env_key_path(name: &str) -> Option<Vec<String>> {
    if let Some((_, path)) = ENV_ALIASES.iter().find(|(alias, _)| *alias == name) {
        return Some(path.split('.').map(String::from).collect());
    }
    let rest = name.strip_prefix("KURA_")?;
    SECTIONS.iter().find_map(|section| {
        let prefix = format!("{}_", section.replace('.', "_").to_ascii_uppercase());
        let key = rest.strip_prefix(&prefix)?;
        if key.is_empty() {
            return None;
        }
        let mut path: Vec<String> = section.split('.').map(String::from).collect();
        path.push(key.to_ascii_lowercase());
        Some(path)
    })
}

fn typed_env_value(
    defaults: &toml::Value,
    path: &[String],
    name: &str,
    value: &str,
) -> Result<toml::Value, ConfigError> {
    let default = path.iter().try_fold(defaults, |node, key| node.get(key));
    let bad = |what: &str| {
        ConfigError(format!(
            "invalid environment variable {name}: {what}, got {value:?}"
        ))
    };
    Ok(match default {
        Some(toml::Value::Boolean(_)) => toml::Value::Boolean(match value.trim() {
            "true" | "1" | "yes" => true,
            "false" | "0" | "no" => false,
            _ => return Err(bad("expected true or false")),
        }),
        Some(toml::Value::Integer(_)) => toml::Value::Integer(
            value
                .trim()
                .parse()
                .map_err(|_| bad("expected an integer"))?,
        ),
        Some(toml::Value::Float(_)) => {
            toml::Value::Float(value.trim().parse().map_err(|_| bad("expected a number"))?)
        }
        Some(toml::Value::Array(_)) => toml::Value::Array(
            value
                .split(',')
                .map(str::trim)
                .filter(|item| !item.is_empty())
                .map(|item| toml::Value::String(item.to_string()))
                .collect(),
        ),
        _ => toml::Value::String(value.to_string()),
    })
}

fn insert_path(
    table: &mut toml::Table,
    path: &[String],
    value: toml::Value,
    name: &str,
) -> Result<(), ConfigError> {
    let (last, sections) = path
        .split_last()
        .ok_or_else(|| ConfigError(format!("{name}: empty key")))?;
    let mut node = table;
    for section in sections {
        let entry = node
            .entry(section.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        node = entry
            .as_table_mut()
            .ok_or_else(|| ConfigError(format!("{name}: config key {section} is not a section")))?;
    }
    node.insert(last.clone(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn no_file_and_no_env_is_the_dev_node() {
        let config = Config::load(None, env(&[])).unwrap();
        assert_eq!(config.server.http.to_string(), "127.0.0.1:4000");
        assert_eq!(config.storage.data_dir, PathBuf::from("./kura-data"));
        assert_eq!(config.auth.mode, AuthMode::None);
        assert_eq!(config.node.account, "dev");
    }

    #[test]
    fn env_overrides_reach_nested_keys_with_their_types() {
        let config = Config::load(
            None,
            env(&[
                ("KURA_STORAGE_CAPACITY", "200GiB"),
                ("KURA_REPLICATION_DISCOVERY_DNS_NAME", "peers.local"),
                (
                    "KURA_REPLICATION_DISCOVERY_NAMESERVERS",
                    "127.0.0.1:53, 127.0.0.2:53",
                ),
                ("KURA_REPLICATION_INSECURE", "true"),
                ("KURA_UPLOADS_MAX_IN_FLIGHT", "7"),
                ("KURA_CONTROL_PLANE_CLIENT_SECRET", "s3cret"),
                ("UNRELATED", "x"),
            ]),
        )
        .unwrap();
        assert_eq!(
            config.storage.capacity,
            Capacity::Bytes(ByteSize(200 << 30))
        );
        assert_eq!(
            config.replication.discovery.dns_name.as_deref(),
            Some("peers.local")
        );
        assert_eq!(config.replication.discovery.nameservers.len(), 2);
        assert!(config.replication.insecure);
        assert_eq!(config.uploads.max_in_flight, 7);
        assert_eq!(
            config.auth.client_secret.as_ref().map(Secret::expose),
            Some("s3cret")
        );
        assert!(!config.to_redacted_toml().contains("s3cret"));
    }

    #[test]
    fn errors_name_the_key() {
        let err = Config::load(None, env(&[("KURA_STORAGE_CAPACITY", "12XB")])).unwrap_err();
        assert!(err.to_string().contains("storage.capacity"), "{err}");
        // Zero bytes would refuse every write and drop every replicated artifact as too large.
        let err = Config::load(None, env(&[("KURA_STORAGE_CAPACITY", "0")])).unwrap_err();
        assert!(err.to_string().contains("storage.capacity"), "{err}");
        for id in ["", " ", "n\u{1}"] {
            let err = Config::load(None, env(&[("KURA_NODE_ID", id)])).unwrap_err();
            assert!(err.to_string().contains("node.id"), "{id:?}: {err}");
        }
        assert!(Config::load(None, env(&[("KURA_NODE_ID", "node a.eu_1 é")])).is_ok());
        let err = Config::load(None, env(&[("KURA_STORAGE_COLOUR", "blue")])).unwrap_err();
        assert!(err.to_string().contains("colour"), "{err}");
        let err = Config::load(None, env(&[("KURA_AUTH_MODE", "static")])).unwrap_err();
        assert!(err.to_string().contains("auth.static_tokens_file"), "{err}");
        // A filter tracing cannot parse fails the start instead of turning into `info`.
        let err = Config::load(None, env(&[("KURA_LOG_LEVEL", "kura=loud")])).unwrap_err();
        assert!(err.to_string().contains("log.level"), "{err}");
        let err = Config::load(None, env(&[("KURA_REPLICATION_INSECURE", "maybe")])).unwrap_err();
        assert!(
            err.to_string().contains("KURA_REPLICATION_INSECURE"),
            "{err}"
        );
    }

    #[test]
    fn connection_limits_override_from_env_and_must_be_nonzero() {
        let config = Config::load(
            None,
            env(&[
                ("KURA_SERVER_HEADER_TIMEOUT", "2s"),
                ("KURA_SERVER_IDLE_TIMEOUT", "90s"),
                ("KURA_SERVER_MAX_CONNECTIONS", "64"),
            ]),
        )
        .unwrap();
        assert_eq!(config.server.header_timeout.0.as_secs(), 2);
        assert_eq!(config.server.idle_timeout.0.as_secs(), 90);
        assert_eq!(config.server.max_connections, 64);
        for (name, key) in [
            ("KURA_SERVER_HEADER_TIMEOUT", "server.header_timeout"),
            ("KURA_SERVER_IDLE_TIMEOUT", "server.idle_timeout"),
            ("KURA_SERVER_MAX_CONNECTIONS", "server.max_connections"),
        ] {
            let err = Config::load(None, env(&[(name, "0")])).unwrap_err();
            assert!(err.to_string().contains(key), "{err}");
        }
    }

    #[test]
    fn file_values_load_and_unknown_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kura.toml");
        std::fs::write(
            &path,
            "[node]\naccount = \"acme\"\n[storage]\ncapacity = \"64MiB\"\n",
        )
        .unwrap();
        let config = Config::load(Some(&path), env(&[])).unwrap();
        assert_eq!(config.node.account, "acme");
        std::fs::write(&path, "[node]\nacount = \"acme\"\n").unwrap();
        let err = Config::load(Some(&path), env(&[])).unwrap_err();
        assert!(err.to_string().contains("acount"), "{err}");
    }
}

#[cfg(test)]
mod example_files {
    use super::*;

    /// Every example under `config/` is a valid configuration as shipped (secrets a file leaves
    /// to the environment are given).
    #[test]
    fn every_example_config_loads() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
        let mut files = Vec::new();
        for dir in [root.clone(), root.join("mesh")] {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                let name = path.file_name().unwrap().to_string_lossy().into_owned();
                if name.ends_with(".toml") && !name.starts_with("tokens") {
                    files.push(path);
                }
            }
        }
        assert!(files.len() >= 6, "{files:?}");
        let secrets = [
            ("KURA_CONTROL_PLANE_CLIENT_ID".to_string(), "id".to_string()),
            (
                "KURA_CONTROL_PLANE_CLIENT_SECRET".to_string(),
                "s".to_string(),
            ),
        ];
        for file in files {
            if let Err(error) = Config::load(Some(&file), secrets.clone()) {
                panic!("{}: {error}", file.display());
            }
        }
    }

    #[test]
    fn the_local_mesh_nodes_name_each_other() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/mesh");
        let load = |name: &str| Config::load(Some(&root.join(name)), []).unwrap();
        let nodes = [
            load("node-a.toml"),
            load("node-b.toml"),
            load("node-c.toml"),
        ];
        for node in &nodes {
            let mut expected: Vec<String> = nodes
                .iter()
                .filter(|other| other.server.internal != node.server.internal)
                .map(|other| format!("https://{}", other.server.internal))
                .collect();
            let mut peers = node.replication.peers.clone();
            expected.sort();
            peers.sort();
            assert_eq!(peers, expected);
            assert!(node.replication.tls.ca.is_some() && !node.replication.insecure);
        }
    }
}
