//! Exports: a named backend plus its policy, counters and lifecycle.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backend::{BackendError, BlockBackend};
use crate::proto::consts::{tx_flags, MAX_PAYLOAD, MAX_STRING_LEN};
use crate::proto::{ExportCatalog, ExportInfo};

/// A backend served under a name.
///
/// Cheap to share (`Arc<Export>`); every connection to it holds one. Closing
/// an export ([`Export::close`]) stops new connections, lets in-flight
/// requests finish, disconnects clients and closes (flushes) the backend.
#[derive(Debug)]
pub struct Export {
    name: String,
    description: String,
    backend: Arc<dyn BlockBackend>,
    read_only: bool,
    stats: ExportStats,
    closing: CancellationToken,
    closed: AtomicBool,
    tasks: TaskTracker,
}

impl Export {
    /// Serve `backend` as `name` (read-write unless the backend is read-only).
    pub fn new(name: impl Into<String>, backend: Arc<dyn BlockBackend>) -> Self {
        let read_only = backend.caps().read_only;
        Export {
            name: name.into(),
            description: String::new(),
            backend,
            read_only,
            stats: ExportStats::default(),
            closing: CancellationToken::new(),
            closed: AtomicBool::new(false),
            tasks: TaskTracker::new(),
        }
    }

    /// Set the description shown by `NBD_OPT_LIST` and `NBD_INFO_DESCRIPTION`.
    pub fn with_description(mut self, description: impl Into<String>) -> Self {
        self.description = description.into();
        self
    }

    /// Refuse writes even if the backend accepts them.
    pub fn read_only(mut self, read_only: bool) -> Self {
        self.read_only = read_only || self.backend.caps().read_only;
        self
    }

    /// The export's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The description.
    pub fn description(&self) -> &str {
        &self.description
    }

    /// The backend.
    pub fn backend(&self) -> &Arc<dyn BlockBackend> {
        &self.backend
    }

    /// Whether writes are refused.
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// Live counters.
    pub fn stats(&self) -> &ExportStats {
        &self.stats
    }

    /// Whether [`Export::close`] has started.
    pub fn is_closing(&self) -> bool {
        self.closing.is_cancelled()
    }

    /// Fires when the export starts closing.
    pub(crate) fn closing_token(&self) -> &CancellationToken {
        &self.closing
    }

    /// Connections and dedicated listeners of this export.
    pub(crate) fn tasks(&self) -> &TaskTracker {
        &self.tasks
    }

    /// Check that the name is a valid NBD string.
    pub(crate) fn validate_name(name: &str) -> Result<(), String> {
        if name.len() > MAX_STRING_LEN {
            return Err(format!("export name longer than {MAX_STRING_LEN} bytes"));
        }
        if name.contains('\0') {
            return Err("export name contains NUL".into());
        }
        Ok(())
    }

    /// Transmission flags before negotiation-dependent bits.
    pub fn base_flags(&self) -> u16 {
        let caps = self.backend.caps();
        let mut f = tx_flags::HAS_FLAGS | tx_flags::SEND_CACHE;
        if self.read_only {
            f |= tx_flags::READ_ONLY;
        } else {
            if caps.can_flush {
                f |= tx_flags::SEND_FLUSH | tx_flags::SEND_FUA;
            }
            if caps.can_trim {
                f |= tx_flags::SEND_TRIM;
            }
            // WRITE_ZEROES is always offered: the protocol layer never needs
            // the backend to be clever about it to be correct.
            f |= tx_flags::SEND_WRITE_ZEROES;
            if caps.can_fast_zero {
                f |= tx_flags::SEND_FAST_ZERO;
            }
        }
        if caps.can_multi_conn {
            f |= tx_flags::CAN_MULTI_CONN;
        }
        f
    }

    /// What the handshake tells clients.
    pub fn info(&self) -> ExportInfo {
        let caps = self.backend.caps();
        // Spec: minimum a power of two ≤ 64 KiB; preferred a power of two
        // ≥ max(minimum, 512).
        let min_block = caps.min_block.clamp(1, 65536).next_power_of_two();
        let preferred_block = caps
            .preferred_block
            .clamp(min_block.max(512), MAX_PAYLOAD)
            .next_power_of_two();
        ExportInfo {
            name: self.name.clone(),
            description: self.description.clone(),
            size: self.backend.size(),
            flags: self.base_flags(),
            min_block,
            preferred_block,
            max_payload: MAX_PAYLOAD,
            base_allocation: true,
            allocation_depth: caps.can_allocation_depth,
        }
    }

    /// Stop serving: no new connections, in-flight requests finish, clients
    /// are disconnected, then the backend is closed (flushed). Idempotent:
    /// later calls only wait for the first to finish its draining.
    pub async fn close(&self) -> Result<ExportStatsSnapshot, BackendError> {
        self.closing.cancel();
        self.tasks.close();
        self.tasks.wait().await;
        if !self.closed.swap(true, Ordering::AcqRel) {
            self.backend.close().await?;
        }
        Ok(self.stats.snapshot())
    }
}

/// Per-export counters, updated lock-free by every connection.
#[derive(Debug, Default)]
pub struct ExportStats {
    connections_active: AtomicU64,
    connections_total: AtomicU64,
    requests: AtomicU64,
    errors: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    last_activity_ms: AtomicU64,
    last_request_ms: AtomicU64,
    write_errors: AtomicU64,
    last_write_error: Mutex<Option<String>>,
}

/// A point-in-time copy of [`ExportStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ExportStatsSnapshot {
    /// Connections currently in transmission.
    pub connections_active: u64,
    /// Connections that ever entered transmission.
    pub connections_total: u64,
    /// Requests handled.
    pub requests: u64,
    /// Requests answered with an error.
    pub errors: u64,
    /// Payload bytes sent to clients.
    pub bytes_read: u64,
    /// Payload bytes received from clients (zeroed ranges not counted).
    pub bytes_written: u64,
    /// Unix time in milliseconds of the last request or connection, 0 if none.
    pub last_activity_ms: u64,
    /// Unix time in milliseconds of the last request, 0 if none (what an
    /// idle watchdog should look at: connecting is not progress).
    pub last_request_ms: u64,
    /// WRITE, WRITE_ZEROES, TRIM and FLUSH requests answered with an error
    /// (refused or failed): the image may not hold what the client sent.
    pub write_errors: u64,
}

impl ExportStats {
    /// Copy the counters.
    pub fn snapshot(&self) -> ExportStatsSnapshot {
        ExportStatsSnapshot {
            connections_active: self.connections_active.load(Ordering::Relaxed),
            connections_total: self.connections_total.load(Ordering::Relaxed),
            requests: self.requests.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            bytes_read: self.bytes_read.load(Ordering::Relaxed),
            bytes_written: self.bytes_written.load(Ordering::Relaxed),
            last_activity_ms: self.last_activity_ms.load(Ordering::Relaxed),
            last_request_ms: self.last_request_ms.load(Ordering::Relaxed),
            write_errors: self.write_errors.load(Ordering::Relaxed),
        }
    }

    /// The message of the last failed WRITE, WRITE_ZEROES, TRIM or FLUSH.
    pub fn last_write_error(&self) -> Option<String> {
        self.last_write_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Count a data-changing request (WRITE, WRITE_ZEROES, TRIM, FLUSH)
    /// that was answered with an error.
    pub(crate) fn write_failed(&self, message: String) {
        self.write_errors.fetch_add(1, Ordering::Relaxed);
        *self
            .last_write_error
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(message);
    }

    pub(crate) fn connection_opened(&self) {
        self.connections_active.fetch_add(1, Ordering::Relaxed);
        self.connections_total.fetch_add(1, Ordering::Relaxed);
        self.touch();
    }

    pub(crate) fn connection_closed(&self) {
        self.connections_active.fetch_sub(1, Ordering::Relaxed);
        self.touch();
    }

    pub(crate) fn request_done(&self, ok: bool, read: u64, written: u64) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if !ok {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        if read > 0 {
            self.bytes_read.fetch_add(read, Ordering::Relaxed);
        }
        if written > 0 {
            self.bytes_written.fetch_add(written, Ordering::Relaxed);
        }
        let now = self.touch();
        self.last_request_ms.store(now, Ordering::Relaxed);
    }

    fn touch(&self) -> u64 {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        self.last_activity_ms.store(now, Ordering::Relaxed);
        now
    }
}

/// Exports reachable by name on shared listeners.
#[derive(Debug, Default)]
pub struct ExportRegistry {
    map: RwLock<BTreeMap<String, Arc<Export>>>,
}

impl ExportRegistry {
    /// Add an export; `false` if the name is taken.
    pub fn insert(&self, export: Arc<Export>) -> bool {
        let mut map = self.map.write().unwrap_or_else(|e| e.into_inner());
        if map.contains_key(export.name()) {
            return false;
        }
        map.insert(export.name().to_owned(), export);
        true
    }

    /// Remove and return an export.
    pub fn remove(&self, name: &str) -> Option<Arc<Export>> {
        self.map
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name)
    }

    /// Look an export up.
    pub fn get(&self, name: &str) -> Option<Arc<Export>> {
        self.map
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    /// Every export, by name.
    pub fn all(&self) -> Vec<Arc<Export>> {
        self.map
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Number of exports.
    pub fn len(&self) -> usize {
        self.map.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What clients may learn about exports ([`crate::ServerConfig`]'s
/// `list_exports` and `exact_export_names`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Visibility {
    /// `NBD_OPT_LIST` names the exports (else it answers an empty list).
    pub list: bool,
    /// Only an export's exact name reaches it: no default name "", and a
    /// port of its own does not answer to other names. With unguessable
    /// names, the name is then a capability.
    pub exact_names: bool,
}

/// What a listener offers: every registered export by name, or one export
/// on a port of its own (which also answers to the default name "" unless
/// names must be exact).
#[derive(Debug, Clone)]
pub(crate) enum Catalog {
    Shared(Arc<ExportRegistry>, Visibility),
    Single(Arc<Export>, Visibility),
}

impl ExportCatalog for Catalog {
    type Export = Arc<Export>;

    fn lookup(&self, name: &str) -> Option<(ExportInfo, Arc<Export>)> {
        // Every refusal below is the same `None`: an unknown name, another
        // port's export and a closing one look alike to the client.
        let export = match self {
            Catalog::Single(e, v) => {
                (name == e.name() || (name.is_empty() && !v.exact_names)).then(|| Arc::clone(e))
            }
            Catalog::Shared(reg, v) => match reg.get(name) {
                Some(e) => Some(e),
                // The default name means "the only export", when there is one.
                None if name.is_empty() && !v.exact_names => {
                    let all = reg.all();
                    if all.len() == 1 {
                        all.into_iter().next()
                    } else {
                        None
                    }
                }
                None => None,
            },
        }?;
        if export.is_closing() {
            return None;
        }
        Some((export.info(), export))
    }

    fn list(&self) -> Vec<(String, String)> {
        let exports = match self {
            Catalog::Single(_, v) | Catalog::Shared(_, v) if !v.list => return Vec::new(),
            Catalog::Single(e, _) => vec![Arc::clone(e)],
            Catalog::Shared(reg, _) => reg.all(),
        };
        exports
            .into_iter()
            .filter(|e| !e.is_closing())
            .map(|e| (e.name().to_owned(), e.description().to_owned()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemoryBackend;

    fn export(name: &str) -> Arc<Export> {
        Arc::new(Export::new(name, Arc::new(MemoryBackend::new(1 << 20))))
    }

    const OPEN: Visibility = Visibility {
        list: true,
        exact_names: false,
    };
    const SECRET: Visibility = Visibility {
        list: false,
        exact_names: true,
    };

    #[test]
    fn listing_and_default_names_follow_visibility() {
        let reg = Arc::new(ExportRegistry::default());
        assert!(reg.insert(export("cap-0123")));
        let open = Catalog::Shared(Arc::clone(&reg), OPEN);
        assert_eq!(open.list().len(), 1);
        assert!(open.lookup("").is_some(), "the only export by default name");
        let secret = Catalog::Shared(Arc::clone(&reg), SECRET);
        assert!(secret.list().is_empty());
        assert!(secret.lookup("").is_none());
        assert!(secret.lookup("cap").is_none());
        assert!(secret.lookup("cap-0123").is_some());

        let single = Catalog::Single(export("own-port"), OPEN);
        assert!(single.lookup("").is_some());
        assert_eq!(single.list().len(), 1);
        let single = Catalog::Single(export("own-port"), SECRET);
        assert!(single.lookup("").is_none());
        assert!(single.lookup("other").is_none());
        assert!(single.lookup("own-port").is_some());
        assert!(single.list().is_empty());
    }
}
