//! Models and data by Hub id (`src/hub.rs`), without the internet: a small HTTP server on the
//! loopback serves the Hub's `resolve` endpoints (HEAD and GET, the headers `huggingface_hub` reads,
//! LFS files behind a redirect to another host, Range requests, the `X-Error-Code`s) for a tiny
//! model, a sharded one, a gated one, the demo task and the MedQA / MMLU-Pro layouts, from fixture
//! files. Cases: first download, cached re-run (no request), offline mode, 404, 401, a gated
//! repository with and without a token, a connection dropped mid-file (resumed), a corrupt
//! download (never kept), a full disk, no network; and `train --config` with hub ids through the
//! binary, whose transcript and error table are written to `$CARGO_TARGET_DIR/tmp/hub.md`.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use med_rlvr::hub::{Hub, Repo};
use sha2::Digest;

const TOKEN: &str = "hf_test_token";

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha256(b: &[u8]) -> String {
    hex(&sha2::Sha256::digest(b))
}

fn git_sha1(b: &[u8]) -> String {
    let mut h = sha1::Sha1::new();
    h.update(format!("blob {}\0", b.len()).as_bytes());
    h.update(b);
    hex(&h.finalize())
}

/// Files stored in LFS on the Hub (a redirect to the CDN, etag = sha256).
fn is_lfs(path: &str) -> bool {
    path.ends_with(".safetensors") || path.ends_with(".parquet")
}

struct FakeRepo {
    /// `""` for models, `"datasets/"` for datasets.
    prefix: &'static str,
    id: String,
    commit: String,
    files: BTreeMap<String, Vec<u8>>,
    gated: bool,
    /// Earlier commits, still served (with today's files).
    earlier: Vec<String>,
}

/// One request the server saw.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    range: Option<String>,
    auth: bool,
}

#[derive(Default)]
struct State {
    repos: Vec<FakeRepo>,
    seen: Vec<Seen>,
    /// The next CDN answer sends this many bytes of the body, then closes the connection.
    drop_after: Option<usize>,
    /// The next CDN answer flips a byte of the body.
    corrupt: bool,
    /// The next CDN answer is 403 (a signed address that expired).
    expire: bool,
    /// Old id → new id: a renamed repository (a relative 307, as the Hub sends).
    renamed: BTreeMap<String, String>,
}

struct FakeHub {
    endpoint: String,
    state: Arc<Mutex<State>>,
}

fn files_of(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            (name, std::fs::read(&p).unwrap())
        })
        .collect()
}

impl FakeHub {
    fn start() -> FakeHub {
        let demo = repo_root().join("assets/demo");
        let model = files_of(&demo.join("model"));
        let mut sharded = BTreeMap::new();
        sharded.insert("config.json".to_string(), model["config.json"].clone());
        sharded.insert(
            "tokenizer.json".to_string(),
            model["tokenizer.json"].clone(),
        );
        sharded.insert("tokenizer_config.json".to_string(), b"{}".to_vec());
        let shards = [
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
        ];
        sharded.insert(
            "model.safetensors.index.json".to_string(),
            serde_json::to_vec(&serde_json::json!({"metadata": {}, "weight_map": {
                "a": shards[0], "b": shards[1], "c": shards[0]}}))
            .unwrap(),
        );
        for (i, s) in shards.iter().enumerate() {
            sharded.insert(s.to_string(), vec![i as u8 + 1; 300_000 + i]);
        }
        let fixture =
            |f: &str| std::fs::read(repo_root().join("tests/fixtures/data").join(f)).unwrap();
        let mut task: BTreeMap<String, Vec<u8>> = ["train.jsonl", "test.jsonl"]
            .iter()
            .map(|f| (f.to_string(), std::fs::read(demo.join(f)).unwrap()))
            .collect();
        task.insert("empty.jsonl".into(), vec![]);
        // An index whose shard names point outside the repository.
        let mut evil = model.clone();
        evil.remove("model.safetensors");
        evil.insert(
            "model.safetensors.index.json".into(),
            br#"{"weight_map": {"a": "../../../../escape.safetensors"}}"#.to_vec(),
        );
        let repo = |prefix, id: &str, n: u8, files: BTreeMap<String, Vec<u8>>, gated| FakeRepo {
            prefix,
            id: id.to_string(),
            commit: format!("{:040x}", 0xc0ffee_u64 * 1000 + n as u64),
            files,
            gated,
            earlier: vec![],
        };
        let mut state = State {
            repos: vec![
                repo("", "med-rlvr/demo-model", 1, model.clone(), false),
                repo("", "med-rlvr/sharded", 2, sharded, false),
                repo("", "med-rlvr/gated", 3, model, true),
                repo("", "med-rlvr/evil", 7, evil, false),
                repo("datasets/", "med-rlvr/demo-task", 4, task, false),
                repo(
                    "datasets/",
                    "GBaker/MedQA-USMLE-4-options",
                    5,
                    [(
                        "phrases_no_exclude_test.jsonl".to_string(),
                        fixture("medqa_us_4opt_test.head20.jsonl"),
                    )]
                    .into(),
                    false,
                ),
                repo(
                    "datasets/",
                    "TIGER-Lab/MMLU-Pro",
                    6,
                    [(
                        "data/validation-00000-of-00001.parquet".to_string(),
                        fixture("mmlu_pro_validation.parquet"),
                    )]
                    .into(),
                    false,
                ),
            ],
            ..Default::default()
        };
        state
            .renamed
            .insert("old-name/demo-model".into(), "med-rlvr/demo-model".into());
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(Mutex::new(state));
        let shared = state.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let st = shared.clone();
                std::thread::spawn(move || {
                    let _ = serve(stream, &st, port);
                });
            }
        });
        FakeHub {
            endpoint: format!("http://127.0.0.1:{port}"),
            state,
        }
    }

    fn hub(&self, cache: &Path) -> Hub {
        Hub {
            endpoint: self.endpoint.clone(),
            cache: cache.to_path_buf(),
            token: None,
            offline: false,
        }
    }

    fn seen(&self) -> Vec<Seen> {
        self.state.lock().unwrap().seen.clone()
    }

    fn file(&self, id: &str, path: &str) -> Vec<u8> {
        let st = self.state.lock().unwrap();
        st.repos.iter().find(|r| r.id == id).unwrap().files[path].clone()
    }

    fn commit(&self, id: &str) -> String {
        let st = self.state.lock().unwrap();
        st.repos.iter().find(|r| r.id == id).unwrap().commit.clone()
    }
}

/// One HTTP/1.1 exchange (`Connection: close`).
fn serve(mut stream: TcpStream, state: &Mutex<State>, port: u16) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_string();
    let path = parts.next().unwrap_or_default().to_string();
    let mut headers = BTreeMap::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let auth = headers.get("authorization").cloned();
    let range = headers.get("range").cloned();
    let mut st = state.lock().unwrap();
    st.seen.push(Seen {
        method: method.clone(),
        path: path.clone(),
        range: range.clone(),
        auth: auth.is_some(),
    });
    let head = method == "HEAD";
    let mut respond = |status: &str, hdrs: &[(&str, String)], body: &[u8]| -> std::io::Result<()> {
        let mut out = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
        for (k, v) in hdrs {
            out.push_str(&format!("{k}: {v}\r\n"));
        }
        if !hdrs.iter().any(|(k, _)| *k == "Content-Length") {
            out.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        out.push_str("\r\n");
        stream.write_all(out.as_bytes())?;
        if !head {
            stream.write_all(body)?;
        }
        stream.flush()
    };
    if let Some(sha) = path.strip_prefix("/cdn/") {
        let Some(bytes) = st
            .repos
            .iter()
            .flat_map(|r| r.files.values())
            .find(|b| sha256(b) == sha)
            .cloned()
        else {
            return respond("404 Not Found", &[], b"");
        };
        let start = range
            .as_deref()
            .and_then(|r| r.strip_prefix("bytes="))
            .and_then(|r| r.trim_end_matches('-').parse::<usize>().ok())
            .unwrap_or(0);
        let mut body = bytes[start.min(bytes.len())..].to_vec();
        if std::mem::take(&mut st.expire) {
            drop(st);
            return respond("403 Forbidden", &[], b"Request has expired");
        }
        if std::mem::take(&mut st.corrupt) && !body.is_empty() {
            body[0] ^= 0xff;
        }
        let status = match start {
            0 => "200 OK",
            _ => "206 Partial Content",
        };
        let mut hdrs = vec![("Content-Length", body.len().to_string())];
        if start > 0 {
            hdrs.push((
                "Content-Range",
                format!("bytes {start}-{}/{}", bytes.len() - 1, bytes.len()),
            ));
        }
        if let Some(k) = st.drop_after.take() {
            drop(st);
            // Announce the whole body, send `k` bytes, hang up.
            let mut out = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
            for (h, v) in &hdrs {
                out.push_str(&format!("{h}: {v}\r\n"));
            }
            out.push_str("\r\n");
            stream.write_all(out.as_bytes())?;
            stream.write_all(&body[..k.min(body.len())])?;
            stream.flush()?;
            return stream.shutdown(Shutdown::Both);
        }
        drop(st);
        return respond(status, &hdrs, &body);
    }
    let (prefix, rest) = match path.strip_prefix("/datasets/") {
        Some(r) => ("datasets/", r),
        None => ("", path.trim_start_matches('/')),
    };
    let segs: Vec<&str> = rest.splitn(5, '/').collect();
    if segs.len() < 5 || segs[2] != "resolve" {
        return respond("404 Not Found", &[], b"");
    }
    let id = format!("{}/{}", segs[0], segs[1]);
    let (rev, file) = (segs[3], segs[4]);
    if let Some(new) = st.renamed.get(&id) {
        let to = format!("/{prefix}{new}/resolve/{rev}/{file}");
        return respond("307 Temporary Redirect", &[("Location", to)], b"");
    }
    let Some(repo) = st.repos.iter().find(|r| r.id == id && r.prefix == prefix) else {
        let code = ("X-Error-Code", "RepoNotFound".to_string());
        return respond("401 Unauthorized", &[code], b"Repository not found");
    };
    if repo.gated && auth.as_deref() != Some(&format!("Bearer {TOKEN}")) {
        let status = match auth {
            Some(_) => "403 Forbidden",
            None => "401 Unauthorized",
        };
        return respond(
            status,
            &[("X-Error-Code", "GatedRepo".to_string())],
            b"gated",
        );
    }
    if rev != "main" && rev != repo.commit && !repo.earlier.iter().any(|c| c == rev) {
        let code = ("X-Error-Code", "RevisionNotFound".to_string());
        return respond("404 Not Found", &[code], b"Invalid rev id");
    }
    let served = match rev {
        "main" => repo.commit.clone(),
        c => c.to_string(),
    };
    let commit = ("X-Repo-Commit", served);
    let Some(bytes) = repo.files.get(file).cloned() else {
        let code = ("X-Error-Code", "EntryNotFound".to_string());
        return respond("404 Not Found", &[code, commit], b"Entry not found");
    };
    if is_lfs(file) {
        let sha = sha256(&bytes);
        // The CDN on another host name (localhost, not 127.0.0.1): the token must not go there.
        let hdrs = [
            ("Location", format!("http://localhost:{port}/cdn/{sha}")),
            ("X-Linked-Etag", format!("\"{sha}\"")),
            ("X-Linked-Size", bytes.len().to_string()),
            ("ETag", "\"a-redirect-etag\"".to_string()),
            commit,
        ];
        return respond("302 Found", &hdrs, b"");
    }
    let etag = ("ETag", format!("\"{}\"", git_sha1(&bytes)));
    respond("200 OK", &[etag, commit], &bytes)
}

fn model(spec: &str) -> Repo {
    Repo::model(spec).unwrap()
}

fn err_text<T: std::fmt::Debug>(r: anyhow::Result<T>) -> String {
    format!("{:#}", r.unwrap_err())
}

#[test]
fn a_model_is_fetched_once_then_found_without_a_request() {
    let server = FakeHub::start();
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("hub");
    let hub = server.hub(&cache);
    for (id, files) in [
        (
            "med-rlvr/demo-model",
            &["config.json", "model.safetensors", "tokenizer.json"][..],
        ),
        (
            "med-rlvr/sharded",
            &[
                "config.json",
                "model.safetensors.index.json",
                "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors",
                "tokenizer.json",
                "tokenizer_config.json",
            ][..],
        ),
    ] {
        let before = server.seen().len();
        let dir = hub.model_folder(&model(id)).unwrap();
        let root = cache.join(format!("models--{}", id.replace('/', "--")));
        let commit = server.commit(id);
        assert_eq!(dir, root.join("snapshots").join(&commit));
        assert_eq!(
            std::fs::read_to_string(root.join("refs/main")).unwrap(),
            commit
        );
        for f in files {
            let p = dir.join(f);
            assert_eq!(std::fs::read(&p).unwrap(), server.file(id, f), "{id} {f}");
            // A relative link into blobs/, as huggingface_hub makes it.
            let target = std::fs::read_link(&p).unwrap();
            assert!(target.starts_with("../../blobs"), "{}", target.display());
        }
        // The optional files the repository lacks are remembered, not asked for again.
        assert!(root
            .join(".no_exist")
            .join(&commit)
            .join("generation_config.json")
            .is_file());
        assert!(std::fs::read_dir(root.join("blobs")).unwrap().all(|e| !e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .ends_with(".incomplete")));
        let asked = server.seen().len() - before;
        assert!(asked >= files.len(), "{id}: {asked} requests");
        // Again, online and offline: the same folder, and no request.
        let before = server.seen().len();
        assert_eq!(hub.model_folder(&model(id)).unwrap(), dir);
        let offline = Hub {
            offline: true,
            endpoint: "http://127.0.0.1:9".into(),
            ..hub.clone()
        };
        assert_eq!(offline.model_folder(&model(id)).unwrap(), dir);
        assert_eq!(
            server.seen().len(),
            before,
            "{id}: the cached re-run made requests"
        );
        // Pinned to the commit: found without a ref.
        let pinned = model(&format!("{id}@{commit}"));
        assert_eq!(offline.model_folder(&pinned).unwrap(), dir);
    }
    // A cache filled by another tool has no .no_exist markers: offline, the optional files a
    // snapshot lacks are absent, not an error.
    let root = cache.join("models--med-rlvr--demo-model");
    std::fs::remove_dir_all(root.join(".no_exist")).unwrap();
    let offline = Hub {
        offline: true,
        ..hub.clone()
    };
    offline.model_folder(&model("med-rlvr/demo-model")).unwrap();
    // `main` moves on while a run holds part of the old commit: the folder stays one commit.
    let tmp2 = tempfile::tempdir().unwrap();
    let hub2 = server.hub(tmp2.path());
    hub2.file(&model("med-rlvr/demo-model"), "config.json")
        .unwrap();
    let (old, new) = (
        server.commit("med-rlvr/demo-model"),
        format!("{:040x}", 0xbeef),
    );
    {
        let mut st = server.state.lock().unwrap();
        let r = st
            .repos
            .iter_mut()
            .find(|r| r.id == "med-rlvr/demo-model")
            .unwrap();
        r.earlier.push(old.clone());
        r.commit = new.clone();
    }
    let dir = hub2.model_folder(&model("med-rlvr/demo-model")).unwrap();
    assert!(dir.ends_with(&old), "{}", dir.display());
    assert!(dir.join("model.safetensors").is_file() && dir.join("tokenizer.json").is_file());
    // The token never went to the CDN host; the LFS files came from there.
    let seen = server.seen();
    assert!(seen.iter().any(|s| s.path.starts_with("/cdn/")));
    assert!(seen
        .iter()
        .filter(|s| s.path.starts_with("/cdn/"))
        .all(|s| !s.auth));
    // A renamed repository: the Hub's relative redirect is followed.
    let renamed = hub.model_folder(&model("old-name/demo-model")).unwrap();
    assert_eq!(
        std::fs::read(renamed.join("config.json")).unwrap(),
        server.file("med-rlvr/demo-model", "config.json")
    );
}

#[test]
fn the_medqa_and_mmlu_pro_hub_layouts_load() {
    use med_rlvr::task::{load, DataFormat, LoadOptions};
    let server = FakeHub::start();
    let tmp = tempfile::tempdir().unwrap();
    let hub = server.hub(tmp.path());
    for (spec, rows, options) in [
        (
            "hf://datasets/GBaker/MedQA-USMLE-4-options/phrases_no_exclude_test.jsonl",
            20,
            4,
        ),
        (
            "hf://datasets/TIGER-Lab/MMLU-Pro/data/validation-00000-of-00001.parquet",
            70,
            10,
        ),
    ] {
        let (repo, path) = Repo::data_path(spec).unwrap().unwrap();
        let file = hub.file(&repo, &path).unwrap();
        assert!(file.ends_with(&path), "{}", file.display());
        let ds = load(&file, DataFormat::Auto, &LoadOptions::default()).unwrap();
        assert_eq!(ds.items.len(), rows, "{spec}");
        assert!(
            ds.items.iter().all(|i| i.options.len() <= options),
            "{spec}"
        );
    }
    // A revision in the path, and paths that are not a dataset file.
    let (r, p) = Repo::data_path("hf://datasets/a/b@v1.0/x/y.jsonl")
        .unwrap()
        .unwrap();
    assert_eq!(
        (r.id.as_str(), r.revision.as_str(), p.as_str()),
        ("a/b", "v1.0", "x/y.jsonl")
    );
    for bad in [
        "hf://models/a/b/c.json",
        "hf://datasets/a/b",
        "hf://datasets/a/b/",
        "hf://datasets/a/b/../c",
    ] {
        let e = err_text(Repo::data_path(bad));
        assert!(
            e.contains("expected hf://datasets/OWNER/NAME[@REVISION]/PATH"),
            "{bad}: {e}"
        );
    }
    assert!(Repo::data_path("data/train.jsonl").unwrap().is_none());
    // Revisions with a slash: HfFileSystem's refs/convert and refs/pr forms, or percent-encoded.
    for (spec, rev, path) in [
        (
            "hf://datasets/a/b@refs/convert/parquet/default/train/0.parquet",
            "refs/convert/parquet",
            "default/train/0.parquet",
        ),
        (
            "hf://datasets/a/b@refs/pr/7/x.jsonl",
            "refs/pr/7",
            "x.jsonl",
        ),
        (
            "hf://datasets/a/b@refs%2Fpr%2F7/x.jsonl",
            "refs/pr/7",
            "x.jsonl",
        ),
    ] {
        let (r, p) = Repo::data_path(spec).unwrap().unwrap();
        assert_eq!((r.revision.as_str(), p.as_str()), (rev, path), "{spec}");
    }
    for bad in [
        "hf://datasets/a/b@../../x/y.jsonl",
        "hf://datasets/a/b@%2E%2E/y.jsonl",
    ] {
        assert!(Repo::data_path(bad).is_err(), "{bad}");
    }
    assert!(Repo::model("a/b@../../../tmp").is_none());
    // An empty file is a file.
    let (r, p) = Repo::data_path("hf://datasets/med-rlvr/demo-task/empty.jsonl")
        .unwrap()
        .unwrap();
    assert_eq!(std::fs::read(hub.file(&r, &p).unwrap()).unwrap().len(), 0);
    // What is a model id: never a path that starts with . or /, never three parts.
    for (s, id) in [
        ("Qwen/Qwen2.5-3B", true),
        ("Qwen/Qwen2.5-3B@main", true),
        ("./runs/x", false),
        ("/abs/x", false),
        ("a/b/c", false),
        ("Qwen2.5-3B", false),
        ("a/b@", false),
    ] {
        assert_eq!(Repo::model(s).is_some(), id, "{s}");
    }
}

#[test]
fn a_dropped_connection_resumes_and_a_corrupt_download_is_never_kept() {
    let server = FakeHub::start();
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("hub");
    let hub = server.hub(&cache);
    let id = "med-rlvr/demo-model";
    let want = server.file(id, "model.safetensors");
    // Corrupt: the hash check refuses it, nothing is left in the cache, the next run fetches it.
    server.state.lock().unwrap().corrupt = true;
    let e = err_text(hub.file(&model(id), "model.safetensors"));
    assert!(
        e.contains("its hash is") && e.contains("deleted: run again"),
        "{e}"
    );
    let root = cache.join("models--med-rlvr--demo-model");
    assert_eq!(std::fs::read_dir(root.join("blobs")).unwrap().count(), 0);
    assert!(!root
        .join("snapshots")
        .join(server.commit(id))
        .join("model.safetensors")
        .exists());
    // Dropped after 100,000 bytes: resumed with a Range request, whole and right.
    server.state.lock().unwrap().drop_after = Some(100_000);
    let before = server.seen().len();
    let f = hub.file(&model(id), "model.safetensors").unwrap();
    assert_eq!(std::fs::read(&f).unwrap(), want);
    let ranges: Vec<_> = server.seen()[before..]
        .iter()
        .filter_map(|s| s.range.clone())
        .collect();
    assert_eq!(ranges, vec!["bytes=100000-".to_string()]);
    // An expired download address (403 from the CDN): a fresh one from the Hub, then the file.
    let tmp2 = tempfile::tempdir().unwrap();
    server.state.lock().unwrap().expire = true;
    let before = server.seen().len();
    let f = server
        .hub(tmp2.path())
        .file(&model(id), "model.safetensors")
        .unwrap();
    assert_eq!(std::fs::read(&f).unwrap(), want);
    let heads = server.seen()[before..]
        .iter()
        .filter(|s| s.method == "HEAD")
        .count();
    assert_eq!(heads, 2);
}

#[test]
fn errors_say_what_to_do() {
    let server = FakeHub::start();
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("hub");
    let hub = server.hub(&cache);
    let cases: Vec<(&str, String, &[&str])> = vec![
        (
            "unknown repository (401 RepoNotFound)",
            err_text(hub.model_folder(&model("nobody/nothing"))),
            &[
                "nobody/nothing",
                "no such repository",
                "private",
                "HF_TOKEN",
            ],
        ),
        (
            "gated, no token (401 GatedRepo)",
            err_text(hub.model_folder(&model("med-rlvr/gated"))),
            &["gated", "accept its licence", "set HF_TOKEN"],
        ),
        (
            "gated, wrong token (403 GatedRepo)",
            err_text(
                Hub {
                    token: Some("hf_wrong".into()),
                    ..hub.clone()
                }
                .model_folder(&model("med-rlvr/gated")),
            ),
            &["gated", "403", "the token (HF_TOKEN"],
        ),
        (
            "shard names outside the repository",
            err_text(hub.model_folder(&model("med-rlvr/evil"))),
            &[
                "weight_map names the shard",
                "not a file inside the repository",
            ],
        ),
        (
            "unknown revision (404 RevisionNotFound)",
            err_text(hub.model_folder(&model("med-rlvr/demo-model@v9"))),
            &["no revision v9"],
        ),
        (
            "missing file (404 EntryNotFound)",
            err_text(
                hub.file(
                    &Repo::data_path("hf://datasets/med-rlvr/demo-task/nope.jsonl")
                        .unwrap()
                        .unwrap()
                        .0,
                    "nope.jsonl",
                ),
            ),
            &["has no file nope.jsonl"],
        ),
        (
            "offline, not cached",
            err_text(
                Hub {
                    offline: true,
                    ..hub.clone()
                }
                .model_folder(&model("med-rlvr/demo-model")),
            ),
            &["HF_HUB_OFFLINE", "not in the cache"],
        ),
        (
            "no network",
            err_text(
                Hub {
                    endpoint: "http://127.0.0.1:9".into(),
                    ..hub.clone()
                }
                .model_folder(&model("med-rlvr/demo-model")),
            ),
            &["cannot reach http://127.0.0.1:9", "HF_HUB_OFFLINE=1"],
        ),
    ];
    for (case, text, want) in &cases {
        for w in *want {
            assert!(text.contains(w), "{case}: {text:?} lacks {w:?}");
        }
    }
    // The gated model with the right token; the token went to the Hub, not to the CDN.
    let ok = Hub {
        token: Some(TOKEN.into()),
        ..hub.clone()
    };
    ok.model_folder(&model("med-rlvr/gated")).unwrap();
    let seen = server.seen();
    assert!(seen
        .iter()
        .any(|s| s.path.contains("/med-rlvr/gated/") && s.auth));
    // A full disk: the partial download is /dev/full.
    if Path::new("/dev/full").exists() {
        let bytes = server.file("med-rlvr/demo-model", "model.safetensors");
        let blobs = cache.join("models--med-rlvr--demo-model/blobs");
        std::fs::create_dir_all(&blobs).unwrap();
        let part = blobs.join(format!("{}.incomplete", sha256(&bytes)));
        std::os::unix::fs::symlink("/dev/full", &part).unwrap();
        let e = err_text(hub.file(&model("med-rlvr/demo-model"), "model.safetensors"));
        assert!(
            e.contains("no space left on the device") && e.contains("HF_HOME"),
            "{e}"
        );
    }
}

/// The binary with the server as its Hub and `hf_home` as its cache (nothing from this machine's
/// Hugging Face settings).
/// `envs` on top.
fn med_rlvr(
    server: &FakeHub,
    hf_home: &Path,
    args: &[&str],
    envs: &[(&str, &str)],
) -> std::process::Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_med-rlvr"));
    c.args(args)
        .env("HF_HOME", hf_home)
        .env("HF_ENDPOINT", &server.endpoint);
    for k in [
        "HF_TOKEN",
        "HUGGING_FACE_HUB_TOKEN",
        "HF_HUB_OFFLINE",
        "HF_HUB_CACHE",
        "HUGGINGFACE_HUB_CACHE",
        "XDG_CACHE_HOME",
        "HTTPS_PROXY",
        "https_proxy",
        "HTTP_PROXY",
        "http_proxy",
        "ALL_PROXY",
        "all_proxy",
    ] {
        c.env_remove(k);
    }
    for (k, v) in envs {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn report_path() -> PathBuf {
    let target = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
    let dir = Path::new(&target).join("tmp");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("hub.md")
}

#[test]
fn train_by_hub_ids_then_the_second_run_asks_nothing_and_the_errors_table() {
    let server = FakeHub::start();
    let tmp = tempfile::tempdir().unwrap();
    let hf_home = tmp.path().join("hf");
    let preset = tmp.path().join("hub-preset.toml");
    let text = std::fs::read_to_string(repo_root().join("assets/presets/demo.toml"))
        .unwrap()
        .replace("path = \"../demo/model\"", "path = \"med-rlvr/demo-model\"")
        .replace(
            "train = \"../demo/train.jsonl\"",
            "train = \"hf://datasets/med-rlvr/demo-task/train.jsonl\"",
        )
        .replace(
            "eval = \"../demo/test.jsonl\"",
            "eval = \"hf://datasets/med-rlvr/demo-task/test.jsonl\"",
        );
    assert!(
        text.contains("med-rlvr/demo-model")
            && text.contains("hf://datasets/med-rlvr/demo-task/test.jsonl")
    );
    std::fs::write(&preset, &text).unwrap();
    let mut report = String::from("# Hub by id through the binary (tests/hub.rs)\n\n");
    let small = [
        "--set",
        "train.steps=1",
        "--set",
        "rollout.prompts_per_step=4",
        "--set",
        "rollout.max_new_tokens=8",
        "--set",
        "ppo.train_batch=4",
        "--set",
        "ppo.micro_batch=4",
        "--set",
        "data.eval_limit=8",
    ];
    for run in ["first", "second"] {
        let before = server.seen().len();
        let out = tmp.path().join(format!("run-{run}"));
        let mut args = vec![
            "train",
            "--config",
            preset.to_str().unwrap(),
            "--quiet",
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend(small);
        let o = med_rlvr(&server, &hf_home, &args, &[]);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{run} run: {stderr}");
        let asked: Vec<String> = server.seen()[before..]
            .iter()
            .map(|s| {
                format!(
                    "{} {}{}",
                    s.method,
                    s.path,
                    s.range
                        .as_ref()
                        .map(|r| format!(" ({r})"))
                        .unwrap_or_default()
                )
            })
            .collect();
        report.push_str(&format!(
            "## {run} run, HF_HOME={} (clean before the first)\n\n```\n$ med-rlvr {}\n{}```\n\nrequests to the hub: {}\n\n```\n{}\n```\n\n",
            hf_home.display(), args.join(" "), stderr, asked.len(), asked.join("\n")));
        match run {
            "first" => {
                // HEAD + GET of config and tokenizer; HEAD of the two optional configs and of the
                // index (absent); HEAD of the weights + GET from the CDN; HEAD + GET of each data file.
                assert_eq!(asked.len(), 13, "{asked:?}");
                // The first file names the revision asked for, the rest the commit it resolved to.
                assert!(
                    stderr
                        .lines()
                        .any(|l| l.starts_with("fetching med-rlvr/demo-model@")
                            && l.contains(" model.safetensors (")),
                    "{stderr}"
                );
                assert!(
                    stderr.contains("fetching hf://datasets/med-rlvr/demo-task train.jsonl"),
                    "{stderr}"
                );
                assert!(
                    asked.iter().any(|a| a.starts_with("GET /cdn/")),
                    "{asked:?}"
                );
            }
            _ => {
                assert!(asked.is_empty(), "the second run asked {asked:?}");
                assert!(!stderr.contains("fetching"), "{stderr}");
            }
        }
        let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
        assert_eq!(metrics.lines().count(), 1);
        // The run records the ids pinned to the commits it used.
        let config = std::fs::read_to_string(out.join("config.toml")).unwrap();
        let commit = server.commit("med-rlvr/demo-model");
        assert!(
            config.contains(&format!("path = \"med-rlvr/demo-model@{commit}\"")),
            "{config}"
        );
        let task = server.commit("med-rlvr/demo-task");
        assert!(
            config.contains(&format!(
                "hf://datasets/med-rlvr/demo-task@{task}/train.jsonl"
            )),
            "{config}"
        );
    }
    // The error table: case → first line of the message, exit status.
    let offline_home = tmp.path().join("empty-hf");
    let cases: Vec<(&str, Vec<&str>, &[&str])> = vec![
        (
            "unknown model id",
            vec![
                "logprobs",
                "--model",
                "nobody/nothing",
                "--prompt",
                "Q",
                "--continuation",
                "A",
            ],
            &["no such repository"],
        ),
        (
            "gated model, no HF_TOKEN",
            vec![
                "logprobs",
                "--model",
                "med-rlvr/gated",
                "--prompt",
                "Q",
                "--continuation",
                "A",
            ],
            &["gated", "HF_TOKEN"],
        ),
        (
            "unknown revision",
            vec![
                "generate",
                "--model",
                "med-rlvr/demo-model@v9",
                "--prompt",
                "Q",
            ],
            &["no revision v9"],
        ),
        (
            "missing data file",
            vec![
                "eval",
                "--model",
                "med-rlvr/demo-model",
                "--data",
                "hf://datasets/med-rlvr/demo-task/nope.jsonl",
            ],
            &["has no file nope.jsonl"],
        ),
        (
            "malformed hf:// path",
            vec!["train", "--data", "hf://datasets/med-rlvr/demo-task"],
            &["expected hf://datasets/OWNER/NAME[@REVISION]/PATH"],
        ),
    ];
    report.push_str("## Errors (exit status 2: refused before anything is written)\n\n| case | exit | first line |\n|---|---|---|\n");
    let mut run_case =
        |case: &str, home: &Path, args: &[&str], envs: &[(&str, &str)], want: &[&str]| {
            let o = med_rlvr(&server, home, args, envs);
            let stderr = String::from_utf8_lossy(&o.stderr);
            let first = stderr
                .lines()
                .find(|l| l.starts_with("error"))
                .unwrap_or_default()
                .to_string();
            assert_eq!(o.status.code(), Some(2), "{case}: {stderr}");
            assert!(!stderr.contains("panicked"), "{case}: {stderr}");
            for w in want {
                assert!(first.contains(w), "{case}: {first:?} lacks {w:?}");
            }
            report.push_str(&format!(
                "| {case} | {} | `{}` |\n",
                o.status.code().unwrap(),
                first.replace('|', "\\|")
            ));
        };
    for (case, args, want) in &cases {
        run_case(case, &hf_home, args, &[], want);
    }
    let logprobs = [
        "logprobs",
        "--model",
        "med-rlvr/demo-model",
        "--prompt",
        "Q",
        "--continuation",
        "A",
    ];
    run_case(
        "offline, not in the cache",
        &offline_home,
        &logprobs,
        &[("HF_HUB_OFFLINE", "1")],
        &["HF_HUB_OFFLINE"],
    );
    run_case(
        "no network",
        &offline_home,
        &logprobs,
        &[("HF_ENDPOINT", "http://127.0.0.1:9")],
        &["cannot reach"],
    );
    // Offline with the cache the runs filled: works, and asks nothing.
    let before = server.seen().len();
    let o = med_rlvr(&server, &hf_home, &logprobs, &[("HF_HUB_OFFLINE", "1")]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(server.seen().len(), before);
    std::fs::write(report_path(), report).unwrap();
}

/// The 3B preset names the paper's model and data by Hub id, and loading it keeps them ids.
#[test]
fn the_3b_preset_names_hub_ids() {
    let cfg = med_rlvr::config::TrainConfig::load(
        Some(&repo_root().join("assets/presets/med-rlvr-qwen2.5-3b.toml")),
        &[],
    )
    .unwrap();
    assert_eq!(cfg.model.path, Path::new("Qwen/Qwen2.5-3B"));
    assert_eq!(
        cfg.data.train,
        Path::new("hf://datasets/GBaker/MedQA-USMLE-4-options/phrases_no_exclude_train.jsonl")
    );
    assert!(med_rlvr::hub::is_remote(&cfg.model.path) && med_rlvr::hub::is_remote(&cfg.data.train));
    // The demo preset's relative folders still resolve against its folder.
    let demo = med_rlvr::config::TrainConfig::load(None, &[]).unwrap();
    assert!(demo.model.path.ends_with("assets/demo/model") && demo.model.path.is_dir());
}
