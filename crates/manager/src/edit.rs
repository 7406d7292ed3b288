//! Changing what a VM is: `vm edit` (its spec and settings), `vm clone` (a stopped VM's
//! copy with its own disks), and templates made from a stopped VM (its disks flattened into
//! new bases).

use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use spec::vm::VmSpec;

use crate::layout::check_name;
use crate::store::{now_s, Desired, RestartPolicy, StoreError, Template, VmRecord};
use crate::vms::{bad, Error, Manager, VmView};

/// `PATCH /api/v1/vms/{name}`: what to change (anything left out stays). Changes to the
/// machine (spec, cpus, memory, cmdline) apply at its next start.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmEdit {
    /// The whole spec (as many disks as it has: they are bound to its files).
    #[serde(default)]
    pub spec: Option<VmSpec>,
    #[serde(default)]
    pub cpus: Option<u32>,
    /// Bytes or with a unit (`"1G"`).
    #[serde(default, with = "spec::size::json::option")]
    #[schema(value_type = Option<u64>)]
    pub memory: Option<u64>,
    #[serde(default)]
    pub cmdline: Option<String>,
    #[serde(default)]
    pub restart: Option<RestartPolicy>,
    #[serde(default)]
    pub autostart: Option<bool>,
    #[serde(default)]
    pub autostart_order: Option<i64>,
    #[serde(default)]
    pub autostart_delay_s: Option<u64>,
}

impl VmEdit {
    fn changes_machine(&self) -> bool {
        self.spec.is_some()
            || self.cpus.is_some()
            || self.memory.is_some()
            || self.cmdline.is_some()
    }
}

/// `POST /api/v1/vms/{name}/clone`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmClone {
    /// The new VM's name.
    pub name: String,
    /// Start it once made.
    #[serde(default)]
    pub start: bool,
}

impl Manager {
    /// Changes a VM's spec or settings.
    pub fn edit(&self, name: &str, req: VmEdit) -> Result<VmView, Error> {
        let _op = self.ops();
        let mut vm = self.store().vm(name)?;
        if req.changes_machine() && (vm.desired == Desired::Suspended || vm.restore_from.is_some())
        {
            return Err(Error::Conflict(format!(
                "{name} resumes from a saved state of its machine: start it (or delete the \
                 state by stopping it) before changing the machine"
            )));
        }
        let mut spec = req.spec.clone().unwrap_or_else(|| vm.spec.clone());
        if spec.disks.len() != vm.disks.len() {
            return Err(bad(format!(
                "spec.disks: {} given; {name} has {} disk files",
                spec.disks.len(),
                vm.disks.len()
            )));
        }
        if let Some(c) = req.cpus {
            spec.cpus = c;
        }
        if let Some(m) = req.memory {
            spec.memory = m;
        }
        if let Some(c) = &req.cmdline {
            spec.boot.cmdline = c.clone();
        }
        spec.validate().map_err(|e| bad(format!("spec.{e}")))?;
        let machine_changed = spec != vm.spec;
        vm.spec = spec;
        if let Some(r) = req.restart {
            vm.restart = r;
        }
        if let Some(a) = req.autostart {
            vm.autostart = a;
        }
        if let Some(o) = req.autostart_order {
            vm.autostart_order = o;
        }
        if let Some(d) = req.autostart_delay_s {
            vm.autostart_delay_s = d;
        }
        self.store().put_vm(&vm)?;
        let note = if machine_changed && self.is_running(name) {
            "the machine's changes apply at its next start"
        } else {
            ""
        };
        self.event(name, "vm.edited", note);
        drop(_op);
        self.view(name)
    }

    /// Makes VM `req.name`, a copy of the stopped VM `name`: its own disks (thin overlays on
    /// the same template bases, holding everything `name` wrote, its snapshots' layers
    /// included), new MAC addresses, a new cloud-init instance.
    pub fn clone_vm(self: &Arc<Self>, name: &str, req: VmClone) -> Result<VmView, Error> {
        check_name(&req.name).map_err(|e| bad(format!("name: {e}")))?;
        let _op = self.ops();
        let src = self.store().vm(name)?;
        stopped(self, &src)?;
        if self.store().vm(&req.name).is_ok() {
            return Err(StoreError::Exists {
                what: "VM",
                name: req.name,
            }
            .into());
        }
        let src_dir = self.layout().vm_dir(name);
        let dir = self.layout().vm_dir(&req.name);
        if dir.exists() {
            return Err(Error::Conflict(format!("{} exists", dir.display())));
        }
        if !src.volumes.is_empty() {
            return Err(Error::Conflict(format!(
                "{name} has pool volumes attached: a clone cannot share them"
            )));
        }
        let own = &src.disks[..src.disks.len() - usize::from(src.cloud_init.is_some())];
        std::fs::create_dir_all(&dir).map_err(|e| Error::Failed(e.to_string()))?;
        let made = (|| {
            let mut spec = src.spec.clone();
            spec.disks.truncate(own.len());
            for n in &mut spec.nets {
                n.mac = Some(net::random_local().map_err(|e| Error::Failed(e.to_string()))?);
            }
            let mut disks = Vec::new();
            for (i, from) in own.iter().enumerate() {
                let to = self.layout().disk(&req.name, i);
                copy_disk(from, &to, &src_dir)
                    .map_err(|e| Error::Failed(format!("disk {i}: {e}")))?;
                disks.push(to);
            }
            let seed = src.cloud_init.clone().map(|mut s| {
                if s.hostname.as_deref() == Some(name) {
                    s.hostname = Some(req.name.clone());
                }
                s
            });
            if let Some(s) = &seed {
                self.write_seed(&req.name, s, &mut spec, &mut disks)?;
            }
            let vm = VmRecord {
                name: req.name.clone(),
                spec,
                disks,
                desired: Desired::Stopped,
                pid: None,
                created: now_s(),
                snapshots: Vec::new(),
                restore_from: None,
                cloud_init: seed,
                jail_uid: None,
                ..src.clone()
            };
            self.store().add_vm(&vm)?;
            Ok(vm)
        })();
        let vm = match made {
            Ok(vm) => vm,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        self.event(&vm.name, "vm.created", format!("a clone of {name}"));
        drop(_op);
        self.sync_hosts(&vm.networks);
        if req.start {
            self.start(&vm.name)?;
        }
        self.view(&vm.name)
    }

    /// A template from the stopped VM `vm`: its spec, and each of its disks (not its seed)
    /// flattened into a new base under STATE/templates/NAME.
    pub(crate) fn template_from_vm(&self, name: &str, vm: &str) -> Result<Template, Error> {
        let _op = self.ops();
        let src = self.store().vm(vm)?;
        stopped(self, &src)?;
        if self.store().template(name).is_ok() {
            return Err(StoreError::Exists {
                what: "template",
                name: name.into(),
            }
            .into());
        }
        let dir = self.layout().template_dir(name);
        if dir.exists() {
            return Err(Error::Conflict(format!("{} exists", dir.display())));
        }
        std::fs::create_dir_all(&dir).map_err(|e| Error::Failed(e.to_string()))?;
        let count = src.disks.len() - usize::from(src.cloud_init.is_some());
        let made = (|| {
            let mut bases = Vec::new();
            for (i, d) in src.disks[..count].iter().enumerate() {
                let base = dir.join(format!("disk-{i}.qcow2"));
                block::ops::convert(d, None, &base, block::Format::Qcow2, None, &|_, _| {})
                    .map_err(|e| Error::Failed(format!("disk {i}: {e}")))?;
                bases.push(base);
            }
            let mut spec = src.spec.clone();
            spec.disks.truncate(count);
            for n in &mut spec.nets {
                n.mac = None;
            }
            let t = Template {
                name: name.to_string(),
                spec,
                base_disks: bases,
                created: now_s(),
            };
            self.store().add_template(&t)?;
            Ok(t)
        })();
        match made {
            Ok(t) => {
                self.event(name, "template.created", format!("from VM {vm}"));
                Ok(t)
            }
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                Err(e)
            }
        }
    }
}

/// Refuses a VM that runs or resumes from a saved state.
fn stopped(m: &Manager, vm: &VmRecord) -> Result<(), Error> {
    if m.is_running(&vm.name) {
        return Err(Error::Conflict(format!(
            "{} is running: stop it first",
            vm.name
        )));
    }
    if vm.desired == Desired::Suspended || vm.restore_from.is_some() {
        return Err(Error::Conflict(format!(
            "{} is suspended: start and stop it first",
            vm.name
        )));
    }
    Ok(())
}

/// Copies VM disk `from` (an overlay whose lower layers may be in the VM's directory
/// `src_dir`: its snapshots') to `to`, an overlay on the first layer outside `src_dir` (the
/// template's base) holding all the layers above it.
fn copy_disk(from: &Path, to: &Path, src_dir: &Path) -> Result<(), String> {
    let chain = block::chain::resolve_chain(from, None).map_err(|e| e.to_string())?;
    let src_dir = std::fs::canonicalize(src_dir).map_err(|e| e.to_string())?;
    std::fs::copy(from, to).map_err(|e| e.to_string())?;
    let Some(direct) = chain.get(1) else {
        return Ok(()); // standalone
    };
    let abs = |p: &Path| -> Result<String, String> {
        Ok(std::fs::canonicalize(p)
            .map_err(|e| format!("{}: {e}", p.display()))?
            .display()
            .to_string())
    };
    // The copy's backing name was relative to `from`: name the same file from `to`.
    block::ops::rebase(
        to,
        Some(&abs(&direct.path)?),
        Some(direct.format),
        true,
        &|_, _| {},
    )
    .map_err(|e| e.to_string())?;
    let base = chain[1..]
        .iter()
        .find(|l| !std::fs::canonicalize(&l.path).is_ok_and(|p| p.starts_with(&src_dir)))
        .map(|l| (l.path.clone(), l.format));
    match base {
        Some((base, fmt)) if base != direct.path => {
            // Layers of `from`'s own snapshots sit between: fold them into the copy.
            block::ops::rebase(to, Some(&abs(&base)?), Some(fmt), false, &|_, _| {})
                .map_err(|e| e.to_string())?;
        }
        Some(_) => {}
        None => {
            // No layer outside the VM: the copy stands alone.
            let tmp = to.with_extension("flat");
            block::ops::convert(to, None, &tmp, block::Format::Qcow2, None, &|_, _| {})
                .map_err(|e| e.to_string())?;
            std::fs::rename(&tmp, to).map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}
