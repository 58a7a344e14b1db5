//! `auth.mode = "static"`: a file mapping SHA-256 hashes of tokens to grants.
//!
//! The token itself is never in the file, only its hash (`kura token hash`). The file is read at
//! start and again by [`StaticTokens::reload`] (on SIGHUP or when its modification time changes);
//! a file that fails to parse on reload leaves the previous tokens in force.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use serde::Deserialize;

use super::grants::{Grants, GrantsDoc};
use super::{Action, Decision, Resource, Token};

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
    grants: Grants,
}

/// The tokens of a static tokens file, reloadable in place.
pub struct StaticTokens {
    path: PathBuf,
    state: RwLock<Loaded>,
}

struct Loaded {
    tokens: Arc<HashMap<[u8; 32], Known>>,
    modified: Option<SystemTime>,
}

impl StaticTokens {
    pub fn load(path: &Path) -> Result<StaticTokens, String> {
        let (tokens, modified) = read_file(path)?;
        Ok(StaticTokens {
            path: path.to_path_buf(),
            state: RwLock::new(Loaded {
                tokens: Arc::new(tokens),
                modified,
            }),
        })
    }

    /// Re-reads the file. On error the tokens already loaded stay in force.
    pub fn reload(&self) -> Result<usize, String> {
        let (tokens, modified) = read_file(&self.path)?;
        let count = tokens.len();
        let mut state = self.state.write().unwrap_or_else(|p| p.into_inner());
        *state = Loaded {
            tokens: Arc::new(tokens),
            modified,
        };
        Ok(count)
    }

    /// Reloads when the file's modification time differs from the one loaded.
    pub fn reload_if_changed(&self) -> Option<Result<usize, String>> {
        let current = std::fs::metadata(&self.path)
            .and_then(|m| m.modified())
            .ok();
        let loaded = self
            .state
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .modified;
        (current != loaded).then(|| self.reload())
    }

    pub fn path(&self) -> &Path {
        &self.path
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

/// Tokens by SHA-256, and the file's modification time when read.
type ReadTokens = (HashMap<[u8; 32], Known>, Option<SystemTime>);

fn read_file(path: &Path) -> Result<ReadTokens, String> {
    let shown = path.display();
    let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read static tokens file {shown}: {e}"))?;
    let file: TokensFile = if path.extension().is_some_and(|ext| ext == "json") {
        serde_json::from_str(&text).map_err(|e| format!("static tokens file {shown}: {e}"))?
    } else {
        toml::from_str(&text).map_err(|e| format!("static tokens file {shown}: {e}"))?
    };
    let mut tokens = HashMap::new();
    for (index, entry) in file.tokens.into_iter().enumerate() {
        let hash = crate::names::parse_sha256_hex(&entry.sha256.to_ascii_lowercase()).ok_or_else(|| {
            format!("static tokens file {shown}: tokens[{index}].sha256 must be 64 hex characters (see `kura token hash`)")
        })?;
        tokens.insert(
            hash,
            Known {
                name: entry.name.into(),
                grants: entry.cache_grants.into(),
            },
        );
    }
    Ok((tokens, modified))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decides_from_hashes_and_reloads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.toml");
        let hash = hex::encode(Token::new("t0ken").sha256());
        std::fs::write(
            &path,
            format!("[[tokens]]\nname = \"ci\"\nsha256 = \"{hash}\"\n[tokens.cache_grants]\naccount = {{ read = [\"acme\"], write = [] }}\n"),
        )
        .unwrap();
        let tokens = StaticTokens::load(&path).unwrap();
        let acme = Resource {
            account: "acme",
            project: Some("ios"),
        };
        assert_eq!(
            tokens.decide(&Token::new("t0ken"), &acme, Action::Read),
            Decision::Allow {
                principal: "ci".into()
            }
        );
        assert_eq!(
            tokens.decide(&Token::new("t0ken"), &acme, Action::Write),
            Decision::Forbidden
        );
        assert_eq!(
            tokens.decide(&Token::new("other"), &acme, Action::Read),
            Decision::InvalidToken
        );

        std::fs::write(&path, "not = [valid").unwrap();
        assert!(tokens.reload().is_err());
        assert!(
            matches!(
                tokens.decide(&Token::new("t0ken"), &acme, Action::Read),
                Decision::Allow { .. }
            ),
            "a broken file keeps the old tokens"
        );
        std::fs::write(&path, "tokens = []\n").unwrap();
        assert_eq!(tokens.reload(), Ok(0));
        assert_eq!(
            tokens.decide(&Token::new("t0ken"), &acme, Action::Read),
            Decision::InvalidToken
        );
    }
}
