//! The vhost-user face of the device: adapts [`Muxer`] to
//! `vhost_user_backend::VhostUserBackend`.
//!
//! Only this module knows about vhost-user. The frontend (QEMU) owns the
//! event queue of a vhost-user-vsock device itself, so the backend serves two
//! queues: RX (index 0) and TX (index 1). All queue and host-socket work runs
//! on the single vring worker thread the library spawns; the vhost-user
//! message thread only flips flags under the muxer lock.

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use tracing::warn;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::muxer::Muxer;

/// Queue index of the device->guest queue.
pub const RX_QUEUE: u16 = 0;
/// Queue index of the guest->device queue.
pub const TX_QUEUE: u16 = 1;
const NUM_QUEUES: usize = 2;
/// Event id of the muxer's epoll fd in the worker's epoll; ids up to
/// `NUM_QUEUES` are reserved by the library.
pub const HOST_EVENT: u16 = 3;
/// QEMU uses 128-entry vsock queues; allow larger for other frontends.
const MAX_QUEUE_SIZE: usize = 1024;
/// TX/RX alternations per event before yielding to other events.
const MAX_ROUNDS: usize = 8;

type Mem = GuestMemoryAtomic<GuestMemoryMmap>;

/// Locks the muxer even if a previous holder panicked: the muxer's state is
/// consistent between calls, and a wedged device is worse than a reset one.
pub fn lock(m: &Mutex<Muxer>) -> MutexGuard<'_, Muxer> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One vhost-user connection's backend.
pub struct VsockBackend {
    muxer: Arc<Mutex<Muxer>>,
    guest_cid: u64,
    mem: Mem,
}

impl VsockBackend {
    /// `mem` must be the same object handed to `VhostUserDaemon::new`, so
    /// memory table updates are seen here.
    pub fn new(muxer: Arc<Mutex<Muxer>>, guest_cid: u64, mem: Mem) -> Self {
        VsockBackend {
            muxer,
            guest_cid,
            mem,
        }
    }

    fn run_queues(&self, mux: &mut Muxer, vrings: &[VringRwLock]) {
        let (Some(rx), Some(tx)) = (vrings.get(RX_QUEUE as usize), vrings.get(TX_QUEUE as usize))
        else {
            return;
        };
        let mem = self.mem.memory();
        for _ in 0..MAX_ROUNDS {
            with_queue(tx, |q| mux.process_tx(&*mem, q));
            let was_throttled = mux.tx_throttled();
            with_queue(rx, |q| mux.process_rx(&*mem, q));
            // Only a TX pass that stopped for RX backpressure needs another
            // round; everything else waits for the next kick or host event.
            if !was_throttled || mux.tx_throttled() {
                return;
            }
        }
        mux.wake();
    }
}

/// Runs `f` on a started and enabled queue, then notifies the guest if it
/// asked to be.
fn with_queue(vring: &VringRwLock, f: impl FnOnce(&mut Queue) -> bool) {
    let mut state = vring.get_mut();
    if !state.get_queue().ready() || !state.is_enabled() {
        return;
    }
    if !f(state.get_queue_mut()) {
        return;
    }
    // On error, notify anyway: a spurious interrupt is harmless, a lost one
    // stalls the guest.
    if state.needs_notification().unwrap_or(true) {
        if let Err(e) = state.signal_used_queue() {
            warn!("vsock: cannot signal the guest: {e}");
        }
    }
}

impl VhostUserBackend for VsockBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        // CONFIG: QEMU reads the guest CID from us; vhost-user-vsock-pci
        // has no guest-cid property.
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::RESET_DEVICE
    }

    fn reset_device(&self) {
        lock(&self.muxer).reset_all("device reset by the frontend");
    }

    fn set_event_idx(&self, _enabled: bool) {
        // The library configures the queues themselves; the muxer's
        // disable/enable-notification loops work either way.
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        // struct virtio_vsock_config { le64 guest_cid; }
        let cfg = self.guest_cid.to_le_bytes();
        let start = (offset as usize).min(cfg.len());
        let end = start.saturating_add(size as usize).min(cfg.len());
        cfg[start..end].to_vec()
    }

    fn update_memory(&self, _mem: Mem) -> io::Result<()> {
        // `self.mem` is the same atomic the library just updated.
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()
    }

    fn stop_vring(&self, _queue_index: u32) -> io::Result<()> {
        // Taking the lock also waits for an in-flight handle_event, so the
        // frontend sees a quiesced ring once GET_VRING_BASE returns.
        lock(&self.muxer).transport_stopped();
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        // Never return an error: the library stops the worker thread on one,
        // which would silently kill the device for the rest of the VM's life.
        let mut mux = lock(&self.muxer);
        match device_event {
            RX_QUEUE | TX_QUEUE => {}
            HOST_EVENT => mux.handle_host_events(),
            other => warn!("vsock: unexpected event id {other}"),
        }
        self.run_queues(&mut mux, vrings);
        Ok(())
    }
}
