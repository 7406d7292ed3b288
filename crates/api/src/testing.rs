//! A fake VM behind a real API server, for the tests of this crate and of its clients (`ctl`):
//! it records every call and can be told to fail or panic.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::client::Client;
use crate::server::{serve, ServerHandle};
use crate::types::*;
use crate::VmController;

/// A fake VM: records every call; can be told to fail or panic.
#[derive(Default)]
pub struct FakeVm {
    pub calls: Mutex<Vec<String>>,
    pub fail: Mutex<Option<ApiError>>,
    pub panic_on: Mutex<Option<&'static str>>,
    pub statuses: Mutex<VecDeque<MigrationStatus>>,
    pub balloon: Mutex<BalloonInfo>,
    /// What `counters` answers (see [`fake_counters`]).
    pub counters: Mutex<VmCounters>,
}

impl FakeVm {
    pub fn record(&self, call: &'static str, arg: String) -> Result<(), ApiError> {
        self.calls
            .lock()
            .unwrap()
            .push(format!("{call}{arg}").trim().to_string());
        if *self.panic_on.lock().unwrap() == Some(call) {
            panic!("fake VM told to panic in {call}");
        }
        match self.fail.lock().unwrap().clone() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    pub fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }

    pub fn fail_with(&self, e: Option<ApiError>) {
        *self.fail.lock().unwrap() = e;
    }
}

pub fn fake_info() -> VmInfo {
    VmInfo {
        state: VmState::Running,
        vcpus: 2,
        memory_bytes: 512 << 20,
        boot_time_ms: Some(42),
        uptime_ms: 1500,
        devices: vec![DeviceInfo {
            id: "serial0".into(),
            kind: "serial".into(),
            address: Some("pio 0x3f8".into()),
            irq: Some(4),
            detail: Some("16550A".into()),
            path: None,
        }],
        version: "0.1.0".into(),
        exit_reason: None,
        pager: None,
    }
}

impl VmController for FakeVm {
    fn info(&self) -> Result<VmInfo, ApiError> {
        self.record("info", String::new())?;
        Ok(fake_info())
    }
    fn boot(&self, doc: VmDocument) -> Result<(), ApiError> {
        self.record(
            "boot",
            format!(" {} cpus, disks {:?}", doc.spec.cpus, doc.bindings.disks),
        )
    }
    fn pause(&self) -> Result<(), ApiError> {
        self.record("pause", String::new())
    }
    fn resume(&self) -> Result<(), ApiError> {
        self.record("resume", String::new())
    }
    fn shutdown(&self) -> Result<(), ApiError> {
        self.record("shutdown", String::new())
    }
    fn reset(&self) -> Result<(), ApiError> {
        self.record("reset", String::new())
    }
    fn snapshot(&self, req: SnapshotRequest) -> Result<(), ApiError> {
        self.record("snapshot", format!(" {req:?}"))
    }
    fn restore(&self, req: RestoreRequest) -> Result<(), ApiError> {
        self.record("restore", format!(" {req:?}"))
    }
    fn migrate_send(&self, req: MigrateSendRequest) -> Result<(), ApiError> {
        self.record("migrate_send", format!(" {req:?}"))
    }
    fn migrate_receive(
        &self,
        req: MigrateReceiveRequest,
    ) -> Result<MigrateReceiveResponse, ApiError> {
        self.record("migrate_receive", format!(" {req:?}"))?;
        Ok(MigrateReceiveResponse {
            token: req
                .token
                .unwrap_or_else(|| MigrationToken("generated-token-0123456789".into())),
        })
    }
    fn migration_status(&self) -> Result<MigrationStatus, ApiError> {
        self.record("migration_status", String::new())?;
        let mut q = self.statuses.lock().unwrap();
        Ok(if q.len() > 1 {
            q.pop_front().unwrap_or_default()
        } else {
            q.front().cloned().unwrap_or_default()
        })
    }
    fn migrate_cancel(&self) -> Result<(), ApiError> {
        self.record("migrate_cancel", String::new())
    }
    fn balloon(&self) -> Result<BalloonInfo, ApiError> {
        self.record("balloon", String::new())?;
        Ok(self.balloon.lock().unwrap().clone())
    }
    fn set_balloon(&self, req: BalloonSetRequest) -> Result<(), ApiError> {
        self.record("set_balloon", format!(" {req:?}"))?;
        self.balloon.lock().unwrap().target_bytes = req.target_bytes;
        Ok(())
    }
    fn counters(&self) -> Result<VmCounters, ApiError> {
        self.record("counters", String::new())?;
        Ok(self.counters.lock().unwrap().clone())
    }
}

/// Counters of a VM with 2 vCPUs, a disk and a network device, every field non-zero.
pub fn fake_counters() -> VmCounters {
    VmCounters {
        vcpus: (0..2)
            .map(|index| VcpuCounters {
                index,
                exits: 28,
                io_exits: 10,
                mmio_exits: 8,
                hlt_exits: 1,
                interrupted_exits: 5,
                shutdown_exits: 1,
                system_event_exits: 2,
                other_exits: 1,
            })
            .collect(),
        disks: vec![DiskCounters {
            id: "block0".into(),
            index: 0,
            read_ops: 3,
            read_bytes: 12288,
            write_ops: 2,
            write_bytes: 4608,
            flush_ops: 1,
            discard_ops: 1,
            write_zeroes_ops: 1,
            errors: 1,
        }],
        nics: vec![NicCounters {
            id: "net0".into(),
            index: 0,
            rx_packets: 4,
            rx_bytes: 400,
            rx_dropped: 1,
            tx_packets: 5,
            tx_bytes: 500,
            tx_dropped: 1,
        }],
    }
}

pub fn fake_balloon() -> BalloonInfo {
    BalloonInfo {
        target_bytes: 64 << 20,
        actual_bytes: 32 << 20,
        stats: Some(
            [
                ("free_memory".to_string(), 100 << 20),
                ("major_faults".to_string(), 7),
                ("swap_in".to_string(), 0),
            ]
            .into(),
        ),
    }
}

pub fn socket_path() -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    std::env::temp_dir().join(format!(
        "vessel-api-test-{}-{}.sock",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

pub fn start() -> (Arc<FakeVm>, ServerHandle, Client) {
    let vm = Arc::new(FakeVm::default());
    let path = socket_path();
    let handle = serve(&path, vm.clone()).unwrap();
    let client = Client::new(&path).with_timeout(Some(Duration::from_secs(30)));
    (vm, handle, client)
}

/// The `$ref`s of an OpenAPI document that name no schema of its own.
pub fn unresolved_refs(doc: &serde_json::Value) -> Vec<String> {
    use serde_json::Value;
    fn refs(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                if let Some(Value::String(r)) = m.get("$ref") {
                    out.push(r.clone());
                }
                m.values().for_each(|v| refs(v, out));
            }
            Value::Array(a) => a.iter().for_each(|v| refs(v, out)),
            _ => {}
        }
    }
    let mut all = Vec::new();
    refs(doc, &mut all);
    let schemas = &doc["components"]["schemas"];
    all.into_iter()
        .filter(|r| {
            r.strip_prefix("#/components/schemas/")
                .is_none_or(|name| schemas.get(name).is_none())
        })
        .collect()
}
