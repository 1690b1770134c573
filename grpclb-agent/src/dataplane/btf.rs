//! Field offsets of kernel structs, read from the kernel's own BTF
//! (`/sys/kernel/btf/vmlinux`). The GOAWAY gate reads two fields of
//! `struct tcp_sock`, whose layout changes between kernels; aya has no CO-RE
//! relocations for Rust programs, so the agent looks the offsets up here and
//! hands them to the program as constants.
//!
//! Only what that needs: the type section's records are walked to find a
//! named struct and a member in it (also inside anonymous struct/union
//! members, which kernels use for cache-line groups).

use anyhow::{bail, ensure, Context, Result};

pub const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

const MAGIC: u16 = 0xeb9f;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;

/// Where the gate finds the send sequence numbers of a TCP socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpSockOffsets {
    pub write_seq: u32,
    pub snd_nxt: u32,
}

pub fn tcp_sock_offsets(btf: &[u8]) -> Result<TcpSockOffsets> {
    let types = Types::parse(btf)?;
    let tcp_sock = types
        .struct_named("tcp_sock")
        .context("the kernel BTF has no struct tcp_sock")?;
    let field = |name| {
        types
            .member_offset(tcp_sock, name)
            .with_context(|| format!("struct tcp_sock has no byte-aligned member {name}"))
    };
    Ok(TcpSockOffsets {
        write_seq: field("write_seq")?,
        snd_nxt: field("snd_nxt")?,
    })
}

/// One type record: its kind, name and, for structs and unions, members.
struct Type {
    kind: u32,
    name: u32,
    /// (name offset, type id, bit offset) for struct/union members.
    members: Vec<(u32, u32, u32)>,
}

struct Types<'a> {
    strings: &'a [u8],
    /// Index 0 is the implicit `void`.
    types: Vec<Type>,
}

impl<'a> Types<'a> {
    fn parse(btf: &'a [u8]) -> Result<Types<'a>> {
        let u16_at = |at: usize| -> Result<u16> {
            let b = btf.get(at..at + 2).context("BTF truncated")?;
            Ok(u16::from_le_bytes([b[0], b[1]]))
        };
        let u32_at = |at: usize| -> Result<u32> {
            let b = btf.get(at..at + 4).context("BTF truncated")?;
            Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        };
        ensure!(u16_at(0)? == MAGIC, "not little-endian BTF (bad magic)");
        let header_len = u32_at(4)? as usize;
        let (type_off, type_len) = (u32_at(8)? as usize, u32_at(12)? as usize);
        let (str_off, str_len) = (u32_at(16)? as usize, u32_at(20)? as usize);
        let type_start = header_len + type_off;
        let str_start = header_len + str_off;
        let strings = btf
            .get(str_start..str_start + str_len)
            .context("BTF string section out of bounds")?;
        let mut types = vec![Type {
            kind: 0,
            name: 0,
            members: Vec::new(),
        }];
        let mut at = type_start;
        let end = type_start + type_len;
        while at < end {
            let name = u32_at(at)?;
            let info = u32_at(at + 4)?;
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            let bitfields = info >> 31 == 1;
            at += 12;
            let mut members = Vec::new();
            let extra = match kind {
                1 | 14 | 17 => 4, // INT, VAR, DECL_TAG
                3 => 12,          // ARRAY
                KIND_STRUCT | KIND_UNION => {
                    for m in 0..vlen {
                        let base = at + m * 12;
                        let raw_offset = u32_at(base + 8)?;
                        // With kind_flag set, the high 8 bits are a bitfield size.
                        let bit_offset = if bitfields {
                            raw_offset & 0xff_ffff
                        } else {
                            raw_offset
                        };
                        members.push((u32_at(base)?, u32_at(base + 4)?, bit_offset));
                    }
                    12 * vlen
                }
                6 | 13 => 8 * vlen,        // ENUM, FUNC_PROTO
                15 | 19 => 12 * vlen,      // DATASEC, ENUM64
                2 | 7..=12 | 16 | 18 => 0, // PTR, FWD, TYPEDEF, qualifiers, FUNC, FLOAT, TYPE_TAG
                other => bail!("unknown BTF kind {other}"),
            };
            at += extra;
            types.push(Type {
                kind,
                name,
                members,
            });
        }
        Ok(Types { strings, types })
    }

    fn name(&self, offset: u32) -> &[u8] {
        let rest = self.strings.get(offset as usize..).unwrap_or_default();
        let len = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        &rest[..len]
    }

    fn struct_named(&self, name: &str) -> Option<usize> {
        self.types
            .iter()
            .position(|t| t.kind == KIND_STRUCT && self.name(t.name) == name.as_bytes())
    }

    /// Byte offset of a member, looking through anonymous struct/union members.
    fn member_offset(&self, id: usize, name: &str) -> Option<u32> {
        let ty = self.types.get(id)?;
        for &(member_name, member_type, bits) in &ty.members {
            if self.name(member_name) == name.as_bytes() {
                return (bits % 8 == 0).then_some(bits / 8);
            }
            let inner = self.types.get(member_type as usize)?;
            if member_name == 0 && matches!(inner.kind, KIND_STRUCT | KIND_UNION) {
                if let Some(offset) = self.member_offset(member_type as usize, name) {
                    return Some(bits / 8 + offset);
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A BTF blob: `struct tcp_sock { int a; union { int x; int write_seq; }
    /// int snd_nxt; }` with write_seq at byte 4 and snd_nxt at byte 8.
    fn synthetic() -> Vec<u8> {
        let strings = b"\0int\0tcp_sock\0a\0x\0write_seq\0snd_nxt\0";
        let name = |s: &str| {
            let needle = format!("\0{s}\0");
            (strings
                .windows(needle.len())
                .position(|w| w == needle.as_bytes())
                .unwrap()
                + 1) as u32
        };
        let mut types = Vec::new();
        let mut push = |words: &[u32]| {
            for w in words {
                types.extend_from_slice(&w.to_le_bytes());
            }
        };
        // 1: int (size 4, 32 bits).
        push(&[name("int"), 1 << 24, 4, 32]);
        // 2: anonymous union { int x; int write_seq; }.
        push(&[0, (KIND_UNION << 24) | 2, 4]);
        push(&[name("x"), 1, 0]);
        push(&[name("write_seq"), 1, 0]);
        // 3: struct tcp_sock { int a; <union>; int snd_nxt; } at bits 0, 32, 64.
        push(&[name("tcp_sock"), (KIND_STRUCT << 24) | 3, 12]);
        push(&[name("a"), 1, 0]);
        push(&[0, 2, 32]);
        push(&[name("snd_nxt"), 1, 64]);
        let mut blob = Vec::new();
        blob.extend_from_slice(&MAGIC.to_le_bytes());
        blob.extend_from_slice(&[1, 0]);
        for w in [
            24u32,
            0,
            types.len() as u32,
            types.len() as u32,
            strings.len() as u32,
        ] {
            blob.extend_from_slice(&w.to_le_bytes());
        }
        blob.extend_from_slice(&types);
        blob.extend_from_slice(strings);
        blob
    }

    #[test]
    fn finds_members_also_inside_anonymous_unions() {
        assert_eq!(
            tcp_sock_offsets(&synthetic()).unwrap(),
            TcpSockOffsets {
                write_seq: 4,
                snd_nxt: 8
            }
        );
    }

    #[test]
    fn rejects_what_is_not_btf() {
        assert!(tcp_sock_offsets(b"\x7fELF and so on, long enough").is_err());
        let mut truncated = synthetic();
        truncated.truncate(40);
        assert!(tcp_sock_offsets(&truncated).is_err());
    }

    #[test]
    fn this_kernel_has_the_fields() {
        let Ok(btf) = std::fs::read(VMLINUX) else {
            panic!("{VMLINUX} is required (a kernel with BTF)");
        };
        let offsets = tcp_sock_offsets(&btf).unwrap();
        assert!(offsets.write_seq > 0 && offsets.snd_nxt > 0);
        assert_ne!(offsets.write_seq, offsets.snd_nxt);
    }
}
