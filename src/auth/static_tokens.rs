//! `auth.mode = "static"`: a file mapping SHA-256 hashes of tokens to grants.
//!
//! The token itself is never in the file, only its hash (`kura token hash`). The file is read at
//! start and again by [`StaticTokens::reload`] (on SIGHUP, or when the poll sees it change).
//! What a reload does depends on what it finds:
//!
//! | file | tokens in force | state |
//! | --- | --- | --- |
//! | valid | the file's | `ok` |
//! | deleted | none: every static token is revoked until a file is back | `missing` |
//! | unreadable, unparsable, or two entries with one hash | the previous ones, so an edit in progress locks nobody out | `invalid` |
//!
//! At start any problem (a missing file included) is an error. Loose permissions are warned
//! about at start and on every reload.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use serde::Deserialize;

use super::grants::{Grants, GrantsDoc};
use super::{Action, Decision, Resource, Token};
use crate::config::file_errors;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokensFile {
    #[serde(default)]
    tokens: Vec<TokenEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenEntry {
    name: String,
    sha256: String,
    #[serde(default)]
    cache_grants: GrantsDoc,
}

struct Known {
    /// Shown in logs instead of the token; shared by every request it allows.
    name: Arc<str>,
    /// Position in the file, to point at both entries of a duplicated hash.
    index: usize,
    grants: Grants,
}

type Tokens = HashMap<[u8; 32], Known>;

/// Where the file stands after the last load or reload (shown in `/status` and `/metrics`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FileState {
    /// The file was read; its tokens are in force.
    Ok,
    /// The file is gone; no static token is accepted.
    Missing,
    /// The file could not be used; the last good tokens stay in force.
    Invalid,
}

impl FileState {
    pub(crate) const ALL: [FileState; 3] = [FileState::Ok, FileState::Missing, FileState::Invalid];

    /// Bounded label for metrics and `/status`.
    pub(crate) fn label(self) -> &'static str {
        match self {
            FileState::Ok => "ok",
            FileState::Missing => "missing",
            FileState::Invalid => "invalid",
        }
    }
}

/// A snapshot of the file's state for `/status`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Health {
    pub(crate) state: FileState,
    /// Tokens in force.
    pub(crate) tokens: usize,
    /// Why the state is not `ok`.
    pub(crate) error: Option<String>,
}

/// What one reload did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Reloaded {
    /// The file was read: this many tokens are now in force.
    Loaded(usize),
    /// The file is gone: every static token is revoked until it is back.
    Revoked,
    /// The file could not be used: the previous tokens (this many) stay in force.
    Kept { error: String, tokens: usize },
}

/// Identifies one version of the file. Any change (content, replacement by rename, chmod, or
/// deletion: `None`) makes the poll read it again; the modification time alone would miss a
/// chmod and a replacement by an older file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    modified: (i64, i64),
    changed: (i64, i64),
}

impl Stamp {
    fn of(metadata: &std::fs::Metadata) -> Stamp {
        Stamp {
            dev: metadata.dev(),
            ino: metadata.ino(),
            len: metadata.len(),
            modified: (metadata.mtime(), metadata.mtime_nsec()),
            changed: (metadata.ctime(), metadata.ctime_nsec()),
        }
    }
}

/// The tokens of a static tokens file, reloadable in place.
pub struct StaticTokens {
    path: PathBuf,
    state: RwLock<Loaded>,
}

struct Loaded {
    tokens: Arc<Tokens>,
    /// The file as last looked at, whatever came of it: a broken file is not re-read (and
    /// re-logged) on every poll, only when it changes or on SIGHUP.
    seen: Option<Stamp>,
    state: FileState,
    error: Option<String>,
}

/// Why a read gave no tokens.
enum Failure {
    /// The file does not exist.
    Missing(String),
    /// It exists but cannot be used.
    Invalid(String),
}

impl Failure {
    fn into_message(self) -> String {
        match self {
            Failure::Missing(message) | Failure::Invalid(message) => message,
        }
    }
}

impl StaticTokens {
    /// Reads the file at start; any failure, a missing file included, is a start-up error.
    pub fn load(path: &Path) -> Result<StaticTokens, String> {
        let seen = inspect(path);
        let tokens = read_file(path).map_err(Failure::into_message)?;
        record_state(FileState::Ok);
        Ok(StaticTokens {
            path: path.to_path_buf(),
            state: RwLock::new(Loaded {
                tokens: Arc::new(tokens),
                seen,
                state: FileState::Ok,
                error: None,
            }),
        })
    }

    /// Re-reads the file: a valid file replaces the tokens, a deleted one revokes them all, any
    /// other failure keeps the tokens in force.
    pub(crate) fn reload(&self) -> Reloaded {
        // Looked at before reading: if the file changes in between, the next poll sees a
        // different stamp and reads it again.
        let seen = inspect(&self.path);
        let outcome = read_file(&self.path);
        let mut loaded = self.state.write().unwrap_or_else(|p| p.into_inner());
        loaded.seen = seen;
        let reloaded = loaded.apply(outcome);
        record_state(loaded.state);
        reloaded
    }

    /// Reloads when the file differs from the one last looked at, appearing and disappearing
    /// included.
    pub(crate) fn reload_if_changed(&self) -> Option<Reloaded> {
        let current = std::fs::metadata(&self.path).ok().map(|m| Stamp::of(&m));
        let seen = self.state.read().unwrap_or_else(|p| p.into_inner()).seen;
        (current != seen).then(|| self.reload())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn health(&self) -> Health {
        let loaded = self.state.read().unwrap_or_else(|p| p.into_inner());
        Health {
            state: loaded.state,
            tokens: loaded.tokens.len(),
            error: loaded.error.clone(),
        }
    }

    pub(super) fn decide(
        &self,
        token: &Token,
        resource: &Resource<'_>,
        action: Action,
    ) -> Decision {
        let tokens = self
            .state
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .tokens
            .clone();
        match tokens.get(&token.sha256()) {
            None => Decision::InvalidToken,
            Some(known) if known.grants.allows(resource, action) => Decision::Allow {
                principal: known.name.clone(),
            },
            Some(_) => Decision::Forbidden,
        }
    }
}

impl Loaded {
    fn apply(&mut self, outcome: Result<Tokens, Failure>) -> Reloaded {
        match outcome {
            Ok(tokens) => {
                let count = tokens.len();
                self.set(Arc::new(tokens), FileState::Ok, None);
                Reloaded::Loaded(count)
            }
            Err(Failure::Missing(error)) => {
                self.set(Arc::default(), FileState::Missing, Some(error));
                Reloaded::Revoked
            }
            Err(Failure::Invalid(error)) => {
                let kept = self.tokens.clone();
                self.set(kept, FileState::Invalid, Some(error.clone()));
                Reloaded::Kept {
                    error,
                    tokens: self.tokens.len(),
                }
            }
        }
    }

    fn set(&mut self, tokens: Arc<Tokens>, state: FileState, error: Option<String>) {
        self.tokens = tokens;
        self.state = state;
        self.error = error;
    }
}

/// Sets `kura_auth_static_tokens_state{state}`: 1 for `current`, 0 for the others, so an alert
/// can match on one series.
fn record_state(current: FileState) {
    for state in FileState::ALL {
        let value = if state == current { 1.0 } else { 0.0 };
        metrics::gauge!(crate::metrics::AUTH_STATIC_TOKENS_STATE, "state" => state.label())
            .set(value);
    }
}

/// The file's stamp, warning if its permissions are loose; `None` when it cannot be looked at.
fn inspect(path: &Path) -> Option<Stamp> {
    let metadata = std::fs::metadata(path).ok()?;
    let mode = metadata.permissions().mode() & 0o7777;
    if loose_permissions(mode) {
        tracing::warn!(
            file = %path.display(),
            mode = %format!("{mode:04o}"),
            "static tokens file has loose permissions (writable by group or others, or readable by others); chmod 600 or 640 it"
        );
    }
    Some(Stamp::of(&metadata))
}

/// Whoever can write the file can grant themselves any access; whoever can read it learns who
/// may do what (and can try to brute-force weak tokens offline). Group-readable stays allowed
/// so a dedicated group can deploy it.
pub(crate) fn loose_permissions(mode: u32) -> bool {
    mode & 0o026 != 0
}

fn read_file(path: &Path) -> Result<Tokens, Failure> {
    let shown = path.display();
    let text = std::fs::read_to_string(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Failure::Missing(format!("static tokens file {shown} does not exist"))
        } else {
            Failure::Invalid(format!("cannot read static tokens file {shown}: {e}"))
        }
    })?;
    parse(path, &text).map_err(Failure::Invalid)
}

fn parse(path: &Path, text: &str) -> Result<Tokens, String> {
    let shown = path.display();
    let file: TokensFile = if path.extension().is_some_and(|ext| ext == "json") {
        // serde_json's message ends with the line and column.
        serde_json::from_str(text).map_err(|e| {
            format!(
                "static tokens file {shown}: {}",
                file_errors::without_quoted_values(&e.to_string())
            )
        })?
    } else {
        toml::from_str(text).map_err(|e| {
            format!(
                "static tokens file {shown}: {}",
                file_errors::toml(text, &e)
            )
        })?
    };
    let mut tokens = HashMap::new();
    for (index, entry) in file.tokens.into_iter().enumerate() {
        let hash = crate::names::parse_sha256_hex(&entry.sha256.to_ascii_lowercase()).ok_or_else(|| {
            format!("static tokens file {shown}: tokens[{index}].sha256 must be 64 hex characters (see `kura token hash`)")
        })?;
        let known = Known {
            name: entry.name.into(),
            index,
            grants: entry.cache_grants.into(),
        };
        match tokens.entry(hash) {
            // Letting one entry win would silently give a token the other entry's grants.
            Entry::Occupied(first) => {
                return Err(duplicate(path, &hash, first.get(), &known));
            }
            Entry::Vacant(slot) => {
                slot.insert(known);
            }
        }
    }
    Ok(tokens)
}

/// Names both entries and the hash by its first 8 hex characters (enough to find it, short in
/// logs).
fn duplicate(path: &Path, hash: &[u8; 32], first: &Known, second: &Known) -> String {
    format!(
        "static tokens file {}: tokens[{}] \"{}\" and tokens[{}] \"{}\" have the same sha256 ({}…); each token needs exactly one entry",
        path.display(),
        first.index,
        first.name,
        second.index,
        second.name,
        hex::encode(&hash[..4]),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const ACME: Resource<'static> = Resource {
        account: "acme",
        project: Some("ios"),
    };

    /// One `[[tokens]]` entry reading account `acme`.
    fn entry(name: &str, token: &str) -> String {
        let hash = hex::encode(Token::new(token).sha256());
        format!(
            "[[tokens]]\nname = \"{name}\"\nsha256 = \"{hash}\"\n[tokens.cache_grants]\naccount = {{ read = [\"acme\"], write = [] }}\n"
        )
    }

    fn reads(tokens: &StaticTokens, token: &str) -> Decision {
        tokens.decide(&Token::new(token), &ACME, Action::Read)
    }

    fn allowed(name: &str) -> Decision {
        Decision::Allow {
            principal: name.into(),
        }
    }

    #[test]
    fn decides_from_hashes_and_reloads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.toml");
        std::fs::write(&path, entry("ci", "t0ken")).unwrap();
        let tokens = StaticTokens::load(&path).unwrap();
        assert_eq!(reads(&tokens, "t0ken"), allowed("ci"));
        assert_eq!(
            tokens.decide(&Token::new("t0ken"), &ACME, Action::Write),
            Decision::Forbidden
        );
        assert_eq!(reads(&tokens, "other"), Decision::InvalidToken);
        assert_eq!(
            tokens.health(),
            Health {
                state: FileState::Ok,
                tokens: 1,
                error: None
            }
        );

        std::fs::write(&path, "tokens = []\n").unwrap();
        assert_eq!(tokens.reload(), Reloaded::Loaded(0));
        assert_eq!(reads(&tokens, "t0ken"), Decision::InvalidToken);
    }

    /// A raw token pasted into the file by mistake (under a field that does not exist, or as
    /// a value of the wrong type) never reaches the error, which goes to the log and to the
    /// unauthenticated `/status`; where the mistake is does.
    #[test]
    fn a_file_error_says_where_and_never_echoes_what_the_file_holds() {
        let dir = tempfile::tempdir().unwrap();
        let secret = "kura_live_8c1f0e5d2b9a";
        let hash = hex::encode(Token::new("t0ken").sha256());
        let cases = [
            (
                "tokens.toml",
                format!("[[tokens]]\nname = \"ci\"\nsha256 = \"{hash}\"\ntoken = \"{secret}\"\n"),
                "line 4",
            ),
            (
                "tokens.toml",
                format!(
                    "[[tokens]]\nname = \"ci\"\nsha256 = \"{hash}\"\ncache_grants = \"{secret}\"\n"
                ),
                "line 4",
            ),
            (
                "tokens.toml",
                format!("[[tokens]]\nname = \"ci\"\nsha256 = \"{secret}\n"),
                "line 3",
            ),
            (
                "tokens.json",
                format!(
                    "{{\"tokens\": [{{\"name\": \"ci\", \"sha256\": \"{hash}\",\n \"cache_grants\": \"{secret}\"}}]}}"
                ),
                "line 2",
            ),
        ];
        for (name, text, place) in cases {
            let path = dir.path().join(name);
            std::fs::write(&path, &text).unwrap();
            let error = StaticTokens::load(&path).err().expect("refused");
            assert!(!error.contains(secret), "the secret leaked: {error}");
            assert!(error.contains(place), "{place} missing from: {error}");
        }
    }

    #[test]
    fn a_duplicated_hash_is_refused_naming_both_entries() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.toml");
        let twice = format!("{}{}", entry("ci", "t0ken"), entry("ci-copy", "t0ken"));
        std::fs::write(&path, &twice).unwrap();
        let error = StaticTokens::load(&path).err().expect("refused at start");
        let prefix = &hex::encode(Token::new("t0ken").sha256())[..8];
        for part in ["tokens[0] \"ci\"", "tokens[1] \"ci-copy\"", prefix] {
            assert!(error.contains(part), "{part} missing from: {error}");
        }

        // On reload it is a file that fails to parse: the tokens in force stay.
        std::fs::write(&path, entry("ci", "t0ken")).unwrap();
        let tokens = StaticTokens::load(&path).unwrap();
        std::fs::write(&path, &twice).unwrap();
        match tokens.reload() {
            Reloaded::Kept { error, tokens: 1 } => assert!(error.contains("ci-copy"), "{error}"),
            other => panic!("duplicate accepted on reload: {other:?}"),
        }
        assert_eq!(reads(&tokens, "t0ken"), allowed("ci"));
        assert_eq!(tokens.health().state, FileState::Invalid);
    }

    #[test]
    fn deleting_the_file_revokes_every_token_and_recreating_it_restores_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.toml");
        std::fs::write(&path, entry("ci", "t0ken")).unwrap();
        let tokens = StaticTokens::load(&path).unwrap();
        assert_eq!(tokens.reload_if_changed(), None, "nothing changed yet");

        std::fs::remove_file(&path).unwrap();
        assert_eq!(tokens.reload_if_changed(), Some(Reloaded::Revoked));
        assert_eq!(reads(&tokens, "t0ken"), Decision::InvalidToken);
        let health = tokens.health();
        assert_eq!((health.state, health.tokens), (FileState::Missing, 0));
        assert!(health.error.is_some_and(|e| e.contains("does not exist")));
        assert_eq!(
            tokens.reload_if_changed(),
            None,
            "a file still missing is not reloaded (nor logged) again"
        );
        assert_eq!(tokens.reload(), Reloaded::Revoked, "SIGHUP while missing");

        std::fs::write(&path, entry("ci", "t0ken")).unwrap();
        assert_eq!(tokens.reload_if_changed(), Some(Reloaded::Loaded(1)));
        assert_eq!(reads(&tokens, "t0ken"), allowed("ci"));
        assert_eq!(tokens.health().state, FileState::Ok);
    }

    #[test]
    fn a_broken_edit_keeps_the_last_good_set_and_reports_invalid() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.toml");
        std::fs::write(&path, entry("ci", "t0ken")).unwrap();
        let tokens = StaticTokens::load(&path).unwrap();

        std::fs::write(&path, "[[tokens]\nbroken").unwrap();
        match tokens.reload_if_changed() {
            Some(Reloaded::Kept { tokens: 1, .. }) => {}
            other => panic!("broken file not kept back: {other:?}"),
        }
        assert_eq!(reads(&tokens, "t0ken"), allowed("ci"));
        let health = tokens.health();
        assert_eq!((health.state, health.tokens), (FileState::Invalid, 1));
        assert!(health.error.is_some_and(|e| e.contains("tokens.toml")));
        assert_eq!(
            tokens.reload_if_changed(),
            None,
            "an unchanged broken file is not re-read on every poll"
        );

        // Fixed: the new set replaces the old one (a different length, so the stamp differs
        // even within one timestamp tick).
        std::fs::write(&path, entry("ci-2", "n3w-token")).unwrap();
        assert_eq!(tokens.reload_if_changed(), Some(Reloaded::Loaded(1)));
        assert_eq!(reads(&tokens, "n3w-token"), allowed("ci-2"));
        assert_eq!(reads(&tokens, "t0ken"), Decision::InvalidToken);
        assert_eq!(tokens.health().state, FileState::Ok);
    }

    #[test]
    fn loose_permissions_are_group_or_other_writable_or_other_readable() {
        for mode in [0o600, 0o640, 0o400, 0o440, 0o700, 0o4600] {
            assert!(!loose_permissions(mode), "{mode:o} is fine");
        }
        for mode in [0o644, 0o604, 0o620, 0o602, 0o660, 0o666, 0o777] {
            assert!(loose_permissions(mode), "{mode:o} is loose");
        }
    }

    #[test]
    fn a_chmod_is_noticed_by_the_poll() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.toml");
        std::fs::write(&path, entry("ci", "t0ken")).unwrap();
        let tokens = StaticTokens::load(&path).unwrap();
        // ctime has the granularity of a clock tick: make sure one passes.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        assert_eq!(
            tokens.reload_if_changed(),
            Some(Reloaded::Loaded(1)),
            "the reload is what warns about the new mode"
        );
    }
}
