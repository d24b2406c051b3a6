//! Kernel config values as the bytes an extern of each kind holds: tristates, booleans,
//! numbers of 1 to 8 bytes, and char arrays.

use super::model::Kind;

/// Encodes a kernel config value (`y`, `m`, `n`, a number, a quoted string) for `kind`.
pub fn encode(kind: &Kind, raw: &str) -> Result<Vec<u8>, String> {
    match raw.chars().next() {
        Some(c @ ('y' | 'n' | 'm')) if raw.len() == 1 => encode_tristate(kind, c),
        Some('"') => encode_string(kind, raw),
        Some(_) => {
            let n = parse_number(raw).ok_or_else(|| format!("{raw:?} is not a number"))?;
            encode_number(kind, n)
        }
        None => Err("empty value".into()),
    }
}

pub(super) fn encode_tristate(kind: &Kind, c: char) -> Result<Vec<u8>, String> {
    let n = match c {
        'y' => 1,
        'm' => 2,
        _ => 0,
    };
    match kind {
        Kind::Bool if c == 'm' => Err("'m' (a module) needs a tristate or char extern".into()),
        Kind::Bool => Ok(vec![n as u8]),
        Kind::Char { .. } => Ok(vec![c as u8]),
        Kind::Tristate { bytes } => Ok(le_bytes(n, *bytes)),
        other => Err(format!(
            "'{c}' needs a bool, tristate or char extern, not {}",
            other.describe()
        )),
    }
}

fn encode_string(kind: &Kind, raw: &str) -> Result<Vec<u8>, String> {
    let Kind::CharArray { len } = kind else {
        return Err(format!(
            "a string needs a char array extern, not {}",
            kind.describe()
        ));
    };
    let inner = raw
        .strip_prefix('"')
        .and_then(|r| r.strip_suffix('"'))
        .ok_or("unterminated string")?;
    let mut out = vec![0u8; *len as usize];
    let take = inner.len().min(out.len().saturating_sub(1));
    out[..take].copy_from_slice(&inner.as_bytes()[..take]);
    Ok(out)
}

pub(super) fn encode_number(kind: &Kind, n: u64) -> Result<Vec<u8>, String> {
    let (bytes, signed) = match kind {
        Kind::Int { bytes, signed } => (*bytes, *signed),
        Kind::Char { signed } => (1, *signed),
        other => {
            return Err(format!(
                "a number needs an integer or char extern, not {}",
                other.describe()
            ))
        }
    };
    let bits = bytes * 8;
    let fits = bits >= 64
        || if signed {
            let v = n as i64;
            let shifted = v >> (bits - 1);
            shifted == 0 || shifted == -1
        } else {
            n >> bits == 0
        };
    if !fits {
        return Err(format!(
            "{n} does not fit in {}",
            Kind::Int { bytes, signed }.describe()
        ));
    }
    Ok(le_bytes(n, bytes))
}

fn le_bytes(n: u64, bytes: u32) -> Vec<u8> {
    n.to_le_bytes()[..bytes as usize].to_vec()
}

/// `strtoull(s, NULL, 0)`: decimal, `0x` hex, leading-`0` octal, an optional `-`.
pub fn parse_number(s: &str) -> Option<u64> {
    let (negative, digits) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    let n = if let Some(hex) = digits
        .strip_prefix("0x")
        .or_else(|| digits.strip_prefix("0X"))
    {
        u64::from_str_radix(hex, 16).ok()?
    } else if digits.len() > 1 && digits.starts_with('0') {
        u64::from_str_radix(&digits[1..], 8).ok()?
    } else {
        digits.parse().ok()?
    };
    Some(if negative { n.wrapping_neg() } else { n })
}
