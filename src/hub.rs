//! Models and data files from the Hugging Face Hub by id, kept in the cache that every Hugging Face
//! tool shares and laid out as `huggingface_hub` lays it out, so a model that transformers, vLLM or
//! candle downloaded once is found here, and the reverse:
//!
//! ```text
//! $HF_HUB_CACHE (else $HF_HOME/hub, else ~/.cache/huggingface/hub)
//!   models--Qwen--Qwen2.5-3B/
//!     refs/main                    the commit `main` resolved to
//!     blobs/<etag>                 a file's bytes, named by its etag (the sha256 of an LFS file)
//!     blobs/<etag>.incomplete      a download under way, resumed by a Range request
//!     snapshots/<commit>/<file>    a relative symlink into blobs/
//!     .no_exist/<commit>/<file>    a file the commit does not have (the optional ones)
//!   datasets--TIGER-Lab--MMLU-Pro/…
//! ```
//!
//! A file in the snapshot of a revision already resolved is used without any request (as the
//! `hf-hub` crate does; pin `@<commit>` or delete `refs/<revision>` to move on). Otherwise one HEAD
//! request resolves the revision to a commit and the file to an etag, a size and a download
//! address; the bytes go to `blobs/<etag>.incomplete`, resumed after a dropped connection, and
//! become `blobs/<etag>` only once their size and hash match (sha256 for LFS files, git's blob
//! sha1 for the others): a cache entry is whole or absent.
//!
//! Environment, as `huggingface_hub` reads it: `HF_ENDPOINT`, `HF_TOKEN` (else the `$HF_HOME/token`
//! file `hf auth login` writes), `HF_HUB_OFFLINE`, `HF_HOME`, `HF_HUB_CACHE`; proxies from
//! `HTTPS_PROXY`/`ALL_PROXY`.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use sha2::Digest;

const DEFAULT_ENDPOINT: &str = "https://huggingface.co";
/// The prefix of a data file on the Hub, as pandas, polars, duckdb and `huggingface_hub`'s
/// `HfFileSystem` write it: `hf://datasets/OWNER/NAME[@REVISION]/PATH`.
pub const DATA_PREFIX: &str = "hf://datasets/";
/// Downloads resumed after a dropped connection before giving up.
const RESUMES: usize = 5;

/// A repository and revision on the Hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repo {
    pub kind: RepoKind,
    /// `OWNER/NAME`.
    pub id: String,
    /// A branch, tag or commit (`main` when none is given).
    pub revision: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepoKind {
    Model,
    Dataset,
}

/// `OWNER/NAME`: each part letters, digits, `-`, `_`, `.`, not starting with `-` or `.` (so
/// `./run`, `../x` and absolute paths are never ids).
fn is_repo_id(s: &str) -> bool {
    let part = |p: &str| {
        !p.is_empty()
            && p.len() <= 96
            && !p.starts_with(['-', '.'])
            && !p.contains("--")
            && !p.contains("..")
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    matches!(s.split_once('/'), Some((o, n)) if part(o) && part(n))
}

/// A relative path inside a repository (or a revision like `refs/pr/1`): no empty, `.` or `..`
/// part, no leading `/`, no backslash, so it can never name a file outside the cache.
fn is_inner_path(p: &str) -> bool {
    !p.is_empty()
        && !p.contains(['\\', '\0'])
        && !p.contains(char::is_whitespace)
        && p.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
}

impl Repo {
    /// A model id `OWNER/NAME[@REVISION]`, or `None` when `spec` is not one.
    pub fn model(spec: &str) -> Option<Repo> {
        let (id, revision) = match spec.split_once('@') {
            Some((id, rev)) => (id, rev),
            None => (spec, "main"),
        };
        (is_repo_id(id) && is_inner_path(revision)).then(|| Repo {
            kind: RepoKind::Model,
            id: id.to_string(),
            revision: revision.to_string(),
        })
    }

    /// The same repository at `commit`.
    fn at(&self, commit: &str) -> Repo {
        Repo {
            revision: commit.to_string(),
            ..self.clone()
        }
    }

    /// `hf://datasets/OWNER/NAME[@REVISION]/PATH` as the dataset repository and the file's path in
    /// it; `None` when `spec` does not start with `hf://`, an error naming the layout when it does
    /// but is not one.
    pub fn data_path(spec: &str) -> Result<Option<(Repo, String)>> {
        if !spec.starts_with("hf://") {
            return Ok(None);
        }
        let malformed = || {
            anyhow!(
                "{spec}: expected {DATA_PREFIX}OWNER/NAME[@REVISION]/PATH (a dataset file on the \
                 Hugging Face Hub)"
            )
        };
        let rest = spec.strip_prefix(DATA_PREFIX).ok_or_else(malformed)?;
        let mut parts = rest.splitn(3, '/');
        let (owner, name, mut path) = match (parts.next(), parts.next(), parts.next()) {
            (Some(o), Some(n), Some(p)) => (o, n, p),
            _ => return Err(malformed()),
        };
        let (name, revision) = match name.split_once('@') {
            // `@refs/pr/N/…` and `@refs/convert/parquet/…` as HfFileSystem reads them; any other
            // revision with a `/` is written percent-encoded (`@refs%2Fpr%2F1`).
            Some((n, "refs")) => {
                let mut segs = path.splitn(3, '/');
                match (segs.next(), segs.next(), segs.next()) {
                    (Some(kind @ ("pr" | "convert")), Some(which), Some(rest)) => {
                        path = rest;
                        (n, format!("refs/{kind}/{which}"))
                    }
                    _ => return Err(malformed()),
                }
            }
            Some((n, r)) => (
                n,
                percent_encoding::percent_decode_str(r)
                    .decode_utf8()
                    .map_err(|_| malformed())?
                    .into_owned(),
            ),
            None => (name, "main".to_string()),
        };
        let id = format!("{owner}/{name}");
        if !is_repo_id(&id) || !is_inner_path(&revision) || !is_inner_path(path) {
            return Err(malformed());
        }
        Ok(Some((
            Repo {
                kind: RepoKind::Dataset,
                id,
                revision,
            },
            path.to_string(),
        )))
    }

    /// `models--OWNER--NAME` or `datasets--OWNER--NAME`, the repository's folder in the cache.
    fn folder_name(&self) -> String {
        let kind = match self.kind {
            RepoKind::Model => "models",
            RepoKind::Dataset => "datasets",
        };
        format!("{kind}--{}", self.id.replace('/', "--"))
    }

    /// A 40-hex-digit revision is a commit: it needs no ref to resolve.
    fn commit(&self) -> Option<&str> {
        let r = &self.revision;
        (r.len() == 40 && r.bytes().all(|b| b.is_ascii_hexdigit())).then_some(r.as_str())
    }

    /// `OWNER/NAME@REVISION` (the revision left out when it is `main`), `hf://datasets/…` for a
    /// dataset.
    pub fn display(&self) -> String {
        let rev = match self.revision.as_str() {
            "main" => String::new(),
            r => format!("@{r}"),
        };
        match self.kind {
            RepoKind::Model => format!("{}{rev}", self.id),
            RepoKind::Dataset => format!("{DATA_PREFIX}{}{rev}", self.id),
        }
    }
}

/// Whether `p` would be fetched from the Hub: an `hf://datasets/` path, or a model id that is not
/// a local path (a local folder of that name wins).
pub fn is_remote(p: &Path) -> bool {
    let s = p.to_string_lossy();
    s.starts_with(DATA_PREFIX) || (!p.exists() && Repo::model(&s).is_some())
}

/// A model folder: `spec` itself when it exists or is no hub id, else the snapshot of the id's
/// model files in the cache, fetched where missing.
pub fn model_dir(spec: &Path) -> Result<PathBuf> {
    match model_repo(spec) {
        Some(repo) => Hub::from_env()?.model_folder(&repo),
        None => Ok(spec.to_path_buf()),
    }
}

/// `spec` pinned: a hub id becomes `OWNER/NAME@<commit>` once its files are in the cache (what a
/// run records in its config and adapters: portable, and found again without a request); a local
/// path stays as it is.
pub fn pin_model(spec: &Path) -> Result<PathBuf> {
    match model_repo(spec) {
        Some(repo) => {
            let dir = Hub::from_env()?.model_folder(&repo)?;
            let pinned = format!("{}@{}", repo.id, commit_of(&dir));
            eprintln!("{pinned}: {}", dir.display());
            Ok(PathBuf::from(pinned))
        }
        None => Ok(spec.to_path_buf()),
    }
}

/// `spec` pinned: `hf://datasets/OWNER/NAME@<commit>/PATH` once the file is in the cache; a local
/// path stays as it is.
pub fn pin_data(spec: &Path) -> Result<PathBuf> {
    match Repo::data_path(&spec.to_string_lossy())? {
        Some((repo, path)) => {
            let file = Hub::from_env()?.file(&repo, &path)?;
            let mut snapshot = file.as_path();
            for _ in 0..=path.matches('/').count() {
                snapshot = snapshot.parent().unwrap_or(snapshot);
            }
            let commit = commit_of(snapshot);
            let rev = utf8_percent_encode(&commit, NON_ALPHANUMERIC);
            Ok(PathBuf::from(format!(
                "{DATA_PREFIX}{}@{rev}/{path}",
                repo.id
            )))
        }
        None => Ok(spec.to_path_buf()),
    }
}

/// The commit of a snapshot folder (`…/snapshots/<commit>`).
fn commit_of(snapshot: &Path) -> String {
    snapshot
        .file_name()
        .map(|c| c.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// What `plan` reads of a model: its `config.json` and `tokenizer.json`, no weights; the folder
/// that holds them.
pub fn model_config_dir(spec: &Path) -> Result<PathBuf> {
    match model_repo(spec) {
        Some(repo) => {
            let hub = Hub::from_env()?;
            let f = hub.file(&repo, "config.json")?;
            let dir = f.parent().map(Path::to_path_buf).unwrap_or_default();
            hub.file(&repo.at(&commit_of(&dir)), "tokenizer.json")?;
            Ok(dir)
        }
        None => Ok(spec.to_path_buf()),
    }
}

fn model_repo(spec: &Path) -> Option<Repo> {
    if spec.exists() {
        return None;
    }
    Repo::model(spec.to_str()?)
}

/// A data file: `spec` itself, or the cached copy of an `hf://datasets/…` file, fetched if missing.
pub fn data_file(spec: &Path) -> Result<PathBuf> {
    match Repo::data_path(&spec.to_string_lossy())? {
        Some((repo, path)) => Hub::from_env()?.file(&repo, &path),
        None => Ok(spec.to_path_buf()),
    }
}

/// The client: where the Hub is, who asks, and the cache.
#[derive(Debug, Clone)]
pub struct Hub {
    /// `https://huggingface.co`, or a mirror (`HF_ENDPOINT`), without a trailing slash.
    pub endpoint: String,
    /// The hub cache folder (holding `models--…`).
    pub cache: PathBuf,
    pub token: Option<String>,
    /// Use the cache only (`HF_HUB_OFFLINE=1`).
    pub offline: bool,
}

/// What one HEAD request says about a file.
struct Remote {
    commit: String,
    etag: String,
    size: Option<u64>,
    /// Where the bytes are: an absolute address elsewhere (a CDN) or the resolve address itself.
    url: String,
    /// Whether `url` is on the endpoint's host (the token goes there only).
    same_host: bool,
}

/// The file the commit does not have (404 `EntryNotFound`).
struct Missing {
    commit: Option<String>,
}

impl Hub {
    /// The client the environment describes (see the module's doc).
    pub fn from_env() -> Result<Self> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        let home = match var("HF_HOME") {
            Some(h) => PathBuf::from(h),
            None => match var("XDG_CACHE_HOME") {
                Some(x) => PathBuf::from(x).join("huggingface"),
                None => PathBuf::from(var("HOME").ok_or_else(|| {
                    anyhow!("neither HF_HOME nor HOME is set: set HF_HOME to a cache folder")
                })?)
                .join(".cache/huggingface"),
            },
        };
        let cache = var("HF_HUB_CACHE")
            .or_else(|| var("HUGGINGFACE_HUB_CACHE"))
            .map(PathBuf::from)
            .unwrap_or_else(|| home.join("hub"));
        let token = var("HF_TOKEN")
            .or_else(|| var("HUGGING_FACE_HUB_TOKEN"))
            .or_else(|| fs::read_to_string(home.join("token")).ok())
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty());
        let offline = var("HF_HUB_OFFLINE").is_some_and(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "1" | "on" | "yes" | "true"
            )
        });
        let endpoint = var("HF_ENDPOINT").unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
        Ok(Hub {
            endpoint: endpoint.trim().trim_end_matches('/').to_string(),
            cache,
            token,
            offline,
        })
    }

    /// The files a model folder needs — `config.json`, `tokenizer.json`, the tokenizer and
    /// generation configs where the repository has them, and the weights (`model.safetensors`, or
    /// `model.safetensors.index.json` and every shard it names) — fetched where missing; returns the
    /// snapshot folder that holds them.
    pub fn model_folder(&self, repo: &Repo) -> Result<PathBuf> {
        let config = self.file(repo, "config.json")?;
        let dir = config.parent().map(Path::to_path_buf).unwrap_or_default();
        // Every other file from config.json's commit, so a folder never mixes two commits (a
        // branch that moved between two runs, or during a long download).
        let repo = &repo.at(&commit_of(&dir));
        self.file(repo, "tokenizer.json")?;
        for optional in ["tokenizer_config.json", "generation_config.json"] {
            self.optional_file(repo, optional)?;
        }
        if dir.join("model.safetensors").is_file() {
            return Ok(dir);
        }
        match self.optional_file(repo, "model.safetensors.index.json")? {
            Some(index) => {
                let text = fs::read_to_string(&index)
                    .with_context(|| format!("{}: cannot read", index.display()))?;
                let v: serde_json::Value = serde_json::from_str(&text)
                    .with_context(|| format!("{}: invalid JSON", index.display()))?;
                let map = v["weight_map"]
                    .as_object()
                    .ok_or_else(|| anyhow!("{}: no weight_map object", index.display()))?;
                let mut shards: Vec<&str> = map.values().filter_map(|s| s.as_str()).collect();
                shards.sort_unstable();
                shards.dedup();
                if let Some(bad) = shards.iter().find(|s| !is_inner_path(s)) {
                    bail!(
                        "{}: weight_map names the shard {bad:?}, not a file inside the repository",
                        index.display()
                    );
                }
                for s in shards {
                    self.file(repo, s)?;
                }
            }
            None => {
                self.file(repo, "model.safetensors")?;
            }
        }
        Ok(dir)
    }

    /// One file of the repository, fetched if missing; an error when the revision has no such file.
    pub fn file(&self, repo: &Repo, path: &str) -> Result<PathBuf> {
        self.fetch(repo, path, false)?.ok_or_else(|| {
            anyhow!(
                "{}: the repository has no file {path} at revision {} ({})",
                repo.display(),
                repo.revision,
                self.page(repo)
            )
        })
    }

    /// One file of the repository, or `None` when the revision does not have it (remembered in
    /// `.no_exist/`, so a cached re-run asks nothing).
    pub fn optional_file(&self, repo: &Repo, path: &str) -> Result<Option<PathBuf>> {
        self.fetch(repo, path, true)
    }

    fn fetch(&self, repo: &Repo, path: &str, optional: bool) -> Result<Option<PathBuf>> {
        if !is_inner_path(path) {
            bail!(
                "{}: {path:?} is not a file inside a repository",
                repo.display()
            );
        }
        let root = self.cache.join(repo.folder_name());
        let ref_file = root.join("refs").join(&repo.revision);
        let known = match repo.commit() {
            Some(c) => Some(c.to_string()),
            None => fs::read_to_string(&ref_file)
                .ok()
                .map(|c| c.trim().to_string())
                .filter(|c| is_inner_path(c)),
        };
        if let Some(commit) = &known {
            let snapshot = root.join("snapshots").join(commit);
            if snapshot.join(path).is_file() {
                return Ok(Some(snapshot.join(path)));
            }
            if root.join(".no_exist").join(commit).join(path).is_file() {
                return Ok(None);
            }
            // Offline, an optional file that a snapshot lacks is absent: other tools (`hf
            // download`, vLLM) fill snapshots without `.no_exist` markers.
            if self.offline && optional && snapshot.is_dir() {
                return Ok(None);
            }
        }
        if self.offline {
            let local = match repo.kind {
                RepoKind::Model => "; no local folder of that name exists either",
                RepoKind::Dataset => "",
            };
            bail!(
                "{}: {path} is not in the cache {} and HF_HUB_OFFLINE is set: run once with the \
                 network (unset HF_HUB_OFFLINE), or copy the files there{local}",
                repo.display(),
                root.display()
            );
        }
        let remote = match self.head(repo, path)? {
            Ok(r) => r,
            Err(Missing { commit }) => {
                if let Some(c) = commit.filter(|c| is_inner_path(c)).or(known) {
                    let marker = root.join(".no_exist").join(c).join(path);
                    write_file(&marker, b"")?;
                }
                return Ok(None);
            }
        };
        if repo.commit().is_none() {
            write_file(&ref_file, remote.commit.as_bytes())?;
        }
        let snap = root.join("snapshots").join(&remote.commit).join(path);
        if snap.is_file() {
            return Ok(Some(snap));
        }
        let blob = root.join("blobs").join(&remote.etag);
        let locks = self.cache.join(".locks").join(repo.folder_name());
        let _held = lock(&locks.join(format!("{}.lock", remote.etag)))?;
        // Another process may have finished it while this one waited for the lock.
        if snap.is_file() {
            return Ok(Some(snap));
        }
        if !blob.is_file() {
            self.download(repo, path, &remote, &blob)?;
        }
        link(&blob, &snap, path)?;
        Ok(Some(snap))
    }

    /// `{endpoint}/[datasets/]{id}/resolve/{revision}/{path}`, the revision and path quoted.
    fn resolve_url(&self, repo: &Repo, path: &str) -> String {
        // Python's `quote(revision, safe="")` and `quote(path)`: unreserved characters stay.
        const REV: &AsciiSet = &NON_ALPHANUMERIC
            .remove(b'-')
            .remove(b'_')
            .remove(b'.')
            .remove(b'~');
        const PATH: &AsciiSet = &REV.remove(b'/');
        let prefix = match repo.kind {
            RepoKind::Model => "",
            RepoKind::Dataset => "datasets/",
        };
        format!(
            "{}/{prefix}{}/resolve/{}/{}",
            self.endpoint,
            repo.id,
            utf8_percent_encode(&repo.revision, REV),
            utf8_percent_encode(path, PATH)
        )
    }

    fn page(&self, repo: &Repo) -> String {
        match repo.kind {
            RepoKind::Model => format!("{}/{}", self.endpoint, repo.id),
            RepoKind::Dataset => format!("{}/datasets/{}", self.endpoint, repo.id),
        }
    }

    /// An HTTP client for requests to `url`: the proxy of `HTTPS_PROXY`/`ALL_PROXY` unless
    /// `NO_PROXY` names its host (ureq reads the former, not the latter).
    fn agent(&self, redirects: u32, url: &str) -> ureq::Agent {
        ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(30))
            .timeout_read(Duration::from_secs(120))
            .redirects(redirects)
            .redirect_auth_headers(ureq::RedirectAuthHeaders::SameHost)
            .user_agent(concat!("med-rlvr/", env!("CARGO_PKG_VERSION")))
            .try_proxy_from_env(!no_proxy(url))
            .build()
    }

    fn authorized(&self, req: ureq::Request) -> ureq::Request {
        match &self.token {
            Some(t) => req.set("Authorization", &format!("Bearer {t}")),
            None => req,
        }
    }

    /// The HEAD request of one file: follows the Hub's own (relative) redirects, as a renamed
    /// repository sends, and stops at a redirect to another host, whose address is the download's.
    fn head(&self, repo: &Repo, path: &str) -> Result<std::result::Result<Remote, Missing>> {
        let mut url = self.resolve_url(repo, path);
        let agent = self.agent(0, &url);
        for _ in 0..5 {
            let req = self
                .authorized(agent.head(&url))
                .set("Accept-Encoding", "identity");
            let resp = match req.call() {
                Ok(r) => r,
                Err(ureq::Error::Status(status, r)) => {
                    return self.status_error(repo, path, status, &r);
                }
                Err(ureq::Error::Transport(t)) => return Err(self.unreachable(repo, path, &t)),
            };
            let redirect = (300..400).contains(&resp.status());
            let location = resp.header("Location").map(str::to_string);
            if redirect {
                match &location {
                    None => bail!("{url}: redirect ({}) without a Location", resp.status()),
                    Some(l) if l.starts_with('/') => {
                        url = format!("{}{l}", origin(&self.endpoint));
                        continue;
                    }
                    Some(_) => {}
                }
            }
            let commit = resp.header("X-Repo-Commit").map(str::to_string);
            let etag = resp
                .header("X-Linked-Etag")
                .or_else(|| resp.header("ETag"))
                .map(normalize_etag);
            // A redirect's own Content-Length is not the file's.
            let size = match resp.header("X-Linked-Size") {
                Some(s) => Some(s),
                None if !redirect => resp.header("Content-Length"),
                None => None,
            }
            .and_then(|s| s.trim().parse::<u64>().ok());
            let (Some(commit), Some(etag)) = (commit, etag) else {
                bail!(
                    "{url}: the answer has no X-Repo-Commit or ETag header: is {} (HF_ENDPOINT) a \
                     Hugging Face Hub?",
                    self.endpoint
                );
            };
            if !is_inner_path(&etag) || etag.contains('/') || !is_inner_path(&commit) {
                bail!("{url}: unusable ETag {etag:?} or commit {commit:?}");
            }
            let (url, same_host) = match location {
                Some(l) if redirect => {
                    let same = origin(&l) == origin(&self.endpoint);
                    (l, same)
                }
                _ => (url, true),
            };
            return Ok(Ok(Remote {
                commit,
                etag,
                size,
                url,
                same_host,
            }));
        }
        bail!("{url}: more than 5 redirects")
    }

    /// The message for an error status, naming what to do; `Missing` for a file the revision
    /// does not have.
    fn status_error(
        &self,
        repo: &Repo,
        path: &str,
        status: u16,
        resp: &ureq::Response,
    ) -> Result<std::result::Result<Remote, Missing>> {
        let code = resp.header("X-Error-Code").unwrap_or_default().to_string();
        let what = repo.display();
        let page = self.page(repo);
        let (asker, token) = match &self.token {
            Some(_) => (
                "the token (HF_TOKEN, else $HF_HOME/token)",
                "the token (HF_TOKEN, else $HF_HOME/token) has no access yet",
            ),
            None => ("an anonymous request", "HF_TOKEN is not set"),
        };
        match (status, code.as_str()) {
            (404, "EntryNotFound") => Ok(Err(Missing {
                commit: resp.header("X-Repo-Commit").map(str::to_string),
            })),
            (_, "GatedRepo") => bail!(
                "{what}: a gated repository ({status}; {token}): accept its licence at {page}, \
                 then set HF_TOKEN to a read token of that account"
            ),
            (_, "RevisionNotFound") => bail!(
                "{what}: no revision {} ({status}): name a branch, tag or commit that {page} has",
                repo.revision
            ),
            (401 | 404, "RepoNotFound") | (404, _) => bail!(
                "{what}: no such repository on {} ({status}), or a private one that {asker} \
                 cannot see{}; no local path of that name exists either",
                self.endpoint,
                if self.token.is_none() { " (set HF_TOKEN)" } else { "" }
            ),
            (401, _) => bail!(
                "{what}: {} refused {asker} (401 Unauthorized): the repository is private, gated \
                 or absent; check the id, or set HF_TOKEN to a read token with access to it",
                self.endpoint
            ),
            (403, _) => bail!(
                "{what}: access denied (403 Forbidden) to {asker}: the token needs read access to \
                 {page}"
            ),
            (429, _) => bail!(
                "{what}: {} asks to slow down (429 Too Many Requests) fetching {path}: wait and run \
                 again (the cache keeps what is done)",
                self.endpoint
            ),
            _ => bail!(
                "{what}: {} answered {status} for {path}: try again later (the cache keeps what is \
                 done)",
                self.endpoint
            ),
        }
    }

    fn unreachable(&self, repo: &Repo, path: &str, t: &ureq::Transport) -> anyhow::Error {
        anyhow!(
            "{}: cannot reach {} to fetch {path} ({t}): check the network (a proxy goes in \
             HTTPS_PROXY), or set HF_HUB_OFFLINE=1 to use only the cache {}",
            repo.display(),
            self.endpoint,
            self.cache.display()
        )
    }

    /// Fetches the file into `blob` through `blob.incomplete`, resuming after a dropped
    /// connection (a fresh download address when the CDN's has expired), and keeps it only when its
    /// size and hash match the HEAD's. A partial download that is a prefix of the file stays for
    /// the next run; one that is not is deleted.
    fn download(&self, repo: &Repo, path: &str, remote: &Remote, blob: &Path) -> Result<()> {
        let part = blob.with_file_name(format!("{}.incomplete", remote.etag));
        if let Some(dir) = part.parent() {
            fs::create_dir_all(dir).map_err(|e| write_error(dir, e))?;
        }
        // Created up front: an empty file is complete at once.
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(&part)
            .map_err(|e| write_error(&part, e))?;
        let size = remote.size;
        let human = size.map(|s| format!(" ({})", indicatif::HumanBytes(s)));
        eprintln!(
            "fetching {} {path}{}",
            repo.display(),
            human.unwrap_or_default()
        );
        let bar =
            indicatif::ProgressBar::with_draw_target(size, indicatif::ProgressDrawTarget::stderr());
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "  {bytes}/{total_bytes} {wide_bar} {bytes_per_sec} eta {eta}",
            )
            .expect("valid template"),
        );
        let len = || fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
        let restart = || {
            OpenOptions::new()
                .write(true)
                .truncate(true)
                .open(&part)
                .map(|_| ())
                .map_err(|e| write_error(&part, e))
        };
        let kept = |why: String| {
            anyhow!(
                "{}: downloading {path} failed at {} bytes after {RESUMES} tries ({why}); the \
                 partial download is kept: run again to resume from {}",
                repo.display(),
                len(),
                part.display()
            )
        };
        let (mut url, mut same_host) = (remote.url.clone(), remote.same_host);
        // Tries since the last byte arrived: a connection that keeps dropping but makes progress
        // is followed to the end.
        let mut attempt = 0;
        loop {
            let have = len();
            match size {
                Some(s) if have == s => break,
                Some(s) if have > s => {
                    restart()?;
                    continue;
                }
                _ => {}
            }
            let mut req = self
                .agent(10, &url)
                .get(&url)
                .set("Accept-Encoding", "identity");
            if same_host {
                req = self.authorized(req);
            }
            if have > 0 {
                req = req.set("Range", &format!("bytes={have}-"));
            }
            let resp = match req.call() {
                Ok(r) => r,
                // The partial is not a prefix of the file (or is all of it, size unknown).
                Err(ureq::Error::Status(416, _)) if have > 0 => {
                    restart()?;
                    if !retry(&mut attempt, len(), "the server refused the range") {
                        return Err(kept("416 Range Not Satisfiable".into()));
                    }
                    continue;
                }
                // A signed CDN address expires: ask the Hub for a fresh one.
                Err(ureq::Error::Status(status, _)) if !same_host => {
                    if !retry(
                        &mut attempt,
                        len(),
                        &format!("the download address answered {status}"),
                    ) {
                        return Err(kept(format!("{status} from {}", origin(&url))));
                    }
                    match self.head(repo, path)? {
                        Ok(fresh) if fresh.etag == remote.etag => {
                            (url, same_host) = (fresh.url, fresh.same_host);
                        }
                        Ok(_) => bail!(
                            "{}: {path} changed on the Hub during the download: run again",
                            repo.display()
                        ),
                        Err(Missing { .. }) => bail!(
                            "{}: {path} was removed from the Hub during the download",
                            repo.display()
                        ),
                    }
                    continue;
                }
                Err(ureq::Error::Status(status, r)) => {
                    let _vanished = self.status_error(repo, path, status, &r)?;
                    bail!("{}: {path}: the file vanished ({status})", repo.display());
                }
                Err(ureq::Error::Transport(t)) => {
                    if retry(&mut attempt, len(), &t.to_string()) {
                        continue;
                    }
                    return Err(match have {
                        0 => self.unreachable(repo, path, &t),
                        _ => kept(t.to_string()),
                    });
                }
            };
            // 206 continues the partial; 200 is the whole file again (a server without ranges).
            let append = resp.status() == 206 && have > 0;
            if append && content_range_start(&resp) != Some(have) {
                restart()?;
                if !retry(
                    &mut attempt,
                    len(),
                    "the server sent another range than asked",
                ) {
                    return Err(kept("a wrong Content-Range".into()));
                }
                continue;
            }
            let mut out = OpenOptions::new()
                .append(append)
                .write(true)
                .truncate(!append)
                .open(&part)
                .map_err(|e| write_error(&part, e))?;
            bar.set_position(if append { have } else { 0 });
            let copied = copy(&mut resp.into_reader(), &mut out, &bar);
            if len() > have {
                attempt = 0;
            }
            match copied {
                Ok(()) => {
                    out.sync_all().map_err(|e| write_error(&part, e))?;
                    match size {
                        Some(s) if len() < s => {
                            if !retry(
                                &mut attempt,
                                len(),
                                &format!("the connection closed at {} of {s} bytes", len()),
                            ) {
                                return Err(kept("the connection kept closing".into()));
                            }
                        }
                        _ => break,
                    }
                }
                Err(CopyError::Write(e)) => return Err(write_error(&part, e)),
                Err(CopyError::Read(e)) => {
                    if !retry(&mut attempt, len(), &e.to_string()) {
                        return Err(kept(e.to_string()));
                    }
                }
            }
        }
        bar.finish_and_clear();
        let got = len();
        if let Some(s) = size.filter(|&s| s != got) {
            let _ = fs::remove_file(&part);
            bail!(
                "{}: {path} arrived with {got} bytes where {s} were announced; the download is \
                 deleted: run again",
                repo.display()
            );
        }
        if let Err(e) = verify(&part, &remote.etag) {
            let _ = fs::remove_file(&part);
            bail!(
                "{}: {path}: {e}; the download is deleted: run again",
                repo.display()
            );
        }
        fs::rename(&part, blob).map_err(|e| write_error(blob, e))?;
        Ok(())
    }
}

/// Counts one more try after `what` went wrong at `at` bytes; false once `RESUMES` are spent.
/// Waits a little longer each time (0.2 s, 0.4 s, … 3.2 s).
fn retry(attempt: &mut usize, at: u64, what: &str) -> bool {
    *attempt += 1;
    if *attempt > RESUMES {
        return false;
    }
    eprintln!("  {what}; resuming at {at} bytes (try {attempt} of {RESUMES})");
    std::thread::sleep(Duration::from_millis(100 << (*attempt).min(6)));
    true
}

/// The first byte of a 206 answer (`Content-Range: bytes START-END/SIZE`).
fn content_range_start(resp: &ureq::Response) -> Option<u64> {
    let v = resp.header("Content-Range")?.trim();
    let v = v.strip_prefix("bytes")?.trim_start();
    v.split('-').next()?.trim().parse().ok()
}

enum CopyError {
    Read(io::Error),
    Write(io::Error),
}

fn copy(src: &mut dyn Read, dst: &mut File, bar: &indicatif::ProgressBar) -> Result<(), CopyError> {
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = match src.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(CopyError::Read(e)),
        };
        dst.write_all(&buf[..n]).map_err(CopyError::Write)?;
        bar.inc(n as u64);
    }
}

/// The file's hash against its etag: a 64-hex-digit etag is an LFS file's sha256, a 40-digit one
/// a git blob id (`sha1("blob {len}\0" + bytes)`); other etags (a mirror's) are not checked.
fn verify(file: &Path, etag: &str) -> Result<()> {
    let hex = |s: &str| s.bytes().all(|b| b.is_ascii_hexdigit());
    let actual = match etag.len() {
        64 if hex(etag) => hash_file(file, sha2::Sha256::new(), None)?,
        40 if hex(etag) => {
            let len = fs::metadata(file)?.len();
            hash_file(file, sha1::Sha1::new(), Some(format!("blob {len}\0")))?
        }
        _ => return Ok(()),
    };
    if !actual.eq_ignore_ascii_case(etag) {
        bail!("its hash is {actual} where the Hub's ETag says {etag}");
    }
    Ok(())
}

fn hash_file<D: Digest>(file: &Path, mut d: D, prefix: Option<String>) -> Result<String> {
    if let Some(p) = prefix {
        d.update(p.as_bytes());
    }
    let mut f = File::open(file).with_context(|| format!("{}: cannot read", file.display()))?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        d.update(&buf[..n]);
    }
    Ok(d.finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>())
}

/// `W/"abc"` → `abc`.
fn normalize_etag(e: &str) -> String {
    e.trim()
        .trim_start_matches("W/")
        .trim_matches('"')
        .to_string()
}

/// `scheme://host[:port]` of an address.
fn origin(url: &str) -> &str {
    let after = url.find("://").map(|i| i + 3).unwrap_or(0);
    match url[after..].find('/') {
        Some(j) => &url[..after + j],
        None => url,
    }
}

/// Whether `NO_PROXY` (or `no_proxy`) exempts `url`'s host: `*`, the host, or a domain suffix
/// (`example.com` and `.example.com` both cover `hub.example.com`).
fn no_proxy(url: &str) -> bool {
    let list = std::env::var("NO_PROXY")
        .or_else(|_| std::env::var("no_proxy"))
        .unwrap_or_default();
    let host = origin(url).split("://").nth(1).unwrap_or_default();
    let host = host.rsplit_once(':').map_or(host, |(h, port)| {
        match port.bytes().all(|b| b.is_ascii_digit()) {
            true => h,
            false => host,
        }
    });
    list.split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .any(|e| {
            let e = e.trim_start_matches('.');
            e == "*" || host == e || host.ends_with(&format!(".{e}"))
        })
}

/// `snapshots/<commit>/<path>` → `../../[../]blobs/<etag>`, relative as `huggingface_hub` links
/// it (a copy where symlinks are not available).
fn link(blob: &Path, snap: &Path, path: &str) -> Result<()> {
    let dir = snap.parent().expect("snapshot file has a folder");
    fs::create_dir_all(dir).map_err(|e| write_error(dir, e))?;
    let ups = 2 + path.matches('/').count();
    let mut target = PathBuf::new();
    for _ in 0..ups {
        target.push("..");
    }
    target.push("blobs");
    target.push(blob.file_name().expect("blob has a name"));
    // Made under a name of this process's, then renamed over the old entry: never a moment
    // without the file for another process reading the snapshot.
    let name = snap.file_name().expect("snapshot file has a name");
    let tmp = snap.with_file_name(format!(
        "{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    let _ = fs::remove_file(&tmp);
    #[cfg(unix)]
    let made = std::os::unix::fs::symlink(&target, &tmp);
    #[cfg(not(unix))]
    let made = fs::copy(blob, &tmp).map(|_| ());
    made.map_err(|e| write_error(&tmp, e))?;
    fs::rename(&tmp, snap).map_err(|e| write_error(snap, e))
}

/// An exclusive lock on `.locks/<repo>/<etag>.lock` (where `huggingface_hub` takes it), held while
/// the blob is fetched, so two processes (two runs, MPI ranks) never write one download together;
/// released when the file closes, by a crash too.
fn lock(p: &Path) -> Result<File> {
    let dir = p.parent().expect("lock file has a folder");
    fs::create_dir_all(dir).map_err(|e| write_error(dir, e))?;
    let f = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(p)
        .map_err(|e| write_error(p, e))?;
    f.lock()
        .with_context(|| format!("{}: cannot lock", p.display()))?;
    Ok(f)
}

/// Writes a small cache file (a ref, a `.no_exist` marker) through a temporary and a rename.
fn write_file(p: &Path, bytes: &[u8]) -> Result<()> {
    let dir = p.parent().expect("cache file has a folder");
    fs::create_dir_all(dir).map_err(|e| write_error(dir, e))?;
    let name = p
        .file_name()
        .expect("cache file has a name")
        .to_string_lossy();
    let tmp = p.with_file_name(format!("{name}.{}.tmp", std::process::id()));
    fs::write(&tmp, bytes).map_err(|e| write_error(&tmp, e))?;
    fs::rename(&tmp, p).map_err(|e| write_error(p, e))
}

/// A write error naming the path; a full disk says what to do.
fn write_error(p: &Path, e: io::Error) -> anyhow::Error {
    if e.kind() == io::ErrorKind::StorageFull || e.raw_os_error() == Some(28) {
        anyhow!(
            "{}: no space left on the device: free space, or point HF_HOME (or HF_HUB_CACHE) to a \
             larger disk, then run again (a partial download resumes)",
            p.display()
        )
    } else {
        anyhow!("{}: cannot write: {e}", p.display())
    }
}
