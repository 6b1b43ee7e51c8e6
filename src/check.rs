//! The one comparison every test, `fusedops check` and the benchmark use.
//!
//! An element passes when `|actual - expected| <= abs` or `<= rel * |expected|` (abs-or-rel, as
//! FlashMLA's tests); NaN and infinity positions must agree exactly; optionally the cosine
//! difference `1 - 2·Σxy / Σ(x² + y²)` (DeepGEMM's `calc_diff`) must stay under a bound.

/// Tolerance of a comparison.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct Tolerance {
    pub abs: f64,
    pub rel: f64,
    /// Bound on the cosine difference, if checked.
    pub max_cos_diff: Option<f64>,
}

impl Tolerance {
    pub const fn new(abs: f64, rel: f64) -> Self {
        Tolerance {
            abs,
            rel,
            max_cos_diff: None,
        }
    }

    /// Exact equality (ids, counts, offsets).
    pub const EXACT: Tolerance = Tolerance::new(0.0, 0.0);

    pub const fn with_cos_diff(mut self, bound: f64) -> Self {
        self.max_cos_diff = Some(bound);
        self
    }

    fn allowed(&self, expected: f64) -> f64 {
        self.abs.max(self.rel * expected.abs())
    }
}

/// Result of one comparison.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Comparison {
    pub len: usize,
    pub max_abs: f64,
    /// Largest `|a - e| / |e|` over elements with `e != 0`.
    pub max_rel: f64,
    /// The element furthest outside (or closest to the edge of) its tolerance.
    pub worst_index: Option<usize>,
    pub worst_actual: f64,
    pub worst_expected: f64,
    pub cos_diff: f64,
    /// Elements out of tolerance (finite on both sides).
    pub failures: usize,
    /// Positions where exactly one side is NaN/inf, or the infinities differ.
    pub nonfinite_mismatches: usize,
    pub first_nonfinite_mismatch: Option<usize>,
    /// Set when the lengths differ (then nothing else was compared).
    pub length_mismatch: Option<(usize, usize)>,
    pub tolerance: Tolerance,
    pub pass: bool,
}

/// Compare `actual` against `expected` (any numeric types convertible to f64).
pub fn compare<A, E>(actual: &[A], expected: &[E], tol: Tolerance) -> Comparison
where
    A: Copy + Into<f64>,
    E: Copy + Into<f64>,
{
    let mut c = Comparison {
        len: actual.len(),
        max_abs: 0.0,
        max_rel: 0.0,
        worst_index: None,
        worst_actual: f64::NAN,
        worst_expected: f64::NAN,
        cos_diff: 0.0,
        failures: 0,
        nonfinite_mismatches: 0,
        first_nonfinite_mismatch: None,
        length_mismatch: None,
        tolerance: tol,
        pass: false,
    };
    if actual.len() != expected.len() {
        c.length_mismatch = Some((actual.len(), expected.len()));
        return c;
    }
    let (mut dot, mut norms) = (0.0f64, 0.0f64);
    let mut worst_ratio = -1.0f64;
    for (i, (&a, &e)) in actual.iter().zip(expected).enumerate() {
        let (a, e): (f64, f64) = (a.into(), e.into());
        if !a.is_finite() || !e.is_finite() {
            let same = (a.is_nan() && e.is_nan()) || a == e;
            if !same {
                c.nonfinite_mismatches += 1;
                c.first_nonfinite_mismatch.get_or_insert(i);
            }
            continue;
        }
        let diff = (a - e).abs();
        c.max_abs = c.max_abs.max(diff);
        if e != 0.0 {
            c.max_rel = c.max_rel.max(diff / e.abs());
        }
        let allowed = tol.allowed(e);
        let ratio = if allowed > 0.0 {
            diff / allowed
        } else if diff > 0.0 {
            f64::INFINITY
        } else {
            0.0
        };
        if diff > allowed {
            c.failures += 1;
        }
        if ratio > worst_ratio {
            worst_ratio = ratio;
            c.worst_index = Some(i);
            c.worst_actual = a;
            c.worst_expected = e;
        }
        dot += a * e;
        norms += a * a + e * e;
    }
    c.cos_diff = if norms > 0.0 {
        (1.0 - 2.0 * dot / norms).max(0.0)
    } else {
        0.0
    };
    let cos_ok = tol.max_cos_diff.is_none_or(|bound| c.cos_diff <= bound);
    c.pass = c.failures == 0 && c.nonfinite_mismatches == 0 && cos_ok;
    c
}

impl Comparison {
    /// Merge the results of comparing several outputs: passes only if every part passes.
    pub fn all_pass(parts: &[Comparison]) -> bool {
        parts.iter().all(|c| c.pass)
    }

    /// A short one-line summary, with the worst element's multi-index in `shape`.
    pub fn summary(&self, shape: &[usize]) -> String {
        if let Some((a, e)) = self.length_mismatch {
            return format!("FAIL: {a} values, expected {e}");
        }
        let verdict = if self.pass { "ok" } else { "FAIL" };
        let worst = match self.worst_index {
            Some(i) => format!(
                " worst {:?}: got {:.6e} want {:.6e}",
                unravel(i, shape),
                self.worst_actual,
                self.worst_expected
            ),
            None => String::new(),
        };
        let mut s = format!(
            "{verdict}: max abs {:.3e}, max rel {:.3e}, cos diff {:.2e}{worst}",
            self.max_abs, self.max_rel, self.cos_diff
        );
        if self.failures > 0 {
            s += &format!("; {} of {} out of tolerance", self.failures, self.len);
        }
        if let Some(i) = self.first_nonfinite_mismatch {
            s += &format!(
                "; {} NaN/inf mismatches, first at {:?}",
                self.nonfinite_mismatches,
                unravel(i, shape)
            );
        }
        if let (Some(bound), false) = (self.tolerance.max_cos_diff, self.pass) {
            if self.cos_diff > bound {
                s += &format!("; cos diff above {bound:.1e}");
            }
        }
        s
    }
}

/// The multi-index of flat index `i` in a row-major `shape` (the flat index if the shape is
/// empty or too small).
pub fn unravel(mut i: usize, shape: &[usize]) -> Vec<usize> {
    let total: usize = shape.iter().product();
    if shape.is_empty() || i >= total {
        return vec![i];
    }
    let mut idx = vec![0; shape.len()];
    for (d, &n) in shape.iter().enumerate().rev() {
        idx[d] = i % n;
        i /= n;
    }
    idx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abs_or_rel_passes_either_bound() {
        let tol = Tolerance::new(1e-3, 1e-2);
        assert!(compare(&[1.0005f32], &[1.0f64], tol).pass); // abs
        assert!(compare(&[101.0f32], &[100.0f64], tol).pass); // rel
        let c = compare(&[1.0f32, 2.5], &[1.0f64, 2.0], tol);
        assert!(!c.pass);
        assert_eq!(c.failures, 1);
        assert_eq!(c.worst_index, Some(1));
        assert!((c.max_abs - 0.5).abs() < 1e-12);
    }

    #[test]
    fn nan_positions_must_agree() {
        let tol = Tolerance::new(1e-3, 0.0);
        assert!(compare(&[f32::NAN, 1.0], &[f64::NAN, 1.0], tol).pass);
        let c = compare(&[f32::NAN, 1.0], &[0.0f64, 1.0], tol);
        assert!(!c.pass);
        assert_eq!(c.first_nonfinite_mismatch, Some(0));
        assert!(!compare(&[f32::INFINITY], &[f64::NEG_INFINITY], tol).pass);
        assert!(!compare(&[1.0f32], &[f64::NAN], tol).pass);
    }

    #[test]
    fn cosine_difference_bound() {
        let exact = compare(&[1.0f32, 2.0, 3.0], &[1.0f64, 2.0, 3.0], Tolerance::EXACT);
        assert_eq!(exact.cos_diff, 0.0);
        let tol = Tolerance::new(1.0, 0.0).with_cos_diff(1e-6);
        let c = compare(&[1.0f32, 2.0, 3.5], &[1.0f64, 2.0, 3.0], tol);
        assert!(c.cos_diff > 1e-6 && !c.pass);
    }

    #[test]
    fn length_mismatch_fails() {
        let c = compare(&[1.0f32], &[1.0f64, 2.0], Tolerance::EXACT);
        assert!(!c.pass && c.length_mismatch == Some((1, 2)));
    }

    #[test]
    fn unravel_row_major() {
        assert_eq!(unravel(5, &[2, 3]), vec![1, 2]);
        assert_eq!(unravel(7, &[2, 3]), vec![7]);
    }
}
