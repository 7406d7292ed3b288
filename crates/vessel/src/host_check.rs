//! `vessel host-check`: what this host's KVM offers, and whether it runs guest ring 0 natively.

use clap::Args;
use hypervisor::Hypervisor;
use serde::Serialize;

#[derive(Args, Debug)]
pub struct HostCheckArgs {
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Report {
    kvm_api_version: i32,
    kvm_module: Option<String>,
    recommended_vcpus: usize,
    max_vcpus: usize,
    max_vcpus_per_vm: u32,
    max_memslots: usize,
    capabilities: Vec<(String, bool)>,
    ring0_probe_us: f64,
    ring0_ns_per_instruction: f64,
    ring0_native: bool,
    /// "available", or why `--restore-memory uffd` cannot work here.
    userfaultfd: String,
    verdict: String,
}

/// Which KVM module is loaded, from sysfs.
fn kvm_module() -> Option<String> {
    ["kvm_intel", "kvm_amd", "kvm_pvm"]
        .into_iter()
        .find(|m| std::path::Path::new("/sys/module").join(m).exists())
        .map(str::to_string)
}

pub fn run(args: HostCheckArgs) -> Result<i32, hypervisor::Error> {
    let hv = Hypervisor::new()?;
    let info = hv.info();
    let probe = hv.probe_ring0()?;
    let native = probe.is_native();
    let module = kvm_module();
    let verdict = if native {
        "guest ring 0 runs natively: Linux guests and the bundled guest boot at full speed"
            .to_string()
    } else {
        format!(
            "guest ring 0 is emulated one instruction at a time (about {:.2} us each{}): the bundled \
             guest, which works in ring 3, runs fine; stock Linux kernels boot very slowly or fail \
             (such emulators reject instructions like int3, xsave and cmpxchg16b). Use a host with \
             VT-x/AMD-V, or nested virtualization, to run Linux guests",
            probe.per_instruction.as_secs_f64() * 1e6,
            module
                .as_deref()
                .filter(|m| *m == "kvm_pvm")
                .map_or(String::new(), |_| "; this host runs kvm_pvm".into()),
        )
    };
    let report = Report {
        kvm_api_version: info.api_version,
        kvm_module: module,
        recommended_vcpus: info.recommended_vcpus,
        max_vcpus: info.max_vcpus,
        max_vcpus_per_vm: (info.max_vcpus as u32).min(arch::MAX_VCPUS),
        max_memslots: info.max_memslots,
        capabilities: info.caps.iter().map(|(n, s)| (n.to_string(), *s)).collect(),
        ring0_probe_us: probe.elapsed.as_secs_f64() * 1e6,
        ring0_ns_per_instruction: probe.per_instruction.as_secs_f64() * 1e9,
        ring0_native: native,
        userfaultfd: match hypervisor::uffd::probe() {
            Ok(()) => "available".to_string(),
            Err(e) => e.to_string(),
        },
        verdict,
    };
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
    } else {
        print_text(&report);
    }
    Ok(0)
}

fn print_text(r: &Report) {
    println!("KVM API version:     {}", r.kvm_api_version);
    println!(
        "KVM module:          {}",
        r.kvm_module.as_deref().unwrap_or("unknown")
    );
    println!(
        "vCPUs:               {} recommended, {} max per VM for Vessel (KVM allows {})",
        r.recommended_vcpus, r.max_vcpus_per_vm, r.max_vcpus
    );
    println!("memory slots:        {}", r.max_memslots);
    let caps: Vec<String> = r
        .capabilities
        .iter()
        .map(|(n, s)| format!("{n}{}", if *s { "" } else { " (missing)" }))
        .collect();
    println!("capabilities:        {}", caps.join(", "));
    println!(
        "ring-0 probe:        {:.0} us for {} instructions ({:.1} ns each)",
        r.ring0_probe_us,
        2 * hypervisor::PROBE_ITERATIONS,
        r.ring0_ns_per_instruction
    );
    println!(
        "userfaultfd:         {} (restore with --restore-memory uffd)",
        r.userfaultfd
    );
    println!("verdict:             {}", r.verdict);
}
