//! How `vessel run` and `vessel serve` confine the VMM: seccomp filters, the jail, vCPU
//! pinning. The jail needs the host files the VM uses, all absolute: [`Needs`] gathers them
//! from the VM's configuration (after [`absolutize`]).

use std::path::{Path, PathBuf};

use clap::Args;
use jail::sandbox::{Access, Exposure, JailSpec, Plan, Privileged, Role};
use vmm::config::{ConsoleConfig, HostBindings, NetBinding, VmConfig};

use crate::run::Error;

/// How the VMM process is confined.
#[derive(Args, Debug, Default)]
pub struct ConfineArgs {
    /// System-call filters per thread class: on (a forbidden call ends the VM with exit code
    /// 71 and a line naming the thread and the call), log (the kernel logs it and lets it
    /// through) or off. Default: on, or VESSEL_SECCOMP.
    #[arg(long, value_name = "on|log|off")]
    seccomp: Option<String>,
    /// Run the VMM jailed (needs root to set up): as uid:gid with no capabilities and
    /// no_new_privs, in new mount, PID, IPC and UTS namespaces, seeing only the VM's own files
    /// (bound at their paths into a new root, read-only where only read; landlock on top),
    /// its own /dev/kvm. A keeper process waits for it, passes signals on and
    /// removes what the jail made. `uid=N,gid=N[,netns=new|PATH][,cgroup=PATH]
    /// [,memory-max=SIZE][,cpu-max=PERCENT%|QUOTA/PERIOD][,pids-max=N]`: netns puts the VMM
    /// in a new or existing network namespace (its taps are made there); cgroup and the
    /// limits put it in a cgroup v2 (default vessel/<pid>) with those limits. Taps that do
    /// not exist are made for the jail's user and removed at the end.
    #[arg(long, value_name = "SPEC")]
    jail: Option<String>,
    /// A host file or directory the jailed VMM may use besides the VM's own: where snapshots
    /// are written, what a migration target's disks are. PATH (read-write) or PATH:ro;
    /// repeatable.
    #[arg(long, value_name = "PATH[:ro]", requires = "jail")]
    jail_path: Vec<String>,
    /// Pin vCPU threads to host CPUs: a CPU list for every vCPU (`2`, `0-3`, `0,2`), or
    /// VCPU=LIST for one (`0=2`, `1=3`); repeatable.
    #[arg(long, value_name = "[VCPU=]CPUS")]
    cpu_affinity: Vec<String>,
}

/// What a jailed VMM needs from the host.
#[derive(Debug, Default)]
pub struct Needs {
    exposures: Vec<Exposure>,
    devices: Vec<PathBuf>,
    taps: Vec<String>,
}

/// `p` made absolute with symbolic links resolved (for a path that does not exist yet, its
/// directory's): the jail holds files at these paths.
pub fn absolute(p: &Path) -> PathBuf {
    if let Ok(c) = p.canonicalize() {
        return c;
    }
    match (p.parent(), p.file_name()) {
        (Some(dir), Some(name)) => {
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            match dir.canonicalize() {
                Ok(d) => d.join(name),
                Err(_) => std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf()),
            }
        }
        _ => std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf()),
    }
}

/// Makes a console's file or socket path absolute.
fn absolute_console(c: &mut ConsoleConfig) {
    match c {
        ConsoleConfig::File(p) | ConsoleConfig::Socket(p) => *p = absolute(p),
        _ => {}
    }
}

/// Makes the host paths a VM binds at start (console, API socket, vsock socket) absolute.
fn absolute_bindings(
    console: &mut ConsoleConfig,
    api_socket: &mut Option<PathBuf>,
    vsock_socket: Option<&mut PathBuf>,
) {
    absolute_console(console);
    if let Some(p) = api_socket {
        *p = absolute(p);
    }
    if let Some(p) = vsock_socket {
        *p = absolute(p);
    }
}

/// Makes a network device's socket path absolute (its own, or its passt's).
fn absolute_net(b: &mut NetBinding) {
    match b {
        NetBinding::Socket(p) => *p = absolute(p),
        NetBinding::Passt(p) => {
            if let Some(s) = &mut p.socket {
                *s = absolute(s);
            }
        }
        NetBinding::Tap(_) => {}
    }
}

/// Makes every host path of a VM's configuration absolute.
pub fn absolutize(c: &mut VmConfig) {
    let boot = &mut c.spec.boot;
    for p in boot.kernel.iter_mut().chain(boot.initrd.iter_mut()) {
        *p = absolute(p);
    }
    let b: &mut HostBindings = &mut c.bindings;
    for d in &mut b.disks {
        *d = absolute(d);
    }
    b.nets.iter_mut().for_each(absolute_net);
    if let Some(v) = &mut b.virtio_console {
        absolute_console(v);
    }
    let off = &mut ConsoleConfig::Off;
    let console = b.console.as_mut().unwrap_or(off);
    absolute_bindings(console, &mut b.api_socket, b.vsock_socket.as_mut());
}

/// Makes every host path of a restore's options absolute.
pub fn absolutize_restore(o: &mut vmm::vm::RestoreOptions) {
    o.nets.iter_mut().for_each(|(_, b)| absolute_net(b));
    let vsock = o.vsock.as_mut().map(|(_, socket)| socket);
    absolute_bindings(&mut o.console, &mut o.api_socket, vsock);
}

impl Needs {
    fn add(&mut self, path: &Path, access: Access) {
        let e = Exposure {
            path: path.to_path_buf(),
            access,
        };
        // Sockets often share a directory: bind it once.
        if !self.exposures.contains(&e) {
            self.exposures.push(e);
        }
    }

    /// What a VM binds at start: its console, API socket, vsock socket and network backends.
    fn bindings<'a>(
        &mut self,
        console: &ConsoleConfig,
        api_socket: Option<&Path>,
        vsock_socket: Option<&Path>,
        nets: impl Iterator<Item = &'a NetBinding>,
    ) {
        self.console(console);
        if let Some(p) = api_socket {
            self.socket(p);
        }
        if let Some(p) = vsock_socket {
            self.socket(p);
        }
        let nets: Vec<&NetBinding> = nets.collect();
        // A stream socket (its own, or the passt's started for it) is bound into the jail
        // itself: the VMM connects to it, as the jail's user.
        for p in nets.iter().filter_map(|b| b.stream_path()) {
            self.add(p, Access::Connect);
        }
        self.nets(nets.iter().filter_map(|b| b.tap()).map(String::from));
    }

    fn socket(&mut self, path: &Path) {
        if let Some(dir) = path.parent() {
            self.add(dir, Access::SocketDir);
        }
    }

    fn console(&mut self, c: &ConsoleConfig) {
        match c {
            ConsoleConfig::File(p) => self.add(p, Access::Output),
            ConsoleConfig::Socket(p) => self.socket(p),
            _ => {}
        }
    }

    /// A disk and the images below it (read-only).
    fn disk(&mut self, path: &Path, read_only: bool) {
        let top = if read_only {
            Access::Read
        } else {
            Access::ReadWrite
        };
        self.add(path, top);
        if let Ok(layers) = block::ops::info(path, true, false) {
            for l in layers.iter().skip(1) {
                // At the path the chain resolves to (which the VMM opens), symbolic links
                // and all.
                let p = Path::new(&l.filename);
                self.add(
                    &std::path::absolute(p).unwrap_or(p.to_path_buf()),
                    Access::Read,
                );
            }
        }
    }

    fn nets(&mut self, taps: impl Iterator<Item = String>) {
        let taps: Vec<String> = taps.collect();
        if !taps.is_empty() {
            self.devices.push("/dev/net/tun".into());
        }
        self.taps.extend(taps);
    }

    /// What a VM built from `c` uses.
    pub fn of_config(c: &VmConfig) -> Needs {
        let mut n = Needs::default();
        let boot = &c.spec.boot;
        for p in boot.kernel.iter().chain(boot.initrd.iter()) {
            n.add(p, Access::Read);
        }
        let b = &c.bindings;
        for (d, path) in c.spec.disks.iter().zip(&b.disks) {
            n.disk(path, d.read_only);
        }
        if let Some(v) = &b.virtio_console {
            n.console(v);
        }
        n.bindings(
            b.console.as_ref().unwrap_or(&ConsoleConfig::Off),
            b.api_socket.as_deref(),
            b.vsock_socket.as_deref(),
            b.nets.iter(),
        );
        n
    }

    /// What restoring the snapshot in `dir` with `opts` uses.
    pub fn of_restore(dir: &Path, opts: &vmm::vm::RestoreOptions) -> Result<Needs, Error> {
        let mut n = Needs::default();
        let (dirs, disks) =
            vmm::snapshot::restore_paths(dir).map_err(|e| Error::Vm(vmm::Error::from(e)))?;
        for d in dirs {
            n.add(&absolute(&d), Access::Read);
        }
        for (path, read_only) in disks {
            n.disk(&absolute(&path), read_only);
        }
        n.bindings(
            &opts.console,
            opts.api_socket.as_deref(),
            opts.vsock.as_ref().map(|(_, socket)| socket.as_path()),
            opts.nets.iter().map(|(_, binding)| binding),
        );
        if opts.memory == api::types::RestoreMemory::Userfaultfd {
            n.userfaultfd();
        }
        Ok(n)
    }

    /// `/dev/userfaultfd`, where the host has it: the jail's user may then create the
    /// userfaultfd a lazy restore or a post-copy target needs, without the sysctl
    /// `vm.unprivileged_userfaultfd`.
    fn userfaultfd(&mut self) {
        let dev = Path::new("/dev/userfaultfd");
        if dev.exists() {
            self.devices.push(dev.to_path_buf());
        }
    }

    /// What an empty `vessel serve` uses.
    pub fn of_serve(api_socket: &Path, console: &ConsoleConfig) -> Needs {
        let mut n = Needs::default();
        n.socket(api_socket);
        n.console(console);
        // A VM restored or received later may have network devices, and a post-copy or
        // userfaultfd restore needs a userfaultfd.
        n.devices.push("/dev/net/tun".into());
        n.userfaultfd();
        n
    }
}

/// A tap the jail makes for its user when it does not exist, and removes at the end.
struct JailTap(String);

impl Privileged for JailTap {
    fn name(&self) -> String {
        format!("tap {}", self.0)
    }
    fn needed(&mut self, spec: &JailSpec) -> bool {
        spec.netns == Some(jail::sandbox::NetNs::New) || !net::tap::exists(&self.0)
    }
    fn setup(&mut self, spec: &JailSpec) -> Result<(), String> {
        net::tap::Tap::create_persistent(&self.0, spec.uid, spec.gid, None)
            .map(drop)
            .map_err(|e| e.to_string())
    }
    fn undo(&mut self) {
        if let Err(e) = net::tap::Tap::remove_persistent(&self.0) {
            eprintln!("vessel: warning: jail: {e}");
        }
    }
}

impl ConfineArgs {
    /// Whether the VMM is to be jailed (its paths must then be absolute).
    pub fn jailed(&self) -> bool {
        self.jail.is_some()
    }

    /// The jail's user and group, when the VMM is to be jailed (what runs for it outside the
    /// jail, passt, runs as them).
    pub fn jail_user(&self) -> Result<Option<(u32, u32)>, Error> {
        let Some(spec) = &self.jail else {
            return Ok(None);
        };
        let spec = JailSpec::parse(spec, |s| spec::cli::memory(s).map_err(|e| e.to_string()))?;
        Ok(Some((spec.uid, spec.gid)))
    }

    /// Confines the process: the jail (if asked; the keeper gets `Some(exit code)` back once
    /// the VMM has ended), pinning, then the seccomp filters. Call before any thread starts.
    /// `cpus`: the VM's vCPUs, when known, that `--cpu-affinity` may name.
    pub fn apply(
        &self,
        cpus: Option<u32>,
        needs: impl FnOnce() -> Result<Needs, Error>,
    ) -> Result<Option<i32>, Error> {
        // Every value checked before the jail forks: a mistake is the caller's, said once.
        let affinity = jail::affinity::Affinity::parse(&self.cpu_affinity)?;
        if let Some(cpus) = cpus {
            affinity.check(cpus)?;
        }
        let mode: jail::seccomp::Mode = self
            .seccomp
            .clone()
            .or_else(|| std::env::var("VESSEL_SECCOMP").ok())
            .unwrap_or_else(|| "on".to_string())
            .parse()?;
        if let Some(spec) = &self.jail {
            let spec = JailSpec::parse(spec, |s| spec::cli::memory(s).map_err(|e| e.to_string()))?;
            let mut needs = needs()?;
            for p in &self.jail_path {
                let (path, access) = match p.strip_suffix(":ro") {
                    Some(p) => (p, Access::Read),
                    None => (p.as_str(), Access::ReadWrite),
                };
                needs.add(&absolute(Path::new(path)), access);
            }
            let plan = Plan {
                spec,
                exposures: needs.exposures,
                devices: needs.devices,
                privileged: needs
                    .taps
                    .into_iter()
                    .map(|t| Box::new(JailTap(t)) as Box<dyn Privileged>)
                    .collect(),
            };
            if let Role::Keeper(code) = jail::sandbox::enter(plan)? {
                return Ok(Some(code));
            }
        }
        affinity.install();
        jail::seccomp::init(mode)?;
        Ok(None)
    }
}
