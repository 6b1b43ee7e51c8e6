//! The dynamic per-token int8 quantization on the default adapter against its reference, bit for
//! bit: random bit patterns over the whole f32 range (subnormal scales and saturation included),
//! ties to even, zero / NaN / ±inf rows, every input dtype, the registry cases, the named-tensor
//! interface, and every error path (nothing dispatched).

mod common;

use common::gpu;
use fusedops::check::{Tolerance, compare};
use fusedops::error::Error;
use fusedops::ops::quantize::{self, QuantizePlan, reference};
use fusedops::registry::{NamedTensors, Operator, Scale};
use fusedops::tensor::{DType, Tensor};
use rand::Rng;

fn assert_same(got: &quantize::Quantized, want: &quantize::Quantized, what: &str) {
    assert_eq!(got.q.shape(), want.q.shape(), "{what}");
    let q = compare(&got.q.to_f32(), &want.q.to_f32(), Tolerance::EXACT);
    assert!(q.pass, "{what}: q {}", q.summary(got.q.shape()));
    // Scales bit for bit (NaN rows as NaN).
    let bits = |t: &Tensor| -> Vec<u32> {
        t.as_f32()
            .unwrap()
            .iter()
            .map(|v| if v.is_nan() { u32::MAX } else { v.to_bits() })
            .collect()
    };
    assert_eq!(bits(&got.scale), bits(&want.scale), "{what}: scales");
}

#[test]
fn random_bit_patterns_match_the_reference_bit_for_bit() {
    let g = gpu();
    let mut rng = common::rng(15);
    let (m, k) = (384, 12);
    // Each row: random finite bit patterns within a random band of exponents (so that the row
    // mixes magnitudes), the band sometimes at the subnormal end; one row in eight holds tiny
    // subnormals, whose scale has so few bits that values saturate.
    let mut values = Vec::with_capacity(m * k);
    for r in 0..m {
        if r % 8 == 0 {
            let top: u32 = rng.random_range(2..20_000);
            for _ in 0..k {
                let sign = rng.random::<u32>() & 0x8000_0000;
                values.push(f32::from_bits(sign | rng.random_range(0..top)));
            }
            continue;
        }
        let top: u32 = rng.random_range(1..255);
        let width: u32 = rng.random_range(0..30).min(top);
        for _ in 0..k {
            let exp = rng.random_range(top - width..=top).min(254);
            let bits = (rng.random::<u32>() & 0x807f_ffff) | (exp << 23);
            values.push(f32::from_bits(bits));
        }
    }
    let x = Tensor::f32(&[m, k], values).unwrap();
    let got = quantize::quantize(g, &x).unwrap();
    let want = reference::quantize(&x).unwrap();
    assert_same(&got, &want, "random f32 bit patterns");
    // Saturation happened somewhere (subnormal scales), so the test covers it.
    let sat = want
        .q
        .as_i8()
        .unwrap()
        .chunks(k)
        .zip(x.as_f32().unwrap().chunks(k))
        .zip(want.scale.as_f32().unwrap())
        .any(|((q, x), &s)| {
            q.iter()
                .zip(x)
                .any(|(&q, &x)| q.abs() == 127 && (x as f64 / s as f64).abs() > 127.5)
        });
    assert!(sat, "no saturating value in the random rows");
}

#[test]
fn ties_round_to_even_in_every_dtype() {
    let g = gpu();
    // amax = 127 · 2^p: scale 2^p exactly, every value a half-integer multiple of it.
    for (dtype, p) in [(DType::F32, -20), (DType::F16, -4), (DType::BF16, 3)] {
        let unit = 2f32.powi(p);
        let halves: Vec<f32> = (0..64)
            .map(|i| match i {
                0 => 127.0 * unit,
                _ => (i as f32 - 32.5) * unit,
            })
            .collect();
        let x = Tensor::from_f32(&[1, 64], &halves, dtype).unwrap();
        let got = quantize::quantize(g, &x).unwrap();
        assert_eq!(got.scale.as_f32().unwrap(), &[unit], "{dtype}");
        let q = got.q.as_i8().unwrap();
        for (i, &v) in q.iter().enumerate().skip(1) {
            let exact = i as f64 - 32.5;
            let want = exact.round_ties_even();
            assert_eq!(v as f64, want, "{dtype}: {exact} quantized to {v}");
        }
    }
}

#[test]
fn zero_nan_and_inf_rows() {
    let g = gpu();
    let rows = [
        vec![0.0f32; 8],
        vec![-0.0; 8],
        vec![1.0, 2.0, f32::NAN, 4.0, 5.0, 6.0, 7.0, 8.0],
        vec![1.0, f32::INFINITY, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0],
        vec![f32::NEG_INFINITY, -2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0],
        vec![0.5, -1.0, 0.25, 0.0, 0.0, 0.0, 0.0, 1.0],
    ];
    let flat: Vec<f32> = rows.concat();
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let x = Tensor::from_f32(&[rows.len(), 8], &flat, dtype).unwrap();
        let got = quantize::quantize(g, &x).unwrap();
        assert_same(&got, &reference::quantize(&x).unwrap(), &format!("{dtype}"));
        let s = got.scale.as_f32().unwrap();
        assert_eq!(&s[..2], &[0.0, 0.0], "{dtype}: zero rows");
        assert!(
            s[2..5].iter().all(|v| v.is_nan()),
            "{dtype}: non-finite rows"
        );
        assert!(
            got.q.as_i8().unwrap()[..40].iter().all(|&q| q == 0),
            "{dtype}: special rows quantize to 0"
        );
        assert_eq!(
            &got.q.as_i8().unwrap()[40..],
            &[64, -127, 32, 0, 0, 0, 0, 127]
        );
    }
}

#[test]
fn the_device_plan_can_be_recorded_again() {
    let g = gpu();
    let x = Tensor::from_f32(
        &[3, 8],
        &(0..24).map(|i| i as f32 - 11.0).collect::<Vec<_>>(),
        DType::BF16,
    )
    .unwrap();
    let x_dev = g.upload(&x).unwrap();
    let q = g.zeros(&[3, 8], DType::I8).unwrap();
    let scale = g.zeros(&[3], DType::F32).unwrap();
    let plan = QuantizePlan::new(g, &x_dev, &q, &scale).unwrap();
    g.run(|rec| {
        plan.record(rec)?;
        plan.record(rec)
    })
    .unwrap();
    let got = quantize::Quantized {
        q: g.download(&q).unwrap(),
        scale: g.download(&scale).unwrap(),
    };
    assert_same(&got, &reference::quantize(&x).unwrap(), "recorded twice");
}

#[test]
fn registry_cases_match_the_reference() {
    let g = gpu();
    let op = &quantize::OPERATOR;
    let cases = op.cases(Scale::Ci, g);
    assert!(cases.len() >= 4);
    for case in cases {
        let name = case.info().name;
        let prepared = case.prepare(g).unwrap();
        g.run(|rec| prepared.record(rec)).unwrap();
        let checks = prepared.verify().unwrap();
        assert_eq!(checks.len(), 2, "{name}");
        for c in checks {
            assert!(
                c.comparison.pass,
                "{name}: {}",
                c.comparison.summary(&c.shape)
            );
        }
    }
    assert!(!op.paths(g).is_empty());
}

#[test]
fn named_tensor_interface_matches_its_reference() {
    let g = gpu();
    let op = &quantize::OPERATOR;
    let mut named = NamedTensors::new();
    let x: Vec<f32> = (0..40).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
    named.insert(
        "x".into(),
        Tensor::from_f32(&[5, 8], &x, DType::F16).unwrap(),
    );
    let params = serde_json::Value::Null;
    let got = op.run_named(g, &named, &params).unwrap();
    let want = op.reference_named(&named, &params).unwrap();
    assert_eq!(got, want);
    assert_eq!(got["q"].dtype(), DType::I8);
    let bad = serde_json::json!({"scale": 2});
    assert!(matches!(
        op.run_named(g, &named, &bad),
        Err(Error::Format { .. })
    ));
    named.insert("x".into(), Tensor::i8(&[5, 8], vec![1; 40]).unwrap());
    assert!(matches!(
        op.run_named(g, &named, &params),
        Err(Error::Unsupported { .. })
    ));
    assert!(op.reference_named(&named, &params).is_err());
}

#[test]
fn bad_inputs_are_typed_errors_and_dispatch_nothing() {
    let g = gpu();
    let x = g
        .upload(&Tensor::from_f32(&[2, 8], &[1.0; 16], DType::BF16).unwrap())
        .unwrap();
    let q = g
        .upload(&Tensor::i8(&[2, 8], vec![9; 16]).unwrap())
        .unwrap();
    let scale = g.upload(&Tensor::f32(&[2], vec![7.0; 2]).unwrap()).unwrap();
    let untouched = |what: &str| {
        assert_eq!(g.download(&q).unwrap().as_i8().unwrap(), &[9; 16], "{what}");
        assert_eq!(
            g.download(&scale).unwrap().as_f32().unwrap(),
            &[7.0; 2],
            "{what}"
        );
    };
    let named = |e: Error, word: &str| {
        assert!(e.to_string().contains(word), "{e} does not name {word}");
        e
    };
    // int8 where a float x is expected.
    let x_i8 = g
        .upload(&Tensor::i8(&[2, 8], vec![1; 16]).unwrap())
        .unwrap();
    let e = named(QuantizePlan::new(g, &x_i8, &q, &scale).unwrap_err(), "x");
    assert!(matches!(e, Error::Unsupported { .. }), "{e}");
    // A float q where int8 is expected.
    let q_f16 = g.zeros(&[2, 8], DType::F16).unwrap();
    let e = named(QuantizePlan::new(g, &x, &q_f16, &scale).unwrap_err(), "q");
    assert!(matches!(e, Error::Shape { .. }), "{e}");
    // Scale of the wrong length or dtype.
    let short = g.zeros(&[1], DType::F32).unwrap();
    let e = named(QuantizePlan::new(g, &x, &q, &short).unwrap_err(), "scale");
    assert!(matches!(e, Error::Shape { .. }), "{e}");
    let ints = g.zeros(&[2], DType::I32).unwrap();
    assert!(QuantizePlan::new(g, &x, &q, &ints).is_err());
    // Rows that do not hold whole words; a 1-D x.
    let odd = g
        .upload(&Tensor::from_f32(&[2, 6], &[1.0; 12], DType::F32).unwrap())
        .unwrap();
    let e = named(
        QuantizePlan::new(g, &odd, &q, &scale).unwrap_err(),
        "multiple of 4",
    );
    assert!(matches!(e, Error::Unsupported { .. }), "{e}");
    let flat = g
        .upload(&Tensor::from_f32(&[16], &[1.0; 16], DType::F32).unwrap())
        .unwrap();
    assert!(matches!(
        QuantizePlan::new(g, &flat, &q, &scale),
        Err(Error::Shape { .. })
    ));
    untouched("after the refused plans");
    // The host entry point refuses before uploading.
    let host_odd = Tensor::from_f32(&[1, 3], &[1.0; 3], DType::F32).unwrap();
    assert!(quantize::quantize(g, &host_odd).is_err());
    assert!(reference::quantize(&host_odd).is_err());
}
