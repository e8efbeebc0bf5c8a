//! API bearer tokens: created, listed, revoked and checked here; only a
//! salted hash of each token is ever stored.
//!
//! Tokens are 256 random bits, so nothing can be learned by guessing and a
//! fast hash is enough (no password-style stretching is needed): the hash
//! is BLAKE3 keyed with a random 256-bit salt per token. Checking compares
//! `blake3::Hash` values, whose equality is constant time.

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

use super::db::{params, DbError, Sql};
use super::{conflict_if_unique, Catalog};
use crate::error::{DaemonError, Result};
use crate::secret;
use crate::time::{now_ms, rfc3339};

/// What a token may do; each role includes the ones below it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// GET requests (and /metrics).
    Reader,
    /// Backups and restores, plus what a reader may do.
    Operator,
    /// VMs, repositories and tokens, plus what an operator may do.
    Admin,
}

impl Role {
    /// The role's name as stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Reader => "reader",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Role, String> {
        match s {
            "reader" => Ok(Role::Reader),
            "operator" => Ok(Role::Operator),
            "admin" => Ok(Role::Admin),
            other => Err(format!(
                "unknown role {other:?} (admin, operator or reader)"
            )),
        }
    }
}

/// A token as listed: never the secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TokenInfo {
    /// Name.
    pub name: String,
    /// Role.
    pub role: Role,
    /// Creation time (RFC 3339).
    pub created_at: String,
    /// Last successful use (RFC 3339), if any.
    pub last_used_at: Option<String>,
}

/// Prefix of every token (helps secret scanners recognise leaked ones).
const TOKEN_PREFIX: &str = "hub_";
/// Prefix of every callback token: a token with it is never an API token,
/// only the key to its own backup's callbacks.
pub const CALLBACK_PREFIX: &str = "hcb_";

fn keyed_hash(salt: &[u8; 32], token: &str) -> blake3::Hash {
    blake3::keyed_hash(salt, token.as_bytes())
}

fn parse_salt(hex: &str) -> Option<[u8; 32]> {
    blake3::Hash::from_hex(hex).ok().map(|h| *h.as_bytes())
}

impl Catalog {
    /// Create a token named `name` with `role`; returns the secret, which
    /// exists nowhere else afterwards. `Conflict` if the name is taken.
    pub async fn create_token(&self, name: &str, role: Role) -> Result<String> {
        crate::names::validate("token name", name).map_err(DaemonError::BadRequest)?;
        let rand = |what: &str| {
            secret::random_bytes::<32>()
                .map_err(|e| DaemonError::io(format!("reading random bytes for {what}"), e))
        };
        let token = format!("{TOKEN_PREFIX}{}", secret::hex(&rand("the token")?));
        let salt = rand("the salt")?;
        let hash = keyed_hash(&salt, &token).to_hex().to_string();
        let salt = secret::hex(&salt);
        let name = name.to_owned();
        self.with(move |c| {
            c.execute(
                "INSERT INTO api_tokens (name, role, salt, token_hash, created_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![name, role.as_str(), salt, hash, now_ms()],
            )
            .map_err(|e| conflict_if_unique(e, || format!("token {name:?} already exists")))?;
            Ok(())
        })
        .await?;
        Ok(token)
    }

    /// Every token, by name.
    pub async fn tokens(&self) -> Result<Vec<TokenInfo>> {
        self.with(|c| {
            let rows = c.query(
                "SELECT name, role, created_ms, last_used_ms FROM api_tokens ORDER BY name",
                params![],
            )?;
            let mut out = Vec::new();
            for r in rows {
                let (name, role, created, used): (String, String, i64, Option<i64>) =
                    (r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?);
                let role = role
                    .parse()
                    .map_err(|e: String| DaemonError::Internal(format!("token {name:?}: {e}")))?;
                out.push(TokenInfo {
                    name,
                    role,
                    created_at: rfc3339(created),
                    last_used_at: used.map(rfc3339),
                });
            }
            Ok(out)
        })
        .await
    }

    /// Remove a token; `NotFound` if there is none by that name.
    pub async fn revoke_token(&self, name: &str) -> Result<()> {
        let name = name.to_owned();
        self.with(move |c| {
            if c.execute("DELETE FROM api_tokens WHERE name = ?1", params![name])? == 0 {
                return Err(DaemonError::NotFound {
                    what: "token",
                    id: name,
                });
            }
            Ok(())
        })
        .await
    }

    /// Whether any token exists (then every API request needs one).
    pub async fn has_tokens(&self) -> Result<bool> {
        self.with(|c| {
            let n: i64 = c
                .query_one("SELECT COUNT(*) FROM api_tokens", params![])?
                .get(0)?;
            Ok(n > 0)
        })
        .await
    }

    /// The name and role of the token `presented` is, if any. Every stored
    /// token is checked (a handful), each in constant time.
    pub async fn check_token(&self, presented: &str) -> Result<Option<(String, Role)>> {
        let presented = presented.to_owned();
        self.with(move |c| {
            let rows = c.query(
                "SELECT name, role, salt, token_hash FROM api_tokens",
                params![],
            )?;
            let mut found = None;
            for r in rows {
                let (name, role, salt, hash): (String, String, String, String) =
                    (r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?);
                let (Some(salt), Ok(hash)) = (parse_salt(&salt), blake3::Hash::from_hex(&hash))
                else {
                    tracing::error!(token = %name, "stored token hash is malformed");
                    continue;
                };
                // blake3::Hash's == is constant time.
                if keyed_hash(&salt, &presented) == hash && found.is_none() {
                    if let Ok(role) = role.parse::<Role>() {
                        found = Some((name, role));
                    }
                }
            }
            Ok(found)
        })
        .await
    }

    /// Make the callback token of running backup `backup_id` (replacing
    /// any); returns the secret, which exists nowhere else afterwards.
    pub async fn create_callback_token(&self, backup_id: &str) -> Result<String> {
        let rand = |what: &str| {
            secret::random_bytes::<32>()
                .map_err(|e| DaemonError::io(format!("reading random bytes for {what}"), e))
        };
        let token = format!(
            "{CALLBACK_PREFIX}{}",
            secret::hex(&rand("the callback token")?)
        );
        let salt = rand("the salt")?;
        let hash = keyed_hash(&salt, &token).to_hex().to_string();
        let salt = secret::hex(&salt);
        let id = backup_id.to_owned();
        self.with(move |c| {
            c.execute(
                "INSERT INTO callback_tokens (backup_id, salt, token_hash) VALUES (?1, ?2, ?3)
                 ON CONFLICT(backup_id) DO UPDATE SET salt = excluded.salt, token_hash = excluded.token_hash",
                params![id, salt, hash],
            )?;
            Ok(())
        })
        .await?;
        Ok(token)
    }

    /// Whether `presented` is the callback token of `backup_id` and that
    /// backup is running (constant-time comparison).
    pub async fn check_callback_token(&self, backup_id: &str, presented: &str) -> Result<bool> {
        let (id, presented) = (backup_id.to_owned(), presented.to_owned());
        self.with(move |c| {
            let row: Option<(String, String)> = c
                .query_opt(
                    "SELECT t.salt, t.token_hash FROM callback_tokens t JOIN backups b ON b.id = t.backup_id
                     WHERE t.backup_id = ?1 AND b.status = 'running'",
                    params![id],
                )?
                .map(|r| Ok::<_, DbError>((r.get(0)?, r.get(1)?)))
                .transpose()?;
            let Some((salt, hash)) = row else {
                return Ok(false);
            };
            let (Some(salt), Ok(hash)) = (parse_salt(&salt), blake3::Hash::from_hex(&hash)) else {
                tracing::error!(backup = %id, "stored callback token hash is malformed");
                return Ok(false);
            };
            Ok(keyed_hash(&salt, &presented) == hash)
        })
        .await
    }

    /// Record that token `name` was used now.
    pub async fn touch_token(&self, name: &str) -> Result<()> {
        let name = name.to_owned();
        self.with(move |c| {
            c.execute(
                "UPDATE api_tokens SET last_used_ms = ?1 WHERE name = ?2",
                params![now_ms(), name],
            )?;
            Ok(())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tokens_are_stored_hashed_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let cat = Catalog::open(&dir.path().join("c.sqlite")).unwrap();
        assert!(!cat.has_tokens().await.unwrap());
        let t = cat.create_token("ci", Role::Operator).await.unwrap();
        assert!(t.starts_with(TOKEN_PREFIX) && t.len() == TOKEN_PREFIX.len() + 64);
        assert!(cat.has_tokens().await.unwrap());
        assert!(matches!(
            cat.create_token("ci", Role::Admin).await,
            Err(DaemonError::Conflict(_))
        ));
        assert_eq!(
            cat.check_token(&t).await.unwrap(),
            Some(("ci".into(), Role::Operator))
        );
        assert_eq!(cat.check_token("hub_00").await.unwrap(), None);
        assert_eq!(cat.check_token("").await.unwrap(), None);
        // The secret is nowhere in the database file.
        drop(cat);
        let cat = Catalog::open(&dir.path().join("c.sqlite")).unwrap();
        let stored: String = cat
            .with(|c| {
                Ok(
                    c.query_one("SELECT salt || token_hash FROM api_tokens", params![])?
                        .get(0)?,
                )
            })
            .await
            .unwrap();
        assert!(!stored.contains(&t[TOKEN_PREFIX.len()..]));
        cat.touch_token("ci").await.unwrap();
        let l = cat.tokens().await.unwrap();
        assert_eq!(l.len(), 1);
        assert_eq!(l[0].role, Role::Operator);
        assert!(l[0].last_used_at.is_some());
        cat.revoke_token("ci").await.unwrap();
        assert_eq!(cat.check_token(&t).await.unwrap(), None);
        assert!(matches!(
            cat.revoke_token("ci").await,
            Err(DaemonError::NotFound { .. })
        ));
    }

    #[tokio::test]
    async fn callback_tokens_hold_for_one_running_backup() {
        let dir = tempfile::tempdir().unwrap();
        let cat = Catalog::open(&dir.path().join("c.sqlite")).unwrap();
        cat.ensure_repository(crate::model::Repository {
            shared: false,
            id: "default".into(),
            path: dir.path().display().to_string(),
            s3: None,
            node_id: crate::catalog::LOCAL.into(),
        })
        .await
        .unwrap();
        for id in ["b1", "b2"] {
            cat.insert_running(crate::catalog::NewBackup {
                id: id.into(),
                vm_name: format!("vm-{id}"),
                repository_id: "default".into(),
                backup_type: "full".into(),
                policy_id: None,
                tags: Default::default(),
                created_ms: 1,
                disks: vec![],
            })
            .await
            .unwrap();
        }
        let t1 = cat.create_callback_token("b1").await.unwrap();
        let t2 = cat.create_callback_token("b2").await.unwrap();
        assert!(t1.starts_with(CALLBACK_PREFIX) && t1 != t2);
        assert!(cat.check_callback_token("b1", &t1).await.unwrap());
        assert!(!cat.check_callback_token("b2", &t1).await.unwrap());
        assert!(!cat.check_callback_token("b1", "hcb_00").await.unwrap());
        assert!(!cat.check_callback_token("nope", &t1).await.unwrap());
        // Ending the backup revokes its token.
        cat.fail("b1", "x", vec![]).await.unwrap();
        assert!(!cat.check_callback_token("b1", &t1).await.unwrap());
        assert!(cat.check_callback_token("b2", &t2).await.unwrap());
    }
}
