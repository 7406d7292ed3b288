//! Sizes as users type them: a number (whole, or with a decimal fraction) and an optional
//! binary unit, `K`, `M`, `G`, `T` or `P` (any case, optionally followed by `B` or `iB`), or
//! `B` for bytes. What a number without a unit means is the caller's: MiB for memory (as
//! QEMU's `-m`), bytes for images (as `qemu-img`).

/// What a plain number counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plain {
    Bytes,
    MiB,
}

/// A value that is not a size.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{0}' is not a size such as 64M, 1.5G or 4096B")]
pub struct SizeError(pub String);

/// Parses `s` (see the module documentation); a plain number counts `plain`.
pub fn parse(s: &str, plain: Plain) -> Result<u64, SizeError> {
    let bad = || SizeError(s.to_string());
    let t = s.trim().to_ascii_lowercase();
    let shift_of = |c: char| match c {
        'k' => Some(10),
        'm' => Some(20),
        'g' => Some(30),
        't' => Some(40),
        'p' => Some(50),
        _ => None,
    };
    let plain_shift = match plain {
        Plain::Bytes => 0,
        Plain::MiB => 20,
    };
    let (num, shift) = if let Some(body) = t.strip_suffix("ib") {
        // `KiB` and the like: a unit letter must come first.
        let c = body.chars().last().ok_or_else(bad)?;
        (&body[..body.len() - 1], shift_of(c).ok_or_else(bad)?)
    } else if let Some(body) = t.strip_suffix('b') {
        match body.chars().last().map(|c| (c, shift_of(c))) {
            Some((_, Some(sh))) => (&body[..body.len() - 1], sh),
            // `4096B`: bytes.
            Some((c, None)) if c.is_ascii_digit() => (body, 0),
            _ => return Err(bad()),
        }
    } else {
        match t.chars().last().map(|c| (c, shift_of(c))) {
            Some((_, Some(sh))) => (&t[..t.len() - 1], sh),
            Some((c, None)) if c.is_ascii_digit() => (t.as_str(), plain_shift),
            _ => return Err(bad()),
        }
    };
    let num = num.trim();
    let (whole, frac) = num.split_once('.').unwrap_or((num, ""));
    let digits = |d: &str| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit());
    if !digits(whole) || (num.contains('.') && !digits(frac)) || frac.len() > 18 {
        return Err(bad());
    }
    let whole: u128 = whole.parse().map_err(|_| bad())?;
    let scale = 10u128.pow(frac.len() as u32);
    let frac: u128 = if frac.is_empty() {
        0
    } else {
        frac.parse().map_err(|_| bad())?
    };
    // whole.frac × 2^shift, in bytes, which must come out whole.
    let unit = 1u128 << shift;
    let frac_bytes = frac * unit;
    if !frac_bytes.is_multiple_of(scale) {
        return Err(bad());
    }
    let bytes = whole
        .checked_mul(unit)
        .and_then(|b| b.checked_add(frac_bytes / scale))
        .ok_or_else(bad)?;
    u64::try_from(bytes).map_err(|_| bad())
}

/// Formats a byte count the way users type it (`2G`, `512M`, else bytes), for messages.
pub fn format(bytes: u64) -> String {
    if bytes >= 1 << 30 && bytes.is_multiple_of(1 << 30) {
        format!("{}G", bytes >> 30)
    } else if bytes.is_multiple_of(1 << 20) {
        format!("{}M", bytes >> 20)
    } else {
        format!("{bytes} bytes")
    }
}

/// Sizes in JSON (`#[serde(with = "spec::size::json")]`): a number of bytes, or a string
/// with a unit (`"512M"`; a plain number in a string is MiB, as on the command line). Written
/// as a number of bytes.
pub mod json {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(*v)
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Bytes(u64),
        Text(String),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        match Size::deserialize(d)? {
            Size::Bytes(n) => Ok(n),
            Size::Text(t) => super::parse(&t, super::Plain::MiB).map_err(serde::de::Error::custom),
        }
    }

    /// The same for an optional size.
    pub mod option {
        use serde::{Deserialize, Deserializer, Serializer};

        pub fn serialize<S: Serializer>(v: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
            match v {
                Some(n) => s.serialize_some(n),
                None => s.serialize_none(),
            }
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
            #[derive(Deserialize)]
            struct Wrap(#[serde(with = "super")] u64);
            Ok(Option::<Wrap>::deserialize(d)?.map(|w| w.0))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_fractions_and_plain_numbers() {
        let mib = |s| parse(s, Plain::MiB);
        let bytes = |s| parse(s, Plain::Bytes);
        for (s, want) in [
            ("512", 512 << 20),
            ("512M", 512 << 20),
            ("512m", 512 << 20),
            ("64MiB", 64 << 20),
            ("64MB", 64 << 20),
            ("2G", 2 << 30),
            ("4GiB", 4 << 30),
            ("64k", 64 << 10),
            ("1T", 1 << 40),
            ("1P", 1 << 50),
            ("0", 0),
            (" 16 ", 16 << 20),
            ("1.5G", 3 << 29),
            ("0.5M", 1 << 19),
            ("4096B", 4096),
        ] {
            assert_eq!(mib(s), Ok(want), "{s}");
        }
        assert_eq!(mib("1.5"), Ok(3 << 19));
        assert_eq!(bytes("4096"), Ok(4096));
        assert_eq!(bytes("1.5M"), Ok(3 << 19));
        assert_eq!(bytes("10g"), Ok(10 << 30));
        for bad in [
            "",
            "M",
            "B",
            "iB",
            "x",
            "12X",
            "-1",
            "-1G",
            "+1G",
            "1.",
            ".5G",
            "1..5G",
            "4iB",
            "1,5G",
            "99999999999T",
            "16385P",
            "1e3M",
            "0.1B",
        ] {
            assert!(mib(bad).is_err(), "{bad}");
        }
        // 1.5 bytes is not a whole number of bytes.
        assert!(bytes("1.5").is_err());
        assert_eq!(
            mib("lots").unwrap_err().to_string(),
            "'lots' is not a size such as 64M, 1.5G or 4096B"
        );
    }
}
