//! cloud-init's NoCloud seed, made by Vessel itself: a small FAT disk labelled `CIDATA` with
//! `meta-data` (instance id, hostname) and `user-data` (the user's own, or a `#cloud-config`
//! with the hostname and SSH keys). cloud-init finds it by its label; a guest without
//! cloud-init can mount it (`mount -L CIDATA`) and read the same files. No mkisofs, no mtools.

use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// What goes into a seed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Seed {
    /// The guest's hostname (`local-hostname`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// SSH public keys for the default user (`ssh_authorized_keys`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ssh_keys: Vec<String>,
    /// The whole user-data instead (a `#cloud-config` or a script); hostname and keys then
    /// go in meta-data only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_data: Option<String>,
}

impl Seed {
    pub fn is_empty(&self) -> bool {
        self.hostname.is_none() && self.ssh_keys.is_empty() && self.user_data.is_none()
    }

    /// Checks what would break the files' syntax.
    pub fn check(&self) -> Result<(), String> {
        if let Some(h) = &self.hostname {
            let ok = !h.is_empty()
                && h.len() <= 253
                && h.split('.').all(|l| {
                    !l.is_empty()
                        && l.len() <= 63
                        && !l.starts_with('-')
                        && !l.ends_with('-')
                        && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                });
            if !ok {
                return Err(format!("hostname: '{h}' is not a host name"));
            }
        }
        for (i, k) in self.ssh_keys.iter().enumerate() {
            if k.contains('\n') || k.split_whitespace().count() < 2 {
                return Err(format!(
                    "ssh_keys[{i}]: expected one line such as 'ssh-ed25519 AAAA... user@host'"
                ));
            }
        }
        Ok(())
    }

    /// `meta-data`.
    pub fn meta_data(&self, instance_id: &str) -> String {
        let mut s = format!("instance-id: {instance_id}\n");
        if let Some(h) = &self.hostname {
            s.push_str(&format!("local-hostname: {h}\n"));
        }
        if !self.ssh_keys.is_empty() {
            s.push_str("public-keys:\n");
            for k in &self.ssh_keys {
                s.push_str(&format!("  - {}\n", quote(k)));
            }
        }
        s
    }

    /// `user-data`.
    pub fn user_data(&self) -> String {
        if let Some(u) = &self.user_data {
            return u.clone();
        }
        let mut s = String::from("#cloud-config\n");
        if let Some(h) = &self.hostname {
            s.push_str(&format!("hostname: {h}\n"));
        }
        if !self.ssh_keys.is_empty() {
            s.push_str("ssh_authorized_keys:\n");
            for k in &self.ssh_keys {
                s.push_str(&format!("  - {}\n", quote(k)));
            }
        }
        s
    }

    /// Writes the seed disk to `path` (1 MiB, FAT12, label `CIDATA`).
    pub fn write(&self, path: &Path, instance_id: &str) -> std::io::Result<()> {
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)?;
        file.set_len(1 << 20)?;
        fatfs::format_volume(
            &mut file,
            fatfs::FormatVolumeOptions::new()
                .volume_label(*b"CIDATA     ")
                .volume_id(volume_id(instance_id))
                .fat_type(fatfs::FatType::Fat12),
        )?;
        {
            let fs = fatfs::FileSystem::new(&mut file, fatfs::FsOptions::new())?;
            for (name, text) in [
                ("meta-data", self.meta_data(instance_id)),
                ("user-data", self.user_data()),
            ] {
                fs.root_dir()
                    .create_file(name)?
                    .write_all(text.as_bytes())?;
            }
            fs.unmount()?;
        }
        file.sync_all()
    }
}

/// The volume serial number: from the instance id (each VM's seed its own).
fn volume_id(instance_id: &str) -> u32 {
    let d = ring::digest::digest(&ring::digest::SHA256, instance_id.as_bytes());
    let b = d.as_ref();
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// A YAML double-quoted string.
fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn the_seed_is_a_cidata_fat_disk_with_the_files() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("seed.img");
        let seed = Seed {
            hostname: Some("web1".into()),
            ssh_keys: vec!["ssh-ed25519 AAAAC3Nza me@host".into()],
            user_data: None,
        };
        seed.check().unwrap();
        seed.write(&path, "vessel-web1-1").unwrap();
        let mut f = std::fs::File::open(&path).unwrap();
        let fs = fatfs::FileSystem::new(&mut f, fatfs::FsOptions::new()).unwrap();
        assert_eq!(fs.volume_label().trim_end(), "CIDATA");
        let read = |name: &str| {
            let mut s = String::new();
            fs.root_dir()
                .open_file(name)
                .unwrap()
                .read_to_string(&mut s)
                .unwrap();
            s
        };
        let meta = read("meta-data");
        assert!(meta.contains("instance-id: vessel-web1-1\n"), "{meta}");
        assert!(meta.contains("local-hostname: web1\n"), "{meta}");
        let user = read("user-data");
        assert!(
            user.starts_with("#cloud-config\nhostname: web1\n"),
            "{user}"
        );
        assert!(
            user.contains("  - \"ssh-ed25519 AAAAC3Nza me@host\"\n"),
            "{user}"
        );
        // An existing file is never overwritten.
        assert!(seed.write(&path, "x").is_err());
    }

    #[test]
    fn bad_hostnames_and_keys_are_refused() {
        for h in ["", "-a", "a_b", "a..b", "a b", &"x".repeat(64)] {
            let s = Seed {
                hostname: Some(h.into()),
                ..Seed::default()
            };
            assert!(s.check().is_err(), "{h}");
        }
        let s = Seed {
            ssh_keys: vec!["justonefield".into()],
            ..Seed::default()
        };
        assert!(s.check().unwrap_err().starts_with("ssh_keys[0]"));
        let s = Seed {
            user_data: Some("#!/bin/sh\necho hi\n".into()),
            hostname: Some("h".into()),
            ..Seed::default()
        };
        assert_eq!(s.user_data(), "#!/bin/sh\necho hi\n");
        assert!(s.meta_data("i").contains("local-hostname: h"));
    }
}
