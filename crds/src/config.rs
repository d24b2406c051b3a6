//! Typed config values: parsing the strings of `spec.config[].value`/`fallback` into the
//! declared scalar type, and their in-memory representation for `.rodata`.

use crate::program::ConfigType;

/// A parsed config value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigValue {
    /// `bool` (1 byte).
    Bool(bool),
    /// `__u8`.
    U8(u8),
    /// `__u16`.
    U16(u16),
    /// `__u32`.
    U32(u32),
    /// `__u64`.
    U64(u64),
    /// `__s32`.
    I32(i32),
    /// `__s64`.
    I64(i64),
}

impl ConfigType {
    /// Size in bytes of the global.
    pub fn size(self) -> usize {
        match self {
            ConfigType::Bool | ConfigType::U8 => 1,
            ConfigType::U16 => 2,
            ConfigType::U32 | ConfigType::I32 => 4,
            ConfigType::U64 | ConfigType::I64 => 8,
        }
    }

    /// Whether the type is signed (bool counts as unsigned).
    pub fn signed(self) -> bool {
        matches!(self, ConfigType::I32 | ConfigType::I64)
    }

    /// Name as written in the CR.
    pub fn as_str(self) -> &'static str {
        match self {
            ConfigType::Bool => "bool",
            ConfigType::U8 => "u8",
            ConfigType::U16 => "u16",
            ConfigType::U32 => "u32",
            ConfigType::U64 => "u64",
            ConfigType::I32 => "i32",
            ConfigType::I64 => "i64",
        }
    }

    /// Parses `s` as this type. Integers are decimal or `0x` hex; bools are `true`/`false`.
    pub fn parse_value(self, s: &str) -> Result<ConfigValue, String> {
        let t = s.trim();
        let range_err = || format!("{s:?} is not a valid {}", self.as_str());
        if self == ConfigType::Bool {
            return match t {
                "true" => Ok(ConfigValue::Bool(true)),
                "false" => Ok(ConfigValue::Bool(false)),
                _ => Err(format!("{s:?} is not a bool; use \"true\" or \"false\"")),
            };
        }
        let (neg, digits) = match t.strip_prefix('-') {
            Some(d) => (true, d),
            None => (false, t),
        };
        let magnitude = match digits
            .strip_prefix("0x")
            .or_else(|| digits.strip_prefix("0X"))
        {
            Some(hex) => u64::from_str_radix(hex, 16),
            None => digits.parse::<u64>(),
        }
        .map_err(|_| range_err())?;
        if digits.starts_with('+') {
            return Err(range_err());
        }
        let signed: i128 = if neg {
            -(magnitude as i128)
        } else {
            magnitude as i128
        };
        let fits = |lo: i128, hi: i128| (lo..=hi).contains(&signed);
        let v = match self {
            ConfigType::Bool => unreachable!("handled above"),
            ConfigType::U8 if fits(0, u8::MAX.into()) => ConfigValue::U8(signed as u8),
            ConfigType::U16 if fits(0, u16::MAX.into()) => ConfigValue::U16(signed as u16),
            ConfigType::U32 if fits(0, u32::MAX.into()) => ConfigValue::U32(signed as u32),
            ConfigType::U64 if fits(0, u64::MAX.into()) => ConfigValue::U64(signed as u64),
            ConfigType::I32 if fits(i32::MIN.into(), i32::MAX.into()) => {
                ConfigValue::I32(signed as i32)
            }
            ConfigType::I64 if fits(i64::MIN.into(), i64::MAX.into()) => {
                ConfigValue::I64(signed as i64)
            }
            _ => return Err(format!("{s:?} is out of range for {}", self.as_str())),
        };
        Ok(v)
    }
}

impl ConfigValue {
    /// Native-endian bytes, as the global sits in `.rodata` on this host.
    pub fn to_ne_bytes(self) -> Vec<u8> {
        match self {
            ConfigValue::Bool(b) => vec![u8::from(b)],
            ConfigValue::U8(v) => vec![v],
            ConfigValue::U16(v) => v.to_ne_bytes().to_vec(),
            ConfigValue::U32(v) => v.to_ne_bytes().to_vec(),
            ConfigValue::U64(v) => v.to_ne_bytes().to_vec(),
            ConfigValue::I32(v) => v.to_ne_bytes().to_vec(),
            ConfigValue::I64(v) => v.to_ne_bytes().to_vec(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_in_range_values() {
        assert_eq!(
            ConfigType::Bool.parse_value("true"),
            Ok(ConfigValue::Bool(true))
        );
        assert_eq!(ConfigType::U8.parse_value("255"), Ok(ConfigValue::U8(255)));
        assert_eq!(
            ConfigType::U16.parse_value("0xffff"),
            Ok(ConfigValue::U16(65535))
        );
        assert_eq!(ConfigType::I32.parse_value("-5"), Ok(ConfigValue::I32(-5)));
        assert_eq!(
            ConfigType::I64.parse_value("-9223372036854775808"),
            Ok(ConfigValue::I64(i64::MIN))
        );
        assert_eq!(
            ConfigType::U64.parse_value("18446744073709551615"),
            Ok(ConfigValue::U64(u64::MAX))
        );
    }

    #[test]
    fn rejects_out_of_range_and_garbage() {
        assert!(ConfigType::U8
            .parse_value("300")
            .unwrap_err()
            .contains("out of range"));
        assert!(ConfigType::U8.parse_value("-1").is_err());
        assert!(ConfigType::Bool.parse_value("yes").is_err());
        assert!(ConfigType::U32.parse_value("").is_err());
        assert!(ConfigType::U32.parse_value("+1").is_err());
        assert!(ConfigType::I32.parse_value("2147483648").is_err());
        assert!(ConfigType::U64.parse_value("18446744073709551616").is_err());
    }
}
