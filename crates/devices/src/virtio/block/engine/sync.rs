//! The synchronous engine: blocking calls into the backend on the queue's worker thread, one
//! request at a time (`engine=sync`).

use std::os::fd::RawFd;
use std::sync::Arc;

use block::DiskBackend;
use guestmem::GuestMem;

use super::{execute_blocking, Bounce, Completion, Engine, Op};

pub(crate) struct SyncEngine {
    disk: Arc<dyn DiskBackend>,
    mem: GuestMem,
    bounce: Bounce,
    done: Vec<Completion>,
}

impl SyncEngine {
    pub(crate) fn new(disk: Arc<dyn DiskBackend>, mem: GuestMem) -> Self {
        SyncEngine {
            disk,
            mem,
            bounce: Bounce::default(),
            done: Vec::new(),
        }
    }
}

impl Engine for SyncEngine {
    fn submit(&mut self, token: usize, op: Op) {
        let result = execute_blocking(&*self.disk, &self.mem, &op, &mut self.bounce);
        self.done.push(Completion { token, result });
    }

    fn completion_fd(&self) -> Option<RawFd> {
        None
    }

    fn reap(&mut self, out: &mut Vec<Completion>) {
        out.append(&mut self.done);
    }
}
