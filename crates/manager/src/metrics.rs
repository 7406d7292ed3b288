//! The daemon's metrics in Prometheus's text format (`GET /api/v1/metrics`): how many VMs in
//! each state, and for each VM its size, state, restarts, uptime, and its process's CPU time
//! and memory (from `/proc`), and the daemon's own memory.

use std::fmt::Write;

use crate::vms::{VmState, VmView};

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

/// The metrics text.
pub fn render(vms: &[VmView], pids: &[(String, u32)]) -> String {
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
        let text = render(&[], &[]);
        assert!(text.contains("vessel_vms{state=\"running\"} 0"), "{text}");
        assert!(text.contains("vessel_daemon_resident_bytes "), "{text}");
    }

    #[test]
    fn state_names_are_the_apis() {
        for s in VmState::ALL {
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
    }
}
