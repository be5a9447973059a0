//! A remote repository rendered into from a clone of Kiln's own (the
//! controller's cache): fetched before each render, so that guards and
//! history see the remote's branch, and pushed after each commit, fast-forward
//! only. Credentials come from the caller (a Secret), never from a URL.

use std::path::Path;

use git2::{Cred, CredentialType, FetchOptions, PushOptions, RemoteCallbacks, Repository};

use super::repo::{Branch, Repo, git};
use crate::{Error, Result};

/// How to authenticate to the remote.
#[derive(Clone, Default)]
pub struct Credentials {
    /// HTTPS user name (default `git`).
    pub username: Option<String>,
    /// HTTPS password or token.
    pub password: Option<String>,
    /// A private SSH key, PEM or OpenSSH format.
    pub identity: Option<String>,
    /// Lines of an OpenSSH `known_hosts` file: the only host keys accepted.
    pub known_hosts: Option<String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Which kinds are set, never their values.
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<set>"))
            .field("identity", &self.identity.as_ref().map(|_| "<set>"))
            .field("known_hosts", &self.known_hosts.is_some())
            .finish()
    }
}

/// A remote branch Kiln renders into.
#[derive(Debug, Clone)]
pub struct Remote {
    /// Where it is: `https://`, `ssh://`, `git@host:path`, `git://`,
    /// `file://` or a path.
    pub url: String,
    /// How to authenticate.
    pub credentials: Credentials,
}

/// How many times a push is retried after the remote moved under it.
pub const PUSH_ATTEMPTS: usize = 5;

impl Remote {
    /// The clone of the remote in `dir`, created (bare, empty) when missing;
    /// HEAD names `branch`.
    pub fn cache(&self, dir: &Path, branch: &str) -> Result<Repo> {
        let opened = if dir.join("HEAD").exists() {
            Repository::open_bare(dir)
        } else {
            std::fs::create_dir_all(dir).map_err(|e| Error::Git {
                message: format!("cache {}: {e}", dir.display()),
            })?;
            Repository::init_bare(dir)
        };
        let repo = opened.map_err(|e| Error::Git {
            message: format!("cache {}: {}", dir.display(), e.message()),
        })?;
        let head = format!("refs/heads/{}", branch.trim_start_matches("refs/heads/"));
        repo.set_head(&head).map_err(git)?;
        Ok(Repo {
            git: repo,
            location: dir.to_path_buf(),
        })
    }

    /// Fetches `branch` and points the clone's branch at the remote's tip:
    /// a commit of Kiln's that never reached the remote is dropped (the
    /// next render makes it again, on top of what the remote has). A
    /// remote without the branch leaves the clone's as it is.
    pub fn fetch(&self, repo: &Repo, branch: &Branch) -> Result<()> {
        let tracking = format!("refs/kiln-remote/{}", branch.short());
        let mut remote = repo
            .git
            .remote_anonymous(&self.url)
            .map_err(|e| self.failed("fetch from", &e, None))?;
        let refused = std::cell::RefCell::new(None);
        let mut options = FetchOptions::new();
        options.remote_callbacks(self.callbacks(&refused));
        let refspec = format!("+{}:{tracking}", branch.refname());
        let fetched = remote.fetch(&[refspec.as_str()], Some(&mut options), None);
        drop(options);
        fetched.map_err(|e| self.failed("fetch from", &e, refused.into_inner()))?;
        let Ok(fetched) = repo.git.find_reference(&tracking) else {
            return Ok(());
        };
        let Some(tip) = fetched.target() else {
            return Ok(());
        };
        repo.git
            .reference(branch.refname(), tip, true, "kiln: follow the remote")
            .map_err(git)?;
        Ok(())
    }

    /// Pushes `branch`, fast-forward only. `Some(reason)` when the remote
    /// refused the update (it moved since the fetch, or a hook said no):
    /// fetch, commit and push again.
    pub fn push(&self, repo: &Repo, branch: &Branch) -> Result<Option<String>> {
        let mut remote = repo
            .git
            .remote_anonymous(&self.url)
            .map_err(|e| self.failed("push to", &e, None))?;
        let rejected = std::cell::RefCell::new(None::<String>);
        let refused = std::cell::RefCell::new(None);
        let mut callbacks = self.callbacks(&refused);
        callbacks.push_update_reference(|_, status| {
            if let Some(status) = status {
                *rejected.borrow_mut() = Some(status.to_string());
            }
            Ok(())
        });
        let mut options = PushOptions::new();
        options.remote_callbacks(callbacks);
        let refspec = format!("{0}:{0}", branch.refname());
        match remote.push(&[refspec.as_str()], Some(&mut options)) {
            Ok(()) => {}
            Err(e)
                if e.code() == git2::ErrorCode::NotFastForward
                    || e.message().contains("fastforward")
                    || e.message().contains("fast-forward") =>
            {
                return Ok(Some("not a fast-forward".into()));
            }
            Err(e) => {
                drop(options);
                return Err(self.failed("push to", &e, refused.into_inner()));
            }
        }
        drop(options);
        Ok(rejected.into_inner())
    }

    /// Credentials and host key checks; why a host key was refused goes to
    /// `refused` (libgit2 replaces the callback's own message).
    fn callbacks<'a>(
        &'a self,
        refused: &'a std::cell::RefCell<Option<String>>,
    ) -> RemoteCallbacks<'a> {
        let mut callbacks = RemoteCallbacks::new();
        let credentials = &self.credentials;
        let mut tried = 0;
        callbacks.credentials(move |_url, username, allowed| {
            // libgit2 asks again after a refusal: fail instead of looping.
            tried += 1;
            if tried > 3 {
                return Err(git2::Error::from_str(
                    "the remote refused the credentials of spec.git.secretRef",
                ));
            }
            if allowed.contains(CredentialType::SSH_KEY)
                && let Some(key) = &credentials.identity
            {
                return Cred::ssh_key_from_memory(username.unwrap_or("git"), None, key, None);
            }
            if allowed.contains(CredentialType::USER_PASS_PLAINTEXT)
                && let Some(password) = &credentials.password
            {
                let user = credentials.username.as_deref().unwrap_or("git");
                return Cred::userpass_plaintext(user, password);
            }
            if allowed.contains(CredentialType::USERNAME) {
                return Cred::username(username.unwrap_or("git"));
            }
            Err(git2::Error::from_str(
                "the remote asks for credentials: set spec.git.secretRef",
            ))
        });
        callbacks.certificate_check(move |cert, host| {
            let Some(hostkey) = cert.as_hostkey() else {
                // TLS: libgit2 has checked the certificate against the
                // system's trust store.
                return Ok(git2::CertificateCheckStatus::CertificatePassthrough);
            };
            let Some(key) = hostkey.hostkey() else {
                return Err(git2::Error::from_str("the SSH server sent no host key"));
            };
            let known = credentials.known_hosts.as_deref().unwrap_or_default();
            if known_host(known, host, key) {
                Ok(git2::CertificateCheckStatus::CertificateOk)
            } else {
                let why = format!(
                    "the SSH host key of {host} is not in the known_hosts of spec.git.secretRef"
                );
                *refused.borrow_mut() = Some(why.clone());
                Err(git2::Error::from_str(&why))
            }
        });
        callbacks
    }

    fn failed(&self, verb: &str, e: &git2::Error, refused: Option<String>) -> Error {
        Error::Git {
            message: format!(
                "{verb} {}: {}",
                self.redacted(),
                refused.unwrap_or_else(|| e.message().to_string())
            ),
        }
    }

    /// The URL without a password someone put in it.
    pub fn redacted(&self) -> String {
        redact_url(&self.url)
    }
}

/// `https://user:secret@host/x` → `https://user:***@host/x`.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    match authority.rsplit_once('@') {
        Some((userinfo, host)) if userinfo.contains(':') => {
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{scheme}://{user}:***@{host}{path}")
        }
        _ => url.to_string(),
    }
}

/// Whether `known_hosts` lists `key` (raw, as the server sent it) for
/// `host`. Hashed host names (`|1|...`) are not supported; `*` matches any
/// host.
fn known_host(known_hosts: &str, host: &str, key: &[u8]) -> bool {
    use base64::Engine as _;
    known_hosts.lines().any(|line| {
        let mut fields = line.split_whitespace();
        let (Some(hosts), Some(_kind), Some(encoded)) =
            (fields.next(), fields.next(), fields.next())
        else {
            return false;
        };
        let names_host = hosts.split(',').any(|h| {
            let h = h.trim_start_matches('[');
            let h = h.split(']').next().unwrap_or(h);
            h == host || h == "*"
        });
        names_host
            && base64::engine::general_purpose::STANDARD
                .decode(encoded)
                .is_ok_and(|k| k == key)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_in_urls_are_not_repeated() {
        assert_eq!(
            redact_url("https://kiln:s3cret@git.example.com/fleet.git"),
            "https://kiln:***@git.example.com/fleet.git"
        );
        assert_eq!(
            redact_url("git@github.com:org/x.git"),
            "git@github.com:org/x.git"
        );
        assert_eq!(
            redact_url("https://git.example.com/x"),
            "https://git.example.com/x"
        );
    }

    #[test]
    fn a_host_key_is_accepted_only_when_listed_for_the_host() {
        use base64::Engine as _;
        let key = b"ssh-ed25519 raw key bytes";
        let encoded = base64::engine::general_purpose::STANDARD.encode(key);
        let known = format!("# comment\ngit.example.com,10.0.0.1 ssh-ed25519 {encoded}\n");
        assert!(known_host(&known, "git.example.com", key));
        assert!(known_host(&known, "10.0.0.1", key));
        assert!(!known_host(&known, "evil.example.com", key));
        assert!(!known_host(&known, "git.example.com", b"another key"));
        let bracketed = format!("[git.example.com]:2222 ssh-ed25519 {encoded}");
        assert!(known_host(&bracketed, "git.example.com", key));
    }
}
