//! Human-friendly sizes (`4MiB`, `10GB`, `80%`) and durations (`250ms`, `5s`, `10m`).

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer, de};

/// A number of bytes, written as `4MiB`, `10GB`, `512KiB` or a plain integer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        let split = text
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(text.len());
        let (number, unit) = text.split_at(split);
        let number: f64 = number
            .parse()
            .map_err(|_| format!("invalid size {text:?} (expected e.g. 512KiB, 200GiB, 10GB)"))?;
        let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "kb" | "k" => 1_000,
            "mb" | "m" => 1_000_000,
            "gb" | "g" => 1_000_000_000,
            "tb" | "t" => 1_000_000_000_000,
            "kib" => 1 << 10,
            "mib" => 1 << 20,
            "gib" => 1 << 30,
            "tib" => 1 << 40,
            other => {
                return Err(format!(
                    "invalid size unit {other:?} in {text:?} (use B, KB, MB, GB, TB, KiB, MiB, GiB or TiB)"
                ));
            }
        };
        let bytes = number * multiplier as f64;
        if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
            return Err(format!("size {text:?} is out of range"));
        }
        Ok(ByteSize(bytes as u64))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(&str, u64); 4] = [
            ("TiB", 1 << 40),
            ("GiB", 1 << 30),
            ("MiB", 1 << 20),
            ("KiB", 1 << 10),
        ];
        for (name, size) in UNITS {
            if self.0 >= size && self.0.is_multiple_of(size) {
                return write!(f, "{}{name}", self.0 / size);
            }
        }
        write!(f, "{}B", self.0)
    }
}

/// Storage capacity: absolute, or a share of the data dir's filesystem.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Capacity {
    Bytes(ByteSize),
    Percent(f64),
}

impl FromStr for Capacity {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.trim().strip_suffix('%') {
            Some(number) => {
                let percent: f64 = number
                    .trim()
                    .parse()
                    .map_err(|_| format!("invalid percentage {text:?}"))?;
                if !(percent > 0.0 && percent <= 100.0) {
                    return Err(format!("percentage {text:?} must be in (0, 100]"));
                }
                Ok(Capacity::Percent(percent))
            }
            None => text.parse().map(Capacity::Bytes),
        }
    }
}

impl fmt::Display for Capacity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Capacity::Bytes(size) => size.fmt(f),
            Capacity::Percent(p) => write!(f, "{p}%"),
        }
    }
}

/// A duration written as `250ms`, `5s`, `10m`, `24h`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl FromStr for HumanDuration {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        humantime::parse_duration(text.trim())
            .map(HumanDuration)
            .map_err(|e| format!("invalid duration {text:?}: {e} (expected e.g. 250ms, 5s, 10m)"))
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        humantime::format_duration(self.0).fmt(f)
    }
}

/// Serde glue: these types are written as strings (integers are accepted for sizes).
macro_rules! string_serde {
    ($type:ty) => {
        impl Serialize for $type {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $type {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                #[derive(Deserialize)]
                #[serde(untagged)]
                enum Raw {
                    Text(String),
                    Number(u64),
                }
                match Raw::deserialize(deserializer)? {
                    Raw::Text(text) => text.parse().map_err(de::Error::custom),
                    Raw::Number(n) => n.to_string().parse().map_err(de::Error::custom),
                }
            }
        }
    };
}
string_serde!(ByteSize);
string_serde!(Capacity);
string_serde!(HumanDuration);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_and_decimal_units() {
        assert_eq!("4MiB".parse(), Ok(ByteSize(4 << 20)));
        assert_eq!("10GB".parse(), Ok(ByteSize(10_000_000_000)));
        assert_eq!("512".parse(), Ok(ByteSize(512)));
        assert_eq!("1.5KiB".parse(), Ok(ByteSize(1536)));
        assert!("12XB".parse::<ByteSize>().is_err());
        assert!("".parse::<ByteSize>().is_err());
        assert_eq!(ByteSize(64 << 20).to_string(), "64MiB");
    }

    #[test]
    fn capacity_accepts_percentages_in_range() {
        assert_eq!("80%".parse(), Ok(Capacity::Percent(80.0)));
        assert_eq!("200GiB".parse(), Ok(Capacity::Bytes(ByteSize(200 << 30))));
        assert!("0%".parse::<Capacity>().is_err());
        assert!("101%".parse::<Capacity>().is_err());
    }

    #[test]
    fn durations_parse() {
        assert_eq!(
            "250ms".parse(),
            Ok(HumanDuration(Duration::from_millis(250)))
        );
        assert_eq!("10m".parse(), Ok(HumanDuration(Duration::from_secs(600))));
        assert!("soon".parse::<HumanDuration>().is_err());
    }
}
