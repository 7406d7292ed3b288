//! The lease file of a network's dnsmasq, which the daemon reads every second: its hostnames
//! come from the guests' DHCP requests.
//!
//! Asserted: no panic, and never more leases than lines.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let leases = netmgr::dnsmasq::leases(&text);
    assert!(leases.len() <= text.lines().count());
});
