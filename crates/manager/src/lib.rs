//! `vessel daemon`: the manager of a host's VMs.
//!
//! - [`store`]: templates, VMs and events behind the [`store::Store`] trait; SQLite here.
//! - [`vms`]: the [`vms::Manager`]: templates, VMs made from them (thin overlays), their
//!   processes (started, watched, stopped, restarted by policy, adopted again after a daemon
//!   restart), events.
//! - [`edit`]: `vm edit`, `vm clone`, templates made from a stopped VM.
//! - [`storage`], [`storage_cli`]: storage pools (directories) and their volumes; `vessel
//!   pool`, `vessel volume`.
//! - [`networks`], [`net_cli`]: the managed networks (`vessel net`, [`netmgr`]) and the VMs'
//!   NICs on them (taps, names, addresses).
//! - [`process`]: a VM's `vessel run` process, watched through a pidfd.
//! - [`jailing`]: how VM processes are jailed (one user for all, or one each).
//! - [`layout`]: where state, disks, logs and sockets live.
//! - [`seed`]: cloud-init's NoCloud seed disk (`CIDATA`), made without outside tools.
//! - [`server`], [`client`]: the REST API on a Unix socket (axum), and optionally on TCP with
//!   TLS and bearer tokens ([`auth`]: admin and read-only roles); its client (hyper).
//! - [`cli`], [`console`]: `vessel daemon`, `vessel vm`, `vessel template`, `vessel events`.
//!
//! The manager talks to VMs only through their processes and their own API (`api`), never
//! through the VMM's internals.

pub mod auth;
pub mod cli;
pub mod client;
pub mod console;
pub mod edit;
pub mod jailing;
pub mod layout;
pub mod metrics;
pub mod migrate;
pub mod net_cli;
pub mod networks;
pub mod process;
pub mod seed;
pub mod server;
pub mod storage;
pub mod storage_cli;
pub mod store;
pub mod vms;
