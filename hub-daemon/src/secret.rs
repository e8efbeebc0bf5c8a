//! Secrets from the operating system's RNG: the random part of export
//! names (capabilities) and API tokens. Read from `/dev/urandom`, which
//! never blocks once the kernel's pool is initialised (long before a
//! daemon starts) and needs no unsafe code.

use std::io::{self, Read};

/// `N` random bytes.
pub fn random_bytes<const N: usize>() -> io::Result<[u8; N]> {
    let mut buf = [0u8; N];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut buf)?;
    Ok(buf)
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// 128 random bits as 32 hex digits: the unguessable part of an export
/// name.
pub fn capability() -> io::Result<String> {
    Ok(hex(&random_bytes::<16>()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_are_128_bit_hex_and_differ() {
        let a = capability().unwrap();
        let b = capability().unwrap();
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
