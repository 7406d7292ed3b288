//! Host networking for Vessel's virtio-net device.
//!
//! - [`tap`]: tap devices opened through `/dev/net/tun` (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`,
//!   one file per queue with `IFF_MULTI_QUEUE`), the 12-byte virtio-net header size, offloads
//!   (`TUNSETOFFLOAD`), attaching and detaching queues, non-blocking reads and writes. Every
//!   `unsafe` tap ioctl of the project is in that module.
//! - [`mac`]: Ethernet MAC addresses: parsing, printing, random locally administered ones.

pub mod mac;
pub mod tap;

pub use mac::{random_local, MacAddr, MacError};
pub use tap::{Tap, TapError};
