//! Timestamp parsing: the handful of forms gateways write, parsed by hand (no allocation, no
//! locale), into milliseconds since the Unix epoch (UTC).

/// The latest instant accepted: 9999-12-31T23:59:59.999Z. Anything later is a unit mix-up.
const MAX_MS: i64 = 253_402_300_799_999;

/// Parses a timestamp string into ms since the Unix epoch (UTC).
///
/// Accepted forms:
/// - RFC 3339 / ISO 8601 with `Z` or an offset (`+02:00`, `+0200`, `+02`), any number of
///   fraction digits (kept to the millisecond, truncated), `T`, `t` or a space between date
///   and time: `2021-03-01T12:34:56.789Z`, `2021-02-25T06:37:48+00:00`;
/// - the same without an offset, read as UTC: `2021-03-01 12:34:56.789`;
/// - the common log format `10/Oct/2000:13:55:36 -0700` (optionally in `[...]`);
/// - numeric strings, read as an epoch with [`epoch_to_ms`] (`1614232668.342`).
///
/// Returns `None` for anything else, including impossible dates (`2021-02-30`).
pub fn parse_timestamp(s: &str) -> Option<i64> {
    let s = s.trim();
    let b = s.as_bytes();
    if b.is_empty() {
        return None;
    }
    if is_numeric(b) {
        return epoch_to_ms(s.parse::<f64>().ok()?);
    }
    if b.len() >= 10 && b[4] == b'-' {
        return parse_iso(b);
    }
    parse_clf(s)
}

/// Epoch number to ms, guessing the unit by magnitude: seconds below 1e11, milliseconds
/// below 1e14, microseconds below 1e17, nanoseconds above. Fractions are allowed (nginx
/// `$msec` is `1614232668.342`); the result is rounded to the nearest millisecond.
///
/// Returns `None` for negative, non-finite or absurdly large values (after year 9999).
pub fn epoch_to_ms(v: f64) -> Option<i64> {
    if !v.is_finite() || v < 0.0 {
        return None;
    }
    let ms = if v < 1e11 {
        v * 1e3
    } else if v < 1e14 {
        v
    } else if v < 1e17 {
        v / 1e3
    } else {
        v / 1e6
    };
    ms_from_f64(ms)
}

/// Scales an epoch number with a known unit (`ms_per_unit`: 1000 for seconds, 1e-3 for
/// microseconds, ...) to ms, rounded; `None` if negative, non-finite or after year 9999.
pub(crate) fn scale_epoch(v: f64, ms_per_unit: f64) -> Option<i64> {
    if !v.is_finite() || v < 0.0 {
        return None;
    }
    ms_from_f64(v * ms_per_unit)
}

fn ms_from_f64(ms: f64) -> Option<i64> {
    let ms = ms.round();
    if (0.0..=MAX_MS as f64).contains(&ms) {
        Some(ms as i64)
    } else {
        None
    }
}

/// Digits with at most one `.` (and at least one digit): an epoch number.
fn is_numeric(b: &[u8]) -> bool {
    let mut dots = 0;
    let mut digits = 0;
    for &c in b {
        match c {
            b'0'..=b'9' => digits += 1,
            b'.' => dots += 1,
            _ => return false,
        }
    }
    digits > 0 && dots <= 1
}

/// `YYYY-MM-DD[Tt ]HH:MM:SS[.fff...][Z|±HH[:MM]|±HHMM]`; no offset means UTC.
/// [`parse_iso_any`] within 1970..=9999: an event time before the epoch is a broken
/// record (found by fuzzing: `0224-01-01 00:00:00` gave a negative time).
pub(crate) fn parse_iso(b: &[u8]) -> Option<i64> {
    parse_iso_any(b).filter(|ms| (0..=MAX_MS).contains(ms))
}

fn parse_iso_any(b: &[u8]) -> Option<i64> {
    let mut p = Cursor { b, i: 0 };
    let year = p.digits(4)?;
    p.expect(b'-')?;
    let month = p.digits(2)?;
    p.expect(b'-')?;
    let day = p.digits(2)?;
    match p.next()? {
        b'T' | b't' | b' ' => {}
        _ => return None,
    }
    let hour = p.digits(2)?;
    p.expect(b':')?;
    let minute = p.digits(2)?;
    p.expect(b':')?;
    let second = p.digits(2)?;
    let millis = p.fraction();
    let offset_min = match p.peek() {
        None => 0,
        Some(b'Z' | b'z') => {
            p.i += 1;
            0
        }
        Some(_) => {
            // Tolerate one space before the offset ("2021-03-01 12:00:00 +0000").
            if p.peek() == Some(b' ') {
                p.i += 1;
            }
            p.offset(true)?
        }
    };
    if p.i != b.len() {
        return None;
    }
    to_ms(year, month, day, hour, minute, second, millis, offset_min)
}

/// `DD/Mon/YYYY:HH:MM:SS[ ±HHMM]`, optionally in brackets; no offset means UTC.
/// [`parse_clf_any`] within 1970..=9999, as [`parse_iso`].
pub(crate) fn parse_clf(s: &str) -> Option<i64> {
    parse_clf_any(s).filter(|ms| (0..=MAX_MS).contains(ms))
}

fn parse_clf_any(s: &str) -> Option<i64> {
    let s = s.trim();
    let s = s.strip_prefix('[').unwrap_or(s);
    let s = s.strip_suffix(']').unwrap_or(s);
    let b = s.as_bytes();
    let mut p = Cursor { b, i: 0 };
    let day = p.digits(2)?;
    p.expect(b'/')?;
    let mon = b.get(p.i..p.i + 3)?;
    p.i += 3;
    let month = month_from_abbrev(mon)?;
    p.expect(b'/')?;
    let year = p.digits(4)?;
    p.expect(b':')?;
    let hour = p.digits(2)?;
    p.expect(b':')?;
    let minute = p.digits(2)?;
    p.expect(b':')?;
    let second = p.digits(2)?;
    let millis = p.fraction();
    let offset_min = if p.peek().is_none() {
        0
    } else {
        p.expect(b' ')?;
        p.offset(false)?
    };
    if p.i != b.len() {
        return None;
    }
    to_ms(year, month, day, hour, minute, second, millis, offset_min)
}

fn month_from_abbrev(m: &[u8]) -> Option<u32> {
    const MONTHS: [&[u8; 3]; 12] = [
        b"jan", b"feb", b"mar", b"apr", b"may", b"jun", b"jul", b"aug", b"sep", b"oct", b"nov",
        b"dec",
    ];
    let lower = [
        m[0].to_ascii_lowercase(),
        m[1].to_ascii_lowercase(),
        m[2].to_ascii_lowercase(),
    ];
    MONTHS
        .iter()
        .position(|x| **x == lower)
        .map(|i| i as u32 + 1)
}

struct Cursor<'b> {
    b: &'b [u8],
    i: usize,
}

impl Cursor<'_> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let c = self.peek()?;
        self.i += 1;
        Some(c)
    }

    fn expect(&mut self, c: u8) -> Option<()> {
        (self.next()? == c).then_some(())
    }

    fn digits(&mut self, n: usize) -> Option<u32> {
        let s = self.b.get(self.i..self.i + n)?;
        let mut v = 0u32;
        for &c in s {
            if !c.is_ascii_digit() {
                return None;
            }
            v = v * 10 + u32::from(c - b'0');
        }
        self.i += n;
        Some(v)
    }

    /// An optional `.fff...` or `,fff...`: milliseconds, extra digits truncated.
    fn fraction(&mut self) -> u32 {
        if !matches!(self.peek(), Some(b'.' | b',')) {
            return 0;
        }
        let start = self.i + 1;
        let mut end = start;
        while end < self.b.len() && self.b[end].is_ascii_digit() {
            end += 1;
        }
        if end == start {
            return 0; // leaves the '.' unconsumed: the caller then rejects the string
        }
        self.i = end;
        let mut ms = 0;
        for k in 0..3 {
            ms *= 10;
            if let Some(&c) = self.b[start..end].get(k) {
                ms += u32::from(c - b'0');
            }
        }
        ms
    }

    /// `±HH:MM`, `±HHMM` or `±HH` (the colon form only when `colon_ok`): minutes east of UTC.
    fn offset(&mut self, colon_ok: bool) -> Option<i32> {
        let sign = match self.next()? {
            b'+' => 1,
            b'-' => -1,
            _ => return None,
        };
        let h = self.digits(2)?;
        let m = match self.peek() {
            None => 0,
            Some(b':') if colon_ok => {
                self.i += 1;
                self.digits(2)?
            }
            Some(_) => self.digits(2)?,
        };
        if h > 23 || m > 59 {
            return None;
        }
        Some(sign * (h * 60 + m) as i32)
    }
}

#[allow(clippy::too_many_arguments)]
fn to_ms(
    year: u32,
    month: u32,
    day: u32,
    hour: u32,
    minute: u32,
    second: u32,
    millis: u32,
    offset_min: i32,
) -> Option<i64> {
    if !(1..=12).contains(&month) || day == 0 || day > days_in_month(year, month) {
        return None;
    }
    if hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    // A leap second stays in its minute.
    let (second, millis) = if second == 60 {
        (59, 999)
    } else {
        (second, millis)
    };
    let days = days_from_civil(i64::from(year), month, day);
    let secs =
        days * 86_400 + i64::from(hour * 3600 + minute * 60 + second) - i64::from(offset_min) * 60;
    Some(secs * 1000 + i64::from(millis))
}

fn days_in_month(year: u32, month: u32) -> u32 {
    match month {
        4 | 6 | 9 | 11 => 30,
        2 if year.is_multiple_of(4) && (!year.is_multiple_of(100) || year.is_multiple_of(400)) => {
            29
        }
        2 => 28,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamp_forms() {
        let cases: &[(&str, i64)] = &[
            // RFC 3339 / ISO 8601
            ("1970-01-01T00:00:00Z", 0),
            ("2021-02-25T06:37:48Z", 1_614_235_068_000),
            ("2021-02-25T06:37:48+00:00", 1_614_235_068_000),
            ("2021-02-25T06:37:48.342Z", 1_614_235_068_342),
            ("2021-02-25T06:37:48.3Z", 1_614_235_068_300),
            ("2021-02-25T06:37:48.34Z", 1_614_235_068_340),
            ("2021-02-25T06:37:48.342999999Z", 1_614_235_068_342),
            ("2021-02-25T06:37:48,342Z", 1_614_235_068_342),
            ("2021-02-25t06:37:48.342z", 1_614_235_068_342),
            ("2021-02-25T07:37:48.342+01:00", 1_614_235_068_342),
            ("2021-02-25T07:37:48.342+0100", 1_614_235_068_342),
            ("2021-02-25T07:37:48.342+01", 1_614_235_068_342),
            ("2021-02-25T01:07:48.342-05:30", 1_614_235_068_342),
            ("2021-02-25T06:37:48-00:00", 1_614_235_068_000),
            ("  2021-02-25T06:37:48Z  ", 1_614_235_068_000),
            // Traefik: nanoseconds
            ("2020-07-21T13:48:40.497523162Z", 1_595_339_320_497),
            // DST: Europe/Berlin springs forward on 2021-03-28 (02:00 CET -> 03:00 CEST)
            ("2021-03-28T01:59:59+01:00", 1_616_893_199_000),
            ("2021-03-28T03:00:00+02:00", 1_616_893_200_000),
            // US/Eastern falls back on 2021-11-07: 01:30 happens twice
            ("2021-11-07T01:30:00-04:00", 1_636_263_000_000),
            ("2021-11-07T01:30:00-05:00", 1_636_266_600_000),
            // leap years and the leap second
            ("2024-02-29T00:00:00Z", 1_709_164_800_000),
            ("2000-02-29T12:00:00Z", 951_825_600_000),
            ("2016-12-31T23:59:60Z", 1_483_228_799_999),
            // space-separated, UTC unless an offset follows
            ("2021-02-25 06:37:48", 1_614_235_068_000),
            ("2021-02-25 06:37:48.342", 1_614_235_068_342),
            ("2021-02-25 07:37:48 +0100", 1_614_235_068_000),
            ("2021-02-25 07:37:48+01:00", 1_614_235_068_000),
            // common log format
            ("10/Oct/2000:13:55:36 -0700", 971_211_336_000),
            ("[10/Oct/2000:13:55:36 -0700]", 971_211_336_000),
            ("25/Feb/2021:06:37:48 +0000", 1_614_235_068_000),
            ("25/feb/2021:07:37:48 +0100", 1_614_235_068_000),
            ("25/Feb/2021:06:37:48", 1_614_235_068_000),
            ("28/Mar/2021:03:00:00 +0200", 1_616_893_200_000),
            // numeric strings: the unit guessed by magnitude
            ("1614232668", 1_614_232_668_000),
            ("1614232668.342", 1_614_232_668_342),
            ("1614232668.3429", 1_614_232_668_343),
            ("1614232668342", 1_614_232_668_342),
            ("1614232668342.7", 1_614_232_668_343),
            ("1614232668342123", 1_614_232_668_342),
            ("1614232668342123456", 1_614_232_668_342),
            ("0", 0),
            ("99999999999", 99_999_999_999_000),
            ("100000000000", 100_000_000_000),
        ];
        for &(input, want) in cases {
            assert_eq!(parse_timestamp(input), Some(want), "{input:?}");
        }
        // Whatever chrono reads as RFC 3339 must agree (leap seconds aside).
        let mut checked = 0;
        for &(input, want) in cases {
            if let Ok(dt) = chrono::DateTime::parse_from_rfc3339(input.trim()) {
                if !input.contains(":60") {
                    assert_eq!(dt.timestamp_millis(), want, "chrono {input:?}");
                    checked += 1;
                }
            }
        }
        assert!(checked > 15, "{checked}");
    }

    #[test]
    fn timestamp_rejects() {
        let bad = [
            "",
            "   ",
            "-",
            "yesterday",
            "2021-02-30T00:00:00Z",
            "2021-02-29T00:00:00Z",
            "1900-02-29T00:00:00Z",
            // Found by fuzzing (FUZZING.md): before the epoch, in every form.
            "0224-01-01 00:00:00.5123456",
            "1969-12-31T23:59:59.999Z",
            "1970-01-01T00:30:00+01:00",
            "10/Oct/1900:13:55:36 -0700",
            "2021-13-01T00:00:00Z",
            "2021-00-01T00:00:00Z",
            "2021-01-00T00:00:00Z",
            "2021-01-01T24:00:00Z",
            "2021-01-01T23:60:00Z",
            "2021-01-01T23:59:61Z",
            "2021-01-01",
            "2021-01-01T12:00Z",
            "2021-01-01T12:00:00.Z",
            "2021-01-01T12:00:00+25:00",
            "2021-01-01T12:00:00+01:60",
            "2021-01-01T12:00:00Q",
            "2021-01-01T12:00:00Z trailing",
            "21-01-01T12:00:00Z",
            "10/Foo/2000:13:55:36 -0700",
            "10/Oct/2000 13:55:36 -0700",
            "32/Oct/2000:13:55:36 -0700",
            "10/Oct/2000:13:55:36 -07:00",
            "10/Oct/2000:13:55:36 0700",
            "1.2.3",
            "-1614232668",
            "1e12",
            "NaN",
            "inf",
            "99999999999999999999999999",
        ];
        for input in bad {
            assert_eq!(parse_timestamp(input), None, "{input:?}");
        }
    }

    #[test]
    fn epoch_units_by_magnitude() {
        let cases: &[(f64, Option<i64>)] = &[
            (0.0, Some(0)),
            (1_614_232_668.0, Some(1_614_232_668_000)),
            (1_614_232_668.342, Some(1_614_232_668_342)),
            (1_614_232_668.342_6, Some(1_614_232_668_343)),
            (99_999_999_999.0, Some(99_999_999_999_000)),
            (1e11, Some(100_000_000_000)),
            (1_614_232_668_342.0, Some(1_614_232_668_342)),
            (99_999_999_999_999.0, Some(99_999_999_999_999)),
            (1e14, Some(100_000_000_000)),
            (1_614_232_668_342_123.0, Some(1_614_232_668_342)),
            (1e17, Some(100_000_000_000)),
            (1_614_232_668_342_123_456.0, Some(1_614_232_668_342)),
            (-1.0, None),
            (f64::NAN, None),
            (f64::INFINITY, None),
            (1e30, None),
        ];
        for &(v, want) in cases {
            assert_eq!(epoch_to_ms(v), want, "{v}");
        }
        assert_eq!(scale_epoch(1.5, 1000.0), Some(1500));
        assert_eq!(scale_epoch(1_500_000.0, 1e-6), Some(2));
        assert_eq!(scale_epoch(-1.0, 1.0), None);
    }
}
