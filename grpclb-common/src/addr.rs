//! A 16-byte IP address in network byte order, IPv4 stored IPv4-mapped.

/// An IP address as the kernel lays it out in `sin6_addr`: 16 bytes, network
/// order. IPv4 addresses are stored as `::ffff:a.b.c.d`.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
pub struct Addr(pub [u8; 16]);

const V4_MAPPED_PREFIX: [u8; 12] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff];

impl Addr {
    /// From IPv4 octets (a.b.c.d).
    pub const fn from_v4(octets: [u8; 4]) -> Self {
        let mut b = [0u8; 16];
        b[10] = 0xff;
        b[11] = 0xff;
        b[12] = octets[0];
        b[13] = octets[1];
        b[14] = octets[2];
        b[15] = octets[3];
        Addr(b)
    }

    /// From an IPv4 address as the kernel hands it to BPF (`user_ip4`: network
    /// byte order, read as a native u32).
    pub fn from_v4_raw(user_ip4: u32) -> Self {
        Self::from_v4(user_ip4.to_ne_bytes())
    }

    /// From an IPv6 address as four native u32 words in network byte order
    /// (`user_ip6`).
    pub fn from_v6_words(words: [u32; 4]) -> Self {
        let mut b = [0u8; 16];
        let mut i = 0;
        while i < 4 {
            let w = words[i].to_ne_bytes();
            b[i * 4] = w[0];
            b[i * 4 + 1] = w[1];
            b[i * 4 + 2] = w[2];
            b[i * 4 + 3] = w[3];
            i += 1;
        }
        Addr(b)
    }

    /// The inverse of [`Addr::from_v6_words`].
    pub fn v6_words(&self) -> [u32; 4] {
        let b = &self.0;
        [
            u32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
            u32::from_ne_bytes([b[4], b[5], b[6], b[7]]),
            u32::from_ne_bytes([b[8], b[9], b[10], b[11]]),
            u32::from_ne_bytes([b[12], b[13], b[14], b[15]]),
        ]
    }

    /// True for `::ffff:a.b.c.d`.
    pub fn is_v4(&self) -> bool {
        let mut i = 0;
        while i < 12 {
            if self.0[i] != V4_MAPPED_PREFIX[i] {
                return false;
            }
            i += 1;
        }
        true
    }

    /// The IPv4 address in `user_ip4` form (network order as a native u32),
    /// meaningful only when [`Addr::is_v4`].
    pub fn v4_raw(&self) -> u32 {
        u32::from_ne_bytes([self.0[12], self.0[13], self.0[14], self.0[15]])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_is_mapped_and_round_trips() {
        let a = Addr::from_v4([10, 96, 0, 1]);
        assert!(a.is_v4());
        assert_eq!(&a.0[..12], &V4_MAPPED_PREFIX);
        assert_eq!(Addr::from_v4_raw(a.v4_raw()), a);
        assert_eq!(a.v4_raw().to_ne_bytes(), [10, 96, 0, 1]);
    }

    #[test]
    fn v6_words_round_trip_and_are_not_v4() {
        let mut b = [0u8; 16];
        b[0] = 0xfd;
        b[15] = 7;
        let a = Addr(b);
        assert!(!a.is_v4());
        assert_eq!(Addr::from_v6_words(a.v6_words()), a);
    }

    #[test]
    fn unspecified_is_not_v4() {
        assert!(!Addr::default().is_v4());
    }
}
