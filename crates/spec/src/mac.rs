//! Ethernet MAC addresses.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Errors parsing or making a MAC address.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MacError {
    #[error("'{0}' is not a MAC address: expected six hex bytes such as 52:54:00:12:34:56")]
    Syntax(String),
    #[error("{0} is a multicast address (the low bit of the first byte is set)")]
    Multicast(MacAddr),
}

/// A 48-bit Ethernet MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// The length of an address in bytes.
    pub const LEN: usize = 6;

    /// A unicast, locally administered address made of `random` bytes (first byte `x2`,
    /// `x6`, `xA` or `xE`).
    pub fn local_from(random: [u8; 6]) -> MacAddr {
        let mut b = random;
        b[0] = (b[0] & !0x01) | 0x02;
        MacAddr(b)
    }

    /// The address bytes.
    pub fn bytes(&self) -> [u8; 6] {
        self.0
    }

    /// Whether the multicast (group) bit is set.
    pub fn is_multicast(&self) -> bool {
        self.0[0] & 0x01 != 0
    }

    /// Whether the locally administered bit is set.
    pub fn is_local(&self) -> bool {
        self.0[0] & 0x02 != 0
    }

    /// Parses `aa:bb:cc:dd:ee:ff` (or with `-`) and refuses multicast addresses, which cannot be
    /// a NIC's own address.
    pub fn parse_unicast(s: &str) -> Result<MacAddr, MacError> {
        let mac: MacAddr = s.parse()?;
        if mac.is_multicast() {
            return Err(MacError::Multicast(mac));
        }
        Ok(mac)
    }
}

impl Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A NIC's own address: written as `52:54:00:12:34:56`, never multicast.
impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<MacAddr, D::Error> {
        let s = String::deserialize(d)?;
        MacAddr::parse_unicast(&s).map_err(serde::de::Error::custom)
    }
}

impl FromStr for MacAddr {
    type Err = MacError;

    fn from_str(s: &str) -> Result<MacAddr, MacError> {
        let bad = || MacError::Syntax(s.to_string());
        let sep = if s.contains('-') { '-' } else { ':' };
        let mut out = [0u8; 6];
        let mut n = 0;
        for part in s.split(sep) {
            if n == 6 || part.is_empty() || part.len() > 2 {
                return Err(bad());
            }
            out[n] = u8::from_str_radix(part, 16).map_err(|_| bad())?;
            n += 1;
        }
        if n != 6 {
            return Err(bad());
        }
        Ok(MacAddr(out))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_print() {
        let m: MacAddr = "52:54:00:12:34:56".parse().unwrap();
        assert_eq!(m.0, [0x52, 0x54, 0, 0x12, 0x34, 0x56]);
        assert_eq!(m.to_string(), "52:54:00:12:34:56");
        assert_eq!("52-54-00-12-34-5".parse::<MacAddr>().unwrap().0[5], 5);
        for bad in [
            "",
            "52:54:00:12:34",
            "52:54:00:12:34:56:78",
            "52:54:00:12:34:zz",
            "52:54:00:12:34:567",
            "52::00:12:34:56",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
        assert!(matches!(
            MacAddr::parse_unicast("01:00:5e:00:00:01"),
            Err(MacError::Multicast(_))
        ));
    }

    #[test]
    fn local_addresses_are_local_unicast() {
        for b in [[0xff; 6], [0; 6], [0x01, 2, 3, 4, 5, 6]] {
            let m = MacAddr::local_from(b);
            assert!(m.is_local() && !m.is_multicast(), "{m}");
            assert_eq!(m.0[1..], b[1..]);
        }
    }

    #[test]
    fn serde_is_the_text_form() {
        let m: MacAddr = "52:54:00:12:34:56".parse().unwrap();
        let j = serde_json::to_string(&m).unwrap();
        assert_eq!(j, "\"52:54:00:12:34:56\"");
        assert_eq!(serde_json::from_str::<MacAddr>(&j).unwrap(), m);
        let e = serde_json::from_str::<MacAddr>("\"01:00:5e:00:00:01\"").unwrap_err();
        assert!(e.to_string().contains("multicast"), "{e}");
    }
}
