//! Calendar helpers for the usage ledger: UTC days and months from Unix time.
//!
//! The ledger keys totals by UTC day (`YYYY-MM-DD`) and quotas by calendar
//! month (`YYYY-MM`). This is the civil-from-days algorithm, exact for the
//! proleptic Gregorian calendar, so no time-zone library is needed.

/// A UTC calendar date.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Date {
    pub year: i32,
    pub month: u32,
    pub day: u32,
}

impl Date {
    /// The UTC date that contains the Unix time `secs`.
    pub fn from_unix(secs: u64) -> Self {
        let days = (secs / 86_400) as i64;
        // Shift the epoch to 0000-03-01 so leap days fall at the end of a year.
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        let year = (yoe + era * 400 + i64::from(month <= 2)) as i32;
        Self { year, month, day }
    }

    /// Parses a `YYYY-MM-DD` day key; `None` unless it is a real date.
    pub fn parse_day(s: &str) -> Option<Self> {
        let b = s.as_bytes();
        if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
            return None;
        }
        let year: i32 = s.get(0..4)?.parse().ok()?;
        let month: u32 = s.get(5..7)?.parse().ok()?;
        let day: u32 = s.get(8..10)?.parse().ok()?;
        let date = Self { year, month, day };
        // Round-trip through Unix days rejects 2026-02-30 and friends.
        (year >= 1970 && Self::from_unix(date.unix_midnight()) == date).then_some(date)
    }

    /// Unix seconds at 00:00 UTC of this date (dates from 1970 on).
    pub fn unix_midnight(&self) -> u64 {
        let (y, m, d) = (
            i64::from(self.year),
            i64::from(self.month),
            i64::from(self.day),
        );
        let y = if m <= 2 { y - 1 } else { y };
        let era = y.div_euclid(400);
        let yoe = y.rem_euclid(400);
        let mp = (m + 9) % 12;
        let doy = (153 * mp + 2) / 5 + d - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        let days = era * 146_097 + doe - 719_468;
        u64::try_from(days.max(0)).unwrap_or(0) * 86_400
    }

    /// The day keys from `self` to `last`, both included, at most `limit`.
    pub fn days_through(&self, last: &Date, limit: usize) -> Vec<String> {
        let (start, end) = (self.unix_midnight(), last.unix_midnight());
        (0..limit as u64)
            .map(|i| start + i * 86_400)
            .take_while(|t| *t <= end)
            .map(|t| Self::from_unix(t).day_key())
            .collect()
    }

    /// `YYYY-MM-DD`.
    pub fn day_key(&self) -> String {
        format!("{:04}-{:02}-{:02}", self.year, self.month, self.day)
    }

    /// `YYYY-MM`.
    pub fn month_key(&self) -> String {
        format!("{:04}-{:02}", self.year, self.month)
    }
}

/// Seconds since the Unix epoch, from the system clock.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_dates() {
        assert_eq!(Date::from_unix(0).day_key(), "1970-01-01");
        // 2000-02-29, a leap day in a century leap year.
        assert_eq!(Date::from_unix(951_782_400).day_key(), "2000-02-29");
        // 2026-11-23 12:00:00 UTC.
        let d = Date::from_unix(1_795_435_200);
        assert_eq!(d.day_key(), "2026-11-23");
        assert_eq!(d.month_key(), "2026-11");
        // Last second of 2024-12-31.
        assert_eq!(Date::from_unix(1_735_689_599).day_key(), "2024-12-31");
        assert_eq!(Date::from_unix(1_735_689_600).day_key(), "2025-01-01");
    }

    #[test]
    fn parse_and_iterate_days() {
        let d = Date::parse_day("2026-11-23").expect("valid");
        assert_eq!(d.unix_midnight(), 1_795_392_000);
        assert_eq!(
            Date::parse_day("2024-02-29")
                .map(|d| d.day_key())
                .as_deref(),
            Some("2024-02-29")
        );
        for bad in [
            "2026-02-30",
            "2026-13-01",
            "26-11-23",
            "2026/11/23",
            "x",
            "1969-12-31",
        ] {
            assert_eq!(Date::parse_day(bad), None, "{bad}");
        }
        let last = Date::parse_day("2026-12-02").expect("valid");
        let days = Date::parse_day("2026-11-29")
            .expect("valid")
            .days_through(&last, 100);
        assert_eq!(
            days,
            ["2026-11-29", "2026-11-30", "2026-12-01", "2026-12-02"]
        );
        assert_eq!(d.days_through(&last, 2).len(), 2);
        assert!(last.days_through(&d, 10).is_empty());
    }
}
