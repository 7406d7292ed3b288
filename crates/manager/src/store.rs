//! What the daemon remembers: templates, VMs and events, behind [`Store`] so that a cluster
//! store (etcd) can replace the embedded one. [`SqliteStore`] keeps them in one SQLite file
//! (WAL, a schema version, every write in a transaction).

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};
use spec::vm::VmSpec;

/// Errors of a store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the database: {0}")]
    Db(#[from] rusqlite::Error),
    #[error("a record in the database is not valid: {0}")]
    Record(#[from] serde_json::Error),
    #[error("{what} {name} exists already")]
    Exists { what: &'static str, name: String },
    #[error("no {what} named {name}")]
    NotFound { what: &'static str, name: String },
    #[error("the database {path} has schema version {found}; this Vessel knows {SCHEMA}")]
    Schema { path: String, found: i64 },
}

/// A template: a VM spec to copy and, for each of its disks, the base image a new VM's thin
/// overlay sits on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Template {
    pub name: String,
    pub spec: VmSpec,
    /// One base image per disk of the spec (absolute paths).
    #[schema(value_type = Vec<String>)]
    pub base_disks: Vec<PathBuf>,
    /// Seconds since the epoch.
    pub created: u64,
}

/// A managed network as the daemon keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NetworkRecord {
    #[serde(flatten)]
    pub def: netmgr::NetworkDef,
    /// Whether it should be up (started, and not stopped since).
    pub active: bool,
    /// Seconds since the epoch.
    pub created: u64,
}

/// A storage pool: a directory whose image files are its volumes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StoragePool {
    pub name: String,
    /// Its directory (absolute).
    #[schema(value_type = String)]
    pub path: PathBuf,
    /// Seconds since the epoch.
    pub created: u64,
}

/// What a VM should be doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Desired {
    Running,
    Stopped,
    /// Saved to disk (memory, devices, disks) and stopped: its next start restores it
    /// (a host going down; `vessel vm suspend`).
    Suspended,
}

/// When the daemon starts a VM whose process ended without being asked to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// Never: the VM is marked crashed.
    Never,
    /// When it failed (exit code not 0, a signal, a crash): at most 5 times in 60 s.
    #[default]
    OnFailure,
    /// Whenever it ends, unless it was stopped through the daemon (same rate limit).
    Always,
}

/// A VM the daemon keeps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VmRecord {
    pub name: String,
    /// The template it was made from.
    pub template: String,
    pub spec: VmSpec,
    /// Its disks' files (overlays on the template's bases), one per disk of the spec.
    #[schema(value_type = Vec<String>)]
    pub disks: Vec<PathBuf>,
    /// The managed network of each NIC of its spec (`spec.nets[i]` is on `networks[i]`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub networks: Vec<String>,
    /// Those of `disks` that are pool volumes attached to it: they outlive it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schema(value_type = Vec<String>)]
    pub volumes: Vec<PathBuf>,
    pub desired: Desired,
    pub restart: RestartPolicy,
    /// Started when the daemon starts (in `autostart_order`, then by name).
    pub autostart: bool,
    pub autostart_order: i64,
    /// Seconds the daemon waits after autostarting it before it starts the next VM.
    #[serde(default)]
    pub autostart_delay_s: u64,
    /// The process running it, while it runs.
    pub pid: Option<u32>,
    /// Seconds since the epoch.
    pub created: u64,
    /// Its snapshots (VM and disks together), oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub snapshots: Vec<Snapshot>,
    /// The user and group (the same id) its jailed VMM runs as, its own (`--vm-uids`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jail_uid: Option<u32>,
    /// Where its disks and snapshots are when that is not this daemon's directory for it (a
    /// VM that migrated here from another daemon, which left them there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub home: Option<PathBuf>,
    /// What its cloud-init seed (its last disk) holds, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_init: Option<crate::seed::Seed>,
    /// The snapshot its next start restores, once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub restore_from: Option<PathBuf>,
}

/// A snapshot of a VM: its memory and devices, and its disks frozen at the same instant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Snapshot {
    pub name: String,
    /// Its directory (state and memory files).
    #[schema(value_type = String)]
    pub dir: PathBuf,
    /// Seconds since the epoch.
    pub created: u64,
}

/// Something that happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Event {
    /// Increasing; `vessel events --since ID` follows on from one.
    pub id: i64,
    /// Milliseconds since the epoch.
    pub time_ms: u64,
    /// The VM (or template) it concerns; empty for the daemon itself.
    pub subject: String,
    /// `vm.created`, `vm.started`, `vm.stopped`, `vm.crashed`, `vm.restarted`, ...
    pub kind: String,
    pub message: String,
}

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Everything.
    Admin,
    /// Look only: GET requests.
    ReadOnly,
}

/// A bearer token for the daemon's TCP listener; only its SHA-256 is kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Token {
    pub name: String,
    pub role: Role,
    /// The secret's SHA-256, hex.
    #[serde(skip_serializing, default)]
    #[schema(ignore)]
    pub hash: String,
    /// Seconds since the epoch.
    pub created: u64,
}

/// The daemon's memory.
pub trait Store: Send + Sync {
    fn add_token(&self, t: &Token) -> Result<(), StoreError>;
    fn tokens(&self) -> Result<Vec<Token>, StoreError>;
    fn delete_token(&self, name: &str) -> Result<(), StoreError>;
    fn add_template(&self, t: &Template) -> Result<(), StoreError>;
    fn template(&self, name: &str) -> Result<Template, StoreError>;
    fn templates(&self) -> Result<Vec<Template>, StoreError>;
    fn delete_template(&self, name: &str) -> Result<(), StoreError>;
    fn add_network(&self, n: &NetworkRecord) -> Result<(), StoreError>;
    fn put_network(&self, n: &NetworkRecord) -> Result<(), StoreError>;
    fn network(&self, name: &str) -> Result<NetworkRecord, StoreError>;
    fn networks(&self) -> Result<Vec<NetworkRecord>, StoreError>;
    fn delete_network(&self, name: &str) -> Result<(), StoreError>;
    fn add_pool(&self, p: &StoragePool) -> Result<(), StoreError>;
    fn pool(&self, name: &str) -> Result<StoragePool, StoreError>;
    fn pools(&self) -> Result<Vec<StoragePool>, StoreError>;
    fn delete_pool(&self, name: &str) -> Result<(), StoreError>;
    fn add_vm(&self, vm: &VmRecord) -> Result<(), StoreError>;
    /// Replaces the VM's record (it must exist).
    fn put_vm(&self, vm: &VmRecord) -> Result<(), StoreError>;
    fn vm(&self, name: &str) -> Result<VmRecord, StoreError>;
    fn vms(&self) -> Result<Vec<VmRecord>, StoreError>;
    fn delete_vm(&self, name: &str) -> Result<(), StoreError>;
    /// Records an event; returns it with its id and time.
    fn add_event(&self, subject: &str, kind: &str, message: &str) -> Result<Event, StoreError>;
    /// Events after `since`, oldest first, at most `limit`.
    fn events(&self, since: i64, limit: usize) -> Result<Vec<Event>, StoreError>;
}

/// The schema this Vessel writes.
const SCHEMA: i64 = 3;

/// What takes the schema from each version to the next (index 0: from nothing to 1).
const MIGRATIONS: [&str; SCHEMA as usize] = [
    "CREATE TABLE templates (name TEXT PRIMARY KEY, body TEXT NOT NULL);
     CREATE TABLE vms (name TEXT PRIMARY KEY, body TEXT NOT NULL);
     CREATE TABLE tokens (name TEXT PRIMARY KEY, body TEXT NOT NULL);
     CREATE TABLE events (id INTEGER PRIMARY KEY AUTOINCREMENT,
         time_ms INTEGER NOT NULL, subject TEXT NOT NULL, kind TEXT NOT NULL,
         message TEXT NOT NULL);",
    "CREATE TABLE pools (name TEXT PRIMARY KEY, body TEXT NOT NULL);",
    "CREATE TABLE networks (name TEXT PRIMARY KEY, body TEXT NOT NULL);",
];

/// Events kept: older ones are dropped as new ones come.
const EVENTS_KEPT: i64 = 10_000;

/// The store in one SQLite file.
pub struct SqliteStore {
    db: Mutex<Connection>,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Seconds since the epoch.
pub fn now_s() -> u64 {
    now_ms() / 1000
}

impl SqliteStore {
    /// Opens (or creates) the database at `path`.
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        let db = Connection::open(path)?;
        db.pragma_update(None, "journal_mode", "WAL")?;
        db.pragma_update(None, "synchronous", "FULL")?;
        db.busy_timeout(std::time::Duration::from_secs(5))?;
        let version: i64 = db.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if !(0..=SCHEMA).contains(&version) {
            return Err(StoreError::Schema {
                path: path.display().to_string(),
                found: version,
            });
        }
        for (i, step) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            db.execute_batch(&format!(
                "BEGIN; {step} PRAGMA user_version = {}; COMMIT;",
                i + 1
            ))?;
        }
        Ok(SqliteStore { db: Mutex::new(db) })
    }

    fn db(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.db.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn insert<T: Serialize>(
        &self,
        table: &str,
        what: &'static str,
        name: &str,
        body: &T,
    ) -> Result<(), StoreError> {
        let body = serde_json::to_string(body)?;
        let sql = format!("INSERT INTO {table} (name, body) VALUES (?1, ?2)");
        match self.db().execute(&sql, params![name, body]) {
            Ok(_) => Ok(()),
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                Err(StoreError::Exists {
                    what,
                    name: name.to_string(),
                })
            }
            Err(e) => Err(e.into()),
        }
    }

    fn replace<T: Serialize>(
        &self,
        table: &str,
        what: &'static str,
        name: &str,
        body: &T,
    ) -> Result<(), StoreError> {
        let body = serde_json::to_string(body)?;
        let sql = format!("UPDATE {table} SET body = ?2 WHERE name = ?1");
        if self.db().execute(&sql, params![name, body])? == 0 {
            return Err(StoreError::NotFound {
                what,
                name: name.to_string(),
            });
        }
        Ok(())
    }

    fn get<T: for<'de> Deserialize<'de>>(
        &self,
        table: &str,
        what: &'static str,
        name: &str,
    ) -> Result<T, StoreError> {
        let sql = format!("SELECT body FROM {table} WHERE name = ?1");
        let body: Option<String> = self
            .db()
            .query_row(&sql, params![name], |r| r.get(0))
            .optional()?;
        let body = body.ok_or_else(|| StoreError::NotFound {
            what,
            name: name.to_string(),
        })?;
        Ok(serde_json::from_str(&body)?)
    }

    fn all<T: for<'de> Deserialize<'de>>(&self, table: &str) -> Result<Vec<T>, StoreError> {
        let db = self.db();
        let mut q = db.prepare(&format!("SELECT body FROM {table} ORDER BY name"))?;
        let bodies = q
            .query_map([], |r| r.get::<_, String>(0))?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(bodies
            .iter()
            .map(|b| serde_json::from_str(b))
            .collect::<Result<_, _>>()?)
    }

    fn delete(&self, table: &str, what: &'static str, name: &str) -> Result<(), StoreError> {
        let n = self.db().execute(
            &format!("DELETE FROM {table} WHERE name = ?1"),
            params![name],
        )?;
        if n == 0 {
            return Err(StoreError::NotFound {
                what,
                name: name.to_string(),
            });
        }
        Ok(())
    }
}

/// A token as stored: with its hash.
#[derive(Serialize, Deserialize)]
struct StoredToken {
    name: String,
    role: Role,
    hash: String,
    created: u64,
}

impl Store for SqliteStore {
    fn add_token(&self, t: &Token) -> Result<(), StoreError> {
        let stored = StoredToken {
            name: t.name.clone(),
            role: t.role,
            hash: t.hash.clone(),
            created: t.created,
        };
        self.insert("tokens", "token", &t.name, &stored)
    }
    fn tokens(&self) -> Result<Vec<Token>, StoreError> {
        let all: Vec<StoredToken> = self.all("tokens")?;
        Ok(all
            .into_iter()
            .map(|t| Token {
                name: t.name,
                role: t.role,
                hash: t.hash,
                created: t.created,
            })
            .collect())
    }
    fn delete_token(&self, name: &str) -> Result<(), StoreError> {
        self.delete("tokens", "token", name)
    }
    fn add_template(&self, t: &Template) -> Result<(), StoreError> {
        self.insert("templates", "template", &t.name, t)
    }
    fn template(&self, name: &str) -> Result<Template, StoreError> {
        self.get("templates", "template", name)
    }
    fn templates(&self) -> Result<Vec<Template>, StoreError> {
        self.all("templates")
    }
    fn delete_template(&self, name: &str) -> Result<(), StoreError> {
        self.delete("templates", "template", name)
    }
    fn add_network(&self, n: &NetworkRecord) -> Result<(), StoreError> {
        self.insert("networks", "network", &n.def.name, n)
    }
    fn put_network(&self, n: &NetworkRecord) -> Result<(), StoreError> {
        self.replace("networks", "network", &n.def.name, n)
    }
    fn network(&self, name: &str) -> Result<NetworkRecord, StoreError> {
        self.get("networks", "network", name)
    }
    fn networks(&self) -> Result<Vec<NetworkRecord>, StoreError> {
        self.all("networks")
    }
    fn delete_network(&self, name: &str) -> Result<(), StoreError> {
        self.delete("networks", "network", name)
    }
    fn add_pool(&self, p: &StoragePool) -> Result<(), StoreError> {
        self.insert("pools", "pool", &p.name, p)
    }
    fn pool(&self, name: &str) -> Result<StoragePool, StoreError> {
        self.get("pools", "pool", name)
    }
    fn pools(&self) -> Result<Vec<StoragePool>, StoreError> {
        self.all("pools")
    }
    fn delete_pool(&self, name: &str) -> Result<(), StoreError> {
        self.delete("pools", "pool", name)
    }
    fn add_vm(&self, vm: &VmRecord) -> Result<(), StoreError> {
        self.insert("vms", "VM", &vm.name, vm)
    }
    fn put_vm(&self, vm: &VmRecord) -> Result<(), StoreError> {
        self.replace("vms", "VM", &vm.name, vm)
    }
    fn vm(&self, name: &str) -> Result<VmRecord, StoreError> {
        self.get("vms", "VM", name)
    }
    fn vms(&self) -> Result<Vec<VmRecord>, StoreError> {
        self.all("vms")
    }
    fn delete_vm(&self, name: &str) -> Result<(), StoreError> {
        self.delete("vms", "VM", name)
    }
    fn add_event(&self, subject: &str, kind: &str, message: &str) -> Result<Event, StoreError> {
        let time_ms = now_ms();
        let mut db = self.db();
        let tx = db.transaction()?;
        tx.execute(
            "INSERT INTO events (time_ms, subject, kind, message) VALUES (?1, ?2, ?3, ?4)",
            params![time_ms as i64, subject, kind, message],
        )?;
        let id = tx.last_insert_rowid();
        tx.execute(
            "DELETE FROM events WHERE id <= ?1",
            params![id - EVENTS_KEPT],
        )?;
        tx.commit()?;
        Ok(Event {
            id,
            time_ms,
            subject: subject.to_string(),
            kind: kind.to_string(),
            message: message.to_string(),
        })
    }
    fn events(&self, since: i64, limit: usize) -> Result<Vec<Event>, StoreError> {
        let db = self.db();
        let mut q = db.prepare(
            "SELECT id, time_ms, subject, kind, message FROM events WHERE id > ?1
             ORDER BY id LIMIT ?2",
        )?;
        let rows = q.query_map(params![since, limit as i64], |r| {
            Ok(Event {
                id: r.get(0)?,
                time_ms: r.get::<_, i64>(1)? as u64,
                subject: r.get(2)?,
                kind: r.get(3)?,
                message: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(name: &str) -> VmRecord {
        VmRecord {
            name: name.into(),
            template: "t".into(),
            spec: VmSpec::default(),
            disks: vec!["/d".into()],
            desired: Desired::Running,
            restart: RestartPolicy::OnFailure,
            autostart: false,
            autostart_order: 0,
            autostart_delay_s: 0,
            cloud_init: None,
            volumes: Vec::new(),
            networks: Vec::new(),
            home: None,
            jail_uid: None,
            pid: Some(7),
            created: 1,
            snapshots: Vec::new(),
            restore_from: None,
        }
    }

    #[test]
    fn records_survive_a_reopen_and_names_are_unique() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("vessel.db");
        {
            let s = SqliteStore::open(&path).unwrap();
            s.add_template(&Template {
                name: "t".into(),
                spec: VmSpec::default(),
                base_disks: vec![],
                created: 1,
            })
            .unwrap();
            s.add_vm(&vm("b")).unwrap();
            s.add_vm(&vm("a")).unwrap();
            assert!(matches!(s.add_vm(&vm("a")), Err(StoreError::Exists { .. })));
            let mut a = s.vm("a").unwrap();
            a.desired = Desired::Stopped;
            a.pid = None;
            s.put_vm(&a).unwrap();
            s.add_event("a", "vm.created", "from t").unwrap();
        }
        let s = SqliteStore::open(&path).unwrap();
        let names: Vec<String> = s.vms().unwrap().into_iter().map(|v| v.name).collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(s.vm("a").unwrap().desired, Desired::Stopped);
        assert_eq!(s.template("t").unwrap().name, "t");
        let e = s.events(0, 10).unwrap();
        assert_eq!((e.len(), e[0].kind.as_str()), (1, "vm.created"));
        let second = s.add_event("b", "vm.started", "").unwrap();
        assert_eq!(s.events(e[0].id, 10).unwrap(), [second]);
        s.delete_vm("a").unwrap();
        assert!(matches!(s.vm("a"), Err(StoreError::NotFound { .. })));
        assert!(matches!(s.delete_vm("a"), Err(StoreError::NotFound { .. })));
        assert!(matches!(
            s.put_vm(&vm("zz")),
            Err(StoreError::NotFound { .. })
        ));
    }

    #[test]
    fn a_version_1_database_is_brought_up_to_date() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("vessel.db");
        {
            let db = Connection::open(&path).unwrap();
            db.execute_batch(&format!("{} PRAGMA user_version = 1;", MIGRATIONS[0]))
                .unwrap();
            // A record as version 1 wrote it: without the fields added since.
            let mut old = serde_json::to_value(vm("old")).unwrap();
            old.as_object_mut().unwrap().remove("autostart_delay_s");
            db.execute(
                "INSERT INTO vms (name, body) VALUES ('old', ?1)",
                params![old.to_string()],
            )
            .unwrap();
        }
        let s = SqliteStore::open(&path).unwrap();
        assert_eq!(s.vm("old").unwrap().autostart_delay_s, 0);
        let p = StoragePool {
            name: "p".into(),
            path: "/srv/p".into(),
            created: 1,
        };
        s.add_pool(&p).unwrap();
        assert_eq!(s.pools().unwrap(), [p]);
        drop(s);
        let version: i64 = Connection::open(&path)
            .unwrap()
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA);
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("vessel.db");
        drop(SqliteStore::open(&path).unwrap());
        Connection::open(&path)
            .unwrap()
            .pragma_update(None, "user_version", 9)
            .unwrap();
        assert!(matches!(
            SqliteStore::open(&path),
            Err(StoreError::Schema { found: 9, .. })
        ));
    }
}
