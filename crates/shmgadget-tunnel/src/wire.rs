//! Frames on the wire: little-endian, fixed headers, validated before use.

pub(crate) const MAGIC: u32 = 0x5347_5431; // "SGT1"
pub(crate) const DATA: u8 = 1;
pub(crate) const ACK: u8 = 2;
pub(crate) const NACK: u8 = 1;
pub(crate) const DATA_HEADER: usize = 40;

/// magic u32, kind u8, 3 pad, stream u64, floor u64, first u64, n u32, 4 pad; then per
/// message: len u32, bytes.
pub(crate) fn data_header(buf: &mut Vec<u8>, stream: u64, floor: u64, first: u64) {
    buf.clear();
    buf.extend_from_slice(&MAGIC.to_le_bytes());
    buf.extend_from_slice(&[DATA, 0, 0, 0]);
    buf.extend_from_slice(&stream.to_le_bytes());
    buf.extend_from_slice(&floor.to_le_bytes());
    buf.extend_from_slice(&first.to_le_bytes());
    buf.extend_from_slice(&[0; 8]);
}

pub(crate) fn data_finish(buf: &mut [u8], n: u32) {
    buf[32..36].copy_from_slice(&n.to_le_bytes());
}

pub(crate) fn data_push(buf: &mut Vec<u8>, msg: &[u8]) {
    buf.extend_from_slice(&(msg.len() as u32).to_le_bytes());
    buf.extend_from_slice(msg);
}

/// A length that marks a hole: a sequence number with no message (a slot queue's dead
/// sender's), skipped by the importer.
pub(crate) const HOLE: u32 = u32::MAX;

pub(crate) fn data_push_hole(buf: &mut Vec<u8>) {
    buf.extend_from_slice(&HOLE.to_le_bytes());
}

pub(crate) struct Data<'a> {
    pub stream: u64,
    pub floor: u64,
    pub first: u64,
    pub n: u32,
    pub body: &'a [u8],
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

pub(crate) fn parse_data(b: &[u8]) -> Option<Data<'_>> {
    if b.len() < DATA_HEADER || u32_at(b, 0) != MAGIC || b[4] != DATA {
        return None;
    }
    Some(Data { stream: u64_at(b, 8), floor: u64_at(b, 16), first: u64_at(b, 24), n: u32_at(b, 32), body: &b[40..] })
}

impl<'a> Data<'a> {
    /// The messages (`None`: a hole); stops at the first malformed record.
    pub fn messages(&self) -> impl Iterator<Item = Option<&'a [u8]>> {
        let mut rest = self.body;
        let mut left = self.n;
        std::iter::from_fn(move || {
            if left == 0 || rest.len() < 4 {
                return None;
            }
            if u32_at(rest, 0) == HOLE {
                rest = &rest[4..];
                left -= 1;
                return Some(None);
            }
            let len = u32_at(rest, 0) as usize;
            if rest.len() - 4 < len {
                return None;
            }
            let m = &rest[4..4 + len];
            rest = &rest[4 + len..];
            left -= 1;
            Some(Some(m))
        })
    }
}

/// magic u32, kind u8, flags u8, 2 pad, stream u64, acked u64, window u64.
pub(crate) fn ack(stream: u64, acked: u64, window: u64, flags: u8) -> Vec<u8> {
    let mut b = Vec::with_capacity(32);
    b.extend_from_slice(&MAGIC.to_le_bytes());
    b.extend_from_slice(&[ACK, flags, 0, 0]);
    b.extend_from_slice(&stream.to_le_bytes());
    b.extend_from_slice(&acked.to_le_bytes());
    b.extend_from_slice(&window.to_le_bytes());
    b
}

pub(crate) struct Ack {
    pub stream: u64,
    pub acked: u64,
    pub window: u64,
    pub nack: bool,
}

pub(crate) fn parse_ack(b: &[u8]) -> Option<Ack> {
    if b.len() < 32 || u32_at(b, 0) != MAGIC || b[4] != ACK {
        return None;
    }
    Some(Ack { stream: u64_at(b, 8), acked: u64_at(b, 16), window: u64_at(b, 24), nack: b[5] & NACK != 0 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_data_frame_round_trips_and_a_truncated_one_yields_only_whole_messages() {
        let mut b = Vec::new();
        data_header(&mut b, 7, 10, 11);
        data_push(&mut b, b"hello");
        data_push(&mut b, b"");
        data_push_hole(&mut b);
        data_push(&mut b, &[9; 300]);
        data_finish(&mut b, 4);
        let d = parse_data(&b).unwrap();
        assert_eq!((d.stream, d.floor, d.first, d.n), (7, 10, 11, 4));
        let m: Vec<Option<&[u8]>> = d.messages().collect();
        assert_eq!(m, vec![Some(&b"hello"[..]), Some(&b""[..]), None, Some(&[9; 300][..])]);
        let cut = parse_data(&b[..b.len() - 1]).unwrap();
        assert_eq!(cut.messages().count(), 3);
        assert!(parse_data(&b[..20]).is_none());
        let a = parse_ack(&ack(7, 99, 5, NACK)).unwrap();
        assert_eq!((a.stream, a.acked, a.window, a.nack), (7, 99, 5, true));
        assert!(parse_ack(&b).is_none(), "a data frame is not an ack");
    }
}
