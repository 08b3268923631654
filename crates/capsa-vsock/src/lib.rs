//! An in-process vhost-user vsock device backend with a hybrid (Unix socket)
//! host side.
//!
//! QEMU's `vhost-user-vsock-pci` device hands its two data virtqueues to this
//! backend over a vhost-user socket; guest memory is shared (`memfd`,
//! `share=on`). Host programs reach the guest through one Unix socket per VM,
//! following the hybrid-vsock convention of Firecracker and cloud-hypervisor:
//!
//! * **host -> guest**: connect to `uds_path`, send `CONNECT <port>\n`,
//!   receive `OK <host_port>\n` once the guest accepted (the stream is closed
//!   if it refused); from then on the stream is a byte pipe to the guest port.
//! * **guest -> host**: a guest connecting to CID 2 port `N` is connected to
//!   the Unix socket `<uds_path>_N`; if nobody listens there the guest gets a
//!   reset (`ECONNRESET`).
//!
//! QEMU needs shared guest memory and the chardev/device pair; there is no
//! `guest-cid` property on `vhost-user-vsock-pci` (QEMU 7.2), the guest
//! reads its CID from this backend's config space:
//!
//! ```text
//! -object memory-backend-memfd,id=mem,size=256M,share=on -M q35,memory-backend=mem
//! -chardev socket,id=vsock0,path=<vhost_socket> -device vhost-user-vsock-pci,chardev=vsock0
//! ```
//!
//! Spawn the device before QEMU starts (QEMU connects at startup) and shut
//! it down after QEMU exits.
//!
//! ```no_run
//! use capsa_vsock::{VsockConfig, VsockDevice};
//! let mut config = VsockConfig::new("/run/vm1/vhost-vsock.sock", "/run/vm1/vsock");
//! config.guest_cid = 3;
//! let device = VsockDevice::spawn(config)?;
//! // qemu-system-x86_64 ... -chardev socket,id=vsock0,path=/run/vm1/vhost-vsock.sock \
//! //     -device vhost-user-vsock-pci,chardev=vsock0
//! device.shutdown();
//! device.join()?;
//! # Ok::<(), capsa_vsock::VsockError>(())
//! ```
//!
//! # Design
//!
//! * [`packet`]: the 44-byte header, parsed and classified without I/O.
//! * `chain`: scatter/gather over one descriptor chain, every length checked.
//! * `conn`: one connection's state machine (Connecting, Established,
//!   Closing) and credit accounting in both directions.
//! * `muxer`: routes between the queues and the host sockets; independent of
//!   vhost-user so a future native KVM transport can drive it directly.
//! * `backend`/`device`: the vhost-user adapter and the serving thread.
//!
//! Threads: one `capsa-vsock` thread accepts the frontend and runs the
//! vhost-user message loop (via `vhost-user-backend`, one daemon per frontend
//! connection); one vring worker thread per daemon does all data-path work.
//! The muxer's epoll fd (host listener, host streams, a deadline timer) is
//! registered in the worker's epoll next to the queue kicks, so queues and
//! sockets are served from one thread without locks contending. Host sockets
//! are non-blocking; nothing on the data path blocks, so a vCPU kicking a
//! queue never waits on a host program.
//!
//! Transport restarts (VM pause, guest driver reset, snapshot load) stop the
//! queues. Connections survive a pause; after any restart every connection
//! is probed with a CREDIT_REQUEST, which a guest that forgot the connection
//! answers with a reset, closing the host side cleanly. A frontend
//! disconnect or vhost-user `RESET_DEVICE` drops all connections at once, as
//! does [`VsockDevice::reset_connections`] (call it after restoring a
//! snapshot).
//!
//! # Threat model
//!
//! The guest is untrusted. It controls the descriptor tables, every byte of
//! every header, the timing and volume of packets, and what it claims in
//! credit fields. Host clients connecting to `uds_path` are trusted to the
//! extent that they may open guest connections but are still bounded.
//!
//! * **Memory safety / panics**: guest memory is only touched through
//!   vm-memory's bounds-checked accessors; header fields are decoded from a
//!   fixed-size copy; all arithmetic on guest values is checked, saturating
//!   or explicitly wrapping (credit counters). No `unwrap` on guest data.
//! * **Descriptor abuse**: chains longer than 64 descriptors, loops (bounded
//!   by the queue size in virtio-queue as well), wrong-direction descriptors,
//!   out-of-memory addresses, truncated headers and `len` fields larger than
//!   the buffer are dropped (and the connection reset when stream bytes would
//!   be lost); buffers are always returned to the guest.
//! * **Unbounded allocation**: payloads are capped at 64 KiB per packet;
//!   guest->host buffering per connection is capped by our advertised
//!   `buf_alloc`, which the guest must respect (violators are reset);
//!   host->guest staging is capped at 64 KiB; connections (including
//!   half-open host handshakes) are capped by
//!   [`Limits::max_connections`]; queued resets are capped by pausing TX
//!   processing until the guest consumes them. Worst case memory is about
//!   `max_connections * (buffer_size + 64 KiB)`.
//! * **Protocol abuse**: unknown ops, non-stream types, wrong destination
//!   CID get a reset; spoofed source CIDs and resets are dropped without an
//!   answer (no reflection, no reset ping-pong). Packets that make no sense in
//!   the connection's state reset it.
//! * **Stalling**: host connects the guest never answers and closes whose
//!   data the host never reads time out; host clients that never send their
//!   `CONNECT` line time out.
//! * **Denial of service** against the host is limited to the above bounds
//!   and to the worker thread's CPU time, which the guest could also spend
//!   by simply kicking queues.
//!
//! Out of scope: confidentiality between host clients (anyone who can open
//! `uds_path` can reach every guest port; protect it with file permissions)
//! and the vhost-user frontend itself, which is trusted (it maps all guest
//! memory anyway).

#![deny(missing_docs)]

mod backend;
mod chain;
mod config;
mod conn;
mod device;
mod error;
mod muxer;
pub mod packet;
pub mod seccomp;

pub use config::{Limits, VsockConfig, DEFAULT_GUEST_CID};
pub use device::{host_port_path, VsockDevice, VsockStats};
pub use error::VsockError;

/// Device-core access for tests and for embedding the data path in another
/// virtio transport (a native KVM backend). Not a stable API.
#[doc(hidden)]
pub mod testing {
    pub use crate::chain::MAX_CHAIN_DESCRIPTORS;
    pub use crate::muxer::{Muxer, SharedStats};
}
