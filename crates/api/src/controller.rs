//! The trait the VMM implements to be driven by the API.

use crate::types::{
    ApiError, BalloonInfo, BalloonSetRequest, MigrateReceiveRequest, MigrateReceiveResponse,
    MigrateSendRequest, MigrationStatus, RestoreRequest, SnapshotRequest, VmCounters, VmDocument,
    VmInfo,
};

/// The message of `vm.boot` to a process that has a VM.
pub const HAS_VM: &str =
    "this process has a VM already: vm.boot starts one in an empty `vessel serve`";

/// The message of a balloon request to a VM without a balloon.
pub const NO_BALLOON: &str = "this VM has no balloon (start it with --balloon)";

/// The message of a counters request to a process without a VM.
pub const NO_COUNTERS: &str = "no VM here: nothing is counted";

/// What the API server asks of a VM.
///
/// Methods are synchronous: the VMM is made of threads. The server calls each one on tokio's
/// blocking pool, so a slow call (a snapshot) delays only its own request, and several calls
/// may run at once: the implementation serializes what must be serialized. A method that
/// panics fails its request with a 500; the server and the VM carry on.
///
/// Errors carry their HTTP status: [`ApiError::conflict`] when the VM's state forbids the
/// request (pausing a paused VM), [`ApiError::bad_request`] for invalid arguments,
/// [`ApiError::not_implemented`] for what this VM cannot do, [`ApiError::internal`] for
/// failures. Only requests that parsed and validated reach the controller.
pub trait VmController: Send + Sync + 'static {
    /// State, size, devices, version.
    fn info(&self) -> Result<VmInfo, ApiError>;
    /// Builds and starts the VM `doc` describes in this empty process (`vessel serve`);
    /// returns once it runs. A spec or bindings that cannot be a VM is a 400 naming the
    /// field. By default: a 409, there is a VM already.
    fn boot(&self, doc: VmDocument) -> Result<(), ApiError> {
        let _ = doc;
        Err(ApiError::conflict(HAS_VM))
    }
    /// Parks every vCPU (at an instruction boundary); returns once they are parked.
    fn pause(&self) -> Result<(), ApiError>;
    /// Releases the parked vCPUs.
    fn resume(&self) -> Result<(), ApiError>;
    /// Presses the ACPI power button; returns at once (the guest decides when to power off).
    fn shutdown(&self) -> Result<(), ApiError>;
    /// Resets the machine (ends `vessel run` with the reset exit code).
    fn reset(&self) -> Result<(), ApiError>;
    /// Writes a snapshot of the paused VM; returns when it is complete.
    fn snapshot(&self, req: SnapshotRequest) -> Result<(), ApiError>;
    /// Restores a snapshot into this (not yet started, or paused) VM.
    fn restore(&self, req: RestoreRequest) -> Result<(), ApiError>;
    /// Starts a live migration to `req.to`; returns once it has started.
    fn migrate_send(&self, req: MigrateSendRequest) -> Result<(), ApiError>;
    /// Starts listening for an incoming migration; returns once listening, with the
    /// migration's token (the request's, or a generated one).
    fn migrate_receive(
        &self,
        req: MigrateReceiveRequest,
    ) -> Result<MigrateReceiveResponse, ApiError>;
    /// Progress of the current (or last) migration.
    fn migration_status(&self) -> Result<MigrationStatus, ApiError>;
    /// Cancels the running migration; the source VM keeps running.
    fn migrate_cancel(&self) -> Result<(), ApiError>;
    /// The balloon's target, actual size and the guest's last statistics (a fresh report is
    /// requested, and arrives for a later call). By default: a 409, no balloon.
    fn balloon(&self) -> Result<BalloonInfo, ApiError> {
        Err(ApiError::conflict(NO_BALLOON))
    }
    /// Sets the balloon's target; a target not below the guest memory is a 400. By default: a
    /// 409, no balloon.
    fn set_balloon(&self, req: BalloonSetRequest) -> Result<(), ApiError> {
        let _ = req;
        Err(ApiError::conflict(NO_BALLOON))
    }
    /// The vCPUs', disks' and network devices' counters; cheap (atomic loads), and answered
    /// while the VM is paused. By default: a 409, no VM.
    fn counters(&self) -> Result<VmCounters, ApiError> {
        Err(ApiError::conflict(NO_COUNTERS))
    }
}
