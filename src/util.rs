//! Small helpers every floor of the crate may use and that use nothing above [`crate::tensor`]:
//! the UTC clock of reports and caches, seeded hashing for reproducible inputs (the same value
//! for the same seed and index on any machine and thread count), and plain text tables.

use half::{bf16, f16};
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor, TensorData};

/// The current UTC time as `YYYY-MM-DD HH:MM:SS` (no date crate needed for this).
pub fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// SplitMix64 of (seed, index): 64 well-mixed bits, the same on every machine.
pub fn mix(seed: u64, i: u64) -> u64 {
    let mut z = seed
        .wrapping_mul(0xd1b5_4a32_d192_ed03)
        .wrapping_add(i.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A deterministic value in [-1, 1) for (seed, index): 24 bits of [`mix`], exact in f32.
pub fn unit(seed: u64, i: u64) -> f32 {
    (mix(seed, i) >> 40) as f32 / (1u64 << 23) as f32 - 1.0
}

/// Fill `out` with `value(i)` on every core (bench inputs reach hundreds of megabytes).
pub fn fill_parallel<T: Send>(out: &mut [T], value: impl Fn(usize) -> T + Sync) {
    out.par_iter_mut()
        .with_min_len(1 << 14)
        .enumerate()
        .for_each(|(i, slot)| *slot = value(i));
}

/// A float tensor of `dtype` holding `value(i)` rounded to it, made on every core.
pub fn synthetic(
    shape: &[usize],
    dtype: DType,
    value: impl Fn(usize) -> f32 + Sync,
) -> Result<Tensor> {
    let len: usize = shape.iter().product();
    let data = match dtype {
        DType::BF16 => {
            let mut v = vec![bf16::ZERO; len];
            fill_parallel(&mut v, |i| bf16::from_f32(value(i)));
            TensorData::BF16(v)
        }
        DType::F16 => {
            let mut v = vec![f16::ZERO; len];
            fill_parallel(&mut v, |i| f16::from_f32(value(i)));
            TensorData::F16(v)
        }
        DType::F32 => {
            let mut v = vec![0.0f32; len];
            fill_parallel(&mut v, &value);
            TensorData::F32(v)
        }
        other => {
            return Err(Error::unsupported(
                "synthetic inputs",
                format!("{other} values"),
            ));
        }
    };
    Tensor::new(shape, data)
}

/// Hashed values `unit(seed, i) * scale`, uniform in [-scale, scale).
pub fn hashed(shape: &[usize], dtype: DType, seed: u64, scale: f32) -> Result<Tensor> {
    synthetic(shape, dtype, |i| unit(seed, i as u64) * scale)
}

/// Format a number with engineering-friendly precision for tables.
pub fn fmt_num(x: Option<f64>) -> String {
    match x {
        None => "-".to_string(),
        Some(v) if v.abs() >= 100.0 => format!("{v:.0}"),
        Some(v) if v.abs() >= 10.0 => format!("{v:.1}"),
        Some(v) if v.abs() >= 0.1 || v == 0.0 => format!("{v:.2}"),
        Some(v) => format!("{v:.2e}"),
    }
}

/// A plain text table with aligned columns.
pub fn text_table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| -> String {
        let mut s = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i > 0 {
                s.push_str("  ");
            }
            s.push_str(cell);
            s.push_str(&" ".repeat(w - cell.chars().count()));
        }
        s.trim_end().to_string()
    };
    let mut out = line(header.iter().map(|h| h.to_string()).collect());
    out.push('\n');
    out.push_str(&line(widths.iter().map(|w| "-".repeat(*w)).collect()));
    out.push('\n');
    for row in rows {
        out.push_str(&line(row.clone()));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_date_is_well_formed() {
        let now = utc_now();
        assert_eq!(now.len(), 19);
        assert!(now.starts_with("20"));
    }

    #[test]
    fn table_aligns_columns() {
        let t = text_table(&["a", "bb"], &[vec!["xxx".into(), "y".into()]]);
        assert_eq!(t, "a    bb\n---  --\nxxx  y\n");
    }

    #[test]
    fn hashed_values_stay_in_range() {
        let t = hashed(&[1000], DType::F32, 9, 1.0).unwrap();
        let v = t.to_f32();
        assert!(v.iter().all(|x| (-1.0..1.0).contains(x)));
        let mean: f32 = v.iter().sum::<f32>() / 1000.0;
        assert!(mean.abs() < 0.1, "mean {mean}");
        assert_eq!(v[17], unit(9, 17), "value i is unit(seed, i)");
    }

    #[test]
    fn synthetic_refuses_integer_dtypes() {
        assert!(synthetic(&[4], DType::I32, |_| 1.0).is_err());
    }
}
