//! Compute units, amounts with SI prefixes, parameter counts, prices and durations.
//!
//! The ledger counts integers only: one compute unit (cu) is one GFLOP of model compute.
//! People read and write amounts as FLOPs with SI prefixes ("10 PFLOP", "3.5 TFLOP"); this
//! module converts exactly between the two and refuses anything that is not a whole number of cu.

use crate::limits::AMOUNT_MAX_CU;
use std::fmt;
use std::time::Duration;

/// FLOPs in one compute unit.
pub const FLOP_PER_CU: u128 = 1_000_000_000;

/// SI prefixes from FLOP up, as powers of 1000.
const PREFIXES: [(&str, u32); 9] = [
    ("", 0),
    ("k", 1),
    ("M", 2),
    ("G", 3),
    ("T", 4),
    ("P", 5),
    ("E", 6),
    ("Z", 7),
    ("Y", 8),
];

/// Why a string is not an amount, a parameter count or a duration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// The text is empty.
    #[error("empty value")]
    Empty,
    /// The number part is malformed.
    #[error("{text:?} is not a number (examples: 250, 3.5 TFLOP, 10 PFLOP)")]
    BadNumber {
        /// The text as given.
        text: String,
    },
    /// The unit is not one we know.
    #[error(
        "{text:?} has an unknown unit {unit:?} (use cu, or FLOP with an SI prefix: GFLOP, TFLOP, PFLOP, EFLOP)"
    )]
    BadUnit {
        /// The text as given.
        text: String,
        /// The unit part.
        unit: String,
    },
    /// Negative values are never amounts.
    #[error("{text:?} is negative")]
    Negative {
        /// The text as given.
        text: String,
    },
    /// The amount is not a whole number of cu (1 cu = 1 GFLOP).
    #[error("{text:?} is not a whole number of compute units (1 cu = 1 GFLOP)")]
    Fractional {
        /// The text as given.
        text: String,
    },
    /// The duration is longer than can be counted in milliseconds.
    #[error("{text:?} is longer than the maximum of {max_days} days")]
    TooLong {
        /// The text as given.
        text: String,
        /// The maximum, in days.
        max_days: u64,
    },
    /// The amount is too large.
    #[error("{text:?} is larger than the maximum of {max} cu")]
    TooLarge {
        /// The text as given.
        text: String,
        /// The maximum.
        max: u64,
    },
}

/// Splits "3.5 TFLOP" into ("3.5", "TFLOP") and checks the number part's shape.
fn split_number(text: &str) -> Result<(&str, &str), ParseError> {
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(ParseError::Empty);
    }
    if trimmed.starts_with('-') {
        return Err(ParseError::Negative {
            text: text.to_string(),
        });
    }
    let end = trimmed
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '_'))
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(end);
    let digits = number.replace('_', "");
    let dots = digits.matches('.').count();
    if digits.is_empty() || digits == "." || dots > 1 {
        return Err(ParseError::BadNumber {
            text: text.to_string(),
        });
    }
    Ok((number, unit.trim()))
}

/// A decimal number as an integer mantissa and a count of fractional digits: "3.50" → (350, 2).
fn decimal(number: &str, text: &str) -> Result<(u128, u32), ParseError> {
    let digits = number.replace('_', "");
    let (whole, fraction) = digits.split_once('.').unwrap_or((&digits, ""));
    let fraction = fraction.trim_end_matches('0');
    let all = format!("{whole}{fraction}");
    let too_large = || ParseError::TooLarge {
        text: text.to_string(),
        max: AMOUNT_MAX_CU,
    };
    if all.len() > 36 {
        return Err(too_large());
    }
    let mantissa = if all.is_empty() {
        0
    } else {
        all.parse::<u128>().map_err(|_| ParseError::BadNumber {
            text: text.to_string(),
        })?
    };
    Ok((mantissa, fraction.len() as u32))
}

/// Parses an amount of compute into cu.
///
/// Accepts a bare integer (cu), `N cu`, or a decimal with a FLOP unit and an optional SI prefix:
/// `250 GFLOP`, `3.5 TFLOP`, `10 PFLOP`, `1 EFLOP`. The result must be a whole number of cu and at
/// most [`AMOUNT_MAX_CU`]. Zero parses; whether zero is allowed is the caller's rule.
pub fn parse_amount_cu(text: &str) -> Result<u64, ParseError> {
    let (number, unit) = split_number(text)?;
    let (mantissa, fraction_digits) = decimal(number, text)?;
    // FLOPs per unit of the number, as a power of ten.
    let unit_exponent: u32 = if unit.is_empty() || unit.eq_ignore_ascii_case("cu") {
        9
    } else {
        let stem = unit
            .strip_suffix("FLOPs")
            .or_else(|| unit.strip_suffix("FLOP"))
            .ok_or_else(|| ParseError::BadUnit {
                text: text.to_string(),
                unit: unit.to_string(),
            })?;
        let (_, power) = PREFIXES
            .iter()
            .find(|(prefix, _)| *prefix == stem)
            .ok_or_else(|| ParseError::BadUnit {
                text: text.to_string(),
                unit: unit.to_string(),
            })?;
        power * 3
    };
    let too_large = || ParseError::TooLarge {
        text: text.to_string(),
        max: AMOUNT_MAX_CU,
    };
    // value_flop = mantissa * 10^(unit_exponent - fraction_digits); cu = value_flop / 10^9.
    let exponent = i64::from(unit_exponent) - i64::from(fraction_digits) - 9;
    let cu: u128 = if exponent >= 0 {
        let scale = 10u128.checked_pow(exponent as u32).ok_or_else(too_large)?;
        mantissa.checked_mul(scale).ok_or_else(too_large)?
    } else {
        let scale =
            10u128
                .checked_pow((-exponent) as u32)
                .ok_or_else(|| ParseError::Fractional {
                    text: text.to_string(),
                })?;
        if mantissa % scale != 0 {
            return Err(ParseError::Fractional {
                text: text.to_string(),
            });
        }
        mantissa / scale
    };
    if cu > u128::from(AMOUNT_MAX_CU) {
        return Err(too_large());
    }
    Ok(cu as u64)
}

/// An amount of compute shown as FLOPs with an SI prefix, e.g. `3.5 TFLOP`.
///
/// At most three decimals are shown, rounded; the exact value is always available as cu.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flops(pub i64);

impl fmt::Display for Flops {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let cu = self.0;
        if cu == 0 {
            return write!(f, "0 FLOP");
        }
        let sign = if cu < 0 { "-" } else { "" };
        let magnitude = u128::from(cu.unsigned_abs());
        // Start at GFLOP (1 cu) and climb while the value is at least 1000 of the next prefix.
        let mut power = 3usize;
        let mut divisor: u128 = 1;
        while power + 1 < PREFIXES.len() && magnitude >= divisor * 1000 {
            divisor *= 1000;
            power += 1;
        }
        let mut thousandths = (magnitude * 1000 + divisor / 2) / divisor;
        // Rounding can carry into the next prefix: 999.9996 TFLOP shows as 1 PFLOP.
        if thousandths >= 1_000_000 && power + 1 < PREFIXES.len() {
            divisor *= 1000;
            power += 1;
            thousandths = (magnitude * 1000 + divisor / 2) / divisor;
        }
        let whole = thousandths / 1000;
        let fraction = thousandths % 1000;
        let prefix = PREFIXES[power].0;
        if fraction == 0 {
            write!(f, "{sign}{whole} {prefix}FLOP")
        } else {
            let fraction = format!("{fraction:03}");
            write!(
                f,
                "{sign}{whole}.{} {prefix}FLOP",
                fraction.trim_end_matches('0')
            )
        }
    }
}

/// Parses a parameter count: `135M`, `8B`, `1.5B`, `70k`, or a plain integer.
pub fn parse_params(text: &str) -> Result<u64, ParseError> {
    let (number, unit) = split_number(text)?;
    let (mantissa, fraction_digits) = decimal(number, text)?;
    let power: u32 = match unit {
        "" => 0,
        "k" | "K" => 3,
        "M" | "m" => 6,
        "B" | "b" | "G" => 9,
        "T" | "t" => 12,
        _ => {
            return Err(ParseError::BadUnit {
                text: text.to_string(),
                unit: unit.to_string(),
            });
        }
    };
    let exponent = i64::from(power) - i64::from(fraction_digits);
    let too_large = || ParseError::TooLarge {
        text: text.to_string(),
        max: u64::MAX,
    };
    let value = if exponent >= 0 {
        mantissa
            .checked_mul(10u128.pow(exponent as u32))
            .ok_or_else(too_large)?
    } else {
        mantissa / 10u128.pow((-exponent) as u32)
    };
    u64::try_from(value).map_err(|_| too_large())
}

/// The default price of one token, in cu, for a model with `params_active` active parameters:
/// the forward-pass cost `ceil(2 × N / 1e9)`, and never zero, so that no call is free.
pub fn default_price_cu_per_token(params_active: u64) -> u64 {
    let flop = 2u128 * u128::from(params_active);
    let cu = flop.div_ceil(FLOP_PER_CU);
    cu.clamp(1, u128::from(AMOUNT_MAX_CU)) as u64
}

/// Parses a duration: an integer followed by `ms`, `s`, `m`, `h` or `d` (`1d`, `30m`, `45s`).
pub fn parse_duration(text: &str) -> Result<Duration, ParseError> {
    let (number, unit) = split_number(text)?;
    if number.contains('.') {
        return Err(ParseError::BadNumber {
            text: text.to_string(),
        });
    }
    let value: u64 = number
        .replace('_', "")
        .parse()
        .map_err(|_| ParseError::BadNumber {
            text: text.to_string(),
        })?;
    let millis_per: u64 = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => {
            return Err(ParseError::BadUnit {
                text: text.to_string(),
                unit: unit.to_string(),
            });
        }
    };
    let millis = value
        .checked_mul(millis_per)
        .ok_or_else(|| ParseError::TooLong {
            text: text.to_string(),
            max_days: u64::MAX / 86_400_000,
        })?;
    Ok(Duration::from_millis(millis))
}

/// Shows a duration the way [`parse_duration`] reads it, in the largest exact unit.
pub fn format_duration(duration: Duration) -> String {
    let millis = duration.as_millis();
    for (unit, per) in [
        ("d", 86_400_000u128),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1_000),
    ] {
        if millis >= per && millis.is_multiple_of(per) {
            return format!("{}{unit}", millis / per);
        }
    }
    format!("{millis}ms")
}

/// Shows ms since the UNIX epoch as RFC 3339 in UTC, to the second: `2026-11-30T00:00:00Z`.
pub fn format_utc(ms: i64) -> String {
    let seconds = ms.div_euclid(1_000);
    let days = seconds.div_euclid(86_400);
    let of_day = seconds.rem_euclid(86_400);
    // Days since 1970-01-01 to a civil date (Howard Hinnant's `civil_from_days`).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        of_day / 3_600,
        of_day % 3_600 / 60,
        of_day % 60
    )
}

/// Reads [`format_utc`]'s form back, `2026-11-30T00:00:00Z`, as ms since the UNIX epoch; `None`
/// for anything else.
pub fn parse_utc(text: &str) -> Option<i64> {
    let bytes = text.as_bytes();
    let shape_ok = bytes.len() == 20
        && bytes[4] == b'-'
        && bytes[7] == b'-'
        && bytes[10] == b'T'
        && bytes[13] == b':'
        && bytes[16] == b':'
        && bytes[19] == b'Z';
    if !shape_ok {
        return None;
    }
    let number = |range: std::ops::Range<usize>| -> Option<i64> {
        let digits = text.get(range)?;
        if !digits.bytes().all(|byte| byte.is_ascii_digit()) {
            return None;
        }
        digits.parse().ok()
    };
    let (year, month, day) = (number(0..4)?, number(5..7)?, number(8..10)?);
    let (hour, minute, second) = (number(11..13)?, number(14..16)?, number(17..19)?);
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 59
    {
        return None;
    }
    // Civil date to days since 1970-01-01 (Howard Hinnant's `days_from_civil`).
    let year_shifted = if month <= 2 { year - 1 } else { year };
    let era = year_shifted.div_euclid(400);
    let year_of_era = year_shifted - era * 400;
    let month_index = (month + 9) % 12;
    let day_of_year = (153 * month_index + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    let days = era * 146_097 + day_of_era - 719_468;
    let ms = (days * 86_400 + hour * 3_600 + minute * 60 + second) * 1_000;
    // A day past the month's end (February 30th) reads back as another date: refused.
    (format_utc(ms) == text).then_some(ms)
}

/// An amount with what it buys of one model: `1 TFLOP (≈ 1000 tokens of smollm2-135m)`.
pub fn describe_tokens(amount_cu: u64, price_cu_per_token: u64, model: &str) -> String {
    let tokens = amount_cu / price_cu_per_token.max(1);
    format!("{} (≈ {tokens} tokens of {model})", Flops(amount_cu as i64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_parse_exactly() {
        let cases: &[(&str, u64)] = &[
            ("0", 0),
            ("250", 250),
            ("250 cu", 250),
            ("250 GFLOP", 250),
            ("250GFLOP", 250),
            ("3.5 TFLOP", 3_500),
            ("10 PFLOP", 10_000_000),
            ("1 EFLOP", 1_000_000_000),
            ("1.000001 PFLOP", 1_000_001),
            ("1000 MFLOP", 1),
            ("1000000000 FLOP", 1),
            ("2 TFLOPs", 2_000),
            ("1_000 GFLOP", 1_000),
            (" 7 ", 7),
        ];
        for (text, expected) in cases {
            assert_eq!(parse_amount_cu(text), Ok(*expected), "{text}");
        }
    }

    #[test]
    fn bad_amounts_are_refused_with_the_reason() {
        assert_eq!(parse_amount_cu(""), Err(ParseError::Empty));
        assert!(matches!(
            parse_amount_cu("-5"),
            Err(ParseError::Negative { .. })
        ));
        assert!(matches!(
            parse_amount_cu("1.5 GFLOP"),
            Err(ParseError::Fractional { .. })
        ));
        assert!(matches!(
            parse_amount_cu("500 MFLOP"),
            Err(ParseError::Fractional { .. })
        ));
        assert!(matches!(
            parse_amount_cu("5 XFLOP"),
            Err(ParseError::BadUnit { .. })
        ));
        assert!(matches!(
            parse_amount_cu("5 dollars"),
            Err(ParseError::BadUnit { .. })
        ));
        assert!(matches!(
            parse_amount_cu("1.2.3"),
            Err(ParseError::BadNumber { .. })
        ));
        assert!(matches!(
            parse_amount_cu("abc"),
            Err(ParseError::BadNumber { .. })
        ));
        assert!(matches!(
            parse_amount_cu("10000 YFLOP"),
            Err(ParseError::TooLarge { .. })
        ));
        assert!(matches!(
            parse_amount_cu("99999999999999999999999999999999999999999"),
            Err(ParseError::TooLarge { .. })
        ));
    }

    #[test]
    fn amounts_display_with_prefixes() {
        let cases: &[(i64, &str)] = &[
            (0, "0 FLOP"),
            (1, "1 GFLOP"),
            (250, "250 GFLOP"),
            (3_500, "3.5 TFLOP"),
            (10_000_000, "10 PFLOP"),
            (1_234_567, "1.235 PFLOP"),
            (-3_500, "-3.5 TFLOP"),
            (999_999, "999.999 TFLOP"),
            (999_999_600, "1 EFLOP"),
            (i64::MAX, "9223.372 YFLOP"),
        ];
        for (cu, expected) in cases {
            assert_eq!(Flops(*cu).to_string(), *expected, "{cu}");
        }
    }

    #[test]
    fn display_round_trips_where_exact() {
        for cu in [1u64, 999, 1_000, 3_500, 10_000_000, 1_500_000_000] {
            let shown = Flops(cu as i64).to_string();
            assert_eq!(parse_amount_cu(&shown), Ok(cu), "{shown}");
        }
    }

    #[test]
    fn params_and_prices() {
        assert_eq!(parse_params("135M"), Ok(135_000_000));
        assert_eq!(parse_params("8B"), Ok(8_000_000_000));
        assert_eq!(parse_params("1.5B"), Ok(1_500_000_000));
        assert_eq!(parse_params("70000"), Ok(70_000));
        assert!(parse_params("8Q").is_err());
        // 2 × 135M = 0.27 GFLOP per token, rounded up to 1 cu: never free.
        assert_eq!(default_price_cu_per_token(135_000_000), 1);
        assert_eq!(default_price_cu_per_token(8_000_000_000), 16);
        assert_eq!(default_price_cu_per_token(8_000_000_001), 17);
        assert_eq!(default_price_cu_per_token(0), 1);
        assert_eq!(default_price_cu_per_token(70_000_000_000), 140);
    }

    #[test]
    fn utc_times() {
        assert_eq!(format_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_utc(1_764_460_800_000), "2025-11-30T00:00:00Z");
        assert_eq!(format_utc(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(format_utc(1_709_251_199_999), "2024-02-29T23:59:59Z");
        assert_eq!(format_utc(-1_000), "1969-12-31T23:59:59Z");
        assert_eq!(format_utc(4_102_444_800_000), "2100-01-01T00:00:00Z");
    }

    #[test]
    fn utc_times_read_back() {
        for ms in [
            0,
            1_764_460_800_000,
            951_782_400_000,
            1_709_251_199_000,
            -1_000,
            4_102_444_800_000,
        ] {
            assert_eq!(parse_utc(&format_utc(ms)), Some(ms), "{ms}");
        }
        for text in [
            "2025-02-30T00:00:00Z",
            "2025-13-01T00:00:00Z",
            "2025-11-30T24:00:00Z",
            "2025-11-30 00:00:00Z",
            "2025-11-30T00:00:00",
            "+025-11-30T00:00:00Z",
            "1764460800000",
            "",
        ] {
            assert_eq!(parse_utc(text), None, "{text}");
        }
    }

    #[test]
    fn tokens_of_a_model() {
        assert_eq!(
            describe_tokens(1_000, 1, "smollm2-135m"),
            "1 TFLOP (≈ 1000 tokens of smollm2-135m)"
        );
        assert_eq!(
            describe_tokens(100, 16, "llama-3.1-8b"),
            "100 GFLOP (≈ 6 tokens of llama-3.1-8b)"
        );
        assert_eq!(describe_tokens(5, 0, "m"), "5 GFLOP (≈ 5 tokens of m)");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("1d"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("30m"), Ok(Duration::from_secs(1_800)));
        assert_eq!(parse_duration("45s"), Ok(Duration::from_secs(45)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse_duration("1.5h").is_err());
        assert!(parse_duration("1w").is_err());
        assert!(parse_duration("-1d").is_err());
        // Too long is said in days, not in cu (a regression test).
        let too_long = parse_duration("99999999999999999d")
            .unwrap_err()
            .to_string();
        assert!(
            too_long.contains("days") && !too_long.contains("cu"),
            "{too_long}"
        );
        assert_eq!(format_duration(Duration::from_secs(86_400)), "1d");
        assert_eq!(format_duration(Duration::from_secs(5_400)), "90m");
        assert_eq!(format_duration(Duration::from_millis(1_500)), "1500ms");
    }
}
