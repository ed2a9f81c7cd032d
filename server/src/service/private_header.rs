//! The header of an application message, read in place: what the DS checks
//! of a `PrivateMessage` (its group, epoch and content type) without
//! copying its ciphertext and other fields as a full decode does.
//!
//! Only canonical input takes this path: protocol version 1.0, wire format
//! `private_message`, every length in its shortest form of 1, 2 or 4 bytes,
//! a known content type, nothing after the message. Any such message
//! decodes with OpenMLS to the same fields; anything else is left to
//! OpenMLS's decoder, which gives the verdict and the error.

use openmls::prelude::ContentType;

/// What the DS checks of a `PrivateMessage`.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct PrivateHeader<'a> {
    /// The group the message is for.
    pub(crate) group_id: &'a [u8],
    /// The epoch it was sent in.
    pub(crate) epoch: u64,
    /// Application, proposal or commit.
    pub(crate) content_type: ContentType,
}

const MLS10: u16 = 1;
const PRIVATE_MESSAGE: u16 = 2;

/// The header of `bytes` if they are one canonical `MLSMessage` holding a
/// `PrivateMessage`; `None` otherwise (which does not mean invalid).
pub(crate) fn read(bytes: &[u8]) -> Option<PrivateHeader<'_>> {
    let mut r = Reader(bytes);
    if r.u16()? != MLS10 || r.u16()? != PRIVATE_MESSAGE {
        return None;
    }
    let group_id = r.vector()?;
    let epoch = u64::from_be_bytes(r.take(8)?.try_into().ok()?);
    let content_type = match r.take(1)?[0] {
        1 => ContentType::Application,
        2 => ContentType::Proposal,
        3 => ContentType::Commit,
        _ => return None,
    };
    // Authenticated data, encrypted sender data, ciphertext.
    for _ in 0..3 {
        r.vector()?;
    }
    r.0.is_empty().then_some(PrivateHeader {
        group_id,
        epoch,
        content_type,
    })
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = (self.0.get(..n)?, self.0.get(n..)?);
        self.0 = rest;
        Some(head)
    }

    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_be_bytes(self.take(2)?.try_into().ok()?))
    }

    /// A variable-length vector (RFC 9420, 2.1.2) whose length is in its
    /// shortest form.
    fn vector(&mut self) -> Option<&'a [u8]> {
        let first = *self.0.first()?;
        let (width, min) = match first >> 6 {
            0 => (1, 0),
            1 => (2, 64),
            2 => (4, 16_384),
            _ => return None,
        };
        let prefix = self.take(width)?;
        let len = prefix[1..]
            .iter()
            .fold(usize::from(first & 0x3f), |n, b| (n << 8) | usize::from(*b));
        if len < min {
            return None;
        }
        self.take(len)
    }
}

#[cfg(test)]
mod tests {
    use openmls::prelude::tls_codec::Deserialize as _;
    use openmls::prelude::{MlsMessageIn, ProtocolMessage};

    use super::*;

    /// An `MLSMessage` holding a `PrivateMessage`, encoded by hand.
    fn message(group: &[u8], epoch: u64, content: u8, fields: [&[u8]; 3]) -> Vec<u8> {
        let mut out = vec![0, 1, 0, 2];
        let vector = |out: &mut Vec<u8>, v: &[u8]| {
            let len = v.len();
            match len {
                0..=63 => out.push(len as u8),
                64..=16_383 => out.extend_from_slice(&(0x4000 | len as u16).to_be_bytes()),
                _ => out.extend_from_slice(&(0x8000_0000 | len as u32).to_be_bytes()),
            }
            out.extend_from_slice(v);
        };
        vector(&mut out, group);
        out.extend_from_slice(&epoch.to_be_bytes());
        out.push(content);
        for f in fields {
            vector(&mut out, f);
        }
        out
    }

    /// What OpenMLS reads, as a header.
    fn openmls(bytes: &[u8]) -> Option<(Vec<u8>, u64, ContentType)> {
        let msg = MlsMessageIn::tls_deserialize_exact(bytes).ok()?;
        match msg.try_into_protocol_message().ok()? {
            ProtocolMessage::PrivateMessage(p) => Some((
                p.group_id().as_slice().to_vec(),
                p.epoch().as_u64(),
                p.content_type(),
            )),
            ProtocolMessage::PublicMessage(_) => None,
        }
    }

    fn agrees(bytes: &[u8]) {
        let ours = read(bytes);
        let theirs = openmls(bytes);
        if let Some(h) = &ours {
            // Whatever this path accepts, OpenMLS accepts with the same fields.
            assert_eq!(
                Some((h.group_id.to_vec(), h.epoch, h.content_type)),
                theirs,
                "{bytes:?}"
            );
        }
    }

    #[test]
    fn reads_what_openmls_reads() {
        let big = vec![7u8; 20_000];
        let ok = message(b"group", 9, 1, [b"aad", &[1; 80], &big]);
        let h = read(&ok).unwrap();
        assert_eq!((h.group_id, h.epoch), (&b"group"[..], 9));
        assert_eq!(h.content_type, ContentType::Application);
        assert_eq!(openmls(&ok), Some((b"group".to_vec(), 9, h.content_type)));
        let empty = message(b"", 0, 3, [b"", b"", b""]);
        assert_eq!(read(&empty).unwrap().content_type, ContentType::Commit);
        agrees(&empty);
    }

    #[test]
    fn refuses_what_is_not_canonical_or_not_private() {
        let ok = message(b"g", 1, 1, [b"", b"s", b"c"]);
        // Trailing byte, cut short, other version, other wire format,
        // unknown content type.
        let mut trailing = ok.clone();
        trailing.push(0);
        let mut version = ok.clone();
        version[1] = 2;
        let mut wire = ok.clone();
        wire[3] = 1;
        let mut content = ok.clone();
        content[4 + 2 + 8] = 4;
        for bad in [
            trailing,
            ok[..ok.len() - 1].to_vec(),
            version,
            wire,
            content,
        ] {
            assert_eq!(read(&bad), None);
            agrees(&bad);
        }
        // A length in a longer form than needed.
        let mut long = vec![0, 1, 0, 2, 0x40, 1, b'g'];
        long.extend_from_slice(&1u64.to_be_bytes());
        long.extend_from_slice(&[1, 0, 1, b's', 1, b'c']);
        assert_eq!(read(&long), None);
    }

    /// Every single-byte change and every cut of valid messages: whatever
    /// this path accepts, OpenMLS reads alike.
    #[test]
    fn never_accepts_what_openmls_reads_otherwise() {
        let samples = [
            message(b"g", 1, 1, [b"", b"s", b"c"]),
            message(&[3; 70], u64::MAX, 2, [&[1; 64], b"", &[2; 300]]),
        ];
        for sample in samples {
            for cut in 0..sample.len() {
                agrees(&sample[..cut]);
            }
            for at in 0..sample.len() {
                for value in [0, 1, 2, 3, 0x3f, 0x40, 0x7f, 0x80, 0xbf, 0xc0, 0xff] {
                    let mut changed = sample.clone();
                    changed[at] = value;
                    agrees(&changed);
                }
            }
            assert!(read(&sample).is_some() && openmls(&sample).is_some());
        }
    }
}
