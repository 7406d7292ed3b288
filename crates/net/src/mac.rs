//! Random MAC addresses (the type itself is the spec's: [`spec::mac::MacAddr`]).

pub use spec::mac::{MacAddr, MacError};

/// A random unicast, locally administered address.
pub fn random_local() -> std::io::Result<MacAddr> {
    let mut b = [0u8; 6];
    jail::random::fill(&mut b)?;
    Ok(MacAddr::local_from(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_addresses_are_local_unicast_and_differ() {
        for _ in 0..32 {
            let m = random_local().unwrap();
            assert!(m.is_local() && !m.is_multicast(), "{m}");
        }
        assert_ne!(random_local().unwrap(), random_local().unwrap());
    }
}
