//! The live dashboard (issue 12, part 3) in a real headless browser
//! (Debian's chromium) against a running hub with real backups written
//! over NBD: the page renders VMs, disks, chains, backups with status,
//! failures with their reason and repository usage; a running backup's
//! progress moves between two loads as the test streams more data; hostile
//! text from clients stays text; the page asks for a token only on 401.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use common::hub::{parse_targets, Hub};
use hub_daemon::catalog::Role;
use integration_tests::support::{pattern, require};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;
/// Disk label and abort reason carrying markup that would run script if
/// the page parsed it (names themselves cannot: see names.rs).
const HOSTILE_LABEL: &str = "<img src=x onerror=\"document.title='pwned'\">";
const HOSTILE_REASON: &str = "sender gave up: <script>document.title='pwned'</script><b>bold</b>";

/// Write `len` bytes of pattern `seed` at `offset` into the export at
/// `uri`, flushed, through our own NBD client.
async fn nbd_write(uri: &str, offset: u64, len: usize, seed: u64) {
    let c = nbd_client::connect_uri(uri).await.unwrap();
    c.write(offset, bytes::Bytes::from(pattern(seed, len)), false)
        .await
        .unwrap();
    c.flush().await.unwrap();
    c.disconnect().await.unwrap();
}

fn targets(started: &Value) -> Vec<String> {
    parse_targets(started["nbd_targets_string"].as_str().unwrap())
        .into_iter()
        .map(|(_, uri)| uri)
        .collect()
}

/// Load `url` in headless chromium, let the page run for a few seconds of
/// virtual time (fetches pause virtual time, so at least one poll of the
/// API completes), and return the serialized DOM.
async fn dump_dom(url: &str, home: &Path) -> String {
    let mut cmd = tokio::process::Command::new("chromium");
    cmd.args([
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-extensions",
        "--disable-background-networking",
        "--disable-sync",
        "--disable-crash-reporter",
        "--virtual-time-budget=4000",
    ])
    .arg(format!(
        "--user-data-dir={}",
        home.join("profile").display()
    ))
    .args(["--dump-dom", url])
    // Everything chromium writes stays under the test's temporary dir.
    .env("HOME", home)
    .env("XDG_CONFIG_HOME", home.join("config"))
    .env("XDG_CACHE_HOME", home.join("cache"))
    .stdin(std::process::Stdio::null())
    .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(90), cmd.output())
        .await
        .expect("chromium did not finish in 90 s")
        .unwrap();
    assert!(
        out.status.success(),
        "chromium failed: {:?}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let dom = String::from_utf8(out.stdout).unwrap();
    assert!(dom.contains("</html>"), "no DOM dumped: {dom}");
    dom
}

/// A TCP proxy in front of the hub that, before passing on each
/// `GET /api/v1/backups` it sees, writes one more chunk into a running
/// disk: data streams in step with the page's polls, whatever the
/// browser's (virtual) clock does.
struct StreamingProxy {
    addr: std::net::SocketAddr,
    chunks: std::sync::Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

/// Chunk written per poll, and the most the proxy writes in all.
const CHUNK: usize = 128 << 10;
const MAX_CHUNKS: u64 = 64;

impl StreamingProxy {
    async fn start(hub: std::net::SocketAddr, uri: String) -> StreamingProxy {
        use std::sync::atomic::{AtomicU64, Ordering};
        use std::sync::Arc;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = Arc::new(nbd_client::connect_uri(&uri).await.unwrap());
        let chunks = Arc::new(AtomicU64::new(0));
        let n = Arc::clone(&chunks);
        let task = tokio::spawn(async move {
            while let Ok((browser, _)) = listener.accept().await {
                let (client, n) = (Arc::clone(&client), Arc::clone(&n));
                tokio::spawn(async move {
                    let Ok(upstream) = tokio::net::TcpStream::connect(hub).await else {
                        return;
                    };
                    let (mut br, mut bw) = browser.into_split();
                    let (mut ur, mut uw) = upstream.into_split();
                    let back = tokio::spawn(async move {
                        let _ = tokio::io::copy(&mut ur, &mut bw).await;
                    });
                    let mut buf = vec![0u8; 64 << 10];
                    // The end of the previous read, so a request line split
                    // across two reads is still seen.
                    let mut tail: Vec<u8> = Vec::new();
                    let needle = b"GET /api/v1/backups ";
                    loop {
                        let len = match br.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(len) => len,
                        };
                        let mut seen = tail.clone();
                        seen.extend_from_slice(&buf[..len]);
                        let polls = seen.windows(needle.len()).filter(|w| w == needle).count();
                        for _ in 0..polls {
                            let k = n.fetch_add(1, Ordering::SeqCst);
                            if k < MAX_CHUNKS {
                                // Cycle through the disk's upper half.
                                let off = 4 * MIB + (k % 32) * CHUNK as u64;
                                let data = bytes::Bytes::from(pattern(100 + k, CHUNK));
                                client.write(off, data, false).await.unwrap();
                            }
                        }
                        tail = seen[seen.len().saturating_sub(needle.len() - 1)..].to_vec();
                        if uw.write_all(&buf[..len]).await.is_err() {
                            break;
                        }
                    }
                    let _ = uw.shutdown().await;
                    let _ = back.await;
                });
            }
        });
        StreamingProxy { addr, chunks, task }
    }

    /// Chunks written so far (one per poll seen).
    fn chunks(&self) -> u64 {
        self.chunks.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for StreamingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Every element of `dom` as (tag, attributes), in document order. Text
/// nodes are serialized with `<` escaped, so every `<` starts a tag; values
/// are read up to their closing quote (quotes inside are `&quot;`).
fn elements(dom: &str) -> Vec<(String, HashMap<String, String>)> {
    let mut out = Vec::new();
    let b = dom.as_bytes();
    let mut i = 0;
    while let Some(p) = dom[i..].find('<') {
        i += p + 1;
        let name_end = dom[i..]
            .find(|c: char| c.is_whitespace() || c == '>' || c == '/')
            .map_or(dom.len(), |n| i + n);
        let tag = dom[i..name_end].to_ascii_lowercase();
        i = name_end;
        let mut attrs = HashMap::new();
        if tag.starts_with('!') || tag.is_empty() {
            continue;
        }
        loop {
            while i < b.len() && (b[i] as char).is_whitespace() {
                i += 1;
            }
            if i >= b.len() || b[i] == b'>' || b[i] == b'/' {
                break;
            }
            let n_end = dom[i..]
                .find(|c: char| c == '=' || c == '>' || c.is_whitespace())
                .map_or(dom.len(), |n| i + n);
            let name = dom[i..n_end].to_owned();
            i = n_end;
            let mut value = String::new();
            if b.get(i) == Some(&b'=') && b.get(i + 1) == Some(&b'"') {
                let v_end = dom[i + 2..].find('"').map_or(dom.len(), |n| i + 2 + n);
                value = dom[i + 2..v_end].to_owned();
                i = (v_end + 1).min(dom.len());
            } else if b.get(i) == Some(&b'=') {
                // Not what chromium writes; step over it so the scan
                // always moves on.
                i += 1;
            }
            if !name.is_empty() {
                attrs.insert(name, value);
            }
        }
        // Script and style text is serialized raw (its `<` unescaped):
        // jump past it rather than read it as tags.
        if tag == "script" || tag == "style" {
            let close = format!("</{tag}");
            i = dom[i..].find(&close).map_or(dom.len(), |n| i + n);
        }
        if !tag.starts_with('/') {
            out.push((tag, attrs));
        }
    }
    out
}

#[test]
fn the_dom_scanner_reads_attributes_and_skips_script_text() {
    let dom = "<html><head><style>a<b{}</style><script>if (a <= b && c<d.x) x = \"<i\";\
               </script></head><body data-updated=\"1\"><!-- c -->\
               <div class=\"x y\" data-v=\"a&quot;b\" hidden=\"\">t &lt;b&gt;</div>\
               <p a=b c=\"unterminated></p></body></html>";
    let e = elements(dom);
    let tags: Vec<&str> = e.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(
        tags,
        ["html", "head", "style", "script", "body", "div", "p"]
    );
    assert_eq!(e[4].1["data-updated"], "1");
    assert_eq!(e[5].1["data-v"], "a&quot;b");
    assert!(e[5].1.contains_key("hidden"));
    assert_eq!(by_class(dom, "y").len(), 1);
}

/// The elements whose `class` list holds `class`.
fn by_class(dom: &str, class: &str) -> Vec<HashMap<String, String>> {
    elements(dom)
        .into_iter()
        .filter(|(_, a)| {
            a.get("class")
                .is_some_and(|c| c.split_whitespace().any(|x| x == class))
        })
        .map(|(_, a)| a)
        .collect()
}

/// The one element of `class` whose attributes include all of `want`.
fn find(dom: &str, class: &str, want: &[(&str, &str)]) -> HashMap<String, String> {
    let mut hits: Vec<_> = by_class(dom, class)
        .into_iter()
        .filter(|a| {
            want.iter()
                .all(|(k, v)| a.get(*k).map(String::as_str) == Some(*v))
        })
        .collect();
    assert_eq!(hits.len(), 1, "{class} {want:?} in:\n{dom}");
    hits.remove(0)
}

fn num(a: &HashMap<String, String>, k: &str) -> f64 {
    a.get(k)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{k} missing or not a number in {a:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_renders_backups_and_progress_moves() {
    if !require("chromium") {
        return;
    }
    let mut hub = Hub::start().await;
    let browser = tempfile::tempdir().unwrap();
    let url = format!("http://{}/", hub.addr);

    // The page is served with its policy, and holds no data.
    let r = hub.get("/").await;
    assert_eq!(r.status, 200);
    assert!(r.header("content-type").unwrap().starts_with("text/html"));
    let csp = r.header("content-security-policy").unwrap().to_owned();
    assert!(csp.starts_with("default-src 'none'"), "{csp}");
    assert!(!csp.contains("unsafe-inline"), "{csp}");

    let vm = "web01";
    let r = hub
        .put(
            &format!("/api/v1/vms/{vm}"),
            json!({"vm_context_id": "ctx-web01", "disks": [
                {"disk_id": 0, "size_bytes": 8 * MIB, "unit_number": 0, "label": "system"},
                {"disk_id": 1, "size_bytes": 2 * MIB, "unit_number": 1, "label": HOSTILE_LABEL},
            ]}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());

    // A full and an incremental on top of it, with real data.
    let full = hub.backup(vm, "full").await;
    for (i, uri) in targets(&full).iter().enumerate() {
        nbd_write(uri, 0, MIB as usize, i as u64).await;
    }
    let full_id = full["backup_id"].as_str().unwrap().to_owned();
    hub.complete(&full_id).await;
    let incr = hub.backup(vm, "incremental").await;
    for uri in targets(&incr) {
        nbd_write(&uri, MIB, 64 << 10, 7).await;
    }
    let incr_id = incr["backup_id"].as_str().unwrap().to_owned();
    hub.complete(&incr_id).await;

    // One that the sender aborted, with markup in its reason.
    let failed = hub.backup(vm, "incremental").await;
    let failed_id = failed["backup_id"].as_str().unwrap().to_owned();
    let r = hub
        .post(
            &format!("/api/v1/backups/{failed_id}/abort"),
            json!({"reason": HOSTILE_REASON}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());

    // One running: disk 0 streams in chunks the test writes (progress as
    // the hub counts it), disk 1 has the sender's own progress reports.
    let running = hub
        .post(
            "/api/v1/backups",
            json!({"vm_name": vm, "backup_type": "full", "repository_id": "default",
                   "tags": {"note": "<b>tagged</b>"}}),
        )
        .await;
    assert_eq!(running.status, 201, "{}", running.text());
    let running = running.json();
    let run_id = running["backup_id"].as_str().unwrap().to_owned();
    let run_uris = targets(&running);
    nbd_write(&run_uris[0], 0, MIB as usize, 11).await;
    let progress =
        |done: u64| json!({"disks": [{"disk_id": 1, "bytes_done": done, "bytes_total": 2 * MIB}]});
    let r = hub
        .post(
            &format!("/api/v1/backups/{run_id}/progress"),
            progress(MIB / 2),
        )
        .await;
    assert_eq!(r.status, 204, "{}", r.text());

    let t = std::time::Instant::now();
    let dom = dump_dom(&url, browser.path()).await;
    eprintln!("first load: {:?}", t.elapsed());
    assert!(
        dom.contains("data-updated="),
        "the page never finished a poll:\n{dom}"
    );

    // The VM, its disks, and one chain per disk with every backup on it.
    find(&dom, "vm", &[("data-vm", vm)]);
    for disk in ["0", "1"] {
        let chain = find(
            &dom,
            "chain-disk",
            &[("data-vm", vm), ("data-disk-id", disk)],
        );
        assert_eq!(num(&chain, "data-points"), 4.0, "disk {disk}: {chain:?}");
        for (id, mode, status) in [
            (&full_id, "full", "completed"),
            (&incr_id, "incremental", "completed"),
            (&failed_id, "incremental", "failed"),
            (&run_id, "full", "running"),
        ] {
            let points: Vec<_> = by_class(&dom, "point")
                .into_iter()
                .filter(|p| p.get("data-backup-id") == Some(id))
                .collect();
            assert_eq!(points.len(), 2, "{id}: one point per disk");
            assert!(points
                .iter()
                .all(|p| p["data-mode"] == mode && p["data-status"] == status));
        }
    }
    // The full, its incremental and the failed incremental form one chain;
    // the running full starts another.
    let tracks = by_class(&dom, "track");
    let of = |root: &str| {
        tracks
            .iter()
            .filter(|t| t["data-chain-root"] == root)
            .count()
    };
    assert_eq!(of(&full_id), 2, "{tracks:?}");
    assert_eq!(of(&run_id), 2, "{tracks:?}");
    assert!(tracks
        .iter()
        .filter(|t| t["data-chain-root"] == full_id)
        .all(|t| t["data-length"] == "3"));

    // Backups with their status.
    for (id, status) in [
        (&full_id, "completed"),
        (&incr_id, "completed"),
        (&failed_id, "failed"),
        (&run_id, "running"),
    ] {
        find(
            &dom,
            "backup",
            &[("data-backup-id", id.as_str()), ("data-status", status)],
        );
    }
    // The failure with its reason, as text.
    find(&dom, "failure", &[("data-backup-id", failed_id.as_str())]);
    assert!(
        dom.contains("sender gave up: &lt;script&gt;document.title='pwned'&lt;/script&gt;&lt;b&gt;bold&lt;/b&gt;"),
        "{dom}"
    );
    // Hostile text never became markup: no img, no extra script, no b,
    // and the title is untouched.
    assert!(
        dom.contains("&lt;img src=x onerror=\"document.title='pwned'\"&gt;"),
        "{dom}"
    );
    assert!(dom.contains("&lt;b&gt;tagged&lt;/b&gt;"), "{dom}");
    let tags: Vec<String> = elements(&dom).into_iter().map(|(t, _)| t).collect();
    for banned in ["img", "b"] {
        assert!(
            !tags.iter().any(|t| t == banned),
            "a <{banned}> element was created"
        );
    }
    assert_eq!(tags.iter().filter(|t| *t == "script").count(), 1);
    assert!(dom.contains("<title>NBD backup hub</title>"));

    // Repository usage.
    let repo = find(&dom, "repo", &[("data-repository-id", "default")]);
    assert!(num(&repo, "data-capacity-bytes") > 0.0, "{repo:?}");
    assert!(num(&repo, "data-used-bytes") > 0.0, "{repo:?}");
    assert!(num(&repo, "data-backup-bytes") >= MIB as f64, "{repo:?}");

    // Live progress: disk 0 as the hub counts it, disk 1 as the sender says.
    let d0 = find(
        &dom,
        "disk-progress",
        &[("data-backup-id", run_id.as_str()), ("data-disk-id", "0")],
    );
    assert_eq!(d0["data-source"], "hub");
    assert_eq!(num(&d0, "data-bytes-written"), MIB as f64, "{d0:?}");
    assert_eq!(num(&d0, "data-bytes-total"), (8 * MIB) as f64, "{d0:?}");
    assert_eq!(num(&d0, "data-percent"), 12.5, "{d0:?}");
    let d1 = find(
        &dom,
        "disk-progress",
        &[("data-backup-id", run_id.as_str()), ("data-disk-id", "1")],
    );
    assert_eq!(d1["data-source"], "sender");
    assert_eq!(num(&d1, "data-percent"), 25.0, "{d1:?}");

    // More data streams in; the next load shows it.
    nbd_write(&run_uris[0], MIB, 3 * MIB as usize, 12).await;
    let r = hub
        .post(
            &format!("/api/v1/backups/{run_id}/progress"),
            progress(2 * MIB),
        )
        .await;
    assert_eq!(r.status, 204, "{}", r.text());
    let t = std::time::Instant::now();
    let dom = dump_dom(&url, browser.path()).await;
    eprintln!("second load: {:?}", t.elapsed());
    let d0b = find(
        &dom,
        "disk-progress",
        &[("data-backup-id", run_id.as_str()), ("data-disk-id", "0")],
    );
    assert_eq!(num(&d0b, "data-bytes-written"), (4 * MIB) as f64, "{d0b:?}");
    assert_eq!(num(&d0b, "data-percent"), 50.0, "{d0b:?}");
    assert!(num(&d0b, "data-percent") > num(&d0, "data-percent"));
    let d1b = find(
        &dom,
        "disk-progress",
        &[("data-backup-id", run_id.as_str()), ("data-disk-id", "1")],
    );
    assert_eq!(num(&d1b, "data-percent"), 100.0, "{d1b:?}");

    // Throughput while data streams: every poll of the backups, on its way
    // to the hub, first lands one more chunk on disk 0, so each poll sees
    // more bytes than the one before and the page must show a rate.
    let proxy = StreamingProxy::start(hub.addr, run_uris[0].clone()).await;
    let dom = dump_dom(&format!("http://{}/", proxy.addr), browser.path()).await;
    let polls = proxy.chunks();
    assert!(polls >= 2, "the page polled {polls} times");
    let d0c = find(
        &dom,
        "disk-progress",
        &[("data-backup-id", run_id.as_str()), ("data-disk-id", "0")],
    );
    assert!(num(&d0c, "data-bytes-written") > num(&d0b, "data-bytes-written"));
    assert!(num(&d0c, "data-rate") > 0.0, "no throughput shown: {d0c:?}");
    drop(proxy);

    // The backup ends: it leaves the running list and becomes a completed
    // point, and no token form was ever shown.
    hub.complete(&run_id).await;
    let dom = dump_dom(&url, browser.path()).await;
    assert!(by_class(&dom, "disk-progress").is_empty(), "{dom}");
    find(
        &dom,
        "backup",
        &[
            ("data-backup-id", run_id.as_str()),
            ("data-status", "completed"),
        ],
    );
    let auth = elements(&dom)
        .into_iter()
        .find(|(_, a)| a.get("id").map(String::as_str) == Some("auth"))
        .unwrap()
        .1;
    assert!(auth.contains_key("hidden"), "{auth:?}");

    // Once tokens exist the page still loads, without data, and asks for one.
    let catalog = hub.daemon.as_ref().unwrap().backups().catalog().clone();
    catalog.create_token("viewer", Role::Reader).await.unwrap();
    assert_eq!(hub.get("/api/v1/backups").await.status, 401);
    assert_eq!(hub.get("/").await.status, 200);
    let dom = dump_dom(&url, browser.path()).await;
    let auth = elements(&dom)
        .into_iter()
        .find(|(_, a)| a.get("id").map(String::as_str) == Some("auth"))
        .unwrap()
        .1;
    assert!(
        !auth.contains_key("hidden"),
        "the token form is not shown:\n{dom}"
    );
    assert!(by_class(&dom, "backup").is_empty(), "{dom}");

    hub.stop().await;
}
