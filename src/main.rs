//! The `kura` command: `serve`, `config check`, `token hash`, `certs ca`, `certs leaf`.

use std::io::{IsTerminal, Read};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use kura::config::{Config, LogFormat};

#[derive(Parser)]
#[command(name = "kura", version, about = "A content-addressed build-cache node")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node. With no config file this is a dev node: ./kura-data, 127.0.0.1:4000, no auth.
    Serve {
        /// TOML config file; every key can be overridden by KURA_<SECTION>_<KEY>.
        #[arg(long, env = "KURA_CONFIG")]
        config: Option<PathBuf>,
        /// Allow auth.mode = "none" on a non-loopback address.
        #[arg(long)]
        allow_insecure: bool,
    },
    /// Configuration tools.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Token tools.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Certificates for the peer plane's mTLS: an account CA and node leaves.
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Create an account CA: OUT/ca.crt and OUT/ca.key (keep the key off the nodes).
    Ca {
        /// The account the CA is for (named in its subject).
        #[arg(long)]
        account: String,
        #[arg(long)]
        out: PathBuf,
    },
    /// Issue a node leaf for server and client auth: OUT/tls.crt, OUT/tls.key and OUT/ca.crt.
    Leaf {
        /// The directory `kura certs ca` wrote.
        #[arg(long)]
        ca: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// A DNS name or IP address peers verify this node by (repeat for several): the peer
        /// Service's DNS name with discovery, the host of the node's URL with static peers.
        #[arg(long = "san", required = true)]
        sans: Vec<String>,
        /// Days the leaf is valid.
        #[arg(long, default_value_t = 365)]
        days: i64,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate the config and print the effective values, secrets redacted.
    Check {
        #[arg(long, env = "KURA_CONFIG")]
        config: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Read a token on stdin and print its SHA-256, for static tokens files.
    Hash,
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Serve {
            config,
            allow_insecure,
        } => serve(config, allow_insecure),
        Command::Config {
            command: ConfigCommand::Check { config },
        } => match load(config) {
            Some(config) => {
                print!("{}", config.to_redacted_toml());
                ExitCode::SUCCESS
            }
            None => ExitCode::from(2),
        },
        Command::Token {
            command: TokenCommand::Hash,
        } => token_hash(),
        Command::Certs { command } => certs(command),
    }
}

fn certs(command: CertsCommand) -> ExitCode {
    let (result, wrote) = match command {
        CertsCommand::Ca { account, out } => {
            (kura::certs::create_ca(&account, &out), out.join("ca.crt"))
        }
        CertsCommand::Leaf {
            ca,
            out,
            sans,
            days,
        } => (
            kura::certs::issue_leaf(&ca, &out, &sans, days),
            out.join("tls.crt"),
        ),
    };
    match result {
        Ok(()) => {
            eprintln!("kura: wrote {}", wrote.display());
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("kura: {error}");
            ExitCode::from(2)
        }
    }
}

fn load(path: Option<PathBuf>) -> Option<Config> {
    match Config::load(path.as_deref(), std::env::vars()) {
        Ok(config) => Some(config),
        Err(error) => {
            eprintln!("kura: {error}");
            None
        }
    }
}

/// glibc's settings the node runs with, in `GLIBC_TUNABLES` form: those of [`tune_malloc`], and a
/// per-thread cache of 64 blocks per size class instead of 7. A request frees more small blocks
/// than 7 of a size; the rest went to the shared bins, which glibc merges again on every
/// page-sized allocation (each response makes one). Measured in `docs/benchmarks.md`: about 10 %
/// more small GETs per second, peak RSS of `tests/memory.rs` unchanged.
///
/// Each comes with the variable through which an operator may have set it already (theirs wins).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MALLOC_TUNABLES: [(&str, i32, Option<&str>); 4] = [
    ("glibc.malloc.tcache_count", 64, None),
    (
        "glibc.malloc.arena_max",
        ARENA_MAX,
        Some("MALLOC_ARENA_MAX"),
    ),
    (
        "glibc.malloc.mmap_threshold",
        MMAP_THRESHOLD,
        Some("MALLOC_MMAP_THRESHOLD_"),
    ),
    (
        "glibc.malloc.trim_threshold",
        TRIM_THRESHOLD,
        Some("MALLOC_TRIM_THRESHOLD_"),
    ),
];

/// Malloc arenas for the whole process (see [`tune_malloc`]).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const ARENA_MAX: i32 = 2;
/// Blocks from this size on are mapped on their own (see [`tune_malloc`]).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: i32 = 512 * 1024;
/// Free memory at the top of an arena that is kept rather than returned (see [`tune_malloc`]).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TRIM_THRESHOLD: i32 = 4 * 1024 * 1024;

/// Marks the re-executed node. In secure-execution mode (a binary given file capabilities to
/// bind a low port, say) glibc may strip `GLIBC_TUNABLES` from the environment, so that variable
/// alone cannot tell the second start from the first: without the mark such a node could
/// re-execute itself forever.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const REEXECUTED: &str = "KURA_MALLOC_TUNED";

/// Runs the node again with [`MALLOC_TUNABLES`] in its environment, as the same process (pid,
/// arguments and open files stay): glibc reads the thread-cache size only from the environment
/// at exec. Returns only when no re-exec happens: this is the re-executed node, the operator set
/// `GLIBC_TUNABLES` (theirs wins), or the exec failed, and then the node runs with what
/// [`tune_malloc`] can set.
fn reexec_with_malloc_tunables() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::os::unix::process::CommandExt as _;
        if std::env::var_os("GLIBC_TUNABLES").is_some() || std::env::var_os(REEXECUTED).is_some() {
            return;
        }
        let Ok(exe) = std::env::current_exe() else {
            return;
        };
        let tunables: Vec<String> = MALLOC_TUNABLES
            .iter()
            .filter(|(_, _, legacy)| legacy.is_none_or(|name| std::env::var_os(name).is_none()))
            .map(|(tunable, value, _)| format!("{tunable}={value}"))
            .collect();
        let error = std::process::Command::new(exe)
            .args(std::env::args_os().skip(1))
            .env("GLIBC_TUNABLES", tunables.join(":"))
            .env(REEXECUTED, "1")
            .exec();
        eprintln!(
            "kura: could not re-exec with GLIBC_TUNABLES ({error}); running without the larger malloc thread cache"
        );
    }
}

/// Keeps glibc's heap from growing with the traffic rather than with what is in use:
/// - each thread that allocates under contention gets an arena of its own, up to eight per core,
///   and memory freed into one arena is not reused by another; transfers hop between the async
///   workers and the blocking pool, so two arenas, not sixteen;
/// - blocks of 512 KiB and more (bodies of up to 1 MiB read whole for verification, say) are
///   mapped and unmapped on their own instead of carved from the heap. glibc would otherwise
///   raise that threshold after the first such block is freed and serve the rest from the heap,
///   where their mixed sizes fragment it. Upload write buffers stay below it, all of
///   one size, so that uploads reuse each other's heap blocks (`storage::bodies`).
/// - up to 4 MiB of free memory at the top of an arena stays with the process. Fixing the mmap
///   threshold also fixes glibc's trim threshold at its 128 KiB default, so freeing one read
///   buffer of a 256 KiB body gave its pages back to the kernel and the next request faulted
///   them in again: 28 page faults per GET of a 256 KiB body, a third of the node's CPU
///   (`docs/benchmarks.md`).
///
/// Measured by `tests/memory.rs` and `benches/soak.sh`. An operator's own `MALLOC_ARENA_MAX`,
/// `MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_` or `GLIBC_TUNABLES` wins.
fn tune_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("GLIBC_TUNABLES").is_none() {
        if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
            // SAFETY: mallopt only adjusts allocator parameters; called before other threads
            // exist.
            unsafe { libc::mallopt(libc::M_ARENA_MAX, ARENA_MAX) };
        }
        if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none() {
            // SAFETY: as above.
            unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) };
        }
        if std::env::var_os("MALLOC_TRIM_THRESHOLD_").is_none() {
            // SAFETY: as above.
            unsafe { libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD) };
        }
    }
}

fn serve(path: Option<PathBuf>, allow_insecure: bool) -> ExitCode {
    reexec_with_malloc_tunables();
    let Some(config) = load(path) else {
        return ExitCode::from(2);
    };
    init_logging(&config);
    if let Some(tunables) = std::env::var_os("GLIBC_TUNABLES") {
        tracing::info!(glibc_tunables = %tunables.to_string_lossy(), "malloc settings");
    }
    tune_malloc();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("kura: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let served = runtime.block_on(kura::node::serve(config, allow_insecure));
    // Dropping the runtime would wait, without a bound, for the work still on its blocking
    // threads (an orphan sweep, a backfill walking every record): a stop would then outlast
    // shutdown.drain_timeout until the kubelet's SIGKILL. That work is crash-safe and starts over
    // at the next start, so it gets a second.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            eprintln!("kura: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log.level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let format = config
        .log
        .format
        .unwrap_or(if std::io::stderr().is_terminal() {
            LogFormat::Pretty
        } else {
            LogFormat::Json
        });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Pretty => builder.init(),
    }
}

fn token_hash() -> ExitCode {
    let mut token = String::new();
    if let Err(error) = std::io::stdin().read_to_string(&mut token) {
        eprintln!("kura: cannot read the token from stdin: {error}");
        return ExitCode::FAILURE;
    }
    let token = token.trim_end_matches(['\n', '\r']);
    if token.is_empty() {
        eprintln!("kura: no token on stdin");
        return ExitCode::from(2);
    }
    println!("{}", hex::encode(kura::auth::Token::new(token).sha256()));
    ExitCode::SUCCESS
}
