//! The daemon's metrics in Prometheus's text format (`GET /api/v1/metrics`): how many VMs in
//! each state, and for each VM its size, state, restarts, uptime, its process's CPU time and
//! memory (from `/proc`), its vCPUs' exits, its disks' and NICs' counters and a migration's
//! progress (from its own API), and the daemon's own memory.

use std::fmt::Write;

use api::types::{MigrationPhase, MigrationStatus, VmCounters};

use crate::vms::{VmState, VmView};

/// What a running VM's own API says of it, for the metrics.
#[derive(Debug, Default)]
pub struct VmLive {
    pub name: String,
    pub counters: Option<VmCounters>,
    pub migration: Option<MigrationStatus>,
}

/// A process's CPU seconds (user + system) and resident bytes.
fn process(pid: u32) -> Option<(f64, u64)> {
    let f = crate::process::stat_fields(pid)?;
    // utime and stime are fields 14 and 15.
    let ticks = f.get(14 - 3)? + f.get(15 - 3)?;
    let rss_pages: u64 = std::fs::read_to_string(format!("/proc/{pid}/statm"))
        .ok()?
        .split(' ')
        .nth(1)?
        .parse()
        .ok()?;
    Some((
        crate::process::ticks_to_secs(ticks),
        rss_pages * rustix::param::page_size() as u64,
    ))
}

/// A label value with `\`, `"` and newlines escaped.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

type Field<T> = (&'static str, &'static str, fn(&T) -> u64);

/// Per-device counters of each VM: `families` (name, help, value) for every `items(vm)`,
/// labelled `vm` and `what` = the item's `id`.
fn per_item<T>(
    out: &mut String,
    live: &[VmLive],
    items: fn(&VmCounters) -> Vec<(String, &T)>,
    what: &str,
    families: &[Field<T>],
) {
    for (name, help, get) in families {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        for l in live {
            let Some(c) = &l.counters else { continue };
            for (id, item) in items(c) {
                let _ = writeln!(
                    out,
                    "{name}{{vm=\"{}\",{what}=\"{}\"}} {}",
                    label(&l.name),
                    label(&id),
                    get(item)
                );
            }
        }
    }
}

/// The VMs' own counters and migrations.
fn render_live(out: &mut String, live: &[VmLive]) {
    use api::types::{DiskCounters, NicCounters, VcpuCounters};
    let vcpus: &[Field<VcpuCounters>] = &[
        (
            "vessel_vm_vcpu_exits_total",
            "Exits of the vCPU to the VMM (all kinds).",
            |v| v.exits,
        ),
        ("vessel_vm_vcpu_io_exits_total", "Port I/O exits.", |v| {
            v.io_exits
        }),
        ("vessel_vm_vcpu_mmio_exits_total", "MMIO exits.", |v| {
            v.mmio_exits
        }),
        ("vessel_vm_vcpu_hlt_exits_total", "HLT exits.", |v| {
            v.hlt_exits
        }),
    ];
    per_item(
        out,
        live,
        |c| c.vcpus.iter().map(|v| (v.index.to_string(), v)).collect(),
        "vcpu",
        vcpus,
    );
    let disks: &[Field<DiskCounters>] = &[
        ("vessel_vm_disk_read_ops_total", "Reads completed.", |d| {
            d.read_ops
        }),
        ("vessel_vm_disk_read_bytes_total", "Bytes read.", |d| {
            d.read_bytes
        }),
        ("vessel_vm_disk_write_ops_total", "Writes completed.", |d| {
            d.write_ops
        }),
        ("vessel_vm_disk_write_bytes_total", "Bytes written.", |d| {
            d.write_bytes
        }),
        (
            "vessel_vm_disk_flush_ops_total",
            "Flushes completed.",
            |d| d.flush_ops,
        ),
        (
            "vessel_vm_disk_errors_total",
            "Requests that failed.",
            |d| d.errors,
        ),
    ];
    per_item(
        out,
        live,
        |c| c.disks.iter().map(|d| (d.id.clone(), d)).collect(),
        "disk",
        disks,
    );
    let nics: &[Field<NicCounters>] = &[
        (
            "vessel_vm_net_rx_packets_total",
            "Frames to the guest.",
            |n| n.rx_packets,
        ),
        ("vessel_vm_net_rx_bytes_total", "Bytes to the guest.", |n| {
            n.rx_bytes
        }),
        (
            "vessel_vm_net_rx_dropped_total",
            "Frames to the guest dropped.",
            |n| n.rx_dropped,
        ),
        (
            "vessel_vm_net_tx_packets_total",
            "Frames from the guest.",
            |n| n.tx_packets,
        ),
        (
            "vessel_vm_net_tx_bytes_total",
            "Bytes from the guest.",
            |n| n.tx_bytes,
        ),
        (
            "vessel_vm_net_tx_dropped_total",
            "Frames from the guest dropped.",
            |n| n.tx_dropped,
        ),
    ];
    per_item(
        out,
        live,
        |c| c.nics.iter().map(|n| (n.id.clone(), n)).collect(),
        "nic",
        nics,
    );
    let migrating: Vec<(&str, &MigrationStatus)> = live
        .iter()
        .filter_map(|l| Some((l.name.as_str(), l.migration.as_ref()?)))
        .filter(|(_, m)| m.phase != MigrationPhase::None)
        .collect();
    type Progress = (&'static str, &'static str, fn(&MigrationStatus) -> u64);
    let progress: [Progress; 4] = [
        (
            "vessel_vm_migration_total_bytes",
            "Guest memory to send.",
            |m| m.total_bytes,
        ),
        (
            "vessel_vm_migration_transferred_bytes",
            "Bytes sent (or received) so far.",
            |m| m.transferred_bytes,
        ),
        (
            "vessel_vm_migration_remaining_bytes",
            "Bytes still to send.",
            |m| m.remaining_bytes,
        ),
        ("vessel_vm_migration_round", "The pre-copy round.", |m| {
            u64::from(m.round)
        }),
    ];
    for (name, help, get) in progress {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for (vm, m) in &migrating {
            let _ = writeln!(
                out,
                "{name}{{vm=\"{}\",phase=\"{}\"}} {}",
                label(vm),
                m.phase,
                get(m)
            );
        }
    }
}

/// The metrics text.
pub fn render(vms: &[VmView], pids: &[(String, u32)], live: &[VmLive]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP vessel_vms VMs by state.\n# TYPE vessel_vms gauge"
    );
    for s in VmState::ALL {
        let n = vms.iter().filter(|v| v.state == s).count();
        let _ = writeln!(out, "vessel_vms{{state=\"{}\"}} {n}", s.as_str());
    }
    let metric = |out: &mut String, name: &str, kind: &str, help: &str| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    };
    type Get = fn(&VmView) -> Option<f64>;
    let per_vm: [(&str, &str, &str, Get); 5] = [
        ("vessel_vm_vcpus", "gauge", "vCPUs.", |v| {
            Some(f64::from(v.record.spec.cpus))
        }),
        ("vessel_vm_memory_bytes", "gauge", "Guest RAM.", |v| {
            Some(v.record.spec.memory as f64)
        }),
        (
            "vessel_vm_up",
            "gauge",
            "1 when the VM's process runs.",
            |v| Some(if v.record.pid.is_some() { 1.0 } else { 0.0 }),
        ),
        (
            "vessel_vm_restarts",
            "gauge",
            "Restarts by the policy in the last minute.",
            |v| Some(f64::from(v.restarts)),
        ),
        (
            "vessel_vm_uptime_seconds",
            "gauge",
            "Seconds since the VM's process started.",
            |v| v.uptime_ms.map(|ms| ms as f64 / 1000.0),
        ),
    ];
    for (name, kind, help, get) in per_vm {
        metric(&mut out, name, kind, help);
        for v in vms {
            if let Some(x) = get(v) {
                let _ = writeln!(out, "{name}{{vm=\"{}\"}} {x}", label(&v.record.name));
            }
        }
    }
    let procs: Vec<(&str, (f64, u64))> = pids
        .iter()
        .filter_map(|(n, p)| process(*p).map(|x| (n.as_str(), x)))
        .collect();
    metric(
        &mut out,
        "vessel_vm_cpu_seconds_total",
        "counter",
        "CPU time of the VM's process (vCPUs and devices), user and system.",
    );
    for (n, (cpu, _)) in &procs {
        let _ = writeln!(
            out,
            "vessel_vm_cpu_seconds_total{{vm=\"{}\"}} {cpu}",
            label(n)
        );
    }
    metric(
        &mut out,
        "vessel_vm_resident_bytes",
        "gauge",
        "Resident memory of the VM's process (the guest's touched RAM included).",
    );
    for (n, (_, rss)) in &procs {
        let _ = writeln!(out, "vessel_vm_resident_bytes{{vm=\"{}\"}} {rss}", label(n));
    }
    if let Some((cpu, rss)) = process(std::process::id()) {
        metric(
            &mut out,
            "vessel_daemon_cpu_seconds_total",
            "counter",
            "The daemon's CPU time.",
        );
        let _ = writeln!(out, "vessel_daemon_cpu_seconds_total {cpu}");
        metric(
            &mut out,
            "vessel_daemon_resident_bytes",
            "gauge",
            "The daemon's memory.",
        );
        let _ = writeln!(out, "vessel_daemon_resident_bytes {rss}");
    }
    render_live(&mut out, live);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_escaped_and_this_process_is_measured() {
        assert_eq!(label(r#"a"b\c"#), r#"a\"b\\c"#);
        let (cpu, rss) = process(std::process::id()).unwrap();
        assert!(cpu >= 0.0 && rss > 0);
        let text = render(&[], &[], &[]);
        assert!(text.contains("vessel_vms{state=\"running\"} 0"), "{text}");
        assert!(text.contains("vessel_daemon_resident_bytes "), "{text}");
    }

    #[test]
    fn a_vms_counters_and_migration_are_labelled() {
        let live = VmLive {
            name: "web".into(),
            counters: Some(api::testing::fake_counters()),
            migration: Some(MigrationStatus {
                phase: MigrationPhase::Precopy,
                transferred_bytes: 4096,
                ..Default::default()
            }),
        };
        let text = render(&[], &[], &[live]);
        for want in [
            "vessel_vm_vcpu_exits_total{vm=\"web\",vcpu=\"0\"} ",
            "vessel_vm_disk_write_bytes_total{vm=\"web\",disk=\"block0\"} ",
            "vessel_vm_net_rx_packets_total{vm=\"web\",nic=\"net0\"} ",
            "vessel_vm_migration_transferred_bytes{vm=\"web\",phase=\"precopy\"} 4096",
        ] {
            assert!(text.contains(want), "{want}: {text}");
        }
    }

    #[test]
    fn state_names_are_the_apis() {
        for s in VmState::ALL {
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
    }
}
