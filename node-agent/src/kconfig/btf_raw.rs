//! Just enough of the raw BTF format to find `__kconfig` externs and patch them in
//! place: a walk over the type records that keeps each record's byte offset.
//! Everything is bounds-checked: the bytes are untrusted.

/// `BTF_KIND_*` numbers used here.
pub(crate) mod kind {
    pub const INT: u32 = 1;
    pub const PTR: u32 = 2;
    pub const ARRAY: u32 = 3;
    pub const STRUCT: u32 = 4;
    pub const UNION: u32 = 5;
    pub const ENUM: u32 = 6;
    pub const FWD: u32 = 7;
    pub const TYPEDEF: u32 = 8;
    pub const VOLATILE: u32 = 9;
    pub const CONST: u32 = 10;
    pub const RESTRICT: u32 = 11;
    pub const FUNC: u32 = 12;
    pub const FUNC_PROTO: u32 = 13;
    pub const VAR: u32 = 14;
    pub const DATASEC: u32 = 15;
    pub const FLOAT: u32 = 16;
    pub const DECL_TAG: u32 = 17;
    pub const TYPE_TAG: u32 = 18;
    pub const ENUM64: u32 = 19;
}

/// `BTF_INT_*` encoding bits.
pub(crate) const INT_SIGNED: u32 = 1;
pub(crate) const INT_BOOL: u32 = 4;
/// `BTF_VAR_GLOBAL_ALLOCATED` and `BTF_VAR_GLOBAL_EXTERN`.
pub(crate) const VAR_GLOBAL: u32 = 1;
pub(crate) const VAR_EXTERN: u32 = 2;

const HEADER_MIN: usize = 24;
const RECORD: usize = 12;
/// Type chains longer than this are corrupt.
const MAX_DEPTH: usize = 32;

/// One type record: its fields and where it starts in the BTF bytes.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Record {
    /// Byte offset of the record in the whole BTF blob.
    pub at: usize,
    pub name_off: u32,
    pub kind: u32,
    pub vlen: usize,
    /// `size` or `type`, by kind.
    pub size_or_type: u32,
    /// The info word's kind flag (a FWD to a union; bitfield members).
    pub kind_flag: bool,
}

impl Record {
    /// Type id 0, `void`, which has no record in the blob.
    pub const VOID: Record = Record {
        at: 0,
        name_off: 0,
        kind: 0,
        vlen: 0,
        size_or_type: 0,
        kind_flag: false,
    };
}

/// A parsed view of raw BTF.
pub(crate) struct RawBtf<'a> {
    pub bytes: &'a [u8],
    pub hdr_len: usize,
    pub str_off: usize,
    pub str_len: usize,
    /// Records by type id (index 0 is `void`, absent).
    pub records: Vec<Record>,
}

pub(crate) fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    let b = bytes.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

impl<'a> RawBtf<'a> {
    /// Parses the header and walks the type section.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, String> {
        if bytes.len() < HEADER_MIN || bytes[..2] != [0x9f, 0xeb] {
            return Err("not little-endian BTF (bad magic)".into());
        }
        let word = |at| u32_at(bytes, at).ok_or("truncated header");
        let hdr_len = word(4)? as usize;
        let (type_off, type_len) = (word(8)? as usize, word(12)? as usize);
        let (str_off, str_len) = (word(16)? as usize, word(20)? as usize);
        let end = |off: usize, len: usize| {
            hdr_len
                .checked_add(off)
                .and_then(|s| s.checked_add(len).map(|e| (s, e)))
                .filter(|&(_, e)| e <= bytes.len())
        };
        let (types_start, types_end) =
            end(type_off, type_len).ok_or("type section out of bounds")?;
        end(str_off, str_len).ok_or("string section out of bounds")?;
        let mut records = vec![Record::VOID];
        let mut at = types_start;
        while at < types_end {
            let name_off = u32_at(bytes, at).ok_or("truncated type")?;
            let info = u32_at(bytes, at + 4).ok_or("truncated type")?;
            let size_or_type = u32_at(bytes, at + 8).ok_or("truncated type")?;
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            let extra = match kind {
                kind::INT | kind::VAR | kind::DECL_TAG => 4,
                kind::ARRAY => 12,
                kind::STRUCT | kind::UNION | kind::DATASEC | kind::ENUM64 => vlen * 12,
                kind::ENUM | kind::FUNC_PROTO => vlen * 8,
                kind::PTR
                | kind::FWD
                | kind::TYPEDEF
                | kind::VOLATILE
                | kind::CONST
                | kind::RESTRICT
                | kind::FUNC
                | kind::FLOAT
                | kind::TYPE_TAG => 0,
                other => return Err(format!("unknown BTF kind {other} at byte {at}")),
            };
            records.push(Record {
                at,
                name_off,
                kind,
                vlen,
                size_or_type,
                kind_flag: info >> 31 != 0,
            });
            at = at + RECORD + extra;
        }
        if at != types_end {
            return Err("the last type runs past the type section".into());
        }
        Ok(Self {
            bytes,
            hdr_len,
            str_off,
            str_len,
            records,
        })
    }

    pub fn record(&self, id: u32) -> Option<&Record> {
        self.records.get(id as usize).filter(|_| id != 0)
    }

    /// The string section (in bounds: checked by `parse`).
    pub fn strings(&self) -> &'a [u8] {
        let start = self.hdr_len + self.str_off;
        self.bytes
            .get(start..start + self.str_len)
            .unwrap_or_default()
    }

    pub fn name(&self, name_off: u32) -> Option<&'a str> {
        let tail = self.strings().get(name_off as usize..)?;
        let len = tail.iter().position(|&b| b == 0)?;
        std::str::from_utf8(&tail[..len]).ok()
    }

    /// The `n`th 4-byte word after a record's 12-byte header.
    pub fn extra(&self, record: &Record, n: usize) -> Option<u32> {
        u32_at(self.bytes, record.at + RECORD + 4 * n)
    }

    /// Through typedefs and qualifiers.
    pub fn strip(&self, mut id: u32) -> Option<(u32, &Record)> {
        for _ in 0..MAX_DEPTH {
            let r = self.record(id)?;
            match r.kind {
                kind::TYPEDEF | kind::VOLATILE | kind::CONST | kind::RESTRICT | kind::TYPE_TAG => {
                    id = r.size_or_type
                }
                _ => return Some((id, r)),
            }
        }
        None
    }

    /// Whether the string section is the last thing in the blob (so a string can be
    /// appended to it).
    pub fn strings_last(&self) -> bool {
        self.hdr_len + self.str_off + self.str_len == self.bytes.len()
    }
}

/// The byte offset of DATASEC entry `n` of `record` (type, offset, size).
pub(crate) fn datasec_entry(record: &Record, n: usize) -> usize {
    record.at + RECORD + n * 12
}
