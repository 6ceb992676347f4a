//! Small helpers shared by the command line and the daemon: sizes with suffixes, wildcards.

/// Parses a size such as `4096`, `512K`, `10G`, `1.5T` or `64MiB` into bytes (binary units).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        return Err(format!(
            "invalid size {text:?}: expected a number such as 10G"
        ));
    }
    let shift = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        "P" | "PB" | "PIB" => 50,
        other => {
            return Err(format!(
                "invalid size {text:?}: unknown unit {other:?} (use K, M, G, T)"
            ))
        }
    };
    let value = if let Some((whole, frac)) = num.split_once('.') {
        let whole: u64 = whole
            .parse()
            .map_err(|_| format!("invalid size {text:?}"))?;
        let frac_val: f64 = format!("0.{frac}")
            .parse()
            .map_err(|_| format!("invalid size {text:?}"))?;
        let w = whole.checked_shl(shift).filter(|v| v >> shift == whole);
        let f = (frac_val * (1u64 << shift) as f64) as u64;
        w.and_then(|w| w.checked_add(f))
    } else {
        let n: u64 = num.parse().map_err(|_| format!("invalid size {text:?}"))?;
        n.checked_shl(shift).filter(|v| v >> shift == n)
    };
    value.ok_or_else(|| format!("invalid size {text:?}: too large"))
}

/// Formats bytes for people: `0 B`, `512 B`, `4.0 KiB`, `1.5 GiB`.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}

/// Whether `target` matches `name`, where `*` in `target` stands for any run of characters
/// and `?` for any one (snapshot schedules, NBD access rules).
pub fn wildcard_match(target: &str, name: &str) -> bool {
    let (t, n) = (target.as_bytes(), name.as_bytes());
    // Iterative wildcard match: on a mismatch, go back to the last `*` and let it take one
    // more character.
    let (mut i, mut j) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while j < n.len() {
        if i < t.len() && (t[i] == b'?' || t[i] == n[j]) {
            i += 1;
            j += 1;
        } else if i < t.len() && t[i] == b'*' {
            star = Some((i, j));
            i += 1;
        } else if let Some((si, sj)) = star {
            i = si + 1;
            j = sj + 1;
            star = Some((si, sj + 1));
        } else {
            return false;
        }
    }
    t[i..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512K"), Ok(512 << 10));
        assert_eq!(parse_size("10G"), Ok(10 << 30));
        assert_eq!(parse_size("16TiB"), Ok(16 << 40));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size("64mb"), Ok(64 << 20));
        assert!(parse_size("").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("12X").is_err());
        assert!(parse_size("99999999999P").is_err());
        assert_eq!(format_size(0), "0 B");
        assert_eq!(format_size(3 << 29), "1.5 GiB");
    }
}
